//! The embedded local pool: rbd-style images on one machine, without Ceph.
//!
//! A *root* directory (default [`DEFAULT_ROOT`], or `$BLOCKD_POOL_DIR`) holds pools; a pool
//! is a directory; an image is a sparse raw file plus a JSON metadata file:
//!
//! ```text
//! <root>/.lock                         flock: metadata changes exclusive, reads shared
//! <root>/<pool>/.pool.json             marks the directory as a pool
//! <root>/<pool>/<image>.json           ImageMeta: size, created, features, parent, snapshots
//! <root>/<pool>/<image>.img            the data, sparse raw (what a bdev serves)
//! <root>/<pool>/<image>.img.handover   flock only: bdevs waiting for the write role
//! <root>/<pool>/<image>.snaps/<snap>.img  read-only point-in-time copies
//! ```
//!
//! The metadata file defines the image: it is written last on create and removed first on
//! delete, always atomically ([`meta::write_atomic`]). Snapshots, rollbacks and clones copy
//! data files with a reflink where the filesystem has them, else sparse-aware
//! ([`copy`]); a clone therefore never reads through its parent, and the parent link it
//! records is bookkeeping (protect/unprotect, `flatten`), as in rbd.
//!
//! Locking ([`lock`]): every metadata change holds the root lock exclusively; a bdev serving
//! an image holds a lock on its data file (or, waiting for the write role of a live
//! migration, on `<image>.img.handover`: [`handover`]), which `rm`, `snap rollback` and
//! shrinking refuse.

pub mod copy;
pub mod error;
pub mod handover;
mod image;
pub mod lock;
pub mod meta;
mod pool;
#[cfg(test)]
mod tests;

pub use copy::CopyMethod;
pub use error::{Error, Result};
pub use handover::{handover_path, ServedImage};
pub use image::{DuEntry, ExportDest, ImageInfo, ImportSource};
pub use pool::{Pool, PoolRoot};

/// Root of the local pools when neither `--pool-dir` nor [`ROOT_ENV`] says otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/blockd/pools";

/// Environment variable naming the root of the local pools.
pub const ROOT_ENV: &str = "BLOCKD_POOL_DIR";

/// Longest pool, image or snapshot name (bytes); leaves room for suffixes in `NAME_MAX`.
pub const MAX_NAME: usize = 200;

/// Checks that `name` can name a pool, image or snapshot: 1 to [`MAX_NAME`] characters of
/// `[A-Za-z0-9_.-]`, not starting with `.` (hidden files are the pool's own).
pub fn check_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() > MAX_NAME {
        "longer than 200 bytes"
    } else if name.starts_with('.') {
        "starts with '.'"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        "only letters, digits, '_', '-' and '.' are allowed"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_string(),
        why,
    })
}
