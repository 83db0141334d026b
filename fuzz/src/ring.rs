//! A split virtqueue (virtio 1.2 §2.7) in mmap-backed guest memory, built from fuzz bytes.
//!
//! Guest memory is three 64 KiB regions: two adjacent ones at 0 and 0x10000, a hole, and one
//! at 0x40000 (as in the parsers' unit tests), so buffers can straddle a region boundary or
//! fall into the hole. The rings sit at fixed addresses at the bottom of the first region;
//! everything else comes from the input:
//!
//! ```text
//! byte 0       queue size 1 << (b % 7) (1..64); b >> 3: target-specific knobs
//! bytes 1..3   le16 avail ring entry 0: the chain head (may be out of range)
//! byte 3       number n of descriptors that follow (the rest of the table is zero)
//! n x 12       le32 addr, le32 len, le16 flags, le16 next; flag bit 15 puts the address
//!              at 0xffff_ffff_0000_0000 + addr (overflow near the top), not passed on
//! rest         bytes written at PAYLOAD (headers, data, indirect tables, segments)
//! ```

use blockd::vhost::guest_map::GuestMap;
use blockd::vhost::split_ring::RingView;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub type Mem = vm_memory::GuestMemoryMmap<()>;

pub const DESC_TABLE: u64 = 0;
pub const AVAIL: u64 = 0x400;
pub const USED: u64 = 0x600;
pub const PAYLOAD: u64 = 0x1000;
pub const DESC_BYTES: usize = 12;
/// Largest queue the layout has room for (the table must end below `AVAIL`).
pub const MAX_QUEUE: u16 = 64;
/// Descriptor flag bit 15 of the input (not a virtio flag): high address.
pub const HIGH_ADDR: u16 = 1 << 15;

/// A ring with one available chain.
pub struct Ring {
    pub mem: Mem,
    pub queue: Queue,
    /// Target-specific knobs from byte 0.
    pub knobs: u8,
}

/// One input descriptor, for seed generators and regression tests.
pub fn encode_desc(out: &mut Vec<u8>, addr: u32, len: u32, flags: u16, next: u16) {
    out.extend_from_slice(&addr.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&next.to_le_bytes());
}

impl Ring {
    /// Lays out the ring described by `data`; None when the input is too short.
    pub fn from_bytes(data: &[u8]) -> Option<Ring> {
        let (&b0, rest) = data.split_first()?;
        let size = 1u16 << (b0 % 7);
        let head = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?);
        let n = usize::from(*rest.get(2)?).min(usize::from(size));
        let descs = rest.get(3..3 + n * DESC_BYTES)?;
        let payload = &rest[3 + n * DESC_BYTES..];
        let mem = Mem::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
            (GuestAddress(0x40000), 0x10000),
        ])
        .expect("guest memory");
        for (i, d) in descs.chunks_exact(DESC_BYTES).enumerate() {
            let addr = u32::from_le_bytes(d[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(d[4..8].try_into().unwrap());
            let flags = u16::from_le_bytes(d[8..10].try_into().unwrap());
            let next = u16::from_le_bytes(d[10..12].try_into().unwrap());
            let addr = if flags & HIGH_ADDR != 0 {
                0xffff_ffff_0000_0000 | u64::from(addr)
            } else {
                u64::from(addr)
            };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&(flags & !HIGH_ADDR).to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(DESC_TABLE + 16 * i as u64))
                .unwrap();
        }
        // avail: flags 0, idx 1, ring[0] = head.
        let mut avail = [0u8; 6];
        avail[2..4].copy_from_slice(&1u16.to_le_bytes());
        avail[4..6].copy_from_slice(&head.to_le_bytes());
        mem.write_slice(&avail, GuestAddress(AVAIL)).unwrap();
        let room = (0x10000 - PAYLOAD) as usize;
        mem.write_slice(&payload[..payload.len().min(room)], GuestAddress(PAYLOAD))
            .unwrap();

        let mut queue = Queue::new(MAX_QUEUE).expect("queue");
        queue.set_size(size);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&mem), "the fixed layout is a valid queue");
        Some(Ring {
            mem,
            queue,
            knobs: b0 >> 3,
        })
    }

    /// The chain head both paths start from, and the ring view (always built: the rings
    /// lie in one region).
    pub fn view(&self, map: &GuestMap) -> (RingView, u16) {
        let view = RingView::new(&self.queue, map).expect("the rings lie in one region");
        let head = view.avail_entry(self.queue.next_avail());
        (view, head)
    }
}
