//! Advisory `flock(2)` locks.
//!
//! - The root lock (`<root>/.lock`): every metadata change takes it exclusively and every
//!   metadata read shares it, so two `blockctl` processes (or a daemon opening an image)
//!   never see or write half-updated metadata. One lock for the whole root keeps clones
//!   across pools simple (no lock ordering).
//! - The image use lock on the data file (`<image>.img`): a read-write bdev holds it
//!   exclusively, a read-only bdev shared, for as long as it serves the image; `rm`,
//!   `rollback` and shrinking test it (non-blocking) and refuse an image in use, as `rbd`
//!   refuses an image with watchers.
//! - The hand-over lock on `<image>.img.handover`: a read-write bdev waiting for the write
//!   role (a live migration's destination) holds it shared; the writer tests it to know
//!   whether to hand the role over ([`super::handover`]).
//!
//! flock locks belong to the open file description: they are dropped with the [`File`]
//! (or when the process dies), so a crashed holder never leaves a stale lock.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::error::{Error, Result};

/// A held flock; released on drop.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Shared or exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

fn flock(file: &File, mode: Mode, wait: bool) -> std::io::Result<()> {
    let mut op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock on a descriptor owned by `file`.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

impl FileLock {
    /// Locks `path` (created if missing), waiting for other holders.
    pub fn acquire(path: &Path, mode: Mode) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io("opening lock file", path, e))?;
        flock(&file, mode, true).map_err(|e| Error::io("locking", path, e))?;
        Ok(FileLock { _file: file })
    }

    /// Locks the existing file `path` without waiting: `Ok(None)` when another open file
    /// holds a conflicting lock.
    pub fn try_acquire(path: &Path, mode: Mode) -> Result<Option<Self>> {
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        match flock(&file, mode, false) {
            Ok(()) => Ok(Some(FileLock { _file: file })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io("locking", path, e)),
        }
    }
}
