//! The metadata file of an image (`<image>.json`) and how it is written: to a temporary
//! file, `fsync`ed, renamed over the old one and the directory `fsync`ed, so a crash leaves
//! either the old or the new metadata, never a mix.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// Version of the metadata format written.
pub const VERSION: u32 = 1;

/// Features every local image has (shown by `info`, as rbd shows its feature bits).
pub const FEATURES: [&str; 2] = ["layering", "sparse"];

/// An image of some pool of the same root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub pool: String,
    pub image: String,
}

/// The snapshot a clone was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub pool: String,
    pub image: String,
    pub snapshot: String,
}

/// One snapshot: a read-only copy of the data file at `created`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapMeta {
    /// Increasing per image, never reused (as rbd snap ids).
    pub id: u64,
    pub name: String,
    /// Image size when the snapshot was taken.
    pub size: u64,
    pub protected: bool,
    /// RFC 3339, UTC.
    pub created: String,
    /// Clones made from this snapshot (unprotect is refused while any is left).
    #[serde(default)]
    pub children: Vec<ImageRef>,
}

/// Everything known about an image besides its data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub version: u32,
    pub name: String,
    /// Size in bytes (the data file has this length).
    pub size: u64,
    /// RFC 3339, UTC.
    pub created: String,
    pub features: Vec<String>,
    /// Set for a clone until `flatten`.
    pub parent: Option<ParentRef>,
    pub snapshots: Vec<SnapMeta>,
    pub next_snap_id: u64,
}

impl ImageMeta {
    /// Metadata of a new image.
    pub fn new(name: &str, size: u64) -> Self {
        ImageMeta {
            version: VERSION,
            name: name.to_string(),
            size,
            created: now_rfc3339(),
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
            parent: None,
            snapshots: Vec::new(),
            next_snap_id: 1,
        }
    }

    /// The snapshot named `name`.
    pub fn snap(&self, name: &str) -> Option<&SnapMeta> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// The snapshot named `name`, mutable.
    pub fn snap_mut(&mut self, name: &str) -> Option<&mut SnapMeta> {
        self.snapshots.iter_mut().find(|s| s.name == name)
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("image metadata {}", path.display()))
            } else {
                Error::io("reading", path, e)
            }
        })?;
        let m: ImageMeta = serde_json::from_slice(&data).map_err(|e| Error::Corrupt {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        if m.version != VERSION {
            return Err(Error::Corrupt {
                path: path.display().to_string(),
                why: format!("version {} (this blockd reads {VERSION})", m.version),
            });
        }
        Ok(m)
    }

    /// Writes to `path` atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn store(&self, path: &Path) -> Result<()> {
        let data = serde_json::to_vec_pretty(self).map_err(|e| Error::Corrupt {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        write_atomic(path, &data)
    }
}

/// The temporary name `path` is written under before the rename (hidden, so listings skip
/// it).
fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Replaces `path` by `data`: a reader sees the old or the new content, also after a crash.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = r {
        // Cleanup; the error returned is the one that matters.
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("writing", path, e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// `fsync` of a directory, so renames and unlinks in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing directory", dir, e))
}

/// The current time as RFC 3339 UTC (`2025-01-31T12:00:00Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// `secs` since the epoch as RFC 3339 UTC (Howard Hinnant's days-to-civil algorithm).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
