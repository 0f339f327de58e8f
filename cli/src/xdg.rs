//! A private `XDG_RUNTIME_DIR` for GPU initialisation (cargo feature `wgpu`).
//!
//! Why: when the variable is unset or not an absolute path to a directory (sudo, cron, ssh
//! without a login session, containers, CI), Mesa's Vulkan drivers print "error:
//! XDG_RUNTIME_DIR is invalid or not set in the environment." on stderr as wgpu probes for a
//! Wayland display. meo draws nothing, so an empty directory of its own serves as well and
//! keeps stderr for meo's own messages. A usable value is left alone.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The variable.
pub const VAR: &str = "XDG_RUNTIME_DIR";

/// Whether `value` is a usable `XDG_RUNTIME_DIR`: an absolute path to an existing directory.
pub fn usable(value: Option<&OsStr>) -> bool {
    value.map(Path::new).is_some_and(|p| p.is_absolute() && p.is_dir())
}

/// A directory created for this process (mode 0700), removed when dropped.
#[derive(Debug)]
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// Creates a new directory `meo-runtime-PID-N` in `base`, readable by this user only.
    ///
    /// # Errors
    /// No new directory could be created there.
    pub fn create(base: &Path) -> std::io::Result<Self> {
        let mut last = None;
        // A name taken by someone else is skipped, never reused: the directory must be ours.
        for n in 0..16 {
            let path = base.join(format!("meo-runtime-{}-{n}", std::process::id()));
            let mut b = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            match b.create(&path) {
                Ok(()) => return Ok(Self(path)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no name left")))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Points `XDG_RUNTIME_DIR` at a new private directory (see the module docs) unless it is
/// usable already. Keep the returned guard alive while the GPU may be used; it removes the
/// directory. `None` when nothing was changed (a usable value, or no directory could be
/// created: then the drivers' message may appear, nothing else changes).
///
/// # Safety
/// Sets an environment variable: no other thread may exist (call it first thing in `main`).
pub unsafe fn ensure_runtime_dir() -> Option<PrivateDir> {
    if usable(std::env::var_os(VAR).as_deref()) {
        return None;
    }
    let dir = PrivateDir::create(&std::env::temp_dir()).ok()?;
    // SAFETY: the caller guarantees that no other thread exists, so none reads the
    // environment concurrently.
    unsafe { std::env::set_var(VAR, dir.path()) };
    Some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_existing_directories_are_usable() {
        let tmp = std::env::temp_dir();
        assert!(usable(Some(tmp.as_os_str())));
        assert!(!usable(None));
        assert!(!usable(Some(OsStr::new(""))));
        assert!(!usable(Some(OsStr::new("relative/dir"))));
        assert!(!usable(Some(tmp.join("meo-no-such-dir-for-xdg-test").as_os_str())));
        let file = tmp.join(format!("meo-xdg-file-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        assert!(!usable(Some(file.as_os_str())));
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn private_dir_is_ours_and_removed() {
        let a = PrivateDir::create(&std::env::temp_dir()).unwrap();
        let b = PrivateDir::create(&std::env::temp_dir()).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(usable(Some(a.path().as_os_str())));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777, 0o700);
        }
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists());
    }
}
