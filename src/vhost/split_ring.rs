//! The split virtqueue (virtio 1.2 §2.7) read and written through host pointers that were
//! translated once, when the ring or the memory table was set up.
//!
//! virtio-queue's `Queue` stays the owner of the ring state (addresses, size, features,
//! `next_avail`/`next_used`, notification suppression for the reactor's sleeps): this view
//! only replaces its per-request accessors, which go through vm-memory for each field and
//! were 60% of blockd's instructions per request. When a ring does not lie inside one
//! memory region the view is not built and the caller uses `Queue` as before.
//!
//! Layout (§2.7.5-§2.7.8), for a queue of `size` entries:
//! ```text
//! descriptor table: size × { le64 addr, le32 len, le16 flags, le16 next }
//! available ring:   le16 flags, le16 idx, size × le16 ring, le16 used_event
//! used ring:        le16 flags, le16 idx, size × { le32 id, le32 len }, le16 avail_event
//! ```
//! The guest writes its parts concurrently: every field is read once, with a volatile
//! access, and treated as untrusted; ordering follows §2.7.13 (read `idx` before the ring
//! entries it publishes; write used entries before `idx`).

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};

use crate::vhost::guest_map::GuestMap;
use crate::vhost::guest_stream::Desc;

/// Size of one descriptor (§2.7.5).
const DESC_LEN: u64 = 16;

/// Why a chain cannot be read; the same cases virtio-queue's `DescriptorChain` stops on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// Not even the first descriptor could be read (head index out of range).
    Empty,
    /// The chain was cut short: a loop (more descriptors than the table holds), a `next`
    /// out of range, an unmapped or malformed indirect table, or a nested one.
    Truncated,
    /// More than the caller's maximum of descriptors.
    TooLong,
}

/// A descriptor as the driver lays it out (§2.7.5), little-endian.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A split ring's three parts as host pointers; see the module documentation.
#[derive(Debug)]
pub struct RingView {
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    size: u16,
}

// SAFETY: pointers into shared guest memory, kept mapped by the owner of the view.
unsafe impl Send for RingView {}

impl RingView {
    /// The view of `queue`'s rings in `map`, or None when the queue is not ready or a ring
    /// is not inside one region (the caller then uses `queue`'s accessors).
    pub fn new(queue: &Queue, map: &GuestMap) -> Option<Self> {
        let size = queue.size();
        // Split rings have power-of-two sizes (§2.7; virtio-queue refuses others), so an
        // index wraps with a mask rather than a division.
        if !queue.ready() || !size.is_power_of_two() {
            return None;
        }
        let n = u64::from(size);
        let desc = map.host_range(queue.desc_table(), n * DESC_LEN)?;
        let avail = map.host_range(queue.avail_ring(), 4 + 2 * n + 2)?;
        let used = map.host_range(queue.used_ring(), 4 + 8 * n + 2)?;
        // The field accesses below are aligned loads and stores: the host addresses must
        // be aligned as §2.7 requires of the guest addresses (2 and 4 bytes; descriptors
        // are copied bytewise). A frontend that breaks this gets the slow path, which copes.
        if !(avail as usize).is_multiple_of(2) || !(used as usize).is_multiple_of(4) {
            return None;
        }
        Some(RingView {
            desc,
            avail,
            used,
            size,
        })
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The driver's `avail->idx`, with acquire ordering for the entries it publishes.
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        // SAFETY: `avail` maps the whole available ring; offset 2 is aligned.
        let idx = unsafe { std::ptr::read_volatile(self.avail.add(2) as *const u16) };
        fence(Ordering::Acquire);
        u16::from_le(idx)
    }

    /// Entry `pos` (mod size) of the available ring: a chain head, still unchecked.
    #[inline]
    pub fn avail_entry(&self, pos: u16) -> u16 {
        let i = usize::from(pos & (self.size - 1));
        // SAFETY: i < size, inside the mapped ring; aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.add(4 + 2 * i) as *const u16) })
    }

    /// `avail->flags` (§2.7.6): `VRING_AVAIL_F_NO_INTERRUPT` asks for no interrupts
    /// (meaningful without EVENT_IDX).
    #[inline]
    pub fn avail_flags(&self) -> u16 {
        // SAFETY: `avail` maps the whole available ring; offset 0 is aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail as *const u16) })
    }

    /// `used_event` (§2.7.10), written by the driver with EVENT_IDX.
    #[inline]
    pub fn used_event(&self) -> u16 {
        let off = 4 + 2 * usize::from(self.size);
        // SAFETY: the available ring was mapped with its trailing used_event; aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.avail.add(off) as *const u16) })
    }

    /// Writes used element `pos` (mod size), without publishing it: the driver sees it once
    /// [`RingView::publish_used`] moves `idx` past it (§2.7.8).
    #[inline]
    pub fn write_used(&self, pos: u16, id: u16, len: u32) {
        let i = usize::from(pos & (self.size - 1));
        // SAFETY: i < size, inside the mapped used ring; 4-byte aligned.
        unsafe {
            let elem = self.used.add(4 + 8 * i);
            std::ptr::write_volatile(elem as *mut u32, u32::from(id).to_le());
            std::ptr::write_volatile(elem.add(4) as *mut u32, len.to_le());
        }
    }

    /// Publishes every used element written before `idx` (§2.7.8: the elements must be
    /// visible before the index that covers them).
    #[inline]
    pub fn publish_used(&self, idx: u16) {
        fence(Ordering::Release);
        // SAFETY: offset 2 of the mapped used ring; aligned.
        unsafe { std::ptr::write_volatile(self.used.add(2) as *mut u16, idx.to_le()) };
    }

    /// Descriptor `i` of a table at `table` (`i` already checked against its length), as
    /// one 16-byte load.
    #[inline]
    fn read_desc(table: *const u8, i: u16) -> RawDesc {
        // SAFETY: the caller checked that entry `i` lies inside the mapped table; the
        // guest may rewrite it concurrently, so it is copied out once (unaligned: a hostile
        // driver may misplace the table).
        let d = unsafe {
            std::ptr::read_unaligned(
                table
                    .add(usize::from(i) * DESC_LEN as usize)
                    .cast::<RawDesc>(),
            )
        };
        RawDesc {
            addr: u64::from_le(d.addr),
            len: u32::from_le(d.len),
            flags: u16::from_le(d.flags),
            next: u16::from_le(d.next),
        }
    }

    /// Copies the non-empty descriptors of the chain at `head` into `out`, following one
    /// level of indirect table (§2.7.5.3), at most `max` descriptors (empty ones count).
    /// Stops exactly where virtio-queue's `DescriptorChain` stops: at `size` linked
    /// descriptors (a loop), a `next` out of range, a nested or malformed indirect table,
    /// an unreadable descriptor, or 4 GiB in total (§2.7.5.2).
    pub fn read_chain(
        &self,
        map: &GuestMap,
        head: u16,
        max: usize,
        out: &mut Vec<Desc>,
    ) -> Result<(), ChainError> {
        walk_chain(map, Some(self.desc), 0, self.size, head, max, out)
    }
}

/// [`RingView::read_chain`] without a view: the descriptor table at guest address `desc`,
/// of a ring of `size` entries, is read through `map` (a ring outside one memory region).
pub fn read_chain_in(
    map: &GuestMap,
    desc: u64,
    size: u16,
    head: u16,
    max: usize,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    walk_chain(map, None, desc, size, head, max, out)
}

/// The walk of [`RingView::read_chain`]: through `table`, the view's mapped table of
/// `size` entries, when given; else through `map` at `table_gpa`.
fn walk_chain(
    map: &GuestMap,
    table: Option<*const u8>,
    table_gpa: u64,
    size: u16,
    head: u16,
    max: usize,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    // The table being walked: mapped in one piece, or (an indirect table across
    // regions) read descriptor by descriptor.
    let mut table = table;
    let mut table_gpa = table_gpa;
    let mut table_len = size;
    let mut indirect = false;
    let mut next = head;
    let mut ttl = size;
    let mut bytes = 0u32;
    let mut count = 0usize;
    let cut = |count: usize| {
        if count == 0 {
            ChainError::Empty
        } else {
            ChainError::Truncated
        }
    };
    loop {
        if ttl == 0 || next >= table_len {
            return Err(cut(count));
        }
        let raw = match table {
            Some(t) => RingView::read_desc(t, next),
            None => {
                let mut d = [0u8; 16];
                let at = table_gpa + u64::from(next) * DESC_LEN;
                map.read(at, &mut d).map_err(|_| cut(count))?;
                RingView::read_desc(d.as_ptr(), 0)
            }
        };
        let (addr, len, flags, nxt) = (raw.addr, raw.len, u32::from(raw.flags), raw.next);
        if flags & VRING_DESC_F_INDIRECT != 0 {
            let n = u64::from(len) / DESC_LEN;
            if indirect || u64::from(len) % DESC_LEN != 0 || n > u64::from(u16::MAX) {
                return Err(cut(count));
            }
            table = map.host_range(addr, u64::from(len)).map(|p| p as *const u8);
            table_gpa = addr;
            table_len = n as u16;
            ttl = table_len;
            indirect = true;
            next = 0;
            continue;
        }
        bytes = bytes.checked_add(len).ok_or_else(|| cut(count))?;
        count += 1;
        if count > max {
            return Err(ChainError::TooLong);
        }
        if len > 0 {
            out.push(Desc {
                addr,
                len,
                write: flags & VRING_DESC_F_WRITE != 0,
            });
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        next = nxt;
        ttl -= 1;
    }
}

/// `vring_need_event` (§2.7.10): whether moving the used index from `old` to `new` passed
/// the driver's `used_event`.
#[inline]
pub fn need_event(used_event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_follows_the_linux_formula() {
        // The driver wants an interrupt once entry 5 is used.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(9, 8, 3));
        // Wrapping.
        assert!(need_event(u16::MAX, 1, u16::MAX - 1));
        // Nothing added: never.
        assert!(!need_event(5, 6, 6));
    }
}
