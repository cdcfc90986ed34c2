//! The disk guard (`queue.min_free_space`): free space on the filesystem of the spool or
//! the quarantine, asked of the kernel (statvfs) at most once a second, so that checking
//! it on every MAIL, RCPT or quarantine write costs nothing.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one statvfs answer is used.
const FRESH: Duration = Duration::from_secs(1);

/// Free space under one directory, cached for a second.
#[derive(Debug)]
pub struct DiskGuard {
    path: PathBuf,
    last: Mutex<Option<(Instant, u64)>>,
}

impl DiskGuard {
    pub fn new(path: &Path) -> DiskGuard {
        DiskGuard {
            path: path.to_path_buf(),
            last: Mutex::new(None),
        }
    }

    /// Bytes available to unprivileged writers (what is left once root's reserve is
    /// set aside), at most a second old.
    pub fn available(&self) -> io::Result<u64> {
        let now = Instant::now();
        if let Ok(last) = self.last.lock()
            && let Some((at, bytes)) = *last
            && now.duration_since(at) < FRESH
        {
            return Ok(bytes);
        }
        let bytes = available(&self.path)?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some((now, bytes));
        }
        Ok(bytes)
    }

    /// `Some(available)` when less than `min` bytes are free; `None` when enough are, when
    /// `min` is 0 (the guard is off), or when the space cannot be read (a failing disk
    /// shows itself at the next write, and refusing all mail on a statvfs error would be
    /// worse).
    pub fn low(&self, min: u64) -> Option<u64> {
        if min == 0 {
            return None;
        }
        match self.available() {
            Ok(bytes) if bytes < min => Some(bytes),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), cause = %e, "cannot read the free disk space");
                None
            }
        }
    }
}

/// Bytes available under `path`, asked now.
// The field types are u64 on 64-bit Linux but narrower elsewhere.
#[allow(clippy::useless_conversion)]
pub fn available(path: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok(u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_free_space_and_caches_it() {
        let dir = tempfile::tempdir().unwrap();
        let g = DiskGuard::new(dir.path());
        let free = g.available().unwrap();
        assert!(free > 0);
        assert_eq!(g.low(0), None, "0 turns the guard off");
        assert_eq!(g.low(1), None);
        assert!(g.low(u64::MAX).is_some());
        let missing = DiskGuard::new(&dir.path().join("missing"));
        assert!(missing.available().is_err());
        assert_eq!(
            missing.low(u64::MAX),
            None,
            "an unreadable disk refuses nothing"
        );
    }
}
