//! The file under an aio bdev: opening it, its geometry and direct-I/O alignment, its
//! allocation map, and the registry of open files by bdev name (for `bdev_aio_rescan`).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use crate::bdev::{push_extent, AllocState, Errno, Extent, MAX_EXTENTS};

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// The open file and how to do I/O on it.
#[derive(Debug)]
pub(super) struct AioFile {
    pub fd: OwnedFd,
    /// Opened with `O_DIRECT`.
    pub direct: bool,
    /// Buffer address alignment `O_DIRECT` needs (1 when buffered).
    pub mem_align: usize,
    /// Length alignment of each iovec under `O_DIRECT` (1 when buffered).
    pub len_align: usize,
}

/// Direct-I/O alignments of `fd` from `statx(STATX_DIOALIGN)`: (memory, offset).
pub(super) fn dio_align(fd: RawFd) -> Option<(usize, usize)> {
    // SAFETY: statx fills the zeroed struct; the empty path with AT_EMPTY_PATH means `fd`.
    unsafe {
        let mut st: libc::statx = std::mem::zeroed();
        let r = libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        );
        if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
            return None;
        }
        Some((
            st.stx_dio_mem_align as usize,
            st.stx_dio_offset_align as usize,
        ))
    }
}

/// Logical block size and byte size of a block device.
pub(super) fn blockdev_geometry(fd: RawFd) -> std::io::Result<(u32, u64)> {
    let mut lbs: libc::c_int = 0;
    let mut size: u64 = 0;
    // SAFETY: both ioctls write one integer of the given type.
    unsafe {
        if libc::ioctl(fd, libc::BLKSSZGET as _, &mut lbs) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::ioctl(fd, BLKGETSIZE64 as _, &mut size) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((lbs.max(512) as u32, size))
}

pub(super) fn open(path: &Path, readonly: bool, direct: bool) -> std::io::Result<std::fs::File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!readonly);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Data and holes of `[offset, offset + len)` of `fd` from `lseek(SEEK_DATA/SEEK_HOLE)`.
///
/// A file system without them (`EINVAL`/`EOPNOTSUPP`), and block devices (every byte is
/// data to `lseek`), report the whole range as data. Holes are reported only where the file
/// system says so, so a hole always reads as zeroes; unwritten (fallocated) extents are
/// holes to ext4/xfs/tmpfs too.
pub(super) fn seek_extents(fd: RawFd, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
    let end = offset.saturating_add(len);
    let mut out = Vec::new();
    let mut pos = offset;
    let seek = |pos: u64, whence: i32| -> Result<Option<u64>, Errno> {
        let Ok(off) = libc::off_t::try_from(pos) else {
            return Err(Errno(libc::EOVERFLOW));
        };
        // SAFETY: lseek on a descriptor the backend keeps open; I/O uses explicit offsets,
        // so moving the file position disturbs nothing.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match std::io::Error::last_os_error().raw_os_error() {
            // No data at or after `pos` (SEEK_DATA), or `pos` at or past the end of file.
            Some(libc::ENXIO) => Ok(None),
            Some(e) => Err(Errno(e)),
            None => Err(Errno(libc::EIO)),
        }
    };
    while pos < end && out.len() < MAX_EXTENTS {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(Errno(libc::EINVAL | libc::EOPNOTSUPP)) if out.is_empty() => {
                push_extent(&mut out, len, AllocState::Data);
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        // Past the end of the file (it shrank under the bdev) reads fail rather than return
        // zeroes, but an extent map must cover the range: call it a hole, as the kernel does.
        let data = data.unwrap_or(end).clamp(pos, end);
        push_extent(&mut out, data - pos, AllocState::Hole);
        pos = data;
        if pos >= end {
            break;
        }
        let hole = seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).clamp(pos, end);
        if hole == pos {
            // SEEK_DATA said data starts here and SEEK_HOLE says a hole does: the file
            // changed in between. Report what is certain (data) for one block and go on.
            push_extent(&mut out, (end - pos).min(4096), AllocState::Data);
            pos += (end - pos).min(4096);
            continue;
        }
        push_extent(&mut out, hole - pos, AllocState::Data);
        pos = hole;
    }
    Ok(out)
}

/// The open file of each aio bdev by name, for `bdev_aio_rescan` (weak: the bdev owns the
/// file). Owned by the application.
#[derive(Default)]
pub struct AioFiles {
    files: Mutex<BTreeMap<String, Weak<AioFile>>>,
}

impl AioFiles {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Weak<AioFile>>> {
        crate::sync::lock(&self.files)
    }

    /// Records `file` as bdev `name`'s, forgetting the files of deleted bdevs.
    pub(super) fn insert(&self, name: &str, file: &Arc<AioFile>) {
        let mut m = self.lock();
        m.retain(|_, f| f.strong_count() > 0);
        m.insert(name.to_string(), Arc::downgrade(file));
    }

    /// The file of bdev `name`, while the bdev lives.
    pub(super) fn get(&self, name: &str) -> Option<Arc<AioFile>> {
        self.lock().get(name).and_then(Weak::upgrade)
    }
}
