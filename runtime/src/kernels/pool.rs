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

/// Threads to use when the caller does not say: one per physical core the process may use.
///
/// Why physical cores: two SMT threads of a core share its load and FMA units, so a second
/// thread per core adds little to these kernels, while its workers spin between jobs and
/// take cycles from their siblings (llama.cpp defaults to physical cores for the same
/// reason). On Linux and Android the CPUs of the process's affinity mask
/// (`Cpus_allowed_list` in `/proc/self/status`) are grouped by core
/// (`/sys/devices/system/cpu/cpuN/topology/core_cpus_list`, or `thread_siblings_list` on
/// older kernels), capped at `std::thread::available_parallelism` (which also honours
/// cgroup CPU quotas). Elsewhere, or when that information is unreadable, it is
/// `available_parallelism`: the logical CPUs. Pass `--threads` to choose.
pub fn default_threads() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let allowed = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
            let line = s.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
            topology::parse_cpu_list(line)
        });
        if let Some(cores) =
            allowed.and_then(|a| topology::physical_cores(std::path::Path::new("/sys/devices/system/cpu"), &a))
        {
            return cores.clamp(1, logical);
        }
    }
    logical
}

/// Physical cores from Linux's CPU topology files (see [`default_threads`]).
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
mod topology {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// CPUs this many or more are not believed (a corrupt list, not a machine).
    const MAX_CPU: usize = 1 << 16;

    /// A kernel CPU list (`0-3,8,10-11`) as CPU numbers; `None` if it is malformed.
    pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
        let mut cpus = Vec::new();
        for part in s.trim().split(',').filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if a > b || b >= MAX_CPU {
                return None;
            }
            cpus.extend(a..=b);
        }
        Some(cpus)
    }

    /// Distinct cores among `cpus`, read from `<sys_cpu>/cpuN/topology/`. CPUs without a
    /// topology directory (not present or offline; the affinity list may name them) are
    /// skipped; `None` when no CPU has one.
    pub fn physical_cores(sys_cpu: &Path, cpus: &[usize]) -> Option<usize> {
        let mut cores = BTreeSet::new();
        for cpu in cpus {
            let dir = sys_cpu.join(format!("cpu{cpu}/topology"));
            // Every SMT sibling of a core reads the same list: it names the core.
            let siblings = ["core_cpus_list", "thread_siblings_list"]
                .iter()
                .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
                .and_then(|s| parse_cpu_list(&s));
            if let Some(s) = siblings.filter(|s| !s.is_empty()) {
                cores.insert(s);
            }
        }
        (!cores.is_empty()).then_some(cores.len())
    }
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
    fn cpu_lists_parse() {
        assert_eq!(topology::parse_cpu_list("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(topology::parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(topology::parse_cpu_list(""), Some(vec![]));
        assert_eq!(topology::parse_cpu_list("3-1"), None);
        assert_eq!(topology::parse_cpu_list("x"), None);
        assert_eq!(topology::parse_cpu_list("0-99999999"), None);
    }

    /// A fake `/sys/devices/system/cpu`: 8 logical CPUs, 2 SMT threads per core (siblings
    /// `n` and `n + 4`, as Linux numbers them on x86), CPU 7 offline (no topology directory);
    /// older kernels' `thread_siblings_list` only for CPU 3.
    #[test]
    fn physical_cores_count_smt_siblings_once() {
        let root = std::env::temp_dir().join(format!("meo-topology-{}", std::process::id()));
        for cpu in 0..7 {
            let dir = root.join(format!("cpu{cpu}/topology"));
            std::fs::create_dir_all(&dir).unwrap();
            let core = cpu % 4;
            let file = if cpu == 3 { "thread_siblings_list" } else { "core_cpus_list" };
            std::fs::write(dir.join(file), format!("{core},{}\n", core + 4)).unwrap();
        }
        let cores = |cpus: &[usize]| topology::physical_cores(&root, cpus);
        assert_eq!(cores(&(0..8).collect::<Vec<_>>()), Some(4));
        // An affinity mask of one thread per core, of both threads of two cores, of CPUs that
        // do not exist.
        assert_eq!(cores(&[0, 1, 2, 3]), Some(4));
        assert_eq!(cores(&[0, 4, 1, 5]), Some(2));
        assert_eq!(cores(&[7, 100]), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn default_threads_is_at_most_the_logical_cpus() {
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!((1..=logical).contains(&default_threads()));
    }

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
