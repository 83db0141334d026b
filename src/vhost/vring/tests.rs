//! The ring plumbing driven by hand: indexes, batching, coalescing, in-flight resume.

use std::sync::mpsc;

use crate::vhost::device::GuestMem;

use super::*;

const SIZE: u16 = 16;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// A ring of `SIZE` entries at 0 in 64 KiB of guest memory, with its `Vring`.
fn ring() -> (Arc<GuestMemoryMmap>, Vring, mpsc::Receiver<u16>) {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    ring_on(GuestMem::new(m), 0, 0)
}

/// A `Vring` over the ring in `mem`, started at `base` with used index `used` (as the
/// session starts one: the used index read from the ring).
fn ring_on(
    mem: GuestMem,
    base: u16,
    used: u16,
) -> (Arc<GuestMemoryMmap>, Vring, mpsc::Receiver<u16>) {
    let mut q = Queue::new(SIZE).unwrap();
    q.set_next_avail(base);
    q.set_next_used(used);
    q.set_size(SIZE);
    q.try_set_desc_table_address(GuestAddress(0)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    let (tx, rx) = mpsc::channel();
    let mut vring = Vring::new(QueueSetup {
        index: 0,
        queue: q,
        mem: mem.clone(),
        kick: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
        call: None,
        stopped: tx,
        coalescing: Arc::default(),
        inflight: None,
        stats: Default::default(),
        log: Default::default(),
        packed: false,
    });
    let (generation, m) = mem.load();
    vring.sync_mem(&m, generation);
    assert!(vring.has_view());
    (m, vring, rx)
}

/// The driver puts `head` in avail slot `pos` (§2.7.6), without moving the index.
fn put_avail(m: &GuestMemoryMmap, pos: u16, head: u16) {
    let at = AVAIL + 4 + 2 * u64::from(pos % SIZE);
    m.write_obj(head.to_le(), GuestAddress(at)).unwrap();
}

fn set_avail_idx(m: &GuestMemoryMmap, idx: u16) {
    m.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
}

fn used_idx(m: &GuestMemoryMmap) -> u16 {
    u16::from_le(m.read_obj(GuestAddress(USED + 2)).unwrap())
}

#[test]
fn pop_head_takes_what_the_last_index_read_covers_and_refuses_a_wild_index() {
    let (m, mut vring, _rx) = ring();
    assert_eq!(vring.pop_head(), None);
    put_avail(&m, 0, 3);
    put_avail(&m, 1, 5);
    set_avail_idx(&m, 2);
    assert_eq!(vring.pop_head(), Some(3));
    // Made available after the index was read: taken once the cached ones are gone.
    put_avail(&m, 2, 7);
    set_avail_idx(&m, 3);
    assert_eq!(vring.pop_head(), Some(5));
    assert_eq!(vring.pop_head(), Some(7));
    assert_eq!(vring.pop_head(), None);
    assert_eq!(vring.queue().next_avail(), 3);

    // An index more than a ring ahead: nothing is taken until the driver fixes it.
    set_avail_idx(&m, 3 + SIZE + 1);
    assert_eq!(vring.pop_head(), None);
    assert_eq!(vring.queue().next_avail(), 3);
    put_avail(&m, 3, 9);
    set_avail_idx(&m, 4);
    assert_eq!(vring.pop_head(), Some(9));
    assert_eq!(vring.pop_head(), None);
}

/// Interrupts written to the call eventfd since the last look.
fn calls(vring: &Vring) -> u64 {
    vring.call.as_ref().and_then(|c| c.read().ok()).unwrap_or(0)
}

#[test]
fn coalescing_holds_interrupts_back_past_the_rate_threshold() {
    let (m, mut vring, _rx) = ring();
    vring.call = Some(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
    let t0 = vring.irq.interval_start;
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut head = 0u16;
    let mut complete = |vring: &mut Vring, n: u16| {
        for _ in 0..n {
            vring.add_used(&m, head % SIZE, 0, "a test chain");
            head = head.wrapping_add(1);
        }
    };

    // Off (the default): every batch is signalled at once.
    complete(&mut vring, 3);
    vring.notify_guest_at(&m, ms(1));
    assert_eq!(calls(&vring), 1);

    // On: 100 µs base past 100 IOPS (one chain per 10 ms interval).
    vring.coalescing.set(100, 100).unwrap();
    complete(&mut vring, 97);
    vring.notify_guest_at(&m, ms(5));
    assert_eq!(calls(&vring), 1, "no rate measured yet: no delay");
    // 100 chains in 11 ms = 90 per interval: 100 µs × (90 − 1) / 1 = 8.9 ms apart.
    complete(&mut vring, 1);
    vring.notify_guest_at(&m, ms(11));
    assert_eq!(calls(&vring), 1);
    assert_eq!(vring.irq.delay, Duration::from_micros(8_900));
    complete(&mut vring, 2);
    vring.notify_guest_at(&m, ms(15));
    assert_eq!(calls(&vring), 0, "held back");
    assert_eq!(used_idx(&m), 103, "the chains are published all the same");
    complete(&mut vring, 1);
    vring.notify_guest_at(&m, ms(16));
    assert_eq!(calls(&vring), 0, "still held back");
    assert_eq!(
        vring.coalescing.held(),
        1,
        "one interrupt held, however often asked"
    );
    assert_eq!(
        vring.irq_deadline(),
        Some(ms(11) + Duration::from_micros(8_900))
    );
    assert!(!vring.irq_due_at(ms(19)));
    assert!(vring.irq_due_at(ms(20)));
    vring.notify_guest_at(&m, ms(20));
    assert_eq!(calls(&vring), 1, "sent once due");
    assert_eq!(vring.irq_deadline(), None);

    // Held back again, until a whole ring's worth waits: then at once.
    complete(&mut vring, 1);
    vring.notify_guest_at(&m, ms(21));
    assert_eq!(calls(&vring), 0);
    complete(&mut vring, SIZE - 1);
    vring.notify_guest_at(&m, ms(22));
    assert_eq!(
        calls(&vring),
        1,
        "a ring's worth of completions is not held back"
    );
    assert_eq!(vring.coalescing.held(), 2);

    // Off again: at once.
    vring.coalescing.set(0, 100).unwrap();
    complete(&mut vring, 1);
    vring.notify_guest_at(&m, ms(23));
    assert_eq!(calls(&vring), 1);
}

#[test]
fn used_chains_are_published_once_per_batch_and_when_the_ring_goes() {
    let (m, mut vring, rx) = ring();
    vring.add_used(&m, 3, 512, "a test chain");
    vring.add_used(&m, 5, 1, "a test chain");
    let elem = |i: u64| -> (u32, u32) {
        let at = USED + 4 + 8 * i;
        (
            m.read_obj(GuestAddress(at)).unwrap(),
            m.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    };
    assert_eq!(elem(0), (3, 512));
    assert_eq!(elem(1), (5, 1));
    assert_eq!(used_idx(&m), 0, "not published before notify_guest");
    vring.notify_guest(&m);
    assert_eq!(used_idx(&m), 2);

    vring.add_used(&m, 7, 0, "a test chain");
    assert_eq!(used_idx(&m), 2);
    drop(vring);
    assert_eq!(used_idx(&m), 3, "a dropped ring publishes what it returned");
    assert_eq!(
        rx.recv().unwrap(),
        0,
        "GET_VRING_BASE answer: next available index"
    );
}

/// A ring with in-flight tracking killed (no Drop: nothing published at exit) with
/// requests in flight that completed out of order, and a new instance on the same
/// memory and region: it resubmits the unfinished heads first, in the order they were
/// taken, and resumes the ring after them, whatever base the frontend restored.
#[test]
fn a_new_instance_resubmits_what_a_killed_one_left_in_flight() {
    use crate::vhost::inflight::InflightRegion;
    let (region, _fd, _msg) = InflightRegion::create(1, SIZE, false).unwrap();
    let (m, mut vring, _rx) = ring();
    vring.track_inflight(region.queue(0).unwrap());
    for (pos, head) in [3u16, 9, 4, 12].into_iter().enumerate() {
        put_avail(&m, pos as u16, head);
    }
    set_avail_idx(&m, 4);
    let taken: Vec<u16> = std::iter::from_fn(|| vring.pop_head()).collect();
    assert_eq!(taken, [3, 9, 4, 12]);
    // 4 completes and is published; 12 completes but the process dies before the
    // batch is published.
    vring.add_used(&m, 4, 0, "a test chain");
    vring.notify_guest(&m);
    assert_eq!(used_idx(&m), 1);
    vring.add_used(&m, 12, 0, "a test chain");
    std::mem::forget(vring);

    // QEMU restores the ring at the used index (1) after the disconnection.
    let mem = GuestMem::new(Arc::unwrap_or_clone(m.clone()));
    let (m2, mut again, rx) = ring_on(mem, used_idx(&m), used_idx(&m));
    again.track_inflight(region.queue(0).unwrap());
    put_avail(&m2, 4, 7);
    set_avail_idx(&m2, 5);
    again.stop();
    assert!(again.has_resubmits());
    let resumed: Vec<u16> = std::iter::from_fn(|| again.pop_head()).collect();
    assert_eq!(
        resumed,
        [3, 9, 12],
        "in flight, in the order taken; a stopping ring takes nothing new"
    );
    for h in [9, 3, 12] {
        again.add_used(&m2, h, 0, "a test chain");
    }
    drop(again);
    assert_eq!(used_idx(&m2), 4);
    assert_eq!(
        rx.recv().unwrap(),
        4,
        "resumes after the chains in flight, not at the base"
    );

    // A third instance finds nothing in flight and takes the new chain.
    let mem = GuestMem::new(Arc::unwrap_or_clone(m2.clone()));
    let (_m3, mut third, _rx) = ring_on(mem, 4, 4);
    third.track_inflight(region.queue(0).unwrap());
    assert!(!third.has_resubmits());
    assert_eq!(third.pop_head(), Some(7));
}
