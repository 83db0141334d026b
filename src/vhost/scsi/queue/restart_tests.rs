//! The control and event queues across a crash of the backend (vhost-user.rst "Inflight
//! I/O tracking"), on split and packed rings laid out by hand ([`Driver`],
//! [`PackedDriver`]): an instance dies (no Drop: nothing published at exit, no
//! GET_VRING_BASE) and a new one starts on the same memory and in-flight region at the
//! base QEMU sends after a disconnection (a split ring's used index, a packed ring's
//! first base, which QEMU cannot update without GET_VRING_BASE). The driver must see
//! every chain it made available used exactly once, at the right ring position.

use std::sync::mpsc;
use std::sync::Arc;

use virtio_bindings::virtio_scsi::*;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::{ControlQueue, EventQueue};
use crate::bdev::malloc::{self, MallocOpts};
use crate::bdev::{Bdev, BdevRegistry};
use crate::reactor::Poller;
use crate::vhost::blk::queue::driver::{Driver, NEXT, QSIZE, USED, WRITE as W};
use crate::vhost::blk::queue::packed_driver::PackedDriver;
use crate::vhost::device::{GuestMem, QueueSetup};
use crate::vhost::inflight::{InflightRegion, QueueInflight};
use crate::vhost::scsi::request::LunAddr;
use crate::vhost::scsi::{ScsiDevice, NUM_QUEUES};
use crate::vhost::vring::Vring;

/// The driver side of a control or event queue, split or packed; chain `id` is a fixed
/// list of `(addr, len, flags)` buffers (the split driver lays it at descriptors `4 * id..`).
enum Drv {
    Split(Driver),
    Packed(PackedDriver),
}

impl Drv {
    fn new(packed: bool, chains: &[Vec<(u64, u32, u16)>]) -> Self {
        if packed {
            let mut d = PackedDriver::new();
            d.chains = chains.to_vec();
            return Drv::Packed(d);
        }
        let d = Driver::new();
        for (id, chain) in chains.iter().enumerate() {
            let head = 4 * id as u16;
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let at = head + i as u16;
                if i + 1 < chain.len() {
                    d.desc(at, addr, len, flags | NEXT, at + 1);
                } else {
                    d.desc(at, addr, len, flags, 0);
                }
            }
        }
        Drv::Split(d)
    }

    fn mem(&self) -> &GuestMem {
        match self {
            Drv::Split(d) => d.mem(),
            Drv::Packed(d) => d.mem(),
        }
    }

    fn offer(&mut self, id: u16) {
        match self {
            Drv::Split(d) => d.make_available(4 * id),
            Drv::Packed(d) => d.make_available(id),
        }
    }

    /// The chains returned since the last call: `(id, used length)`.
    fn used(&mut self) -> Vec<(u16, u32)> {
        let mut v = Vec::new();
        loop {
            match self {
                Drv::Split(d) => match d.next_used() {
                    Some((head, len)) => v.push((head / 4, len)),
                    None => return v,
                },
                Drv::Packed(d) => match d.next_used() {
                    Some(u) => v.push(u),
                    None => return v,
                },
            }
        }
    }

    /// Queue `index` as the frontend hands it over with the region's part: at `base` (the
    /// answer of a GET_VRING_BASE), or, after a crash, at the base QEMU restores (a split
    /// ring's used index, `virtio_queue_restore_last_avail_idx`; a packed ring's first
    /// base). A split ring's used index continues from the ring, as the session sets it.
    fn setup(
        &self,
        index: u16,
        part: QueueInflight,
        base: Option<u16>,
    ) -> (QueueSetup, mpsc::Receiver<u16>) {
        let (mut s, rx) = match self {
            Drv::Split(d) => d.setup(),
            Drv::Packed(d) => d.setup(),
        };
        s.index = index;
        s.inflight = Some(part);
        if let Drv::Split(_) = self {
            let used: u16 = self
                .mem()
                .memory()
                .read_obj(GuestAddress(USED as u64 + 2))
                .unwrap();
            s.queue.set_next_avail(base.unwrap_or(used));
            s.queue.set_next_used(used);
        } else if let Some(b) = base {
            s.queue.set_next_avail(b);
        }
        (s, rx)
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem()
            .memory()
            .read_slice(&mut b, GuestAddress(gpa))
            .unwrap();
        b
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem()
            .memory()
            .write_slice(bytes, GuestAddress(gpa))
            .unwrap();
    }
}

fn device() -> (ScsiDevice, BdevRegistry) {
    (
        ScsiDevice::new("scsi.restart").unwrap(),
        BdevRegistry::default(),
    )
}

fn bdev(reg: &BdevRegistry, name: &str) -> Arc<Bdev> {
    malloc::create(
        reg,
        MallocOpts {
            name: Some(name.into()),
            uuid: None,
            num_blocks: 64,
            block_size: 512,
        },
    )
    .unwrap()
}

/// A stopped poller's answer to GET_VRING_BASE.
fn stop(mut q: impl Poller, rx: &mpsc::Receiver<u16>) -> u16 {
    q.request_stop();
    for _ in 0..4 {
        if q.finished() {
            break;
        }
        q.poll();
    }
    assert!(q.finished(), "a stopping queue finishes");
    drop(q);
    rx.recv().unwrap()
}

/// Control request `id`: 24 readable bytes at `req(id)`, 5 writable at `resp(id)`.
fn req(id: u16) -> u64 {
    0x10000 + 0x1000 * u64::from(id)
}
fn resp(id: u16) -> u64 {
    req(id) + 0x800
}

/// A control request the previous instance took and had not answered (a LUN reset
/// waiting for the LUN's commands) when it died, after it had answered a later one (an
/// AN query): the new instance answers it once, not the later one again, and takes the
/// next request at the right ring position. The control queue completes out of order, so
/// even a split ring's used index is not where the previous instance was.
fn control_request_in_flight_at_a_crash(packed: bool) {
    let (dev, reg) = device();
    dev.add_target(0, bdev(&reg, "Malloc0")).unwrap();
    let region = InflightRegion::create(NUM_QUEUES as u16, QSIZE, packed)
        .unwrap()
        .0;
    let chains: Vec<_> = (0..4)
        .map(|id| vec![(req(id), 24, 0), (resp(id), 5, W)])
        .collect();
    let mut d = Drv::new(packed, &chains);
    let tmf = |subtype: u32| {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&VIRTIO_SCSI_T_TMF.to_le_bytes());
        b[4..8].copy_from_slice(&subtype.to_le_bytes());
        b[8..16].copy_from_slice(&LunAddr::encode(0, 0));
        b
    };
    d.write(req(0), &tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET));
    d.write(req(1), &tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET));
    let mut an = [0u8; 24];
    an[0..4].copy_from_slice(&VIRTIO_SCSI_T_AN_QUERY.to_le_bytes());
    an[4..12].copy_from_slice(&LunAddr::encode(0, 0));
    d.write(req(2), &an);
    d.write(req(3), &tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK));
    for id in 0..4 {
        d.write(resp(id), &[0xEE; 5]);
    }

    let (s, _rx) = d.setup(0, region.queue(0).unwrap(), None);
    let mut ctl = ControlQueue::new(s, dev.shared().clone());
    d.offer(0);
    ctl.poll();
    let target = dev.shared().target(0).unwrap();
    target
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    d.offer(1);
    d.offer(2);
    ctl.poll();
    assert_eq!(d.used(), [(0, 1), (2, 5)], "the reset of a busy LUN waits");
    std::mem::forget(ctl);
    // The new process has no commands in flight.
    target
        .in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);

    let (s, rx) = d.setup(0, region.queue(0).unwrap(), None);
    let mut ctl = ControlQueue::new(s, dev.shared().clone());
    d.write(resp(2), &[0xEE; 5]);
    d.offer(3);
    for _ in 0..3 {
        ctl.poll();
    }
    assert_eq!(
        d.used(),
        [(1, 1), (3, 1)],
        "the reset left in flight answered once, then the next request"
    );
    assert_eq!(
        d.read(resp(1), 1),
        [VIRTIO_SCSI_S_FUNCTION_SUCCEEDED as u8],
        "the reset run again against an idle LUN"
    );
    assert_eq!(d.read(resp(3), 1), [0], "ABORT TASK: FUNCTION COMPLETE");
    assert_eq!(
        d.read(resp(2), 5),
        [0xEE; 5],
        "the AN query not answered again"
    );
    let base = if packed { 0x8000 | 8 } else { 4 };
    assert_eq!(
        stop(ctl, &rx),
        base,
        "GET_VRING_BASE: after the four requests"
    );
}

#[test]
fn control_request_in_flight_at_a_crash_split() {
    control_request_in_flight_at_a_crash(false);
}

#[test]
fn control_request_in_flight_at_a_crash_packed() {
    control_request_in_flight_at_a_crash(true);
}

/// Event buffer `id`: 16 writable bytes.
fn evbuf(id: u16) -> u64 {
    0x40000 + 0x100 * u64::from(id)
}

/// The event in buffer `id`: event, LUN address, reason.
fn event_in(d: &Drv, id: u16) -> (u32, [u8; 8], u32) {
    let b = d.read(evbuf(id), 16);
    (
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        b[4..12].try_into().unwrap(),
        u32::from_le_bytes(b[12..16].try_into().unwrap()),
    )
}

/// An instance that takes one event buffer from the ring and dies before returning it
/// (the window between taking a buffer for an event and publishing it); the buffer's id.
fn take_one_and_die(d: &Drv, part: QueueInflight) -> u16 {
    let (mut s, _rx) = d.setup(1, part, None);
    let part = s.inflight.take().unwrap();
    let mut v = Vring::new(s);
    v.track_inflight(part);
    v.sync_current_mem();
    let head = v.pop_head().expect("a buffer on the ring");
    let mut out = Vec::new();
    v.read_chain(head, 4, &mut out).unwrap();
    std::mem::forget(v);
    ((out[0].addr - evbuf(0)) / 0x100) as u16
}

/// The event queue across crashes: the ring position the event queue reached survives
/// (a packed ring's base is stale), a buffer taken and not returned by a dead instance is
/// held by the next one and filled by the next event, and a clean stop returns the
/// buffer it holds with NO_EVENT, so that the instance after it resumes exactly.
fn event_buffers_across_a_crash(packed: bool) {
    let (dev, reg) = device();
    let region = InflightRegion::create(NUM_QUEUES as u16, QSIZE, packed)
        .unwrap()
        .0;
    let chains: Vec<_> = (0..6).map(|id| vec![(evbuf(id), 16, W)]).collect();
    let mut d = Drv::new(packed, &chains);
    let rescan = |t: u8| {
        (
            VIRTIO_SCSI_T_TRANSPORT_RESET,
            LunAddr::encode(t, 0),
            VIRTIO_SCSI_EVT_RESET_RESCAN,
        )
    };

    let (s, _rx) = d.setup(1, region.queue(1).unwrap(), None);
    let mut eq = EventQueue::new(s, dev.shared().clone()).unwrap();
    for id in 0..5 {
        d.offer(id);
    }
    eq.poll();
    assert!(d.used().is_empty(), "buffers wait for events");
    dev.add_target(0, bdev(&reg, "Malloc0")).unwrap();
    eq.poll();
    assert_eq!(d.used(), [(0, 16)]);
    assert_eq!(event_in(&d, 0), rescan(0));
    std::mem::forget(eq);

    assert_eq!(take_one_and_die(&d, region.queue(1).unwrap()), 1);

    let (s, _rx) = d.setup(1, region.queue(1).unwrap(), None);
    let mut eq = EventQueue::new(s, dev.shared().clone()).unwrap();
    eq.poll();
    assert!(
        d.used().is_empty(),
        "the buffer left taken is held for an event"
    );
    dev.add_target(1, bdev(&reg, "Malloc1")).unwrap();
    eq.poll();
    dev.add_target(2, bdev(&reg, "Malloc2")).unwrap();
    eq.poll();
    assert_eq!(
        d.used(),
        [(1, 16), (2, 16)],
        "the held buffer first, then the ring"
    );
    assert_eq!(event_in(&d, 1), rescan(1));
    assert_eq!(event_in(&d, 2), rescan(2));
    std::mem::forget(eq);

    assert_eq!(take_one_and_die(&d, region.queue(1).unwrap()), 3);
    d.write(evbuf(3), &[0xEE; 16]);
    let (s, rx) = d.setup(1, region.queue(1).unwrap(), None);
    let eq = EventQueue::new(s, dev.shared().clone()).unwrap();
    let base = stop(eq, &rx);
    assert_eq!(
        d.used(),
        [(3, 16)],
        "a clean stop returns the buffer it holds"
    );
    assert_eq!(event_in(&d, 3), (VIRTIO_SCSI_T_NO_EVENT, [0; 8], 0));
    assert_eq!(base, if packed { 0x8000 | 4 } else { 4 });

    // The frontend starts the ring again at the base it got.
    let (s, rx) = d.setup(1, region.queue(1).unwrap(), Some(base));
    let mut eq = EventQueue::new(s, dev.shared().clone()).unwrap();
    dev.add_target(3, bdev(&reg, "Malloc3")).unwrap();
    eq.poll();
    assert_eq!(d.used(), [(4, 16)], "the next buffer on the ring");
    assert_eq!(event_in(&d, 4), rescan(3));
    assert_eq!(stop(eq, &rx), if packed { 0x8000 | 5 } else { 5 });
}

#[test]
fn event_buffers_across_a_crash_split() {
    event_buffers_across_a_crash(false);
}

#[test]
fn event_buffers_across_a_crash_packed() {
    event_buffers_across_a_crash(true);
}
