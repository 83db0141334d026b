//! Copying image data without inflating it.
//!
//! A copy is first tried as a reflink (`ioctl(FICLONE)`: btrfs, XFS with reflink, bcachefs,
//! ...), which is instant, atomic with respect to concurrent writers, and shares extents
//! until either side is written. Elsewhere (ext4, tmpfs) the copy is sparse-aware: only the
//! data extents the source reports (`lseek(SEEK_DATA/SEEK_HOLE)`) are read, and chunks of
//! zeros within them are skipped, so holes stay holes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::{Error, Result};

/// `_IOW(0x94, 9, int)`: make the destination share all extents of the source.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Bytes per read of a copy.
pub const CHUNK: usize = 1 << 20;

/// Called with the number of bytes done so far.
pub type Progress<'a> = &'a mut dyn FnMut(u64);

/// How a copy was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// Shared extents (`FICLONE`).
    Reflink,
    /// Data extents copied, holes kept.
    Sparse,
}

/// Makes `dst` (already created, empty) share the extents of `src`; false when the
/// filesystem cannot (`EOPNOTSUPP`, `EXDEV`, `EINVAL`, `ENOTTY`).
pub fn reflink(src: &File, dst: &File) -> std::io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both are open.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

/// The data extents `(offset, length)` of the first `len` bytes of `f`, in order; the whole
/// range when the filesystem does not report holes.
pub fn data_extents(f: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // No data after `pos`.
                Some(libc::ENXIO) => break,
                // SEEK_DATA unsupported: everything is data.
                Some(libc::EINVAL | libc::EOPNOTSUPP) => {
                    out.push((pos, len - pos));
                    break;
                }
                _ => return Err(e),
            }
        }
        let data = data as u64;
        if data >= len {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let end = (hole as u64).min(len);
        out.push((data, end - data));
        pos = end;
    }
    Ok(out)
}

/// Reads exactly `buf.len()` bytes at `off`, or fewer at end of file.
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads from a stream until `buf` is full or end of input.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Granularity at which zeros are left as holes (the usual filesystem block).
const HOLE: usize = 4096;

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Writes `buf` at `off` except its all-zero [`HOLE`]-sized pieces (runs of non-zero
/// pieces go in one write), so that zeros stay (or become) holes in a fresh file.
fn write_nonzero(dst: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
    let mut i = 0;
    while i < buf.len() {
        let end = (i + HOLE).min(buf.len());
        if is_zero(&buf[i..end]) {
            i = end;
            continue;
        }
        let mut j = end;
        while j < buf.len() {
            let e = (j + HOLE).min(buf.len());
            if is_zero(&buf[j..e]) {
                break;
            }
            j = e;
        }
        dst.write_all_at(&buf[i..j], off + i as u64)?;
        i = j;
    }
    Ok(())
}

/// Copies the first `len` bytes of `src` into `dst` at the same offsets, writing only
/// non-zero chunks of data extents; `dst` is set to length `len`.
pub fn sparse_copy(src: &File, dst: &File, len: u64, progress: Progress) -> std::io::Result<()> {
    dst.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    for (start, elen) in data_extents(src, len)? {
        let mut off = start;
        let end = start + elen;
        while off < end {
            let want = ((end - off) as usize).min(CHUNK);
            let n = read_full_at(src, &mut buf[..want], off)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("source shrank during the copy (at byte {off})"),
                ));
            }
            write_nonzero(dst, &buf[..n], off)?;
            off += n as u64;
            progress(off);
        }
    }
    progress(len);
    Ok(())
}

/// Copies `src` to the new file `dst` (which must not exist), as a reflink when possible;
/// `dst` is removed again when the copy fails.
pub fn clone_file(src: &Path, dst: &Path, progress: Progress) -> Result<CopyMethod> {
    let s = File::open(src).map_err(|e| Error::io("opening", src, e))?;
    let len = s.metadata().map_err(|e| Error::io("stat", src, e))?.len();
    let d = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| Error::io("creating", dst, e))?;
    let r = (|| {
        let m = if reflink(&s, &d)? {
            progress(len);
            CopyMethod::Reflink
        } else {
            sparse_copy(&s, &d, len, progress)?;
            CopyMethod::Sparse
        };
        d.sync_all()?;
        Ok(m)
    })();
    r.map_err(|e| {
        // Cleanup of the partial copy; the error returned is the one that matters.
        let _ = std::fs::remove_file(dst);
        Error::io(&format!("copying {} to", src.display()), dst, e)
    })
}

/// Writes a stream into `dst` (empty, seekable) keeping zero chunks as holes; returns the
/// number of bytes read (the new length of `dst`).
pub fn import_stream(src: &mut dyn Read, dst: &File, progress: Progress) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    loop {
        let n = read_full(src, &mut buf)?;
        if n == 0 {
            break;
        }
        write_nonzero(dst, &buf[..n], off)?;
        off += n as u64;
        progress(off);
    }
    dst.set_len(off)?;
    Ok(off)
}

/// Writes the first `len` bytes of `src` to a stream (pipe, terminal): holes as zeros.
pub fn export_stream(
    src: &File,
    len: u64,
    dst: &mut dyn Write,
    progress: Progress,
) -> std::io::Result<()> {
    let zeros = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let mut extents = data_extents(src, len)?;
    extents.push((len, 0));
    for (start, elen) in extents {
        while pos < start {
            let n = ((start - pos) as usize).min(CHUNK);
            dst.write_all(&zeros[..n])?;
            pos += n as u64;
            progress(pos);
        }
        let end = start + elen;
        while pos < end {
            let want = ((end - pos) as usize).min(CHUNK);
            let n = read_full_at(src, &mut buf[..want], pos)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("image shrank during the export (at byte {pos})"),
                ));
            }
            dst.write_all(&buf[..n])?;
            pos += n as u64;
            progress(pos);
        }
    }
    dst.flush()?;
    Ok(())
}

/// Bytes allocated to `path` (`st_blocks` × 512).
pub fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    Ok(m.blocks() * 512)
}
