//! Guest memory as a flat table of host mappings, for the per-request hot path.
//!
//! vm-memory's `GuestMemory` accessors are general (any number of regions, dirty bitmaps,
//! volatile slices, iterators) and cost a few hundred instructions per access; a virtio-blk
//! request needs about six (descriptors, header, data, status, used ring). A vhost-user
//! frontend hands over a handful of regions (vhost-user.rst "VHOST_USER_SET_MEM_TABLE") that
//! change only on a new memory table, so this table is built once per table and every
//! lookup is a scan of a few entries. It neither copies nor owns the mappings: it is valid
//! exactly as long as the `GuestMemoryMmap` it was built from, which its owner keeps.
//! Nothing here writes vm-memory's dirty bitmap: blockd offers no dirty logging
//! (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`); completion writes go through
//! [`crate::vhost::engine::GuestWriter`], where it would be added.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Most host iovecs one request's data may map to (Linux `UIO_MAXIOV`, the preadv/io_uring
/// limit).
pub const MAX_IOVECS: usize = 1024;

/// Why a guest range cannot be used (here or in a descriptor stream); the parsers turn it
/// into their own error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A range not (fully) backed by guest memory, or whose address overflows.
    BadGuestAddress { addr: u64, len: u64 },
    /// The range maps to more than [`MAX_IOVECS`] host buffers.
    TooManyIovecs,
}

/// One guest memory region: guest-physical `[gpa, gpa + len)` is mapped at `host`.
#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// The regions of one guest memory table; see the module documentation.
#[derive(Debug, Default)]
pub struct GuestMap {
    /// Sorted by `gpa`, non-overlapping (vm-memory checks this when building the memory).
    regions: Vec<Region>,
}

// SAFETY: the table holds addresses of shared mappings that any thread may access (the
// guest does); the owner keeps the mappings alive for as long as it uses the table.
unsafe impl Send for GuestMap {}

impl GuestMap {
    /// The table of `mem`.
    ///
    /// # Safety
    /// `mem`'s mappings must outlive every use of this table and of what is built from it
    /// (a `RingView`, host iovecs): `read`, `write` and the ring accessors are safe to call
    /// and dereference these addresses unchecked. Keep `mem` (or an `Arc` of it) alive.
    pub unsafe fn new(mem: &GuestMemoryMmap) -> Self {
        let mut regions: Vec<Region> = mem
            .iter()
            .map(|r| Region {
                gpa: r.start_addr().0,
                len: r.len(),
                host: r.as_ptr(),
            })
            .collect();
        regions.sort_by_key(|r| r.gpa);
        GuestMap { regions }
    }

    /// The host address of guest range `[gpa, gpa + len)`, when one region holds all of it
    /// (`len` 0 counts as one byte, so the address is inside guest memory).
    #[inline]
    pub fn host_range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let end = gpa.checked_add(len.max(1))?;
        for r in &self.regions {
            if gpa >= r.gpa && end <= r.gpa + r.len {
                // In bounds: gpa - r.gpa < r.len, and r.len bytes are mapped at r.host.
                return Some(r.host.wrapping_add((gpa - r.gpa) as usize));
            }
        }
        None
    }

    /// Whether guest range `[gpa, gpa + len)` is entirely backed by guest memory.
    pub fn check_range(&self, gpa: u64, len: u64) -> bool {
        self.pieces(gpa, len, |_, _, _| Ok(())).is_ok()
    }

    /// Copies guest range `[gpa, gpa + buf.len())` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), StreamError> {
        self.pieces(gpa, buf.len() as u64, |host, off, n| {
            // SAFETY: `pieces` hands out mapped bytes; guest memory never overlaps a Rust
            // buffer. The guest may write concurrently: callers treat the bytes as untrusted.
            unsafe { std::ptr::copy_nonoverlapping(host, buf[off..].as_mut_ptr(), n) };
            Ok(())
        })
    }

    /// Copies `buf` to guest range `[gpa, gpa + buf.len())`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), StreamError> {
        self.pieces(gpa, buf.len() as u64, |host, off, n| {
            // SAFETY: as in `read`, for writing.
            unsafe { std::ptr::copy_nonoverlapping(buf[off..].as_ptr(), host, n) };
            Ok(())
        })
    }

    /// Appends the host iovecs of guest range `[gpa, gpa + len)` to `out`, one per region
    /// it crosses, at most [`MAX_IOVECS`] in all.
    pub fn push_iovecs(
        &self,
        gpa: u64,
        len: u64,
        out: &mut Vec<libc::iovec>,
    ) -> Result<(), StreamError> {
        self.pieces(gpa, len, |host, _, n| {
            if out.len() == MAX_IOVECS {
                return Err(StreamError::TooManyIovecs);
            }
            out.push(libc::iovec {
                iov_base: host.cast(),
                iov_len: n,
            });
            Ok(())
        })
    }

    /// Calls `f(host, offset, n)` for each piece of guest range `[gpa, gpa + len)` that one
    /// region maps (`offset` counts from `gpa`), in order; the range must be all mapped.
    fn pieces<F>(&self, gpa: u64, len: u64, mut f: F) -> Result<(), StreamError>
    where
        F: FnMut(*mut u8, usize, usize) -> Result<(), StreamError>,
    {
        // Nearly every range lies inside one region: one lookup, one piece.
        if let Some(host) = self.host_range(gpa, len) {
            return if len == 0 {
                Ok(())
            } else {
                f(host, 0, len as usize)
            };
        }
        let bad = || StreamError::BadGuestAddress { addr: gpa, len };
        gpa.checked_add(len).ok_or_else(bad)?;
        let mut done = 0u64;
        while done < len {
            let (host, avail) = self.piece(gpa + done).ok_or_else(bad)?;
            let n = (len - done).min(avail as u64);
            f(host, done as usize, n as usize)?;
            done += n;
        }
        Ok(())
    }

    /// The host address of `gpa` and how many bytes from there its region maps.
    #[inline]
    fn piece(&self, gpa: u64) -> Option<(*mut u8, usize)> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.len)
            .map(|r| {
                let off = gpa - r.gpa;
                (
                    r.host.wrapping_add(off as usize),
                    usize::try_from(r.len - off).unwrap_or(usize::MAX),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .unwrap()
    }

    #[test]
    fn translates_within_and_across_regions() {
        let mem = two_regions();
        mem.write_slice(b"abcdef", GuestAddress(0x1ffd)).unwrap();
        // SAFETY: `mem` lives until the end of the test, past every use of `map`.
        let map = unsafe { GuestMap::new(&mem) };
        assert!(map.host_range(0x1000, 0x1000).is_some());
        assert!(
            map.host_range(0x1ffd, 6).is_none(),
            "crosses a region boundary"
        );
        assert!(map.host_range(0xfff, 2).is_none());
        assert!(map.host_range(0x3000, 0).is_none(), "one past the end");
        assert!(map.host_range(u64::MAX, 1).is_none());
        let mut buf = [0u8; 6];
        map.read(0x1ffd, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdef");
        let mut v = Vec::new();
        map.push_iovecs(0x1ffd, 6, &mut v).unwrap();
        assert_eq!(v.iter().map(|i| i.iov_len).collect::<Vec<_>>(), vec![3, 3]);
        assert!(map.check_range(0x1000, 0x2000));
        assert!(!map.check_range(0x1000, 0x2001));
        assert!(map.read(0x2ffe, &mut buf).is_err());
        assert!(map.push_iovecs(u64::MAX - 1, 4, &mut v).is_err());
    }
}
