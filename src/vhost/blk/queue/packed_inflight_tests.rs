//! A packed ring's in-flight tracking (vhost-user.rst "Inflight I/O tracking", packed
//! layout) through the virtqueue engine's [`Vring`], against [`PackedDriver`]: instances
//! die (no Drop: nothing published at exit) with chains in flight, completed out of order,
//! some returned but not published, across laps of the ring (both wrap counters flip), and
//! each new instance starts at the stale base QEMU keeps for a packed ring. The driver must
//! see every chain it made available used exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;

use vm_memory::GuestMemoryMmap;

use super::driver::QSIZE;
use super::packed_driver::{PackedDriver, W};
use crate::vhost::inflight::InflightRegion;
use crate::vhost::vring::Vring;

/// Buffer ids, each with a chain of 1 to 3 ring descriptors at its own addresses.
const IDS: u16 = 48;

fn driver() -> PackedDriver {
    let mut d = PackedDriver::new();
    for id in 0..u64::from(IDS) {
        let base = 0x10000 + 0x1000 * id;
        let chain = match id % 3 {
            0 => vec![(base, 16, 0)],
            1 => vec![(base, 16, 0), (base + 0x100, 512, W)],
            _ => vec![(base, 16, 0), (base + 0x100, 512, W), (base + 0x800, 1, W)],
        };
        d.chains.push(chain);
    }
    d
}

/// A tiny deterministic generator (the schedule must be reproducible).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// The buffer id of the chain behind `token` (its first address).
fn id_of(v: &Vring, token: u16) -> u16 {
    let mut out = Vec::new();
    let _ = v.read_chain(token, 64, &mut out);
    ((out[0].addr - 0x10000) / 0x1000) as u16
}

struct Run {
    d: PackedDriver,
    region: std::sync::Arc<InflightRegion>,
    mem: std::sync::Arc<GuestMemoryMmap>,
    /// Ids made available and not yet seen used by the driver.
    outstanding: HashSet<u16>,
    /// Times each id was made available / seen used.
    made: HashMap<u16, u32>,
    used: HashMap<u16, u32>,
    rng: Lcg,
}

impl Run {
    fn new() -> Self {
        let d = driver();
        let mem = d.mem().memory().into_inner();
        let (region, _fd, _msg) = InflightRegion::create(1, QSIZE, true).unwrap();
        Run {
            d,
            region,
            mem,
            outstanding: HashSet::new(),
            made: HashMap::new(),
            used: HashMap::new(),
            rng: Lcg(7),
        }
    }

    /// A new instance, at the base QEMU keeps for a packed ring (the first one).
    fn start(&self) -> (Vring, mpsc::Receiver<u16>) {
        let (setup, rx) = self.d.setup();
        let mut v = Vring::new(setup);
        v.track_inflight(self.region.queue(0).unwrap());
        v.sync_mem(&self.mem, self.d.mem().generation());
        (v, rx)
    }

    /// The driver makes ids available while its ring has room.
    fn offer(&mut self, n: usize) {
        let busy: usize = self
            .outstanding
            .iter()
            .map(|&id| self.d.chains[usize::from(id)].len())
            .sum();
        let mut room = usize::from(QSIZE) - busy;
        for _ in 0..n {
            let id = self.rng.next(usize::from(IDS)) as u16;
            let len = self.d.chains[usize::from(id)].len();
            if self.outstanding.contains(&id) || len > room {
                continue;
            }
            room -= len;
            self.outstanding.insert(id);
            *self.made.entry(id).or_default() += 1;
            self.d.make_available(id);
        }
    }

    /// The driver makes `ids` available.
    fn offer_ids(&mut self, ids: &[u16]) {
        for &id in ids {
            self.outstanding.insert(id);
            *self.made.entry(id).or_default() += 1;
            self.d.make_available(id);
        }
    }

    /// The driver reads every used descriptor published: each must be outstanding.
    fn reap(&mut self) {
        while let Some((id, len)) = self.d.next_used() {
            assert!(
                self.outstanding.remove(&id),
                "id {id} used but not outstanding (used twice?)"
            );
            assert_eq!(len, u32::from(id) + 1, "id {id}: its own used length");
            *self.used.entry(id).or_default() += 1;
        }
    }

    /// Returns `tokens` (out of order) and publishes them.
    fn complete(&mut self, v: &mut Vring, tokens: &mut Vec<u16>, k: usize, publish: bool) {
        for _ in 0..k.min(tokens.len()) {
            let t = tokens.swap_remove(self.rng.next(tokens.len()));
            let id = id_of(v, t);
            v.add_used(&self.mem, t, u32::from(id) + 1, "a test chain");
        }
        if publish {
            v.notify_guest(&self.mem);
        }
    }
}

#[test]
fn killed_instances_lose_nothing_and_return_nothing_twice() {
    let mut r = Run::new();
    let (mut v, _rx) = r.start();
    let mut crashes = 0;
    let mut resubmitted_total = 0;
    for round in 0..400 {
        r.offer(12);
        let mut tokens: Vec<u16> = std::iter::from_fn(|| v.pop_head()).collect();
        // Most rounds leave chains in flight; some return a batch without publishing it.
        let k = r.rng.next(tokens.len() + 1);
        r.complete(&mut v, &mut tokens, k, true);
        r.reap();
        let unpublished = r.rng.next(3);
        r.complete(&mut v, &mut tokens, unpublished, false);
        // Chains still in flight stay with the instance (the engine would hold them).
        let keep_going = round % 17 != 16;
        if keep_going {
            // Carry the tokens over: complete them in a later round.
            let mut left = tokens;
            r.offer(4);
            left.extend(std::iter::from_fn(|| v.pop_head()));
            let n = left.len();
            r.complete(&mut v, &mut left, n, true);
            r.reap();
            continue;
        }
        // kill -9: nothing published at exit, nothing answered.
        let in_flight_ids: HashSet<u16> = r.outstanding.clone();
        std::mem::forget(v);
        crashes += 1;
        let (nv, _rx) = r.start();
        v = nv;
        // The driver sees nothing new before the new instance returns chains.
        r.reap();
        assert_eq!(r.outstanding, in_flight_ids);
        let mut again: Vec<u16> = Vec::new();
        while v.has_resubmits() {
            again.push(v.pop_head().unwrap());
        }
        let ids: HashSet<u16> = again.iter().map(|&t| id_of(&v, t)).collect();
        assert_eq!(ids.len(), again.len(), "each chain resubmitted once");
        assert!(
            ids.iter().all(|id| r.outstanding.contains(id)),
            "only chains the driver still waits for"
        );
        resubmitted_total += again.len();
        // Anything else outstanding was never taken: the ring gives it again.
        again.extend(std::iter::from_fn(|| v.pop_head()));
        let taken: HashSet<u16> = again.iter().map(|&t| id_of(&v, t)).collect();
        assert_eq!(taken, r.outstanding, "after a kill in round {round}");
        // One at a time, each published and read before the next: the driver walks the
        // used positions the new instance writes, past slots the killed one may have
        // written used descriptors to without publishing them.
        while !again.is_empty() {
            r.complete(&mut v, &mut again, 1, true);
            r.reap();
        }
        assert!(
            r.outstanding.is_empty(),
            "round {round}: {:?}",
            r.outstanding
        );
    }
    r.reap();
    let mut left: Vec<u16> = std::iter::from_fn(|| v.pop_head()).collect();
    let n = left.len();
    r.complete(&mut v, &mut left, n, true);
    r.reap();
    assert!(r.outstanding.is_empty());
    assert_eq!(
        r.made, r.used,
        "every chain made available was used exactly once"
    );
    let chains: u32 = r.made.values().sum();
    assert!(
        crashes >= 20 && resubmitted_total >= 40,
        "{crashes} {resubmitted_total}"
    );
    assert!(
        chains > 3 * u32::from(QSIZE),
        "several laps: {chains} chains"
    );
}

/// A killed instance had written used descriptors it never published (the batch's first
/// flags are written last): the new one completes the same chains in another order, one
/// batch each, and the driver, walking its used positions, never reads a stale one.
#[test]
fn used_descriptors_never_published_are_not_read_after_a_kill() {
    let mut r = Run::new();
    let (mut v, _rx) = r.start();
    // One-slot chains (ids divisible by 3), past the first lap.
    for _ in 0..3 {
        r.offer_ids(&(0..IDS).step_by(3).collect::<Vec<_>>());
        let mut t: Vec<u16> = std::iter::from_fn(|| v.pop_head()).collect();
        let n = t.len();
        r.complete(&mut v, &mut t, n, true);
        r.reap();
    }
    r.offer_ids(&[0, 3, 6, 9]);
    let t: Vec<u16> = std::iter::from_fn(|| v.pop_head()).collect();
    assert_eq!(t.len(), 4);
    // 0 then 3 returned (3's used descriptor complete, flags and all), not published.
    for &tok in &t[..2] {
        let id = id_of(&v, tok);
        v.add_used(&r.mem, tok, u32::from(id) + 1, "a test chain");
    }
    std::mem::forget(v);
    let (mut v, _rx) = r.start();
    r.reap();
    assert_eq!(r.outstanding.len(), 4, "nothing reached the driver");
    let mut again: Vec<u16> = std::iter::from_fn(|| v.pop_head()).collect();
    let ids: Vec<u16> = again.iter().map(|&t| id_of(&v, t)).collect();
    assert_eq!(ids, [0, 3, 6, 9], "resubmitted in the order taken");
    // 3 first, alone: the driver then stands where the killed instance had put 3.
    for want in [3u16, 9, 0, 6] {
        let i = ids.iter().position(|&x| x == want).unwrap();
        let tok = again[i];
        again[i] = u16::MAX;
        v.add_used(&r.mem, tok, u32::from(want) + 1, "a test chain");
        v.notify_guest(&r.mem);
        r.reap();
        assert!(!r.outstanding.contains(&want));
    }
    assert!(r.outstanding.is_empty());
    assert_eq!(r.made, r.used);
}

/// A clean stop (SIGTERM: everything returned and published) answers GET_VRING_BASE with
/// its position; a new instance given a stale base resumes at the recorded one and
/// resubmits nothing.
#[test]
fn a_clean_stop_resumes_at_the_recorded_position() {
    let mut r = Run::new();
    let (mut v, rx) = r.start();
    for _ in 0..30 {
        r.offer(10);
        let mut t: Vec<u16> = std::iter::from_fn(|| v.pop_head()).collect();
        let n = t.len();
        r.complete(&mut v, &mut t, n, true);
        r.reap();
    }
    drop(v);
    let pos = rx.recv().unwrap();
    assert_eq!(pos, r.d.used_base());
    let (v, rx) = r.start();
    assert!(!v.has_resubmits());
    drop(v);
    assert_eq!(rx.recv().unwrap(), pos);
}
