//! Replacing a small file atomically and durably, for the files blockd keeps across its
//! restarts (`--config`, the rbd client record): a crash or power cut at any point leaves
//! either the previous content or the new one, never a mix.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The temporary file [`write_atomic`] writes before renaming it over `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `data` atomically and durably: write `path.tmp` (mode 0600),
/// fsync it, rename it over `path`, fsync the directory (rename(2); fsync(2) on a
/// directory makes the new entry durable).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let err = |what: &str, p: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err("cannot create", &tmp, e))?;
    f.write_all(data)
        .map_err(|e| err("cannot write", &tmp, e))?;
    f.sync_all().map_err(|e| err("cannot fsync", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| err("cannot rename over", path, e))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err("cannot fsync directory", dir, e))
}
