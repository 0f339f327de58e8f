//! Surviving a model file that is truncated or rewritten in place while mapped (feature
//! `std`; Unix).
//!
//! Reading a page of a mapping past the end of its (now shorter) file raises `SIGBUS`, whose
//! default action kills the process. Safe Rust cannot unwind out of a signal handler, so the
//! guard recovers the other way: [`install`] sets a process-wide `SIGBUS` handler which, when
//! the faulting address lies inside a mapping meo registered (every [`Mapped`](crate::file::Mapped)
//! and fd-opened model registers itself), maps one zero-filled anonymous page over the
//! faulting page (`mmap(MAP_FIXED | MAP_ANONYMOUS)`), marks that mapping *changed* and
//! returns: the read resumes and sees zeros. Sessions check the mark after every forward call
//! and fail with [`ForwardError::FileChanged`](crate::ForwardError::FileChanged) instead of
//! returning results computed from those zeros.
//!
//! A `SIGBUS` for any other address (or one sent by `kill`) goes to the handler that was
//! installed before (Rust's own stack-overflow handler, an app's crash reporter), or, if that
//! was the default action, restores the default action so the signal kills the process as it
//! would have without the guard.
//!
//! The guard is opt-in because a signal handler is process-wide state an app may manage
//! itself. It covers at most [`MAX_MAPPINGS`] live mappings at once; a mapping opened while
//! all slots are taken is not covered (a truncation under it still kills the process).

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Most mappings the guard covers at once.
pub const MAX_MAPPINGS: usize = 256;

/// One registered mapping: `[start, start + len)`. `len == 0` = free (or being set up).
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    changed: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Self { start: AtomicUsize::new(0), len: AtomicUsize::new(0), changed: AtomicBool::new(false) }
    }
}

/// Fixed-size and lock-free: the signal handler may not lock or allocate.
static SLOTS: [Slot; MAX_MAPPINGS] = [const { Slot::new() }; MAX_MAPPINGS];
/// Page size, read by the handler (which must not call `sysconf`'s lazy initialisation).
static PAGE: AtomicUsize = AtomicUsize::new(0);
/// The `SIGBUS` action in place before [`install`].
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Why the guard could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the SIGBUS handler: {0}")]
pub struct GuardError(std::io::Error);

/// Installs the `SIGBUS` handler described in the module docs (once per process; later calls
/// do nothing). Call it before opening models, at start-up, from one thread.
///
/// # Errors
/// `sigaction` fails.
pub fn install() -> Result<(), GuardError> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if *done {
        return Ok(());
    }
    PAGE.store(crate::residency::page_size(), Ordering::Release);
    // SAFETY: a zeroed `sigaction` is a valid value of this plain C struct; every field we rely
    // on is set below.
    let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
    act.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `act.sa_mask` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; the handler only touches the lock-free
    // statics above and async-signal-safe system calls.
    if unsafe { libc::sigaction(libc::SIGBUS, &act, &mut old) } != 0 {
        return Err(GuardError(std::io::Error::last_os_error()));
    }
    let _ = PREVIOUS.set(old);
    *done = true;
    Ok(())
}

/// Whether [`install`] has run in this process.
pub fn installed() -> bool {
    PREVIOUS.get().is_some()
}

/// Whether the guard has replaced a page of a registered mapping overlapping `bytes` (its file
/// changed on disk while mapped).
pub fn changed(bytes: &[u8]) -> bool {
    let (lo, hi) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
    SLOTS.iter().any(|s| {
        let len = s.len.load(Ordering::Acquire);
        let start = s.start.load(Ordering::Acquire);
        len != 0 && start < hi && lo < start + len && s.changed.load(Ordering::Acquire)
    })
}

/// A mapping's entry in the guard's table; dropping it removes the entry (drop it before the
/// mapping is unmapped).
#[derive(Debug)]
pub struct Registration(Option<usize>);

impl Registration {
    /// Registers `bytes`, the whole of a live read-only file mapping. `Registration(None)` if
    /// every slot is taken.
    pub fn new(bytes: &[u8]) -> Self {
        let (start, len) = (bytes.as_ptr() as usize, bytes.len());
        if len == 0 {
            return Self(None);
        }
        for (i, s) in SLOTS.iter().enumerate() {
            if s.start.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                s.changed.store(false, Ordering::Release);
                // Published last: the handler and `changed` ignore a slot whose len is 0.
                s.len.store(len, Ordering::Release);
                return Self(Some(i));
            }
        }
        Self(None)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            SLOTS[i].len.store(0, Ordering::Release);
            SLOTS[i].start.store(0, Ordering::Release);
        }
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // si_code > 0: raised by the kernel for a fault, so si_addr is the faulting address (for
    // kill/tgkill the same bytes hold a pid and uid).
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let fault = unsafe { (*info).si_code > 0 }.then(|| unsafe { (*info).si_addr() } as usize);
    if let Some(addr) = fault
        && recover(addr)
    {
        return;
    }
    chain(sig, info, ctx);
}

/// Maps a zero page over `addr` if it lies in a registered mapping; true on success.
fn recover(addr: usize) -> bool {
    let page = PAGE.load(Ordering::Acquire);
    if page == 0 {
        return false;
    }
    for s in &SLOTS {
        let len = s.len.load(Ordering::Acquire);
        let start = s.start.load(Ordering::Acquire);
        if len == 0 || addr < start || addr >= start + len {
            continue;
        }
        let at = addr & !(page - 1);
        // SAFETY: `at` is the page holding the faulting address, inside a registered mapping.
        // That mapping is alive: the thread that faulted is reading it through a borrow of
        // its owner, which unregisters before unmapping. MAP_FIXED replaces exactly that
        // page of our own read-only file mapping with a private read-only zero page; nothing
        // else is mapped there, and no Rust reference can observe a write (there is none:
        // the bytes were being read, and what a shrunken file's bytes are is unspecified).
        // mmap is a plain system call, safe to make from a signal handler on Linux and BSDs.
        let r = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return false;
        }
        s.changed.store(true, Ordering::Release);
        return true;
    }
    false
}

/// Passes the signal to the previous handler, or restores the default action so that
/// returning re-runs the faulting access and the signal kills the process as usual.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get();
    let handler = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: a zeroed sigaction with SIG_DFL (0) is the default action; sigaction is
        // async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = core::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, core::ptr::null_mut());
        }
        if fault_addr_missing(info) {
            // A signal sent by kill(): returning would not re-raise it, so raise it again.
            // SAFETY: raise is async-signal-safe.
            unsafe { libc::raise(sig) };
        }
        return;
    }
    let flags = prev.map_or(0, |p| p.sa_flags);
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous action was installed with SA_SIGINFO, so its handler has this
        // signature; we pass on exactly what the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { core::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { core::mem::transmute(handler) };
        f(sig);
    }
}

/// True when the signal was not raised by a fault (sent with kill/raise).
fn fault_addr_missing(info: *mut libc::siginfo_t) -> bool {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    unsafe { (*info).si_code <= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs test `name` of this binary again in a child process with `MEO_GUARD_CHILD=1`, and
    /// returns its exit status: a child killed by a signal shows as one.
    fn in_child(name: &str) -> std::process::Output {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env("MEO_GUARD_CHILD", "1")
            .output()
            .unwrap()
    }

    fn is_child() -> bool {
        std::env::var_os("MEO_GUARD_CHILD").is_some()
    }

    fn assert_clean(o: &std::process::Output) {
        use std::os::unix::process::ExitStatusExt;
        let err = String::from_utf8_lossy(&o.stderr);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.signal(), None, "the child died by signal\n{out}\n{err}");
        assert!(o.status.success(), "{}\n{out}\n{err}", o.status);
        assert!(out.contains("1 passed"), "the child ran no test:\n{out}");
    }

    #[test]
    fn truncation_under_a_live_mapping_reads_zeros_and_is_flagged() {
        if !is_child() {
            return assert_clean(&in_child("guard::tests::truncation_under_a_live_mapping_reads_zeros_and_is_flagged"));
        }
        let dir = tempfile_dir("trunc");
        let p = dir.join("f.bin");
        let ps = crate::residency::page_size();
        std::fs::write(&p, vec![7u8; 8 * ps]).unwrap();
        let m = crate::file::Mapped::open(&p).unwrap();
        install().unwrap();
        assert_eq!(m.bytes()[5 * ps], 7);
        assert!(!m.changed());
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(ps as u64).unwrap();
        // Without the guard this read kills the process with SIGBUS.
        let v = std::hint::black_box(&m.bytes()[5 * ps..6 * ps]).iter().map(|&b| u32::from(b)).sum::<u32>();
        assert_eq!(v, 0);
        assert!(m.changed());
        assert!(changed(&m.bytes()[5 * ps..]));
        assert_eq!(m.bytes()[0], 7, "pages still inside the file keep their bytes");
        drop(m);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    static PREV_CALLED: AtomicBool = AtomicBool::new(false);

    extern "C" fn app_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        PREV_CALLED.store(true, Ordering::SeqCst);
    }

    #[test]
    fn other_sigbus_goes_to_the_previous_handler() {
        if !is_child() {
            return assert_clean(&in_child("guard::tests::other_sigbus_goes_to_the_previous_handler"));
        }
        // SAFETY: installs a handler that only stores to an atomic.
        unsafe {
            let mut act: libc::sigaction = core::mem::zeroed();
            act.sa_sigaction = app_handler as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGBUS, &act, core::ptr::null_mut()), 0);
        }
        install().unwrap();
        // SAFETY: raise is always safe to call; the handler chain returns.
        unsafe { libc::raise(libc::SIGBUS) };
        assert!(PREV_CALLED.load(Ordering::SeqCst));
    }

    fn tempfile_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("meo-guard-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
