//! The packed layout of a queue's part of the in-flight region (vhost-user.rst "Inflight
//! I/O tracking", `QueueRegionPacked` and `DescStatePacked`), for packed virtqueues
//! (virtio 1.2 §2.8): one entry per ring descriptor taken, allocated from a free list, so
//! that a chain's descriptors survive the device overwriting its ring slots with used
//! descriptors (out-of-order completion), and the device's used position with its wrap
//! counter, which QEMU cannot give back after a disconnection (it has no used index to
//! restore a packed ring from and sends the base it last sent).
//!
//! Layout, little-endian, at the part's start ([`part_len`](super::part_len) apart):
//! ```text
//! 0   u64 features  8 u16 version  10 u16 desc_num  12 u16 free_head  14 u16 old_free_head
//! 16  u16 used_idx  18 u16 old_used_idx  20 u8 used_wrap_counter  21 u8 old_used_wrap_counter
//! 32  desc[desc_num], 32 bytes each: u8 inflight, u8 padding, u16 next, u16 last, u16 num,
//!     u64 counter, u16 id, u16 flags, u32 len, u64 addr
//! ```
//! The order of the writes is the spec's, with one difference that keeps it exact when the
//! device takes chains between returning some and publishing them: returned entries join
//! the free list only when the batch is published ([`QueueInflight::packed_commit`]), so a
//! chain taken meanwhile never reuses the entries of one that may yet be rolled back.
//!
//! Everything read back is untrusted: entries are bounds-checked, lists are walked at most
//! `desc_num` steps and never twice through an entry, and a chain that does not add up is
//! dropped (logged), never followed.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{fence, Ordering};

use super::{QueueInflight, QUEUE_ALIGN, REGION_VERSION};

/// The spec's `QueueRegionPacked` without its `desc[]`.
#[repr(C)]
pub struct QueueRegionPacked {
    pub features: u64,
    pub version: u16,
    pub desc_num: u16,
    pub free_head: u16,
    pub old_free_head: u16,
    pub used_idx: u16,
    pub old_used_idx: u16,
    pub used_wrap_counter: u8,
    pub old_used_wrap_counter: u8,
    pub padding: [u8; 7],
}

/// The spec's `DescStatePacked`: one ring descriptor taken.
#[repr(C)]
pub struct DescStatePacked {
    pub inflight: u8,
    pub padding: u8,
    pub next: u16,
    pub last: u16,
    pub num: u16,
    pub counter: u64,
    pub id: u16,
    pub flags: u16,
    pub len: u32,
    pub addr: u64,
}

const VERSION: usize = offset_of!(QueueRegionPacked, version);
const DESC_NUM: usize = offset_of!(QueueRegionPacked, desc_num);
const FREE_HEAD: usize = offset_of!(QueueRegionPacked, free_head);
const OLD_FREE_HEAD: usize = offset_of!(QueueRegionPacked, old_free_head);
const USED_IDX: usize = offset_of!(QueueRegionPacked, used_idx);
const OLD_USED_IDX: usize = offset_of!(QueueRegionPacked, old_used_idx);
const USED_WRAP: usize = offset_of!(QueueRegionPacked, used_wrap_counter);
const OLD_USED_WRAP: usize = offset_of!(QueueRegionPacked, old_used_wrap_counter);
const HEADER_LEN: usize = size_of::<QueueRegionPacked>().next_multiple_of(8);
const ENTRY_LEN: usize = size_of::<DescStatePacked>();
const E_INFLIGHT: usize = offset_of!(DescStatePacked, inflight);
const E_NEXT: usize = offset_of!(DescStatePacked, next);
const E_LAST: usize = offset_of!(DescStatePacked, last);
const E_NUM: usize = offset_of!(DescStatePacked, num);
const E_COUNTER: usize = offset_of!(DescStatePacked, counter);
const E_ID: usize = offset_of!(DescStatePacked, id);
const E_FLAGS: usize = offset_of!(DescStatePacked, flags);
const E_LEN: usize = offset_of!(DescStatePacked, len);
const E_ADDR: usize = offset_of!(DescStatePacked, addr);

/// Descriptor flags AVAIL and USED (virtio 1.2 §2.8.21).
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// Bytes one queue's packed part takes for rings of up to `queue_size` entries.
pub fn queue_region_len(queue_size: u16) -> u64 {
    let raw = (HEADER_LEN + ENTRY_LEN * usize::from(queue_size)) as u64;
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// A ring descriptor as recorded in an entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawEntry {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

/// A chain a previous instance left in flight.
#[derive(Debug, PartialEq, Eq)]
pub struct Restored {
    /// Its entries, head first (the head is the chain's token).
    pub entries: Vec<u16>,
    /// Its ring descriptors, in order.
    pub descs: Vec<RawEntry>,
}

/// What a packed ring restarts with ([`QueueInflight::packed_resume`]).
#[derive(Debug, PartialEq, Eq)]
pub struct PackedResume {
    /// The part was not initialised for this ring: it starts at the front-end's base.
    pub fresh: bool,
    /// The device's used position: next used slot | wrap counter << 15.
    pub used: u16,
    /// Chains in flight, in the order they were taken.
    pub chains: Vec<Restored>,
    /// The counter the next chain taken gets.
    pub next_counter: u64,
    /// The free list rebuilt: `next` links of every entry and its head.
    pub next: Vec<u16>,
    pub free_head: u16,
    /// A batch published but not recorded was committed (true), or one not published was
    /// rolled back.
    pub committed: bool,
    /// Chains whose entries did not add up (a corrupted region): dropped.
    pub dropped: usize,
}

/// The flags the driver gives a descriptor it makes available with wrap counter `wrap`.
pub fn avail_flags(wrap: bool) -> u16 {
    if wrap {
        F_AVAIL
    } else {
        F_USED
    }
}

impl QueueInflight {
    fn entry(&self, e: u16) -> Option<usize> {
        (e < self.capacity).then(|| HEADER_LEN + usize::from(e) * ENTRY_LEN)
    }

    fn rd8(&self, off: usize) -> u8 {
        // SAFETY: callers pass offsets inside the part (a header field or a checked entry).
        unsafe { std::ptr::read_volatile(self.base.add(off)) }
    }

    fn wr8(&self, off: usize, v: u8) {
        // SAFETY: as rd8.
        unsafe { std::ptr::write_volatile(self.base.add(off), v) }
    }

    fn rd32(&self, off: usize) -> u32 {
        // SAFETY: as rd8; 4-byte aligned (32-byte entries from a 64-byte aligned part).
        u32::from_le(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u32>()) })
    }

    fn wr32(&self, off: usize, v: u32) {
        // SAFETY: as rd32.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u32>(), v.to_le()) }
    }

    fn rd64(&self, off: usize) -> u64 {
        // SAFETY: as rd8; 8-byte aligned (the fields are at multiples of 8 in an entry).
        u64::from_le(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u64>()) })
    }

    fn wr64(&self, off: usize, v: u64) {
        // SAFETY: as rd64.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u64>(), v.to_le()) }
    }

    fn e16(&self, e: u16, field: usize) -> u16 {
        self.entry(e).map_or(u16::MAX, |d| self.rd16(d + field))
    }

    fn set_e16(&self, e: u16, field: usize, v: u16) {
        if let Some(d) = self.entry(e) {
            self.wr16(d + field, v);
        }
    }

    fn set_e_inflight(&self, e: u16, v: bool) {
        if let Some(d) = self.entry(e) {
            self.wr8(d + E_INFLIGHT, u8::from(v));
        }
    }

    /// A chain was taken: its ring descriptors `descs` went to `entries` (taken from the
    /// free list, head first), with `counter`; the free list now starts at `free_head`.
    /// The spec's order: the entries, then the head's `inflight`, then the list's head
    /// (a crash before that leaves the head at the start of the free list, cleared on
    /// resume).
    #[inline]
    pub fn packed_take(&self, entries: &[u16], descs: &[RawEntry], counter: u64, free_head: u16) {
        let (Some(&head), Some(&last)) = (entries.first(), entries.last()) else {
            return;
        };
        for (&e, d) in entries.iter().zip(descs) {
            if let Some(o) = self.entry(e) {
                self.wr64(o + E_ADDR, d.addr);
                self.wr32(o + E_LEN, d.len);
                self.wr16(o + E_ID, d.id);
                self.wr16(o + E_FLAGS, d.flags);
                if e != head {
                    self.wr8(o + E_INFLIGHT, 0);
                }
            }
        }
        if let Some(o) = self.entry(head) {
            self.wr16(o + E_NUM, entries.len() as u16);
            self.wr16(o + E_LAST, last);
            self.wr64(o + E_COUNTER, counter);
            fence(Ordering::Release);
            self.wr8(o + E_INFLIGHT, 1);
        }
        fence(Ordering::Release);
        self.wr16(FREE_HEAD, free_head);
        self.wr16(OLD_FREE_HEAD, free_head);
    }

    /// A batch of used descriptors is published: `links` are the returned chains as
    /// (head, last entry, the `next` its last entry gets), the free list then starts at
    /// `free_head`, and the device's used position is `used` (slot | wrap << 15).
    /// `publish` makes the batch visible to the driver (the flags of its first used
    /// descriptor). The spec's order: the free list and used position, the flags, the
    /// heads' `inflight`, then the `old_` copies (the committed state).
    pub fn packed_commit(
        &self,
        links: &[(u16, u16, u16)],
        free_head: u16,
        used: u16,
        publish: impl FnOnce(),
    ) {
        for &(_, last, next) in links {
            self.set_e16(last, E_NEXT, next);
        }
        self.wr16(FREE_HEAD, free_head);
        self.wr16(USED_IDX, used & 0x7fff);
        self.wr8(USED_WRAP, u8::from(used & 0x8000 != 0));
        fence(Ordering::Release);
        publish();
        fence(Ordering::SeqCst);
        for &(head, _, _) in links {
            self.set_e_inflight(head, false);
        }
        fence(Ordering::Release);
        self.wr16(OLD_FREE_HEAD, free_head);
        self.wr16(OLD_USED_IDX, used & 0x7fff);
        self.wr8(OLD_USED_WRAP, u8::from(used & 0x8000 != 0));
    }

    /// Takes the part over for a packed ring of `size` entries that the front-end started
    /// at `base`; `flags_at` reads a ring slot's flags (guest memory). A part never
    /// initialised for such a ring starts afresh at `base`. Otherwise the spec's recovery:
    /// a batch in progress is committed when its first used descriptor reached the driver
    /// (the slot at the old used position no longer holds the driver's available flags),
    /// else rolled back; the entries on the free list are not in flight; the chains still
    /// in flight come back in counter order. The free list is then rebuilt from what is
    /// in use, so that nothing the front-end could have written is followed again.
    pub fn packed_resume(
        &self,
        size: u16,
        base: u16,
        flags_at: impl Fn(u16) -> Option<u16>,
    ) -> PackedResume {
        let fresh = || PackedResume {
            fresh: true,
            used: base,
            chains: Vec::new(),
            next_counter: 0,
            next: (1..=size).collect(),
            free_head: 0,
            committed: false,
            dropped: 0,
        };
        let version = self.rd16(VERSION);
        let desc_num = self.rd16(DESC_NUM);
        let old_used = self.rd16(OLD_USED_IDX);
        if version != REGION_VERSION
            || desc_num != size
            || size > self.capacity
            || old_used >= size
            || self.rd16(USED_IDX) >= size
        {
            if version != 0 {
                tracing::warn!(
                    version,
                    desc_num,
                    size,
                    "inflight region does not describe this packed ring: starting it afresh"
                );
            }
            self.packed_init(size, base);
            return fresh();
        }
        // 1. A batch in progress: published or not.
        let mut committed = false;
        let old_wrap = self.rd8(OLD_USED_WRAP) != 0;
        if self.rd16(USED_IDX) != old_used || (self.rd8(USED_WRAP) != 0) != old_wrap {
            let published =
                flags_at(old_used).is_some_and(|f| f & (F_AVAIL | F_USED) != avail_flags(old_wrap));
            if published {
                committed = true;
                self.wr16(OLD_FREE_HEAD, self.rd16(FREE_HEAD));
                self.wr16(OLD_USED_IDX, self.rd16(USED_IDX));
                self.wr8(OLD_USED_WRAP, self.rd8(USED_WRAP));
            }
        }
        // 2. Roll back what was not committed.
        let (used_idx, used_wrap) = (self.rd16(OLD_USED_IDX), self.rd8(OLD_USED_WRAP) != 0);
        if used_idx >= size {
            self.packed_init(size, base);
            return fresh();
        }
        let n = usize::from(size);
        // 3. The free list is not in flight.
        let mut in_use = vec![false; n];
        let mut e = self.rd16(OLD_FREE_HEAD);
        for _ in 0..n {
            if e >= size || in_use[usize::from(e)] {
                break;
            }
            in_use[usize::from(e)] = true;
            self.set_e_inflight(e, false);
            e = self.e16(e, E_NEXT);
        }
        let free_listed = in_use.clone();
        in_use.iter_mut().for_each(|u| *u = false);
        // 4. The heads in flight, their entries checked.
        let mut pending: Vec<(u64, Restored)> = Vec::new();
        let mut dropped = 0;
        let mut total = 0usize;
        for h in 0..size {
            let Some(o) = self.entry(h) else { break };
            if free_listed[usize::from(h)] || self.rd8(o + E_INFLIGHT) == 0 {
                continue;
            }
            let num = self.rd16(o + E_NUM);
            let mut entries = Vec::with_capacity(usize::from(num.min(size)));
            let mut e = h;
            let mut ok = num >= 1 && usize::from(num) + total <= n;
            for i in 0..num {
                if !ok {
                    break;
                }
                if e >= size || in_use[usize::from(e)] || (i > 0 && e == h) {
                    ok = false;
                    break;
                }
                entries.push(e);
                if i + 1 < num {
                    e = self.e16(e, E_NEXT);
                }
            }
            if !ok || entries.last() != Some(&self.rd16(o + E_LAST)) {
                dropped += 1;
                self.set_e_inflight(h, false);
                continue;
            }
            total += entries.len();
            let descs = entries
                .iter()
                .filter_map(|&e| self.entry(e))
                .map(|o| RawEntry {
                    addr: self.rd64(o + E_ADDR),
                    len: self.rd32(o + E_LEN),
                    id: self.rd16(o + E_ID),
                    flags: self.rd16(o + E_FLAGS),
                })
                .collect();
            for &e in &entries {
                in_use[usize::from(e)] = true;
            }
            pending.push((self.rd64(o + E_COUNTER), Restored { entries, descs }));
        }
        pending.sort_by_key(|(c, _)| *c);
        let next_counter = pending.last().map_or(0, |(c, _)| c.wrapping_add(1));
        // 5. The free list rebuilt: every entry not in use, in order.
        let mut next: Vec<u16> = (0..size).map(|e| self.e16(e, E_NEXT)).collect();
        let mut free_head = size;
        for e in (0..size).rev() {
            if !in_use[usize::from(e)] {
                next[usize::from(e)] = free_head;
                self.set_e16(e, E_NEXT, free_head);
                free_head = e;
            }
        }
        self.wr16(FREE_HEAD, free_head);
        self.wr16(USED_IDX, used_idx);
        self.wr8(USED_WRAP, u8::from(used_wrap));
        fence(Ordering::Release);
        self.wr16(OLD_FREE_HEAD, free_head);
        PackedResume {
            fresh: false,
            used: used_idx | (u16::from(used_wrap) << 15),
            chains: pending.into_iter().map(|(_, r)| r).collect(),
            next_counter,
            next,
            free_head,
            committed,
            dropped,
        }
    }

    /// Initialises the part for a packed ring of `size` entries at `base` (nothing in
    /// flight, every entry free in order), the version last.
    fn packed_init(&self, size: u16, base: u16) {
        self.wr16(VERSION, 0);
        fence(Ordering::Release);
        let size = size.min(self.capacity);
        for e in 0..size {
            self.set_e_inflight(e, false);
            self.set_e16(e, E_NEXT, e + 1);
        }
        self.wr16(DESC_NUM, size);
        for f in [FREE_HEAD, OLD_FREE_HEAD] {
            self.wr16(f, 0);
        }
        for f in [USED_IDX, OLD_USED_IDX] {
            self.wr16(f, base & 0x7fff);
        }
        for f in [USED_WRAP, OLD_USED_WRAP] {
            self.wr8(f, u8::from(base & 0x8000 != 0));
        }
        fence(Ordering::Release);
        self.wr16(VERSION, REGION_VERSION);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::inflight::InflightRegion;

    #[test]
    fn layout_is_the_specs() {
        // vhost-user.rst "Inflight I/O tracking", QueueRegionPacked and DescStatePacked.
        assert_eq!(VERSION, 8);
        assert_eq!(DESC_NUM, 10);
        assert_eq!(FREE_HEAD, 12);
        assert_eq!(OLD_FREE_HEAD, 14);
        assert_eq!(USED_IDX, 16);
        assert_eq!(OLD_USED_IDX, 18);
        assert_eq!(USED_WRAP, 20);
        assert_eq!(OLD_USED_WRAP, 21);
        assert_eq!(size_of::<QueueRegionPacked>(), 32);
        assert_eq!(HEADER_LEN, 32);
        assert_eq!(
            (E_INFLIGHT, E_NEXT, E_LAST, E_NUM, E_COUNTER),
            (0, 2, 4, 6, 8)
        );
        assert_eq!((E_ID, E_FLAGS, E_LEN, E_ADDR), (16, 18, 20, 24));
        assert_eq!(ENTRY_LEN, 32);
        // DPDK's get_pervq_shm_size_packed: header and entries, rounded up to 64 bytes.
        assert_eq!(queue_region_len(256), 32 + 256 * 32 + 32);
        let (_r, _f, msg) = InflightRegion::create(2, 256, true).unwrap();
        assert_eq!(msg.mmap_size, 2 * queue_region_len(256));
    }

    fn d(id: u16) -> RawEntry {
        RawEntry {
            addr: 0x1000 * u64::from(id),
            len: 512,
            id,
            flags: avail_flags(true),
        }
    }

    #[test]
    fn an_unpublished_batch_is_rolled_back_and_a_published_one_committed() {
        let (r, _f, _m) = InflightRegion::create(1, 8, true).unwrap();
        let q = r.queue(0).unwrap();
        q.packed_resume(8, 0x8000, |_| None);
        q.packed_take(&[0, 1], &[d(1), d(2)], 10, 2);
        q.packed_take(&[2], &[d(3)], 11, 3);
        q.packed_take(&[3, 4, 5], &[d(4), d(5), d(6)], 12, 6);
        q.packed_commit(&[(2, 2, 6)], 2, 0x8001, || {});
        // A crash in the middle of publishing A's batch (free list and used position
        // written, the flags not).
        q.set_e16(1, E_NEXT, 2);
        q.wr16(FREE_HEAD, 0);
        q.wr16(USED_IDX, 3);
        let not_yet = q.packed_resume(8, 0x8000, |slot| {
            assert_eq!(slot, 1);
            Some(avail_flags(true))
        });
        assert!(!not_yet.fresh && !not_yet.committed);
        assert_eq!(
            not_yet.used, 0x8001,
            "rolled back to the committed position"
        );
        let heads: Vec<u16> = not_yet.chains.iter().map(|c| c.entries[0]).collect();
        assert_eq!(heads, [0, 3], "in flight, in counter order");
        assert_eq!(not_yet.chains[1].entries, [3, 4, 5]);
        assert_eq!(not_yet.chains[1].descs, [d(4), d(5), d(6)]);
        assert_eq!(not_yet.next_counter, 13);
        assert_eq!(not_yet.free_head, 2);
        assert_eq!(not_yet.next[2], 6);
        assert_eq!(not_yet.next[7], 8);

        // The same crash, but the flags had reached the driver: committed.
        q.set_e16(1, E_NEXT, 2);
        q.wr16(FREE_HEAD, 0);
        q.wr16(USED_IDX, 3);
        let res = q.packed_resume(8, 0x8000, |_| Some(F_AVAIL | F_USED));
        assert!(res.committed);
        assert_eq!(res.used, 0x8003);
        assert_eq!(res.chains.len(), 1);
        assert_eq!(res.chains[0].entries, [3, 4, 5]);
        assert_eq!(res.free_head, 0);
    }

    #[test]
    fn a_corrupted_part_is_bounded() {
        let (r, _f, _m) = InflightRegion::create(1, 8, true).unwrap();
        let q = r.queue(0).unwrap();
        q.packed_resume(8, 0x8000, |_| None);
        q.packed_take(&[0, 1], &[d(1), d(2)], 1, 2);
        q.packed_take(&[2], &[d(3)], 2, 3);
        // A loop in a chain, a huge num, a head whose last does not match.
        q.set_e16(0, E_NEXT, 0);
        q.set_e16(2, E_NUM, 9000);
        q.wr16(FREE_HEAD, 5000);
        q.wr16(OLD_FREE_HEAD, 5000);
        let res = q.packed_resume(8, 0x8000, |_| None);
        assert_eq!(res.dropped, 2);
        assert!(res.chains.is_empty());
        assert_eq!(res.free_head, 0);
        // A used position out of the ring: afresh.
        q.wr16(OLD_USED_IDX, 8);
        assert!(q.packed_resume(8, 0x8002, |_| None).fresh);
        // A different ring size: afresh, at the front-end's base.
        let res = q.packed_resume(4, 0x0003, |_| None);
        assert!(res.fresh);
        assert_eq!(res.used, 3);
    }
}
