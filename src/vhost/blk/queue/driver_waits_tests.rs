//! [`crate::reactor::Poller::driver_waits`] of a blk queue: true only once a busy pass has
//! signalled the driver and left nothing in flight; what lets a reactor on a host with
//! cheap wake-ups sleep at once ([`crate::reactor::wake_cost`]).

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::driver::{malloc_device, Driver, AVAIL, NEXT, WRITE};
use crate::reactor::Poller;

/// A blk queue on a 32 KiB malloc bdev, its test driver and its call eventfd.
fn queue() -> (Driver, super::BlkQueue, EventFd) {
    let dev = malloc_device("wait", 64);
    let d = Driver::new();
    let (mut setup, _rx) = d.setup();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    setup.call = Some(call.try_clone().unwrap());
    let q = super::BlkQueue::new(setup, dev.shared.clone()).unwrap();
    (d, q, call)
}

#[test]
fn the_driver_waits_once_signalled_with_nothing_in_flight() {
    let (mut d, mut q, call) = queue();
    // Nothing yet: nothing will come without a kick.
    assert!(q.driver_waits());

    // A 4 KiB read: header, data, status.
    d.write(0x10000, &[0u8; 16]);
    d.desc(0, 0x10000, 16, NEXT, 1);
    d.desc(1, 0x40000, 4096, WRITE | NEXT, 2);
    d.desc(2, 0x20000, 1, WRITE, 0);
    d.make_available(0);
    let mut answered = false;
    for _ in 0..1000 {
        let work = q.poll();
        if let Some((head, len)) = d.next_used() {
            assert_eq!((head, len), (0, 4096 + 1));
            answered = true;
            assert!(work > 0);
            break;
        }
        // Taken, not answered: in flight, the driver's next move is not a wait.
        if work > 0 {
            assert!(!q.driver_waits());
        }
    }
    assert!(answered, "the read was never answered");
    // Answered and signalled (the call eventfd was written), nothing in flight.
    assert_eq!(call.read().unwrap(), 1);
    assert!(q.driver_waits());
    // An idle pass changes nothing.
    assert_eq!(q.poll(), 0);
    assert!(q.driver_waits());

    // A driver that asks for no interrupts (VRING_AVAIL_F_NO_INTERRUPT: a polling client)
    // is not waiting for one.
    d.write(AVAIL as u64, &1u16.to_le_bytes());
    d.make_available(0);
    let mut answered = false;
    for _ in 0..1000 {
        q.poll();
        if d.next_used().is_some() {
            answered = true;
            break;
        }
    }
    assert!(answered);
    assert!(call.read().is_err(), "an interrupt the driver did not want");
    assert!(!q.driver_waits());
}

/// [`crate::reactor::Poller::driver_batch`]: the requests answered since the driver last
/// waited, which bounds how long a reactor polls for its next turn
/// ([`crate::reactor::poll_window`]).
#[test]
fn the_driver_batch_is_the_requests_of_its_last_turn() {
    let (mut d, mut q, _call) = queue();
    assert_eq!(q.driver_batch(), 1, "no turn yet");
    // Turns of 1, 5 and 1 reads of 512 bytes (3 descriptors each), all published at once.
    for n in [1u16, 5, 1] {
        for r in 0..n {
            let h = 3 * r;
            let hdr = 0x10000 + 0x100 * r as u64;
            d.write(hdr, &[0u8; 16]);
            d.desc(h, hdr, 16, NEXT, h + 1);
            d.desc(h + 1, 0x40000 + 0x1000 * r as u64, 512, WRITE | NEXT, h + 2);
            d.desc(h + 2, 0x20000 + r as u64, 1, WRITE, 0);
            d.make_available(h);
        }
        let mut answered = 0;
        for _ in 0..1000 {
            q.poll();
            while d.next_used().is_some() {
                answered += 1;
            }
            if answered == n && q.driver_waits() {
                break;
            }
        }
        assert_eq!(answered, n);
        assert!(q.driver_waits());
        assert_eq!(q.driver_batch(), n as usize);
    }
}
