//! A per-session thread pool (feature `std`): `threads - 1` workers plus the calling thread.
//!
//! Why not rayon: a decode step is ~50 small fork/joins (six per layer, tens of µs each).
//! Rayon's `install` from a thread outside the pool parks the caller on a latch and wakes it
//! again per fork/join, and the caller does no work meanwhile, so with 2 cores and 2 workers
//! three threads compete and every join pays two futex round trips. Here the caller takes
//! chunks like a worker and workers spin briefly between jobs before they sleep, as
//! llama.cpp's pool does; a fork/join costs a few atomic operations while work keeps coming.
//!
//! Protocol: one job at a time. `state` packs (epoch, next chunk, chunk count); a chunk is
//! claimed by a compare-exchange that only succeeds for the current epoch while chunks are
//! left, so the job description is read only by claimants, and the caller, which returns
//! only when every chunk is done, cannot overwrite it under them.

use super::Parallel;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Threads to use when the caller does not say: `std::thread::available_parallelism`.
///
/// That is the number of *logical* CPUs the process may use (it honours affinity masks and
/// cgroup quotas); on SMT machines it is twice the physical cores, which for these
/// memory-bound kernels costs little. Pass `--threads` to choose.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Bits of `state` for the chunk index and the chunk count each; the epoch takes the rest.
const IDX_BITS: u32 = 16;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// Jobs with more chunks than this run on the calling thread alone.
const MAX_CHUNKS: usize = IDX_MASK as usize;
/// A worker waiting for the next job spins this many times, then yields its core this many
/// times (≈ 1 ms in all on an idle core), then sleeps until a job is published.
const SPIN: u32 = 1 << 11;
const YIELDS: u32 = 1 << 11;

fn pack(epoch: u64, next: usize, n: usize) -> u64 {
    (epoch << (2 * IDX_BITS)) | ((next as u64) << IDX_BITS) | n as u64
}
fn unpack(s: u64) -> (u64, usize, usize) {
    (s >> (2 * IDX_BITS), ((s >> IDX_BITS) & IDX_MASK) as usize, (s & IDX_MASK) as usize)
}

type JobFn<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;

/// The current job: the output buffer and the function, lifetimes erased.
#[derive(Clone, Copy)]
struct Job {
    out: *mut f32,
    len: usize,
    chunk: usize,
    f: *const JobFn<'static>,
}

struct Shared {
    state: AtomicU64,
    job: UnsafeCell<Job>,
    done: AtomicUsize,
    panicked: AtomicBool,
    quit: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread that owns the pool, between jobs, when no claim
// can succeed (see the module docs); it is read only after a successful claim. The raw
// pointers in it point to data the publishing call keeps alive until every chunk is done.
unsafe impl Sync for Shared {}
// SAFETY: as above; the pointers are only dereferenced under that protocol.
unsafe impl Send for Shared {}

impl Shared {
    /// Claims and runs chunks of the current job until none are left; true if it ran any.
    fn work(&self) -> bool {
        let mut ran = false;
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (epoch, next, n) = unpack(s);
            if next >= n {
                return ran;
            }
            match self.state.compare_exchange_weak(s, pack(epoch, next + 1, n), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // SAFETY: the claim succeeded, so the job of `epoch` is live and stays so
                    // until this chunk is counted done (the publisher waits for that).
                    let job = unsafe { *self.job.get() };
                    let start = next * job.chunk;
                    let len = job.chunk.min(job.len - start);
                    // SAFETY: chunk `next` is claimed once, so this slice aliases no other
                    // live slice; it lies inside `out[..len]`, borrowed mutably by the publisher.
                    let part = unsafe { std::slice::from_raw_parts_mut(job.out.add(start), len) };
                    // SAFETY: `f` outlives the job (same argument as for `job`).
                    let f = unsafe { &*job.f };
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(next, part))).is_err() {
                        self.panicked.store(true, Ordering::Relaxed);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    ran = true;
                    s = self.state.load(Ordering::Acquire);
                }
                Err(now) => s = now,
            }
        }
    }
}

fn worker(sh: &Shared) {
    let mut idle = 0u32;
    while !sh.quit.load(Ordering::Acquire) {
        if sh.work() {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < SPIN {
            std::hint::spin_loop();
            continue;
        }
        if idle < SPIN + YIELDS {
            // Polls that give the core away when another thread wants it (a busy machine,
            // or sessions side by side in tests) and cost a system call when none does.
            std::thread::yield_now();
            continue;
        }
        // Sleep until a job is published (the publisher reads `sleepers` after it publishes,
        // and this re-checks the state after counting itself: one of the two sees the other).
        let guard = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
        sh.sleepers.fetch_add(1, Ordering::SeqCst);
        let (_, next, n) = unpack(sh.state.load(Ordering::SeqCst));
        if next >= n && !sh.quit.load(Ordering::SeqCst) {
            drop(sh.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
        } else {
            drop(guard);
        }
        sh.sleepers.fetch_sub(1, Ordering::SeqCst);
        idle = 0;
    }
}

/// A thread pool owned by one session: `threads - 1` workers; the thread that calls
/// [`Parallel::for_each_chunk`] works too.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    /// Set while a job is being published and run: `for_each_chunk` takes `&self`, so a
    /// second caller (another thread, or a nested call from inside a chunk) runs serially.
    busy: AtomicBool,
}

impl core::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ThreadPool").field("threads", &self.threads).finish()
    }
}

impl ThreadPool {
    /// Starts `threads - 1` worker threads.
    ///
    /// # Errors
    /// The OS refused to start a thread.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let noop: &'static JobFn<'static> = &|_, _| {};
        let shared = Arc::new(Shared {
            state: AtomicU64::new(pack(0, 0, 0)),
            job: UnsafeCell::new(Job { out: core::ptr::null_mut(), len: 0, chunk: 1, f: noop }),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Self { shared, workers: Vec::new(), threads, busy: AtomicBool::new(false) };
        for i in 1..threads {
            let sh = Arc::clone(&pool.shared);
            // On error `pool` drops here and stops the workers already started.
            pool.workers.push(std::thread::Builder::new().name(format!("meo-worker-{i}")).spawn(move || worker(&sh))?);
        }
        Ok(pool)
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Parallel for ThreadPool {
    fn threads(&self) -> usize {
        self.threads
    }
    fn for_each_chunk(&self, out: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        let chunk = chunk.max(1);
        let n = out.len().div_ceil(chunk);
        if n <= 1 || self.workers.is_empty() || n > MAX_CHUNKS || self.busy.swap(true, Ordering::Acquire) {
            for (i, c) in out.chunks_mut(chunk).enumerate() {
                f(i, c);
            }
            return;
        }
        let sh = &*self.shared;
        // SAFETY: the previous job is finished (every chunk done, no claim can succeed), so
        // nothing reads `job` now. The lifetime erasure of `f` and `out` holds because this
        // call returns only after every chunk is done.
        unsafe {
            let f: *const JobFn<'_> = f;
            let f = core::mem::transmute::<*const JobFn<'_>, *const JobFn<'static>>(f);
            *sh.job.get() = Job { out: out.as_mut_ptr(), len: out.len(), chunk, f };
        }
        sh.done.store(0, Ordering::Relaxed);
        // The epoch only has to differ from the last one for compare-exchange to tell jobs
        // apart; a wrap after 2^24 jobs is harmless because no claim of an old job is pending.
        let (last, _, _) = unpack(sh.state.load(Ordering::Relaxed));
        let epoch = (last + 1) & ((1 << (64 - 2 * IDX_BITS)) - 1);
        sh.state.store(pack(epoch, 0, n), Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        sh.work();
        let mut spins = 0u32;
        while sh.done.load(Ordering::Acquire) < n {
            // A worker may be descheduled mid-chunk on a busy machine: stop burning its core.
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.busy.store(false, Ordering::Release);
        if sh.panicked.swap(false, Ordering::Relaxed) {
            panic!("a worker thread panicked in a kernel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once() {
        for threads in [1, 2, 3, 5] {
            let p = ThreadPool::new(threads).unwrap();
            for round in 0..200 {
                let mut v = vec![0.0f32; 103 + round];
                p.for_each_chunk(&mut v, 10, &|i, c| c.iter_mut().for_each(|x| *x += i as f32 + 1.0));
                for (j, x) in v.iter().enumerate() {
                    assert_eq!(*x, (j / 10) as f32 + 1.0);
                }
            }
        }
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let p = ThreadPool::new(2).unwrap();
        let mut v = vec![0.0f32; 64];
        p.for_each_chunk(&mut v, 8, &|i, c| c.fill(i as f32));
        std::thread::sleep(std::time::Duration::from_millis(50));
        let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
        p.for_each_chunk(&mut v, 1, &|i, c| {
            seen.lock().unwrap().insert(i);
            c[0] = 2.0 * i as f32;
        });
        assert_eq!(seen.into_inner().unwrap().len(), 64);
        assert!(v.iter().enumerate().all(|(i, x)| *x == 2.0 * i as f32));
    }
}
