//! Serving an image to a bdev, and handing its write role over to another instance (the
//! destination of a live migration).
//!
//! A served image is held in one of three ways, each an `flock(2)` ([`super::lock`]):
//!
//! - a *reader* (read-only bdev) holds a shared lock on the data file `<image>.img`;
//! - the *writer* holds the exclusive lock on the data file: the write role. There is at
//!   most one, and no reader beside it;
//! - a *waiter* (a read-write bdev opened `incoming` while the role was taken, or a writer
//!   that gave the role up) holds a shared lock on the hand-over file
//!   `<image>.img.handover` and may read but not write (its bdev refuses writes, unmaps
//!   and write-zeroes with EBUSY) until it takes the role.
//!
//! The hand-over follows the devices of a live migration (QEMU's `-incoming`): the
//! destination's bdev is opened `incoming` and waits; when the source's device stops
//! (GET_VRING_BASE), its bdev syncs and, seeing a waiter (the exclusive lock on the
//! hand-over file is refused), gives the role up and becomes a waiter itself, so that a
//! later migration back works the same way; when the destination's device starts, its
//! bdev takes the role. A start that finds the role taken fails (EBUSY): two instances
//! never write at once, whatever the order of events (a cancelled migration restarts the
//! source, which takes the role back if the destination has not). Everything else is
//! refused as before: a read-write open that is not `incoming` while the role is held, or
//! while it is free and an instance waits for it (the hand-over window). An `incoming` open
//! takes a free role at once only when nobody waits for it. The destination's bdev must
//! exist before the source's device stops (it does: its QEMU connects to it before the
//! migration starts); a source that stopped with nobody waiting keeps the role.
//!
//! Why it is safe without the root lock on these paths: a bdev always holds one of its two
//! locks (each transition takes the new lock before it drops the old), and
//! [`Pool::in_use`] tests the hand-over file only while it holds the data file's exclusive
//! lock, i.e. while no writer exists and none can appear. So `rm`, `rollback` and shrinking
//! (which test under the exclusive root lock, keeping new bdevs away) see every bdev,
//! a writer's test for waiters never meets `in_use`'s, and a transition only races with
//! the brief test of `in_use`, which [`ServedImage::take_write_role`] rides out.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{Error, Result};
use super::lock::{FileLock, Mode};
use super::Pool;
use crate::sync::lock;

/// How long a daemon waits for the root lock before answering busy.
const SERVE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long taking the role retries while the data file's exclusive lock is refused: an
/// `in_use` test (`blockctl image info`) holds it for an instant.
const TAKE_ROLE_RETRY: Duration = Duration::from_millis(200);

/// The hand-over file of the data file `data`: `<image>.img.handover`.
pub fn handover_path(data: &Path) -> PathBuf {
    let mut name = data.file_name().unwrap_or_default().to_os_string();
    name.push(".handover");
    data.with_file_name(name)
}

/// How a served image is held (see the module documentation).
#[derive(Debug)]
enum Hold {
    Reader { _lock: FileLock },
    Writer { _lock: FileLock },
    Waiter { _lock: FileLock },
}

/// An image opened for a bdev: its data file and the lock that keeps `rm` and `rollback`
/// away while it is served (released on drop), with the write role if it has it.
#[derive(Debug)]
pub struct ServedImage {
    pub path: PathBuf,
    pub size: u64,
    /// `pool/image`, for messages.
    what: String,
    hold: Mutex<Hold>,
    /// Whether this holds the write role; read by the bdev's channels on every write.
    writable: Arc<AtomicBool>,
}

/// Tries the exclusive lock on the hand-over file: `true` when a waiter holds it shared.
fn waiter_exists(handover: &Path) -> Result<bool> {
    match FileLock::try_acquire(handover, Mode::Exclusive) {
        Ok(l) => Ok(l.is_none()),
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl ServedImage {
    fn new(pool: &Pool, image: &str, path: PathBuf, size: u64, hold: Hold) -> Self {
        let writable = matches!(hold, Hold::Writer { .. });
        ServedImage {
            path,
            size,
            what: format!("{}/{image}", pool.name),
            hold: Mutex::new(hold),
            writable: Arc::new(AtomicBool::new(writable)),
        }
    }

    /// Whether this holds the write role now.
    pub fn has_write_role(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// The flag that says whether this holds the write role, for I/O paths that must not
    /// take a lock.
    pub fn write_role(&self) -> Arc<AtomicBool> {
        self.writable.clone()
    }

    /// Takes the write role if this waits for it (a reader or the writer: nothing to do).
    /// Fails with EBUSY while another instance (or a reader) holds the data file.
    pub fn take_write_role(&self) -> Result<()> {
        let mut hold = lock(&self.hold);
        if !matches!(*hold, Hold::Waiter { .. }) {
            return Ok(());
        }
        let deadline = Instant::now() + TAKE_ROLE_RETRY;
        loop {
            if let Some(l) = FileLock::try_acquire(&self.path, Mode::Exclusive)? {
                // The data file's lock is held before the hand-over file's goes.
                *hold = Hold::Writer { _lock: l };
                self.writable.store(true, Ordering::Release);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy(format!(
                    "image {} is being written by another instance",
                    self.what
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Gives the write role up if this holds it and another instance waits for it, and
    /// waits for it itself from then on; returns whether it did. The caller has made every
    /// completed write durable.
    pub fn yield_write_role(&self) -> Result<bool> {
        let mut hold = lock(&self.hold);
        if !matches!(*hold, Hold::Writer { .. }) {
            return Ok(false);
        }
        let handover = handover_path(&self.path);
        if !waiter_exists(&handover)? {
            return Ok(false);
        }
        // Blocks at most for another writer's (or `in_use`'s) instant exclusive test.
        let w = FileLock::acquire(&handover, Mode::Shared)?;
        self.writable.store(false, Ordering::Release);
        *hold = Hold::Waiter { _lock: w };
        Ok(true)
    }
}

impl Pool {
    /// Opens `image` for a bdev: takes its use lock (exclusive for read-write, shared for
    /// read-only), so no other read-write bdev serves it and `rm`/`rollback` refuse it.
    pub fn serve(&self, image: &str, readonly: bool) -> Result<ServedImage> {
        self.serve_with(image, readonly, false)
    }

    /// Opens `image` read-write as the destination of a migration: with the write role
    /// when it is free, else as a waiter ([`ServedImage::take_write_role`] takes it later).
    pub fn serve_incoming(&self, image: &str) -> Result<ServedImage> {
        self.serve_with(image, false, true)
    }

    fn serve_with(&self, image: &str, readonly: bool, incoming: bool) -> Result<ServedImage> {
        let _l = self.root.lock_shared_timeout(SERVE_LOCK_TIMEOUT)?;
        let m = self.load(image)?;
        let path = self.data_path(image);
        let mode = if readonly {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let handover = handover_path(&path);
        let busy = || {
            Error::Busy(format!(
                "image {}/{image} is already served{}",
                self.name,
                if readonly { " read-write" } else { "" }
            ))
        };
        let hold = match FileLock::try_acquire(&path, mode)? {
            Some(l) if readonly => Hold::Reader { _lock: l },
            // The role is free, but an instance may wait for it (between a migration's
            // source stopping and its destination starting): it is that instance's.
            Some(l) if waiter_exists(&handover)? => {
                if !incoming {
                    return Err(Error::Busy(format!(
                        "image {}/{image} is being handed over between instances (a bdev                          waits for its write role)",
                        self.name
                    )));
                }
                let w = FileLock::acquire(&handover, Mode::Shared)?;
                drop(l);
                Hold::Waiter { _lock: w }
            }
            Some(l) => Hold::Writer { _lock: l },
            None if incoming => Hold::Waiter {
                _lock: FileLock::acquire(&handover, Mode::Shared)?,
            },
            None => return Err(busy()),
        };
        Ok(ServedImage::new(self, image, path, m.size, hold))
    }
}
