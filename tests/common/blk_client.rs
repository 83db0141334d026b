//! A synchronous vhost-user-blk client on libblkio (the `blkio` crate), for tests: the
//! real client a VMM-less user would use. Every wait has a deadline because libblkio does
//! not notice a dead backend.

#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// How long one request may take before the test fails.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A connected, started libblkio instance with its queues and one mapped buffer region.
pub struct BlkClient {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
}

impl BlkClient {
    /// Connects to the vhost-user-blk socket `path` with `num_queues` queues and a buffer
    /// region of `buf_len` bytes.
    pub fn connect(path: &str, num_queues: i32, buf_len: usize) -> Result<Self, blkio::Error> {
        Self::connect_with(path, num_queues, buf_len, false)
    }

    /// As [`BlkClient::connect`]; `read_only` asks for read-only access (libblkio refuses
    /// read-write access to a device that offers VIRTIO_BLK_F_RO).
    pub fn connect_with(
        path: &str,
        num_queues: i32,
        buf_len: usize,
        read_only: bool,
    ) -> Result<Self, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", path)?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        b.set_i32("queue-size", 256)?;
        let out = b.start()?;
        let capacity = b.get_u64("capacity")?;
        let region = b.alloc_mem_region(buf_len)?;
        b.map_mem_region(&region)?;
        Ok(BlkClient {
            blkio: b,
            queues: out.queues,
            region,
            capacity,
        })
    }

    /// The mapped buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for our lifetime and only touched by us between
        // requests.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn wait(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = IO_TIMEOUT;
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut t), None)
            .expect("do_io failed");
        assert_eq!(n, 1, "request timed out after {IO_TIMEOUT:?}");
        // SAFETY: do_io initialised n = 1 completion.
        unsafe { c[0].assume_init_ref() }.ret
    }

    /// Reads `len` bytes at `offset` into the buffer's start; returns the completion's ret.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> i32 {
        let p = self.region.addr as *mut u8;
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Writes the buffer's first `len` bytes at `offset`.
    pub fn write(&mut self, q: usize, offset: u64, len: usize) -> i32 {
        let p = self.region.addr as *const u8;
        self.queues[q].write(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Reads/writes with a buffer at `buf_off` within the region.
    pub fn read_at(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = (self.region.addr + buf_off) as *mut u8;
        self.queues[q].read(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write_at(&mut self, q: usize, offset: u64, buf_off: usize, len: usize) -> i32 {
        let p = (self.region.addr + buf_off) as *const u8;
        self.queues[q].write(offset, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64, unmap: bool) -> i32 {
        let f = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.queues[q].write_zeroes(offset, len, 0, f);
        self.wait(q)
    }
}

/// A deterministic pattern for `len` bytes at device offset `offset` (differs per block
/// and per seed, so misplaced or stale data shows).
pub fn pattern(buf: &mut [u8], offset: u64, seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *b = ((pos / 512) as u8).wrapping_mul(31) ^ (pos as u8) ^ seed;
    }
}
