//! Test support shared by the request parsers' tests (virtio-blk and virtio-scsi): a guest
//! memory of two adjacent regions and a hole, descriptors as virtio-queue's mock driver lays
//! them out, the ring view of a mock queue (the hot path each parser must agree with), and a
//! deterministic random source for hostile chains.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use crate::vhost::guest_map::GuestMap;
use crate::vhost::split_ring::RingView;

pub type Mem = vm_memory::GuestMemoryMmap<()>;

/// Descriptor flags (virtio 1.2 §2.7.5).
pub const R: u16 = 0;
pub const W: u16 = VRING_DESC_F_WRITE as u16;
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const IND: u16 = VRING_DESC_F_INDIRECT as u16;

/// Unmapped: between region B (ends 0x20000) and region C (starts 0x40000).
pub const HOLE: u64 = 0x30000;

/// Regions A [0, 0x10000) and B [0x10000, 0x20000), adjacent, and C [0x40000, 0x50000).
pub fn mem() -> Mem {
    Mem::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10000), 0x10000),
        (GuestAddress(0x40000), 0x10000),
    ])
    .unwrap()
}

/// A descriptor as the driver writes it.
pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Calls `f` with the pre-translated view of `q`'s rings and the head at its next available
/// entry: what the engine's fast path parses from. The map and view live only during `f`,
/// while `mem` is borrowed.
pub fn with_ring_view<T>(
    mem: &Mem,
    q: &MockSplitQueue<Mem>,
    f: impl FnOnce(&GuestMap, &RingView, u16) -> T,
) -> T {
    let queue: Queue = q.create_queue().unwrap();
    // SAFETY: `mem` is borrowed for this whole call, and `map` and `view`, which point into
    // it, are dropped before it returns.
    let map = unsafe { GuestMap::new(mem) };
    let view = RingView::new(&queue, &map).expect("the mock's rings lie in one region");
    let head = view.avail_entry(queue.next_avail());
    f(&map, &view, head)
}

/// Deterministic xorshift64*.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
