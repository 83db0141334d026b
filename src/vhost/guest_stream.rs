//! One part (device-readable or device-writable) of a descriptor chain seen as a single
//! byte stream in guest memory, as every virtio request format is defined: the device must
//! not assume a particular arrangement of descriptors (virtio 1.2 §2.7.4), so a header may
//! be split over several descriptors or share one with data.
//!
//! The device parsers (blk, scsi) copy a chain's descriptors out and validate them their
//! own way; reading, writing and translating ranges of the resulting streams is shared
//! here. Every address and length is guest-controlled: nothing here panics or overflows.

use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::vhost::guest_map::GuestMap;
pub use crate::vhost::guest_map::{StreamError, MAX_IOVECS};

/// One non-empty descriptor, copied out of a chain (the chain itself lives in guest memory
/// the driver may rewrite at any time).
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest-physical start address.
    pub addr: u64,
    /// Length in bytes (non-zero).
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write: bool,
}

/// Guest memory as the parsers use it: byte copies and host translations of guest ranges.
/// The hot path uses the pre-translated [`GuestMap`]; any vm-memory backend works too
/// (tests, the slow path for rings outside one region).
pub trait GuestRanges {
    /// Whether `[addr, addr + len)` is entirely guest memory.
    fn check(&self, addr: u64, len: u64) -> bool;
    /// Copies `[addr, addr + buf.len())` into `buf`.
    fn read_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError>;
    /// Copies `buf` to `[addr, addr + buf.len())`.
    fn write_at(&self, addr: u64, buf: &[u8]) -> Result<(), GuestMemoryError>;
    /// Appends the host iovecs of `[addr, addr + len)` (split at region boundaries).
    fn iovecs(&self, addr: u64, len: u64, out: &mut Vec<libc::iovec>) -> Result<(), StreamError>;
}

impl<M: GuestMemoryBackend + ?Sized> GuestRanges for M {
    fn check(&self, addr: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|len| self.check_range(GuestAddress(addr), len))
    }

    fn read_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.read_slice(buf, GuestAddress(addr))
    }

    fn write_at(&self, addr: u64, buf: &[u8]) -> Result<(), GuestMemoryError> {
        self.write_slice(buf, GuestAddress(addr))
    }

    fn iovecs(&self, addr: u64, len: u64, out: &mut Vec<libc::iovec>) -> Result<(), StreamError> {
        let bad = StreamError::BadGuestAddress { addr, len };
        let len = usize::try_from(len).map_err(|_| bad.clone())?;
        for slice in GuestMemoryBackend::get_slices(self, GuestAddress(addr), len) {
            let slice = slice.map_err(|_| bad.clone())?;
            if out.len() == MAX_IOVECS {
                return Err(StreamError::TooManyIovecs);
            }
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        Ok(())
    }
}

impl GuestRanges for GuestMap {
    fn check(&self, addr: u64, len: u64) -> bool {
        self.check_range(addr, len)
    }

    fn read_at(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.read(addr, buf)
            .map_err(|_| GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)))
    }

    fn write_at(&self, addr: u64, buf: &[u8]) -> Result<(), GuestMemoryError> {
        self.write(addr, buf)
            .map_err(|_| GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)))
    }

    fn iovecs(&self, addr: u64, len: u64, out: &mut Vec<libc::iovec>) -> Result<(), StreamError> {
        self.push_iovecs(addr, len, out)
    }
}

/// Calls `f(guest_addr, len)` for the pieces of the stream `descs` in `[skip, skip + take)`;
/// returns how many descriptors contributed.
pub fn walk<E, F>(descs: &[Desc], skip: u64, take: u64, mut f: F) -> Result<usize, E>
where
    E: From<StreamError>,
    F: FnMut(u64, u64) -> Result<(), E>,
{
    let mut pos = 0u64;
    let end = skip.saturating_add(take);
    let mut pieces = 0;
    for d in descs {
        let (d_addr, d_len) = (d.addr, d.len);
        let d_start = pos;
        let d_end = pos + u64::from(d_len);
        pos = d_end;
        if d_start >= end {
            break;
        }
        let lo = d_start.max(skip);
        let hi = d_end.min(end);
        if lo >= hi {
            continue;
        }
        let addr = d_addr
            .checked_add(lo - d_start)
            .ok_or(StreamError::BadGuestAddress {
                addr: d_addr,
                len: u64::from(d_len),
            })?;
        f(addr, hi - lo)?;
        pieces += 1;
    }
    Ok(pieces)
}

/// Copies `buf.len()` bytes at offset `skip` of the stream into `buf`.
pub fn read_stream<M: GuestRanges + ?Sized>(
    mem: &M,
    descs: &[Desc],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), StreamError> {
    copy_pieces(descs, skip, buf.len(), |addr, r| {
        mem.read_at(addr.0, &mut buf[r])
    })
}

/// Copies `buf` to offset `skip` of the stream.
pub fn write_stream<M: GuestRanges + ?Sized>(
    mem: &M,
    descs: &[Desc],
    skip: u64,
    buf: &[u8],
) -> Result<(), StreamError> {
    copy_pieces(descs, skip, buf.len(), |addr, r| {
        mem.write_at(addr.0, &buf[r])
    })
}

/// Calls `copy(guest_addr, buf_range)` for each piece of a `len`-byte copy between a buffer
/// and offset `skip` of the stream.
fn copy_pieces<F>(descs: &[Desc], skip: u64, len: usize, mut copy: F) -> Result<(), StreamError>
where
    F: FnMut(GuestAddress, Range<usize>) -> Result<(), GuestMemoryError>,
{
    let mut off = 0usize;
    walk(descs, skip, len as u64, |addr, n| {
        let n = n as usize; // <= len
        copy(GuestAddress(addr), off..off + n).map_err(|_| StreamError::BadGuestAddress {
            addr,
            len: n as u64,
        })?;
        off += n;
        Ok(())
    })?;
    Ok(())
}

/// Appends the host iovecs of guest range `addr`+`len` to `out` (split at memory-region
/// boundaries), at most [`MAX_IOVECS`] in all.
pub fn push_iovecs<M: GuestRanges + ?Sized>(
    mem: &M,
    addr: u64,
    len: u64,
    out: &mut Vec<libc::iovec>,
) -> Result<(), StreamError> {
    mem.iovecs(addr, len, out)
}

/// Copies `src` into `iovs`; returns the bytes copied (at most the iovecs' total).
///
/// # Safety
/// The iovecs must point to live, writable memory (the guest memory they were translated
/// from must still be mapped).
pub unsafe fn copy_to_iovecs(iovs: &[libc::iovec], src: &[u8]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == src.len() {
            break;
        }
        let n = iov.iov_len.min(src.len() - done);
        // SAFETY: per the caller's guarantee; guest memory never overlaps a Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), iov.iov_base as *mut u8, n) };
        done += n;
    }
    done
}

/// Copies the first `dst.len()` bytes of `iovs` into `dst`; returns the bytes copied.
///
/// # Safety
/// As [`copy_to_iovecs`], for reading.
pub unsafe fn copy_from_iovecs(iovs: &[libc::iovec], dst: &mut [u8]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == dst.len() {
            break;
        }
        let n = iov.iov_len.min(dst.len() - done);
        // SAFETY: per the caller's guarantee.
        unsafe {
            std::ptr::copy_nonoverlapping(iov.iov_base as *const u8, dst[done..].as_mut_ptr(), n)
        };
        done += n;
    }
    done
}
