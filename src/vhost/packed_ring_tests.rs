//! Hand-laid packed rings (virtio 1.2 §2.8): the driver's side is played here byte by
//! byte, the device's is [`PackedRing`].

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const SIZE: u16 = 4;
const DRIVER: u64 = 0x800;
const DEVICE: u64 = 0x804;
const TABLE: u64 = 0x1000;
/// Unmapped: guest memory is [0, 0x20000).
const HOLE: u64 = 0x20000;

/// The driver side: its avail position and wrap counter, and its used ones.
struct Drv {
    mem: GuestMemoryMmap,
    avail: u16,
    avail_wrap: bool,
    used: u16,
    used_wrap: bool,
    /// Ring slots per buffer id, to skip used descriptors (§2.8.6).
    slots_of: std::collections::HashMap<u16, u16>,
}

impl Drv {
    fn new() -> Self {
        Drv {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap(),
            avail: 0,
            avail_wrap: true,
            used: 0,
            used_wrap: true,
            slots_of: Default::default(),
        }
    }

    fn ring(&self, base: u16) -> (GuestMap, PackedRing) {
        // SAFETY: `self.mem` outlives the map in every test (both live to its end).
        let map = unsafe { GuestMap::new(&self.mem) };
        let mut r = PackedRing::new(0, DRIVER, DEVICE, SIZE, base);
        assert!(r.remap(&map));
        (map, r)
    }

    fn put(&self, gpa: u64, addr: u64, len: u32, id: u16, flags: u16) {
        self.mem.write_obj(addr.to_le(), GuestAddress(gpa)).unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(gpa + 8))
            .unwrap();
        self.mem
            .write_obj(id.to_le(), GuestAddress(gpa + 12))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(gpa + 14))
            .unwrap();
    }

    /// Makes a chain of ring descriptors `(addr, len, flags)` available with buffer id
    /// `id`; NEXT is added on all but the last, the head's flags are written last.
    fn add(&mut self, id: u16, descs: &[(u64, u32, u16)]) {
        let head = self.avail;
        let head_wrap = self.avail_wrap;
        let mut head_flags = 0;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let mut f = flags;
            if i + 1 < descs.len() {
                f |= F_NEXT;
            }
            f |= if self.avail_wrap { F_AVAIL } else { F_USED };
            let at = 16 * u64::from(self.avail);
            if i == 0 {
                head_flags = f;
                self.put(at, addr, len, id, 0);
                // Not available yet (the flags of the previous wrap).
                let stale = if head_wrap { F_USED } else { F_AVAIL };
                self.mem.write_obj(stale, GuestAddress(at + 14)).unwrap();
            } else {
                self.put(at, addr, len, id, f);
            }
            self.avail += 1;
            if self.avail == SIZE {
                self.avail = 0;
                self.avail_wrap = !self.avail_wrap;
            }
        }
        self.slots_of.insert(id, descs.len() as u16);
        let at = 16 * u64::from(head) + 14;
        self.mem
            .write_obj(head_flags.to_le(), GuestAddress(at))
            .unwrap();
    }

    /// The next used descriptor: (id, len).
    fn used(&mut self) -> Option<(u16, u32)> {
        let at = 16 * u64::from(self.used);
        let flags: u16 = self.mem.read_obj(GuestAddress(at + 14)).unwrap();
        let want = self.used_wrap;
        if (flags & F_AVAIL != 0) != want || (flags & F_USED != 0) != want {
            return None;
        }
        let id: u16 = self.mem.read_obj(GuestAddress(at + 12)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 8)).unwrap();
        let n = self
            .slots_of
            .remove(&id)
            .expect("a used id the driver gave");
        self.used += n;
        if self.used >= SIZE {
            self.used -= SIZE;
            self.used_wrap = !self.used_wrap;
        }
        Some((id, len))
    }

    fn set_driver_event(&self, off_wrap: u16, flags: u16) {
        self.mem.write_obj(off_wrap, GuestAddress(DRIVER)).unwrap();
        self.mem.write_obj(flags, GuestAddress(DRIVER + 2)).unwrap();
    }
}

/// A chain's verdict and its descriptors as `(addr, len, write)`.
type Read = (Result<(), ChainError>, Vec<(u64, u32, bool)>);

fn chain(r: &PackedRing, slot: u16) -> Read {
    let mut out = Vec::new();
    let res = r.read_chain(slot, 64, &mut out);
    (res, out.iter().map(|d| (d.addr, d.len, d.write)).collect())
}

#[test]
fn chains_wrap_around_and_complete_out_of_order() {
    let mut d = Drv::new();
    let (map, mut r) = d.ring(0x8000);
    assert_eq!(r.pop(&map), None, "empty ring");
    d.add(7, &[(0x100, 16, 0), (0x200, 512, F_WRITE)]);
    d.add(9, &[(0x300, 1, F_WRITE)]);
    let a = r.pop(&map).unwrap();
    let b = r.pop(&map).unwrap();
    assert_eq!((a, b), (0, 2), "tokens are the chains' first entries");
    assert_eq!(r.pop(&map), None);
    assert_eq!(
        chain(&r, a),
        (Ok(()), vec![(0x100, 16, false), (0x200, 512, true)])
    );
    assert_eq!(chain(&r, b), (Ok(()), vec![(0x300, 1, true)]));
    // The second completes first: its used descriptor goes to the device's used
    // position (slot 0, over the first chain's head), which skips one slot.
    assert_eq!(r.add_used(b, 1), Some(0));
    r.publish();
    assert_eq!(d.used(), Some((9, 1)));
    assert_eq!(d.used(), None);
    // The first chain was read when taken: its slot being overwritten changes nothing.
    assert_eq!(chain(&r, a).1.len(), 2);
    assert_eq!(r.add_used(a, 512), Some(16));
    assert_eq!(r.add_used(a, 512), None, "returned twice");
    assert_eq!(
        d.used(),
        None,
        "the batch's first flags are written by publish"
    );
    r.publish();
    assert_eq!(d.used(), Some((7, 512)));
    assert_eq!(r.used_position(), (3, true));

    // Around the ring: a 2-slot chain from slot 3 wraps to slot 0 and flips the counters.
    d.add(1, &[(0x400, 16, 0), (0x500, 4, F_WRITE)]);
    d.add(2, &[(0x600, 16, 0)]);
    // The entries freed last are taken first.
    assert_eq!(r.pop(&map), Some(0));
    assert_eq!(r.base(), 1, "next avail 1, wrap counter flipped to 0");
    assert_eq!(r.pop(&map), Some(2));
    assert_eq!(r.pop(&map), None);
    r.add_used(2, 0);
    r.add_used(0, 4);
    r.publish();
    assert_eq!(d.used(), Some((2, 0)));
    assert_eq!(d.used(), Some((1, 4)));
    assert_eq!(r.used_position(), (2, false));
    // Another lap: the driver's counter flips back.
    for id in 10..13 {
        d.add(id, &[(0x700, 8, F_WRITE)]);
    }
    let got: Vec<u16> = std::iter::from_fn(|| r.pop(&map)).collect();
    assert_eq!(got, [0, 1, 2]);
    assert_eq!(r.base(), 0x8001);
    for s in got {
        r.add_used(s, 8);
    }
    r.publish();
    assert_eq!(
        std::iter::from_fn(|| d.used()).collect::<Vec<_>>(),
        [(10, 8), (11, 8), (12, 8)]
    );
}

#[test]
fn a_ring_resumes_at_its_base_with_its_wrap_counter() {
    let mut d = Drv::new();
    // The driver is on its second lap at slot 2 (wrap counter 0).
    d.avail = 2;
    d.avail_wrap = false;
    d.used = 2;
    d.used_wrap = false;
    let (map, mut r) = d.ring(2);
    d.add(5, &[(0x100, 4, F_WRITE)]);
    let t = r.pop(&map).unwrap();
    assert_eq!(chain(&r, t).1, [(0x100, 4, true)], "read at slot 2");
    r.add_used(t, 4);
    r.publish();
    assert_eq!(d.used(), Some((5, 4)));
    assert_eq!(r.used_position(), (3, false));
    // A base out of range starts at 0, without panicking.
    let (_m, r) = d.ring(0x7fff);
    assert_eq!(r.base(), 0);
}

#[test]
fn an_indirect_table_is_read_whole_and_only_its_write_flags_count() {
    let mut d = Drv::new();
    let (map, mut r) = d.ring(0x8000);
    d.put(TABLE, 0x100, 16, 0, F_NEXT | F_INDIRECT);
    d.put(TABLE + 16, 0x200, 4096, 0, F_WRITE | F_NEXT);
    d.put(TABLE + 32, 0x3000, 0, 0, 0);
    d.put(TABLE + 48, 0x300, 1, 0, F_WRITE);
    d.add(3, &[(TABLE, 64, F_INDIRECT)]);
    let s = r.pop(&map).unwrap();
    assert_eq!(
        chain(&r, s),
        (
            Ok(()),
            vec![(0x100, 16, false), (0x200, 4096, true), (0x300, 1, true)]
        )
    );
    // Four descriptors (the empty one counts against the limit).
    assert_eq!(
        r.read_chain(s, 3, &mut Vec::new()),
        Err(ChainError::TooLong)
    );
    assert_eq!(r.writable(s).count(), 2);
    r.add_used(s, 4097);
    r.publish();
    assert_eq!(d.used(), Some((3, 4097)));
    assert_eq!(
        r.used_position(),
        (1, true),
        "an indirect chain is one slot"
    );
}

#[test]
fn hostile_chains_are_cut_short_without_harm() {
    let mut d = Drv::new();
    let (map, mut r) = d.ring(0x8000);
    // NEXT on every slot: the chain stops at the ring's size.
    d.add(
        1,
        &[
            (0x100, 1, F_NEXT),
            (0x100, 1, F_NEXT),
            (0x100, 1, F_NEXT),
            (0x100, 1, F_NEXT),
        ],
    );
    // `add` cleared NEXT on the last: set it again (a loop around the ring).
    d.mem
        .write_obj((F_NEXT | F_AVAIL).to_le(), GuestAddress(16 * 3 + 14))
        .unwrap();
    let s = r.pop(&map).unwrap();
    assert_eq!(chain(&r, s).0, Err(ChainError::Truncated));
    assert_eq!(r.base(), 0, "the whole ring consumed, wrap counter flipped");
    r.add_used(s, 0);
    r.publish();
    assert_eq!(d.used(), Some((1, 0)));

    // Each of these is taken, judged and returned with used length 0.
    let mut judge = |id: u16, descs: &[(u64, u32, u16)], max: usize| {
        d.add(id, descs);
        let s = r.pop(&map).unwrap();
        let mut out = Vec::new();
        let res = r.read_chain(s, max, &mut out);
        assert!(out.len() <= MAX_CHAIN);
        r.add_used(s, 0);
        r.publish();
        assert_eq!(d.used(), Some((id, 0)));
        res
    };
    // Lengths adding past 4 GiB.
    let past_4g = [(0x100, u32::MAX, 0), (0x200, 2, F_WRITE)];
    assert_eq!(judge(2, &past_4g, 64), Err(ChainError::Truncated));
    // Indirect: unmapped, empty, a ragged length, not alone in its chain, huge.
    let e = Err(ChainError::Empty);
    assert_eq!(judge(3, &[(HOLE, 32, F_INDIRECT)], 64), e);
    assert_eq!(judge(4, &[(TABLE, 0, F_INDIRECT)], 64), e);
    assert_eq!(judge(5, &[(TABLE, 17, F_INDIRECT)], 64), e);
    let not_alone = [(0x100, 16, 0), (TABLE, 16, F_INDIRECT)];
    assert_eq!(judge(6, &not_alone, 64), Err(ChainError::Truncated));
    // A table of MAX_CHAIN + 1 descriptors inside memory: cut there.
    let huge = [(0, (MAX_CHAIN as u32 + 1) * 16, F_INDIRECT)];
    assert_eq!(judge(7, &huge, usize::MAX), Err(ChainError::TooLong));

    // The driver makes the slot of a chain in flight available again: nothing is taken.
    d.add(8, &[(0x100, 1, F_WRITE)]);
    let s = r.pop(&map).unwrap();
    let at = 16 * u64::from(s) + 14;
    let now: u16 = d.mem.read_obj(GuestAddress(at)).unwrap();
    // Flip the slot to "available in the next lap" while the device's position comes
    // round to it: walk the device around with chains filling the other slots.
    for id in 20..23 {
        d.add(id, &[(0x100, 1, F_WRITE)]);
    }
    let others: Vec<u16> = std::iter::from_fn(|| r.pop(&map)).collect();
    assert_eq!(others.len(), 3);
    d.mem
        .write_obj((now ^ (F_AVAIL | F_USED)).to_le(), GuestAddress(at))
        .unwrap();
    assert_eq!(r.pop(&map), None, "a slot in flight is never taken twice");
}

#[test]
fn event_suppression_both_ways() {
    let mut d = Drv::new();
    let (map, mut r) = d.ring(0x8000);
    let round = |r: &mut PackedRing, d: &mut Drv, n: u16| {
        for i in 0..n {
            d.add(i, &[(0x100, 1, F_WRITE)]);
        }
        let s: Vec<u16> = std::iter::from_fn(|| r.pop(&map)).collect();
        for t in s {
            r.add_used(t, 1);
        }
        r.publish();
        while d.used().is_some() {}
    };
    // ENABLE: always; DISABLE: never, with or without EVENT_IDX.
    round(&mut r, &mut d, 1);
    d.set_driver_event(0, EVENT_ENABLE);
    assert!(r.wants_interrupt(false));
    d.set_driver_event(0, EVENT_DISABLE);
    assert!(!r.wants_interrupt(false));
    assert!(!r.wants_interrupt(true));
    // DESC: the first decision signals (nothing judged yet); then only when the used
    // position passed the driver's offset and wrap counter.
    d.set_driver_event(3 | 0x8000, EVENT_DESC);
    assert!(r.wants_interrupt(true));
    r.mark_signalled(); // at (1, wrap 1)
    round(&mut r, &mut d, 1); // used position 2
    assert!(!r.wants_interrupt(true), "slot 3 not used yet");
    round(&mut r, &mut d, 2); // used position 0, wrap 0: passed slot 3
    assert!(r.wants_interrupt(true));
    assert!(
        r.wants_interrupt(false),
        "DESC without EVENT_IDX is not valid: signal"
    );
    r.mark_signalled();
    // An event in the next lap, not reached yet.
    d.set_driver_event(1, EVENT_DESC);
    round(&mut r, &mut d, 1); // used position 1, wrap 0
    assert!(!r.wants_interrupt(true));
    round(&mut r, &mut d, 1); // 2: passed (1, wrap 0)
    assert!(r.wants_interrupt(true));

    // The device's flags: DISABLE while polling; enabling reports a chain that slipped in.
    assert_eq!(r.set_device_event(EVENT_DISABLE), Some(DEVICE + 2));
    let f: u16 = d.mem.read_obj(GuestAddress(DEVICE + 2)).unwrap();
    assert_eq!(f, EVENT_DISABLE);
    assert!(!r.enable_kicks().0);
    let f: u16 = d.mem.read_obj(GuestAddress(DEVICE + 2)).unwrap();
    assert_eq!(f, EVENT_ENABLE);
    d.add(9, &[(0x100, 1, F_WRITE)]);
    assert!(
        r.enable_kicks().0,
        "available before the device slept: no sleep"
    );
}

/// Out-of-order completion lets the driver make the slots of a chain still in flight
/// available again (its used descriptor went elsewhere, and the driver got as many slots
/// back): the new chain is taken, and both are answered.
#[test]
fn a_chain_in_flight_does_not_block_its_slots() {
    let mut d = Drv::new();
    let (map, mut r) = d.ring(0x8000);
    d.add(1, &[(0x100, 16, 0), (0x200, 8, F_WRITE)]);
    d.add(2, &[(0x300, 16, 0), (0x400, 8, F_WRITE)]);
    let a = r.pop(&map).unwrap();
    let b = r.pop(&map).unwrap();
    // B returns first: its used descriptor lands on slot 0 (A's head), 2 slots back.
    r.add_used(b, 8);
    r.publish();
    assert_eq!(d.used(), Some((2, 8)));
    // The driver has 2 free slots, at slots 0 and 1 (wrapped): A's.
    d.add(3, &[(0x500, 16, 0), (0x600, 8, F_WRITE)]);
    let c = r.pop(&map).expect("the new chain is taken");
    assert_ne!(c, a);
    assert_eq!(chain(&r, c).1, [(0x500, 16, false), (0x600, 8, true)]);
    assert_eq!(chain(&r, a).1, [(0x100, 16, false), (0x200, 8, true)]);
    // More than the ring: nothing taken, nothing broken for good.
    assert_eq!(r.pop(&map), None);
    r.add_used(c, 8);
    r.add_used(a, 8);
    r.publish();
    assert_eq!(d.used(), Some((3, 8)));
    assert_eq!(d.used(), Some((1, 8)));
}
