//! The driver side of a packed ring (virtio 1.2 §2.8) in one region of guest memory,
//! played by hand through host pointers: for the queue benchmarks and tests on packed
//! rings ([`super::driver`] plays a split ring).

use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::driver::{keep_in_flight, RingDriver, QSIZE, WRITE};
use crate::reactor::Poller;
use crate::vhost::device::{GuestMem, QueueSetup};

type Mem = vm_memory::GuestMemoryMmap<()>;

const MEM_SIZE: usize = 0x100000;
/// Descriptor ring at 0 (`QSIZE` × 16 bytes), driver and device areas after it.
const DRIVER: usize = 0x1000;
const DEVICE: usize = 0x1004;
const NEXT: u16 = 1;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// The driver side of one packed ring at guest address 0; each buffer id has a fixed
/// chain of buffers, made available again when it is used.
pub struct PackedDriver {
    mem: GuestMem,
    ring: *mut u8,
    avail: u16,
    avail_wrap: bool,
    used: u16,
    used_wrap: bool,
    /// Per buffer id: its chain as `(addr, len, flags)` (NEXT added on all but the last).
    pub chains: Vec<Vec<(u64, u32, u16)>>,
}

impl PackedDriver {
    pub fn new() -> Self {
        let m = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let ring = m.get_host_address(GuestAddress(0)).unwrap();
        PackedDriver {
            mem: GuestMem::new(m),
            ring,
            avail: 0,
            avail_wrap: true,
            used: 0,
            used_wrap: true,
            chains: Vec::new(),
        }
    }

    pub fn setup(&self) -> (QueueSetup, mpsc::Receiver<u16>) {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(0)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(DRIVER as u64))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(DEVICE as u64))
            .unwrap();
        q.set_event_idx(true);
        // The base of a fresh packed ring: index 0, wrap counter 1.
        q.set_next_avail(0x8000);
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
            packed: true,
        };
        (setup, rx)
    }

    /// The guest memory the ring lives in.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM_SIZE);
        // SAFETY: inside the 1 MiB region, checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ring.add(gpa as usize), bytes.len())
        };
    }

    /// Makes the chain of buffer `id` available at the driver's position, the head's flags
    /// last (§2.8.21).
    pub fn make_available(&mut self, id: u16) {
        let chain = &self.chains[usize::from(id)];
        let mut head = None;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let mut f = flags;
            if i + 1 < chain.len() {
                f |= NEXT;
            }
            f |= if self.avail_wrap { F_AVAIL } else { F_USED };
            let at = 16 * usize::from(self.avail);
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&id.to_le_bytes());
            // SAFETY: the ring lies inside the mapped region.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ring.add(at), 14) };
            if i == 0 {
                head = Some((at, f));
            } else {
                // SAFETY: as above; aligned.
                unsafe { std::ptr::write_volatile(self.ring.add(at + 14) as *mut u16, f.to_le()) };
            }
            self.avail += 1;
            if self.avail == QSIZE {
                self.avail = 0;
                self.avail_wrap = !self.avail_wrap;
            }
        }
        if let Some((at, f)) = head {
            fence(Ordering::Release);
            // SAFETY: as above; aligned.
            unsafe { std::ptr::write_volatile(self.ring.add(at + 14) as *mut u16, f.to_le()) };
        }
    }

    /// The next used buffer: id and used length.
    pub fn next_used(&mut self) -> Option<(u16, u32)> {
        let at = 16 * usize::from(self.used);
        // SAFETY: the ring lies inside the mapped region; aligned.
        let flags =
            u16::from_le(unsafe { std::ptr::read_volatile(self.ring.add(at + 14) as *const u16) });
        let w = self.used_wrap;
        if (flags & F_AVAIL != 0) != w || (flags & F_USED != 0) != w {
            return None;
        }
        fence(Ordering::Acquire);
        // SAFETY: as above.
        let (len, id) = unsafe {
            (
                u32::from_le(std::ptr::read_volatile(self.ring.add(at + 8) as *const u32)),
                u16::from_le(std::ptr::read_volatile(self.ring.add(at + 12) as *const u16)),
            )
        };
        self.used += self.chains[usize::from(id)].len() as u16;
        if self.used >= QSIZE {
            self.used -= QSIZE;
            self.used_wrap = !self.used_wrap;
        }
        Some((id, len))
    }

    /// The driver's used position as a packed ring's base (wrap counter in bit 15).
    pub fn used_base(&self) -> u16 {
        self.used | (u16::from(self.used_wrap) << 15)
    }

    /// Keeps buffers `0..chains.len()` in flight until `n` requests completed, each with
    /// `used_len` bytes written; the time per request.
    pub fn run(&mut self, q: &mut dyn Poller, n: u64, used_len: u32) -> Duration {
        let ids = 0..self.chains.len() as u16;
        keep_in_flight(self, q, ids, n, used_len)
    }
}

/// A flag for chains: device-writable.
pub const W: u16 = WRITE;

impl RingDriver for PackedDriver {
    fn make_available(&mut self, id: u16) {
        PackedDriver::make_available(self, id)
    }
    fn next_used(&mut self) -> Option<(u16, u32)> {
        PackedDriver::next_used(self)
    }
}
