//! A per-session thread pool (feature `std`), on rayon.

use super::Parallel;
use rayon::prelude::*;

/// Threads to use when the caller does not say: `std::thread::available_parallelism`.
///
/// That is the number of *logical* CPUs the process may use (it honours affinity masks and
/// cgroup quotas); on SMT machines it is twice the physical cores, which for these
/// memory-bound kernels costs little. Pass `--threads` to choose.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A thread pool owned by one session.
#[derive(Debug)]
pub struct ThreadPool {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl ThreadPool {
    /// Starts `threads` worker threads.
    ///
    /// # Errors
    /// The OS refused to start a thread.
    pub fn new(threads: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let threads = threads.max(1);
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(|i| format!("meo-worker-{i}")).build()?;
        Ok(Self { pool, threads })
    }
}

impl Parallel for ThreadPool {
    fn threads(&self) -> usize {
        self.threads
    }
    fn for_each_chunk(&self, out: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        let chunk = chunk.max(1);
        if out.len() <= chunk {
            f(0, out);
            return;
        }
        self.pool.install(|| out.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once() {
        let p = ThreadPool::new(3).unwrap();
        let mut v = vec![0.0f32; 103];
        p.for_each_chunk(&mut v, 10, &|i, c| c.iter_mut().for_each(|x| *x += i as f32 + 1.0));
        for (j, x) in v.iter().enumerate() {
            assert_eq!(*x, (j / 10) as f32 + 1.0);
        }
    }
}
