//! The driver side of a split ring (virtio 1.2 §2.7) in one region of guest memory, played
//! by hand through host pointers: for the queue benchmarks and the queue tests.

use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::reactor::Poller;
use crate::vhost::device::{GuestMem, QueueSetup};

type Mem = vm_memory::GuestMemoryMmap<()>;

pub const QSIZE: u16 = 256;
/// Guest memory: one region of this size at 0; the descriptor table at 0.
pub const MEM_SIZE: usize = 0x100000;
pub const AVAIL: usize = 0x1000;
pub const USED: usize = 0x2000;
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

/// A blk device `name` on a malloc bdev of `num_blocks` 512-byte blocks: the device the
/// queue tests drive.
pub fn malloc_device(name: &str, num_blocks: u64) -> crate::vhost::blk::BlkDevice {
    use crate::bdev::malloc::{self, MallocOpts};
    let reg = crate::bdev::BdevRegistry::default();
    let opts = MallocOpts {
        name: Some(name.into()),
        uuid: None,
        num_blocks,
        block_size: 512,
    };
    let bdev = malloc::create(&reg, opts).unwrap();
    crate::vhost::blk::BlkDevice::new(name, bdev, false, crate::vhost::ConfigNotifier::default())
}

/// The driver side of one split ring at guest address 0, through host pointers.
pub struct Driver {
    mem: GuestMem,
    ring: *mut u8,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    pub fn new() -> Self {
        let m = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let ring = m.get_host_address(GuestAddress(0)).unwrap();
        Driver {
            mem: GuestMem::new(m),
            ring,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn setup(&self) -> (QueueSetup, mpsc::Receiver<u16>) {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(0)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL as u64))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(USED as u64))
            .unwrap();
        q.set_ready(true);
        let (tx, rx) = mpsc::channel();
        let setup = QueueSetup {
            index: 2,
            queue: q,
            mem: self.mem.clone(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: None,
            stopped: tx,
            coalescing: Default::default(),
            inflight: None,
            stats: Default::default(),
            log: Default::default(),
            packed: false,
        };
        (setup, rx)
    }

    /// The guest memory the ring lives in.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let m = self.mem.memory();
        let p = m.get_host_address(GuestAddress(gpa)).unwrap();
        // SAFETY: inside the 1 MiB region.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    /// A copy of guest range `[gpa, gpa + len)`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let m = self.mem.memory();
        let p = m.get_host_address(GuestAddress(gpa)).unwrap();
        let mut v = vec![0u8; len];
        // SAFETY: the caller stays inside the region (`MEM_SIZE` bytes at 0).
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }

    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(16 * u64::from(i), &b);
    }

    /// Makes chain `head` available (§2.7.13: entry before index).
    pub fn make_available(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * usize::from(self.avail_idx % QSIZE);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the avail ring lies inside the mapped region; aligned.
        unsafe {
            std::ptr::write_volatile(self.ring.add(slot) as *mut u16, head.to_le());
            fence(Ordering::Release);
            std::ptr::write_volatile(self.ring.add(AVAIL + 2) as *mut u16, self.avail_idx.to_le());
        }
    }

    /// The next used chain: head and used length.
    pub fn next_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring lies inside the mapped region; aligned.
        let idx =
            u16::from_le(unsafe { std::ptr::read_volatile(self.ring.add(USED + 2) as *const u16) });
        if idx == self.used_seen {
            return None;
        }
        fence(Ordering::Acquire);
        let at = USED + 4 + 8 * usize::from(self.used_seen % QSIZE);
        self.used_seen = self.used_seen.wrapping_add(1);
        // SAFETY: as above.
        let (id, len) = unsafe {
            (
                std::ptr::read_volatile(self.ring.add(at) as *const u32),
                std::ptr::read_volatile(self.ring.add(at + 4) as *const u32),
            )
        };
        Some((u32::from_le(id) as u16, u32::from_le(len)))
    }

    /// Keeps `heads` in flight until `n` requests completed, each with `used_len` bytes
    /// written; the time per request.
    pub fn run(&mut self, q: &mut dyn Poller, heads: &[u16], n: u64, used_len: u32) -> Duration {
        keep_in_flight(self, q, heads.iter().copied(), n, used_len)
    }
}

/// What [`keep_in_flight`] needs of a test driver, split or packed.
pub trait RingDriver {
    /// Makes chain (head or buffer id) `id` available to the device.
    fn make_available(&mut self, id: u16);
    /// The next used chain and the bytes written, if the device returned one.
    fn next_used(&mut self) -> Option<(u16, u32)>;
}

impl RingDriver for Driver {
    fn make_available(&mut self, id: u16) {
        Driver::make_available(self, id)
    }
    fn next_used(&mut self) -> Option<(u16, u32)> {
        Driver::next_used(self)
    }
}

/// Keeps chains `ids` in flight on `q` until `n` requests completed, each with `used_len`
/// bytes written, then stops the queue; the time per request.
pub fn keep_in_flight(
    d: &mut impl RingDriver,
    q: &mut dyn Poller,
    ids: impl IntoIterator<Item = u16>,
    n: u64,
    used_len: u32,
) -> Duration {
    for id in ids {
        d.make_available(id);
    }
    let start = Instant::now();
    let mut done = 0u64;
    while done < n {
        q.poll();
        while let Some((id, len)) = d.next_used() {
            assert_eq!(len, used_len, "request {done} (chain {id}) failed");
            done += 1;
            d.make_available(id);
        }
    }
    let per = start.elapsed() / u32::try_from(n).unwrap_or(u32::MAX);
    q.request_stop();
    while !q.finished() {
        q.poll();
    }
    per
}
