//! The one way the queues write into guest memory to complete a request: a virtio-blk
//! status byte, a virtio-scsi response header, a control-queue answer, an event.
//!
//! Live migration's dirty-page logging does not happen here but when the chain goes back
//! to the driver ([`crate::vhost::vring::Vring::add_used`]), which marks every
//! device-writable buffer of the chain: what is written here, and what the bdevs wrote
//! into the guest's pages, alike.

use crate::vhost::guest_map::{GuestMap, StreamError};
use crate::vhost::guest_stream::{walk, Desc};

/// Writes into the guest memory of one memory table (see the module documentation).
#[derive(Clone, Copy)]
pub struct GuestWriter<'a> {
    map: &'a GuestMap,
}

impl<'a> GuestWriter<'a> {
    /// A writer into the memory `map` was built from (which the caller keeps mapped).
    pub fn new(map: &'a GuestMap) -> Self {
        GuestWriter { map }
    }

    /// Copies `bytes` to guest range `[gpa, gpa + bytes.len())`; fails when the range is
    /// not all guest memory (the frontend removed it meanwhile).
    #[inline]
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), StreamError> {
        self.map.write(gpa, bytes)
    }

    /// Copies `bytes` to the start of the device-writable stream `descs` (virtio 1.2
    /// §2.7.4: a response may be spread over several descriptors).
    pub fn write_stream(&self, descs: &[Desc], bytes: &[u8]) -> Result<(), StreamError> {
        let mut off = 0usize;
        walk(descs, 0, bytes.len() as u64, |addr, n| {
            let n = n as usize; // at most bytes.len()
            self.write(addr, &bytes[off..off + n])?;
            off += n;
            Ok::<(), StreamError>(())
        })?;
        if off < bytes.len() {
            // The stream is shorter than the response.
            return Err(StreamError::BadGuestAddress {
                addr: descs.first().map_or(0, |d| d.addr),
                len: bytes.len() as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    #[test]
    fn writes_streams_across_descriptors_and_refuses_holes() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        // SAFETY: `mem` lives until the end of the test, past every use of `map`.
        let map = unsafe { GuestMap::new(&mem) };
        let w = GuestWriter::new(&map);
        let descs = [
            Desc {
                addr: 0xffe,
                len: 3,
                write: true,
            },
            Desc {
                addr: 0x1800,
                len: 8,
                write: true,
            },
        ];
        w.write_stream(&descs, b"abcdef").unwrap();
        let mut b = [0u8; 3];
        mem.read_slice(&mut b, GuestAddress(0xffe)).unwrap();
        assert_eq!(&b, b"abc");
        mem.read_slice(&mut b, GuestAddress(0x1800)).unwrap();
        assert_eq!(&b, b"def");
        assert!(w.write_stream(&descs[..1], b"abcdef").is_err(), "too short");
        assert!(w.write(0x1fff, b"xy").is_err(), "past the end of memory");
        w.write(0x10, &[7]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 7);
    }
}
