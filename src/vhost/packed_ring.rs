//! The packed virtqueue (virtio 1.2 §2.8, `VIRTIO_F_RING_PACKED`) read and written through
//! host pointers translated once per memory table, like [`crate::vhost::split_ring`].
//!
//! Layout, for a queue of `size` entries (the three vhost-user ring addresses of
//! SET_VRING_ADDR are, for a packed ring: descriptor ring, driver area, device area):
//! ```text
//! descriptor ring:       size × { le64 addr, le32 len, le16 id, le16 flags }
//! driver event suppr.:   le16 off_wrap, le16 flags   (written by the driver, §2.8.10)
//! device event suppr.:   le16 off_wrap, le16 flags   (written by the device)
//! ```
//! A descriptor is available when its AVAIL flag equals the device's avail wrap counter
//! and its USED flag does not (§2.8.1); the device walks the ring in order, a chain being
//! consecutive descriptors linked by NEXT (§2.8.6) or one descriptor pointing at an
//! indirect table (§2.8.8), and returns a chain by writing one used descriptor (its buffer
//! id, the length written, AVAIL = USED = its used wrap counter) at its own used position,
//! which then skips as many ring slots as the chain had (§2.8.6, §2.8.22): with
//! out-of-order completion the used descriptor lands wherever the device's position is,
//! possibly on the slots of a chain still in flight.
//!
//! That is why a chain is read completely when it is taken ([`PackedRing::pop`]) and kept
//! until it is returned: its slots may be overwritten before it completes, and the driver
//! may make them available again for a new chain while it is in flight. A chain takes one
//! entry per ring descriptor from a free list of `size` entries (vhost-user.rst's
//! `DescStatePacked` list, mirrored in the in-flight region when the frontend shares one,
//! [`crate::vhost::inflight::packed`]); the token the engine holds for a chain (its
//! "head") is its first entry, unique among the chains in flight. The buffer id the driver
//! chose is kept beside it and written back as is. The entries go back to the free list
//! when the batch that returns the chain is published.
//!
//! With the region, a new instance after a crash ([`PackedRing::track`]) resumes at the
//! used position the last published batch left, takes the chains left in flight again from
//! their recorded descriptors, and continues taking from the ring after them: every chain
//! the driver made available is returned exactly once.
//!
//! Everything read from guest memory is untrusted: chains are bounded by the ring size and
//! [`MAX_CHAIN`], an indirect table by its length, every buffer address goes through the
//! caller's [`GuestMap`] later, and a driver that makes more descriptors available than
//! the ring has (more than its free entries) stops the ring (nothing is taken until it
//! fixes it).

use std::sync::atomic::{fence, Ordering};

use crate::vhost::guest_map::GuestMap;
use crate::vhost::guest_stream::Desc;
use crate::vhost::inflight::packed::{avail_flags, RawEntry};
use crate::vhost::inflight::QueueInflight;
use crate::vhost::split_ring::ChainError;

/// `VIRTIO_F_RING_PACKED` (virtio 1.2 §6).
pub const VIRTIO_F_RING_PACKED: u32 = 34;

/// Descriptor flags (§2.8.21).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// Event suppression `flags` values (§2.8.10).
pub const EVENT_ENABLE: u16 = 0;
pub const EVENT_DISABLE: u16 = 1;
pub const EVENT_DESC: u16 = 2;

/// Size of one descriptor (§2.8.13).
const DESC_LEN: u64 = 16;
/// Offsets within a descriptor.
const OFF_LEN: usize = 8;
const OFF_ID: usize = 12;
const OFF_FLAGS: usize = 14;

/// Most descriptors a chain may have (ring and indirect ones together): above every
/// device's own limit (virtio-blk's `seg_max` plus framing, virtio-scsi's 1024), so that
/// the devices' limits decide, while a hostile chain costs bounded memory.
pub const MAX_CHAIN: usize = 4096;

/// A chain taken from the ring and not yet returned, kept at its first entry.
#[derive(Default)]
struct Taken {
    busy: bool,
    /// The driver's buffer id (from the chain's last ring descriptor, §2.8.6).
    id: u16,
    /// Ring slots the chain occupies: how far the used position skips (§2.8.6), and how
    /// many entries it holds.
    slots: u16,
    /// Its last entry.
    last: u16,
    /// What reading it gave: descriptors counted (empty ones too), and the error if any.
    counted: usize,
    error: Option<ChainError>,
    /// Its non-empty descriptors.
    descs: Vec<Desc>,
}

/// The three areas of a packed ring as host pointers, rebuilt with each memory table.
#[derive(Clone, Copy)]
struct Areas {
    desc: *mut u8,
    driver: *const u8,
    device: *mut u8,
}

/// A packed ring's state and its view into guest memory; see the module documentation.
pub struct PackedRing {
    areas: Option<Areas>,
    desc_gpa: u64,
    driver_gpa: u64,
    device_gpa: u64,
    size: u16,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
    /// The used position at the last interrupt decision (EVENT_IDX), None before the
    /// first: then the device signals (as QEMU's `signalled_used_valid`).
    signalled: Option<(u16, bool)>,
    /// The first used descriptor of the current batch: its flags are written last, by
    /// [`PackedRing::publish`], so that the driver sees the whole batch at once.
    deferred: Option<(u16, u16)>,
    /// Per entry: the chain whose first entry it is.
    taken: Vec<Taken>,
    /// The entries' free list: `next` links (`size` ends it), its head and length.
    next: Vec<u16>,
    free_head: u16,
    free_count: u16,
    /// Chains returned since the last [`PackedRing::publish`] (their entries are freed then).
    returned: Vec<u16>,
    /// In-flight tracking in the region the frontend shares.
    track: Option<Track>,
    /// The driver made more descriptors available than the ring has (logged once).
    broken: bool,
}

/// A packed ring's in-flight tracking ([`PackedRing::track`]).
struct Track {
    part: QueueInflight,
    /// The counter the next chain taken gets: the order of the chains in flight.
    counter: u64,
    /// Scratch: a chain's entries and descriptors, the links of a batch.
    entries: Vec<u16>,
    raw: Vec<RawEntry>,
    links: Vec<(u16, u16, u16)>,
}

/// What [`PackedRing::track`] found in the region.
#[derive(Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The region had nothing for this ring: it starts at the frontend's base.
    pub fresh: bool,
    /// Tokens of the chains a previous instance left in flight, in the order taken.
    pub resubmit: Vec<u16>,
    /// The used position resumed at (slot | wrap << 15).
    pub used: u16,
    /// A batch published but not recorded was committed.
    pub committed: bool,
    /// Chains dropped because their entries did not add up (a corrupted region).
    pub dropped: usize,
}

// SAFETY: pointers into shared guest memory, kept mapped by the owner (the `Vring`).
unsafe impl Send for PackedRing {}

/// A little-endian u16 at `p`, read once (volatile: the driver writes concurrently).
#[inline]
fn rd16(p: *const u8) -> u16 {
    // SAFETY: callers pass a pointer inside a mapped area with 2 bytes left; a byte array
    // has no alignment, so a hostile placement is harmless.
    u16::from_le_bytes(unsafe { std::ptr::read_volatile(p.cast::<[u8; 2]>()) })
}

#[inline]
fn wr16(p: *mut u8, v: u16) {
    // SAFETY: callers pass a pointer inside a mapped area with 2 bytes left.
    unsafe { std::ptr::write_volatile(p.cast::<[u8; 2]>(), v.to_le_bytes()) }
}

/// A descriptor as read from the ring or an indirect table.
#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

#[inline]
fn read_desc(p: *const u8) -> RawDesc {
    // SAFETY: callers pass a pointer with 16 mapped bytes; copied out once, unaligned.
    let b: [u8; 16] = unsafe { std::ptr::read_unaligned(p.cast::<[u8; 16]>()) };
    RawDesc {
        addr: u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
        len: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
        id: u16::from_le_bytes([b[12], b[13]]),
        flags: u16::from_le_bytes([b[14], b[15]]),
    }
}

impl PackedRing {
    /// The ring at `desc` (descriptor ring), `driver` and `device` (event suppression
    /// areas), of `size` entries, resuming at `base` as SET_VRING_BASE gives it for a
    /// packed ring (vhost-user.rst: bits 0-14 the next available index, bit 15 the avail
    /// wrap counter). The used side starts at the same place (every chain taken had been
    /// returned when the frontend read the base, as QEMU assumes when it restores it).
    pub fn new(desc: u64, driver: u64, device: u64, size: u16, base: u16) -> Self {
        let mut next = base & 0x7fff;
        let wrap = base & 0x8000 != 0;
        if next >= size {
            tracing::warn!(base, size, "packed ring base out of range: starting at 0");
            next = 0;
        }
        PackedRing {
            areas: None,
            desc_gpa: desc,
            driver_gpa: driver,
            device_gpa: device,
            size,
            next_avail: next,
            avail_wrap: wrap,
            next_used: next,
            used_wrap: wrap,
            signalled: None,
            deferred: None,
            taken: (0..size).map(|_| Taken::default()).collect(),
            next: (1..=size).collect(),
            free_head: 0,
            free_count: size,
            returned: Vec::with_capacity(usize::from(size)),
            track: None,
            broken: false,
        }
    }

    /// Records the chains taken and returned in `part` (the region's packed layout) and
    /// resumes from it ([`QueueInflight::packed_resume`]): the used position the last
    /// published batch left, the chains left in flight read back (their tokens returned
    /// for resubmission), the available position after them. The ring slots between the
    /// two are the device's: used descriptors a previous instance wrote there without
    /// publishing them are turned back into available ones, so that the driver never
    /// reads a stale one. None when the part is not for a packed ring of this size.
    /// Called before anything is taken, with the areas mapped.
    pub fn track(&mut self, map: &GuestMap, part: QueueInflight) -> Option<Resumed> {
        if !part.is_packed() || self.size > part.capacity() {
            return None;
        }
        let size = self.size;
        let areas = self.areas.as_ref();
        let r = part.packed_resume(size, self.base(), |slot| {
            areas
                .filter(|_| slot < size)
                .map(|a| rd16(Self::slot_ptr(a, slot).wrapping_add(OFF_FLAGS)))
        });
        let mut out = Resumed {
            fresh: r.fresh,
            resubmit: Vec::with_capacity(r.chains.len()),
            used: r.used,
            committed: r.committed,
            dropped: r.dropped,
        };
        if !r.fresh {
            let n = u32::from(size);
            let lin = |base: u16| u32::from(base & 0x7fff) + n * u32::from(base & 0x8000 == 0);
            let used = lin(r.used);
            let mut total = 0u32;
            for c in &r.chains {
                let h = c.entries[0];
                let t = &mut self.taken[usize::from(h)];
                restore(t, map, &c.descs);
                t.slots = c.entries.len() as u16;
                t.last = c.entries[c.entries.len() - 1];
                total += u32::from(t.slots);
                out.resubmit.push(h);
            }
            let pos = |l: u32| ((l % n) as u16, (l / n).is_multiple_of(2));
            (self.next_used, self.used_wrap) = pos(used);
            let avail = (used + total) % (2 * n);
            (self.next_avail, self.avail_wrap) = pos(avail);
            self.next = r.next;
            self.free_head = r.free_head;
            self.free_count = size - total as u16;
            self.signalled = None;
            self.deferred = None;
            self.returned.clear();
            if let Some(a) = &self.areas {
                for k in 0..total {
                    let (slot, wrap) = pos((used + k) % (2 * n));
                    let p = Self::slot_ptr(a, slot).wrapping_add(OFF_FLAGS);
                    wr16(p, (rd16(p) & !(F_AVAIL | F_USED)) | avail_flags(wrap));
                }
            }
        }
        self.track = Some(Track {
            part,
            counter: r.next_counter,
            entries: Vec::new(),
            raw: Vec::new(),
            links: Vec::new(),
        });
        Some(out)
    }

    /// The guest address and length of the descriptor ring (dirty logging).
    pub fn desc_ring(&self) -> (u64, u64) {
        (self.desc_gpa, u64::from(self.size) * DESC_LEN)
    }

    /// Translates the ring's areas through `map` (a new memory table); false when an area
    /// is not inside one region: the ring then takes nothing.
    pub fn remap(&mut self, map: &GuestMap) -> bool {
        let n = u64::from(self.size) * DESC_LEN;
        self.areas = match (
            map.host_range(self.desc_gpa, n),
            map.host_range(self.driver_gpa, 4),
            map.host_range(self.device_gpa, 4),
        ) {
            (Some(desc), Some(driver), Some(device)) if self.size > 0 => Some(Areas {
                desc,
                driver,
                device,
            }),
            _ => None,
        };
        self.areas.is_some()
    }

    /// Whether the areas are mapped.
    pub fn has_view(&self) -> bool {
        self.areas.is_some()
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The GET_VRING_BASE answer: next available index | avail wrap counter << 15.
    pub fn base(&self) -> u16 {
        self.next_avail | (u16::from(self.avail_wrap) << 15)
    }

    /// The device's used position and wrap counter (tests).
    #[cfg(test)]
    pub fn used_position(&self) -> (u16, bool) {
        (self.next_used, self.used_wrap)
    }

    /// The used position as a base (next used slot | used wrap counter << 15): where the
    /// ring resumes when every chain taken was returned.
    pub fn used_base(&self) -> u16 {
        self.next_used | (u16::from(self.used_wrap) << 15)
    }

    #[inline]
    fn slot_ptr(areas: &Areas, slot: u16) -> *mut u8 {
        areas
            .desc
            .wrapping_add(usize::from(slot) * DESC_LEN as usize)
    }

    /// Whether a descriptor with `flags` is available to a device whose wrap counter is
    /// `wrap` (§2.8.1).
    #[inline]
    fn is_avail(flags: u16, wrap: bool) -> bool {
        (flags & F_AVAIL != 0) == wrap && (flags & F_USED != 0) != wrap
    }

    /// Whether a chain is available at the next position (the driver's flags re-read).
    pub fn has_avail(&self) -> bool {
        match &self.areas {
            Some(a) => {
                let flags = rd16(Self::slot_ptr(a, self.next_avail).wrapping_add(OFF_FLAGS));
                Self::is_avail(flags, self.avail_wrap)
            }
            None => false,
        }
    }

    /// Takes the chain at the next available position and reads it (with its indirect
    /// table) into the record of its first entry; returns that entry (the token
    /// [`PackedRing::read_chain`] and [`PackedRing::add_used`] take), None when
    /// nothing is available or the ring is broken.
    pub fn pop(&mut self, map: &GuestMap) -> Option<u16> {
        let areas = self.areas?;
        let areas = &areas;
        let start = self.next_avail;
        if !Self::is_avail(
            rd16(Self::slot_ptr(areas, start).wrapping_add(OFF_FLAGS)),
            self.avail_wrap,
        ) {
            return None;
        }
        // The descriptors are read after the flags that make them available (§2.8.21.1).
        fence(Ordering::Acquire);
        if self.free_count == 0 {
            self.out_of_entries(start);
            return None;
        }
        let size = self.size;
        let first = self.free_head;
        let mut track = self.track.as_mut();
        let mut raw = track.as_mut().map(|t| std::mem::take(&mut t.raw));
        if let Some(r) = &mut raw {
            r.clear();
        }
        let t = &mut self.taken[usize::from(first)];
        begin(t);
        // The ring descriptors: consecutive slots while NEXT, at most the ring.
        let mut slot = start;
        let mut slots = 0u16;
        let mut bytes = 0u32;
        let mut indirect: Option<RawDesc> = None;
        loop {
            let d = read_desc(Self::slot_ptr(areas, slot));
            slots += 1;
            slot = if slot + 1 == size { 0 } else { slot + 1 };
            ring_desc(t, &mut bytes, &mut indirect, d, slots);
            if let Some(r) = &mut raw {
                r.push(RawEntry {
                    addr: d.addr,
                    len: d.len,
                    id: d.id,
                    flags: d.flags,
                });
            }
            if d.flags & F_NEXT == 0 {
                break;
            }
            if slots == size {
                // NEXT on every slot: a loop around the ring.
                t.error.get_or_insert(cut(t.counted));
                break;
            }
        }
        if slots > self.free_count {
            // More descriptors in flight than the ring has: nothing is taken.
            t.busy = false;
            if let (Some(tr), Some(r)) = (track, raw) {
                tr.raw = r;
            }
            self.out_of_entries(start);
            return None;
        }
        t.slots = slots;
        if let Some(ind) = indirect {
            read_indirect(map, ind, t, &mut bytes);
        }
        // Its entries: `slots` from the free list.
        let mut last = first;
        if let Some(tr) = &mut track {
            tr.entries.clear();
            tr.entries.push(first);
        }
        for _ in 1..slots {
            last = self.next.get(usize::from(last)).copied().unwrap_or(size);
            if let Some(tr) = &mut track {
                tr.entries.push(last);
            }
        }
        let t = &mut self.taken[usize::from(first)];
        t.last = last;
        self.free_head = self.next.get(usize::from(last)).copied().unwrap_or(size);
        self.free_count -= slots;
        if let (Some(tr), Some(r)) = (track, raw) {
            tr.part
                .packed_take(&tr.entries, &r, tr.counter, self.free_head);
            tr.counter = tr.counter.wrapping_add(1);
            tr.raw = r;
        }
        let wrapped = u32::from(start) + u32::from(slots) >= u32::from(size);
        self.next_avail = slot;
        if wrapped {
            self.avail_wrap = !self.avail_wrap;
        }
        Some(first)
    }

    /// No free entry for the chain at `slot`: returned chains not yet published hold them
    /// (the next pass publishes them), or the driver made more available than the ring
    /// has (logged once; nothing is taken until it fixes it).
    #[cold]
    fn out_of_entries(&mut self, slot: u16) {
        if self.returned.is_empty() && !self.broken {
            self.broken = true;
            tracing::warn!(
                slot,
                "the driver made more descriptors available than the ring has"
            );
        }
    }

    /// The descriptors of the chain `slot` ([`PackedRing::pop`]'s token) into `out`, with
    /// the split ring's verdicts ([`crate::vhost::split_ring::RingView::read_chain`]):
    /// more than `max` descriptors (empty ones count) is `TooLong`.
    pub fn read_chain(&self, slot: u16, max: usize, out: &mut Vec<Desc>) -> Result<(), ChainError> {
        let t = match self.taken.get(usize::from(slot)) {
            Some(t) if t.busy => t,
            _ => return Err(ChainError::Empty),
        };
        if t.counted > max {
            return Err(ChainError::TooLong);
        }
        out.extend_from_slice(&t.descs);
        match t.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The device-writable buffers of the chain in flight at `slot` (dirty logging).
    pub fn writable(&self, slot: u16) -> impl Iterator<Item = &Desc> {
        self.taken
            .get(usize::from(slot))
            .filter(|t| t.busy)
            .map(|t| t.descs.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|d| d.write)
    }

    /// Returns the chain taken at `slot` with `len` bytes written: its used descriptor at
    /// the device's used position, which skips the chain's slots (§2.8.6). Returns the
    /// guest address of the descriptor written (for the dirty log), None when `slot`
    /// holds no chain in flight. The first used descriptor of a batch is published by
    /// [`PackedRing::publish`]; later ones as they are written (the driver reads them in
    /// order, so they stay invisible until the first is).
    pub fn add_used(&mut self, slot: u16, len: u32) -> Option<u64> {
        let areas = self.areas.as_ref()?;
        let t = self.taken.get_mut(usize::from(slot)).filter(|t| t.busy)?;
        t.busy = false;
        let (id, slots) = (t.id, t.slots);
        self.returned.push(slot);
        let pos = self.next_used;
        let p = Self::slot_ptr(areas, pos);
        // SAFETY: `pos` < size: 16 mapped bytes at `p`.
        unsafe {
            std::ptr::write_volatile(p.add(OFF_LEN).cast::<[u8; 4]>(), len.to_le_bytes());
        }
        wr16(p.wrapping_add(OFF_ID), id);
        let flags = if self.used_wrap { F_AVAIL | F_USED } else { 0 };
        if self.deferred.is_none() {
            self.deferred = Some((pos, flags));
        } else {
            fence(Ordering::Release);
            wr16(p.wrapping_add(OFF_FLAGS), flags);
        }
        let next = u32::from(pos) + u32::from(slots);
        if next >= u32::from(self.size) {
            self.used_wrap = !self.used_wrap;
        }
        self.next_used = (next % u32::from(self.size)) as u16;
        Some(self.desc_gpa + u64::from(pos) * DESC_LEN)
    }

    /// Makes the batch of used descriptors written since the last call visible: the flags
    /// of its first, with release ordering (§2.8.21.2: the driver reads the rest after it).
    /// The batch's entries go back to the free list, recorded in the region around the
    /// flags in the spec's order ([`QueueInflight::packed_commit`]).
    pub fn publish(&mut self) {
        let first = self.deferred.take();
        let mut links = self
            .track
            .as_mut()
            .map(|t| std::mem::take(&mut t.links))
            .unwrap_or_default();
        links.clear();
        for h in self.returned.drain(..) {
            let t = &self.taken[usize::from(h)];
            let (last, next) = (t.last, self.free_head);
            if let Some(l) = self.next.get_mut(usize::from(last)) {
                *l = next;
            }
            self.free_head = h;
            self.free_count = self.free_count.saturating_add(t.slots).min(self.size);
            links.push((h, last, next));
        }
        let areas = &self.areas;
        let write_first = || {
            if let (Some((pos, flags)), Some(a)) = (first, areas) {
                fence(Ordering::Release);
                wr16(Self::slot_ptr(a, pos).wrapping_add(OFF_FLAGS), flags);
            }
        };
        let used = self.next_used | (u16::from(self.used_wrap) << 15);
        match &mut self.track {
            Some(tr) => {
                tr.part
                    .packed_commit(&links, self.free_head, used, write_first);
                tr.links = links;
            }
            None => write_first(),
        }
    }

    /// Whether the driver wants an interrupt for the used descriptors written since the
    /// last decision (§2.8.10): its event suppression flags, and with EVENT_IDX the event
    /// offset and wrap counter: wanted when the device's used position passed it. The
    /// caller has published the batch and fenced. [`PackedRing::mark_signalled`] ends the
    /// range judged.
    pub fn wants_interrupt(&self, event_idx: bool) -> bool {
        let Some(a) = &self.areas else {
            return true;
        };
        let off_wrap = rd16(a.driver);
        let flags = rd16(a.driver.wrapping_add(2)) & 3;
        match flags {
            EVENT_DISABLE => false,
            EVENT_DESC if event_idx => {
                let Some(old) = self.signalled else {
                    return true;
                };
                let n = 2 * u32::from(self.size);
                let lin =
                    |pos: u16, wrap: bool| u32::from(pos) + u32::from(wrap) * u32::from(self.size);
                let new = lin(self.next_used, self.used_wrap);
                let old = lin(old.0, old.1);
                let off = u32::from(off_wrap & 0x7fff);
                if off >= u32::from(self.size) {
                    return true;
                }
                let event = lin(off as u16, off_wrap & 0x8000 != 0);
                // vring_need_event over positions counted modulo two rings.
                (new + n - event - 1) % n < (new + n - old) % n
            }
            _ => true,
        }
    }

    /// The range up to the current used position was judged for an interrupt.
    pub fn mark_signalled(&mut self) {
        self.signalled = Some((self.next_used, self.used_wrap));
    }

    /// Writes the device's event suppression flags (§2.8.10): `EVENT_DISABLE` while the
    /// device polls, `EVENT_ENABLE` before it sleeps. Returns the guest address written
    /// (dirty log).
    pub fn set_device_event(&self, flags: u16) -> Option<u64> {
        let a = self.areas.as_ref()?;
        wr16(a.device.wrapping_add(2), flags);
        Some(self.device_gpa + 2)
    }

    /// Enables kicks before the device sleeps; true when a chain is already available
    /// (it arrived before the driver could see the enable: the device must not sleep).
    pub fn enable_kicks(&self) -> (bool, Option<u64>) {
        let at = self.set_device_event(EVENT_ENABLE);
        // The enable must be visible before the ring is looked at again (§2.8.10.1), as
        // the driver writes its descriptor before it reads the device's flags.
        fence(Ordering::SeqCst);
        (self.has_avail(), at)
    }
}

/// Starts reading a chain into `t`.
fn begin(t: &mut Taken) {
    t.busy = true;
    t.counted = 0;
    t.error = None;
    if t.descs.capacity() > 256 {
        t.descs = Vec::new();
    }
    t.descs.clear();
}

/// Counts the `nth` ring descriptor `d` of a chain into `t` (an indirect one is kept in
/// `indirect`, read after the ring's).
#[inline]
fn ring_desc(t: &mut Taken, bytes: &mut u32, indirect: &mut Option<RawDesc>, d: RawDesc, nth: u16) {
    t.id = d.id;
    if d.flags & F_INDIRECT != 0 {
        // Only a chain's sole descriptor may be indirect (§2.8.8).
        if nth == 1 && d.flags & F_NEXT == 0 {
            *indirect = Some(d);
        } else if t.error.is_none() {
            t.error = Some(cut(t.counted));
        }
    } else if t.error.is_none() {
        push(t, bytes, d.addr, d.len, d.flags & F_WRITE != 0);
    }
}

/// Reads a chain a previous instance left in flight back into `t`, from the ring
/// descriptors the region recorded (an indirect table from guest memory again: the driver
/// leaves it alone while the chain is in flight, §2.8.8).
fn restore(t: &mut Taken, map: &GuestMap, descs: &[RawEntry]) {
    begin(t);
    let mut bytes = 0u32;
    let mut indirect = None;
    for (i, d) in descs.iter().enumerate() {
        let d = RawDesc {
            addr: d.addr,
            len: d.len,
            id: d.id,
            flags: d.flags,
        };
        ring_desc(t, &mut bytes, &mut indirect, d, i as u16 + 1);
    }
    if descs.last().is_some_and(|d| d.flags & F_NEXT != 0) {
        t.error.get_or_insert(cut(t.counted));
    }
    if let Some(ind) = indirect {
        read_indirect(map, ind, t, &mut bytes);
    }
}

/// The error for a chain cut short after `count` descriptors ([`ChainError`]).
fn cut(count: usize) -> ChainError {
    if count == 0 {
        ChainError::Empty
    } else {
        ChainError::Truncated
    }
}

/// Counts one descriptor into `t`, keeping the non-empty ones; records the error when the
/// chain passes [`MAX_CHAIN`] descriptors or 4 GiB.
fn push(t: &mut Taken, bytes: &mut u32, addr: u64, len: u32, write: bool) {
    match bytes.checked_add(len) {
        Some(b) => *bytes = b,
        None => {
            t.error = Some(cut(t.counted));
            return;
        }
    }
    t.counted += 1;
    if t.counted > MAX_CHAIN {
        t.error = Some(ChainError::TooLong);
        return;
    }
    if len > 0 {
        t.descs.push(Desc { addr, len, write });
    }
}

/// Reads the indirect table `ind` points at (§2.8.8): `len / 16` descriptors in order,
/// of whose flags only WRITE counts (the others and the ids are reserved).
fn read_indirect(map: &GuestMap, ind: RawDesc, t: &mut Taken, bytes: &mut u32) {
    let len = u64::from(ind.len);
    if len == 0 || len % DESC_LEN != 0 {
        t.error = Some(cut(t.counted));
        return;
    }
    let n = len / DESC_LEN;
    let table = map.host_range(ind.addr, len);
    for i in 0..n {
        if t.error.is_some() {
            return;
        }
        let d = match table {
            Some(p) => read_desc(p.wrapping_add((i * DESC_LEN) as usize)),
            None => {
                let mut b = [0u8; 16];
                if map.read(ind.addr + i * DESC_LEN, &mut b).is_err() {
                    t.error = Some(cut(t.counted));
                    return;
                }
                read_desc(b.as_ptr())
            }
        };
        push(t, bytes, d.addr, d.len, d.flags & F_WRITE != 0);
    }
}

#[cfg(test)]
#[path = "packed_ring_tests.rs"]
mod tests;
