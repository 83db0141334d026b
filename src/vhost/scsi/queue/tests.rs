//! The queue engines driven like a driver would: commands, task management and hot-plug
//! events through virtio-queue's mock split rings over real guest memory, against malloc
//! bdevs; plus hostile and randomized descriptor chains.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_scsi::*;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bdev::malloc::{self, MallocOpts};
use crate::bdev::BdevRegistry;
use crate::bdev::{IoOp, IoVecs};
use crate::reactor::Poller;
use crate::sync::lock;
use crate::vhost::device::GuestMem;
use crate::vhost::device::QueueSetup;
use crate::vhost::scsi::request::REQ_HEADER_LEN;
use crate::vhost::scsi::request::{LunAddr, RESP_LEN};
use crate::vhost::scsi::ScsiDevice;

type Mem = GuestMemoryMmap<()>;

const QSIZE: u16 = 256;
const REQ: u64 = 0x10000;
const OUT: u64 = 0x11000;
const RESP: u64 = 0x30000;
const IN: u64 = 0x31000;
const EVQ: u64 = 0x80000;
const EVBUF: u64 = 0x90000;
const CTLQ: u64 = 0xA0000;
const CTLBUF: u64 = 0xB0000;
const W: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// A split ring laid out by hand at `base`: descriptor table, avail ring at +0x1000, used
/// ring at +0x2000 (virtio 1.2 §2.7).
struct Ring {
    base: u64,
    size: u16,
    avail: u16,
}

impl Ring {
    fn new(m: &Mem, base: u64, size: u16) -> Self {
        m.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        Ring {
            base,
            size,
            avail: 0,
        }
    }
    fn used_addr(&self) -> GuestAddress {
        GuestAddress(self.base + 0x2000)
    }
    fn avail_addr(&self) -> GuestAddress {
        GuestAddress(self.base + 0x1000)
    }
    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.base))
            .unwrap();
        q.try_set_avail_ring_address(self.avail_addr()).unwrap();
        q.try_set_used_ring_address(self.used_addr()).unwrap();
        q.set_ready(true);
        q
    }
    /// Writes descriptors verbatim at table index `at` and makes `at` available.
    fn add_desc_chains(&mut self, m: &Mem, descs: &[RawDescriptor], at: u16) -> Result<(), ()> {
        for (i, d) in descs.iter().enumerate() {
            let s = SplitDescriptor::from(*d);
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&s.addr().0.to_le_bytes());
            b[8..12].copy_from_slice(&s.len().to_le_bytes());
            b[12..14].copy_from_slice(&s.flags().to_le_bytes());
            b[14..16].copy_from_slice(&s.next().to_le_bytes());
            let idx = (at as u64 + i as u64) % u64::from(self.size);
            m.write_slice(&b, GuestAddress(self.base + 16 * idx))
                .unwrap();
        }
        let slot = self.base + 0x1004 + 2 * u64::from(self.avail % self.size);
        m.write_obj(at, GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        m.write_obj(self.avail, GuestAddress(self.base + 0x1002))
            .unwrap();
        Ok(())
    }
}

struct Rig {
    mem: GuestMem,
    dev: ScsiDevice,
    reg: BdevRegistry,
    n: u16,
    ring: Option<Ring>,
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn setup(mem: &GuestMem, index: u16, q: Queue) -> (QueueSetup, mpsc::Receiver<u16>) {
    let (tx, rx) = mpsc::channel();
    (
        QueueSetup {
            index,
            queue: q,
            mem: mem.clone(),
            kick: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
            call: None,
            stopped: tx,
            coalescing: Default::default(),
            inflight: None,
            stats: Default::default(),
            log: Default::default(),
            packed: false,
        },
        rx,
    )
}

/// Reads used element `i` of a ring at `used_addr`.
fn used_elem(m: &Mem, used_addr: GuestAddress, i: u16, size: u16) -> (u32, u32) {
    let at = used_addr.0 + 4 + 8 * u64::from(i % size);
    (
        m.read_obj(GuestAddress(at)).unwrap(),
        m.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

fn used_idx(m: &Mem, used_addr: GuestAddress) -> u16 {
    m.read_obj(GuestAddress(used_addr.0 + 2)).unwrap()
}

struct Resp {
    sense_len: u32,
    resid: u32,
    status: u8,
    response: u8,
    sense: Vec<u8>,
    data: Vec<u8>,
    used: u32,
}

impl Rig {
    fn new() -> Self {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let reg = BdevRegistry::default();
        let dev = ScsiDevice::new("scsi.test").unwrap();
        Rig {
            mem: GuestMem::new(m),
            dev,
            reg,
            n: 0,
            ring: None,
        }
    }

    fn add(&self, target: i64, name: &str, blocks: u64, bs: u32) -> Arc<crate::bdev::Bdev> {
        let b = malloc::create(
            &self.reg,
            MallocOpts {
                name: Some(name.into()),
                uuid: None,
                num_blocks: blocks,
                block_size: bs,
            },
        )
        .unwrap();
        self.dev.add_target(target, b.clone()).unwrap();
        b
    }

    fn header(target_lun: [u8; 8], cdb: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; REQ_HEADER_LEN as usize];
        h[0..8].copy_from_slice(&target_lun);
        h[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        h[19..19 + cdb.len()].copy_from_slice(cdb);
        h
    }

    /// Sends one command through a request queue and polls until it is used.
    fn cmd_lun(
        &mut self,
        rq: &mut RequestQueue,
        lun: [u8; 8],
        cdb: &[u8],
        out: &[u8],
        in_len: u32,
    ) -> Resp {
        let g = self.mem.memory();
        let m: &Mem = &g;
        m.write_slice(&Self::header(lun, cdb), GuestAddress(REQ))
            .unwrap();
        m.write_slice(out, GuestAddress(OUT)).unwrap();
        m.write_slice(&[0xEE; RESP_LEN as usize], GuestAddress(RESP))
            .unwrap();
        let mut descs = vec![raw(REQ, REQ_HEADER_LEN as u32, 0, 0)];
        if !out.is_empty() {
            descs.push(raw(OUT, out.len() as u32, 0, 0));
        }
        descs.push(raw(RESP, RESP_LEN as u32, W, 0));
        if in_len > 0 {
            descs.push(raw(IN, in_len, W, 0));
        }
        self.submit(rq, descs)
    }

    fn submit(&mut self, rq: &mut RequestQueue, mut descs: Vec<RawDescriptor>) -> Resp {
        let g = self.mem.memory();
        let m: &Mem = &g;
        let mock = self.ring.as_mut().unwrap();
        let at = (self.n * 8) % QSIZE;
        let len = descs.len();
        for (i, d) in descs.iter_mut().enumerate() {
            let s = SplitDescriptor::from(*d);
            let (f, nx) = if i + 1 < len {
                (s.flags() | NEXT, at + i as u16 + 1)
            } else {
                (s.flags() & !NEXT, 0)
            };
            *d = raw(s.addr().0, s.len(), f, nx);
        }
        mock.add_desc_chains(m, &descs, at).unwrap();
        self.n += 1;
        let used_addr = mock.used_addr();
        let deadline = Instant::now() + Duration::from_secs(5);
        while used_idx(m, used_addr) != self.n {
            rq.poll();
            assert!(
                Instant::now() < deadline,
                "command not completed: used {} {:?} {:?} in_flight {} next_avail {}",
                used_idx(m, used_addr),
                rq.vring()
                    .queue()
                    .used_idx(m, std::sync::atomic::Ordering::Acquire),
                used_addr,
                rq.in_flight(),
                rq.vring().queue().next_avail()
            );
        }
        let (id, used) = used_elem(m, used_addr, self.n - 1, QSIZE);
        assert_eq!(id, u32::from(at));
        let mut r = [0u8; RESP_LEN as usize];
        m.read_slice(&mut r, GuestAddress(RESP)).unwrap();
        let data_len = used.saturating_sub(RESP_LEN as u32) as usize;
        let mut data = vec![0u8; data_len];
        m.read_slice(&mut data, GuestAddress(IN)).unwrap();
        let sense_len = u32::from_le_bytes(r[0..4].try_into().unwrap());
        Resp {
            sense_len,
            resid: u32::from_le_bytes(r[4..8].try_into().unwrap()),
            status: r[10],
            response: r[11],
            sense: r[12..12 + (sense_len as usize).min(96)].to_vec(),
            data,
            used,
        }
    }

    fn cmd(
        &mut self,
        rq: &mut RequestQueue,
        target: u8,
        cdb: &[u8],
        out: &[u8],
        in_len: u32,
    ) -> Resp {
        self.cmd_lun(rq, LunAddr::encode(target, 0), cdb, out, in_len)
    }

    fn request_queue(&mut self) -> (RequestQueue, mpsc::Receiver<u16>) {
        self.request_queue_at(0)
    }

    /// A request queue whose ring starts at `base`.
    fn request_queue_at(&mut self, base: u64) -> (RequestQueue, mpsc::Receiver<u16>) {
        let g = self.mem.memory();
        let ring = Ring::new(&g, base, QSIZE);
        let (s, rx) = setup(&self.mem, 2, ring.queue());
        self.ring = Some(ring);
        self.n = 0;
        (RequestQueue::new(s, self.dev.shared().clone()), rx)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_read_verify_on_bdev() {
    let mut rig = Rig::new();
    let b = rig.add(0, "Malloc0", 2048, 512);
    let (mut rq, _rx) = rig.request_queue();
    let data = pattern(8 * 512, 7);
    let r = rig.cmd(&mut rq, 0, &[0x2A, 0, 0, 0, 0, 16, 0, 0, 8], &data, 0);
    assert_eq!(
        (r.response, r.status, r.sense_len, r.used),
        (0, 0, 0, RESP_LEN as u32)
    );
    // The bytes are on the bdev, at LBA 16.
    let mut ch = b.open_channel().unwrap();
    let mut buf = vec![0u8; 8 * 512];
    let iov = crate::bdev::channel::test_support::iov(&mut buf);
    // SAFETY: `buf` and `iov` outlive the `reap_all` below.
    unsafe {
        crate::bdev::channel::test_support::submit(
            &mut ch,
            1,
            IoOp::Read {
                offset: 16 * 512,
                iovs: IoVecs::from_slice(std::slice::from_ref(&iov)),
            },
        )
    };
    crate::bdev::channel::test_support::reap_all(&mut ch, 1);
    assert!(buf == data);
    // READ(16) back, with a larger data-in buffer: resid reports the rest.
    let r = rig.cmd(
        &mut rq,
        0,
        &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 8],
        &[],
        8 * 512 + 100,
    );
    assert_eq!(
        (r.status, r.resid, r.used),
        (0, 100, RESP_LEN as u32 + 4096)
    );
    assert!(r.data == data);
    // FUA write.
    let r = rig.cmd(
        &mut rq,
        0,
        &[0x2A, 0x08, 0, 0, 0, 0, 0, 0, 1],
        &data[..512],
        0,
    );
    assert_eq!(r.status, 0);
    assert!(b.stats.totals().num_flush_ops() >= 1);
    // INQUIRY data and SYNCHRONIZE CACHE.
    let r = rig.cmd(&mut rq, 0, &[0x12, 0, 0, 0, 36], &[], 36);
    assert_eq!((r.status, r.data.len()), (0, 36));
    assert_eq!(&r.data[8..16], b"BLOCKD  ");
    assert_eq!(rig.cmd(&mut rq, 0, &[0x35], &[], 0).status, 0);
}

/// A ring that is not inside one memory region has no ring view: the engine pops through
/// virtio-queue's `DescriptorChain`, with the same results.
#[test]
fn slow_ring_path_serves_commands() {
    let mut rig = Rig::new();
    let m =
        Mem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0xFF000)]).unwrap();
    rig.mem = GuestMem::new(m);
    rig.add(0, "Malloc0", 64, 512);
    // The descriptor table straddles the two regions.
    let (mut rq, _rx) = rig.request_queue_at(0x800);
    let data = pattern(2 * 512, 9);
    let r = rig.cmd(&mut rq, 0, &[0x2A, 0x08, 0, 0, 0, 4, 0, 0, 2], &data, 0);
    assert_eq!((r.response, r.status, r.used), (0, 0, RESP_LEN as u32));
    assert!(!rq.vring().has_view(), "the slow path was taken");
    let r = rig.cmd(&mut rq, 0, &[0x28, 0, 0, 0, 0, 4, 0, 0, 2], &[], 2 * 512);
    assert_eq!((r.status, r.used), (0, RESP_LEN as u32 + 1024));
    assert!(r.data == data);
    // Rejected chains: answered with FAILURE, or returned unused.
    let h = REQ_HEADER_LEN as u32;
    let x = rig.submit(
        &mut rq,
        vec![raw(REQ, 10, 0, 0), raw(RESP, RESP_LEN as u32, W, 0)],
    );
    assert_eq!(
        (x.response, x.used),
        (VIRTIO_SCSI_S_FAILURE as u8, RESP_LEN as u32)
    );
    let x = rig.submit(&mut rq, vec![raw(REQ, h, 0, 0), raw(RESP, 50, W, 0)]);
    assert_eq!(x.used, 0);
    assert_eq!(rq.in_flight(), 0);
}

const LBA_RANGE: [u8; 18] = [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0];

#[test]
fn errors_and_addressing() {
    let mut rig = Rig::new();
    rig.add(0, "Malloc0", 64, 512);
    let (mut rq, _rx) = rig.request_queue();
    // Past the end: CHECK CONDITION with exact sense, nothing transferred.
    let r = rig.cmd(&mut rq, 0, &[0x28, 0, 0, 0, 0, 63, 0, 0, 2], &[], 1024);
    assert_eq!(
        (r.response, r.status, r.sense_len, r.resid, r.used),
        (0, 2, 18, 1024, RESP_LEN as u32)
    );
    assert_eq!(r.sense, LBA_RANGE);
    // Unknown opcode.
    let r = rig.cmd(&mut rq, 0, &[0xC5], &[], 0);
    assert_eq!((r.status, r.sense[2], r.sense[12]), (2, 5, 0x20));
    // Data-in buffer smaller than the transfer.
    let r = rig.cmd(&mut rq, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 2], &[], 512);
    assert_eq!((r.status, r.sense[12]), (2, 0x24));
    // Missing target, malformed LUN field: BAD_TARGET.
    let r = rig.cmd(&mut rq, 5, &[0x00], &[], 0);
    assert_eq!(r.response, VIRTIO_SCSI_S_BAD_TARGET as u8);
    let r = rig.cmd_lun(&mut rq, [2, 0, 0x40, 0, 0, 0, 0, 0], &[0x00], &[], 0);
    assert_eq!(r.response, VIRTIO_SCSI_S_BAD_TARGET as u8);
    let r = rig.cmd_lun(&mut rq, [1, 200, 0x40, 0, 0, 0, 0, 0], &[0x00], &[], 0);
    assert_eq!(r.response, VIRTIO_SCSI_S_BAD_TARGET as u8);
    // LUN 1 of an existing target: not-capable INQUIRY, LUN NOT SUPPORTED otherwise.
    let r = rig.cmd_lun(
        &mut rq,
        LunAddr::encode(0, 1),
        &[0x12, 0, 0, 0, 36],
        &[],
        36,
    );
    assert_eq!((r.response, r.status, r.data[0]), (0, 0, 0x7f));
    let r = rig.cmd_lun(&mut rq, LunAddr::encode(0, 1), &[0x00], &[], 0);
    assert_eq!((r.status, r.sense[12]), (2, 0x25));
}

#[test]
fn unmap_and_write_same() {
    let mut rig = Rig::new();
    let b = rig.add(0, "Malloc0", 256, 4096);
    let (mut rq, _rx) = rig.request_queue();
    let data = pattern(4 * 4096, 3);
    assert_eq!(
        rig.cmd(&mut rq, 0, &[0x2A, 0, 0, 0, 0, 0, 0, 0, 4], &data, 0)
            .status,
        0
    );
    // UNMAP blocks 1..3 (two descriptors).
    let mut p = vec![0u8, 38, 0, 32, 0, 0, 0, 0];
    for (lba, n) in [(1u64, 1u32), (2, 1)] {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    let r = rig.cmd(
        &mut rq,
        0,
        &[0x42, 0, 0, 0, 0, 0, 0, 0, p.len() as u8],
        &p,
        0,
    );
    assert_eq!(r.status, 0, "sense {:?}", r.sense);
    assert_eq!(b.stats.totals().num_unmap_ops(), 2);
    let r = rig.cmd(&mut rq, 0, &[0x28, 0, 0, 0, 0, 0, 0, 0, 4], &[], 4 * 4096);
    assert!(r.data[..4096] == data[..4096]);
    assert!(r.data[4096..3 * 4096].iter().all(|&x| x == 0));
    assert!(r.data[3 * 4096..] == data[3 * 4096..]);
    // A parameter list longer than the data-out buffer.
    let r = rig.cmd(&mut rq, 0, &[0x42, 0, 0, 0, 0, 0, 0, 0, 100], &p, 0);
    assert_eq!((r.status, r.sense[12]), (2, 0x1A));
    // WRITE SAME(16) with UNMAP, and with a zero block: both zero block 3.
    let zero = vec![0u8; 4096];
    let r = rig.cmd(
        &mut rq,
        0,
        &[0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1],
        &zero,
        0,
    );
    assert_eq!(r.status, 0);
    assert_eq!(b.stats.totals().num_unmap_ops(), 3);
    let r = rig.cmd(&mut rq, 0, &[0x41, 0, 0, 0, 0, 0, 0, 0, 1], &zero, 0);
    assert_eq!(r.status, 0);
    assert_eq!(b.stats.totals().num_write_zeroes_ops(), 1);
    // A non-zero pattern is refused.
    let r = rig.cmd(
        &mut rq,
        0,
        &[0x41, 0, 0, 0, 0, 0, 0, 0, 1],
        &data[..4096],
        0,
    );
    assert_eq!((r.status, r.sense[12]), (2, 0x24));
}

#[test]
fn hotplug_events_and_table_changes() {
    let mut rig = Rig::new();
    rig.add(0, "Malloc0", 64, 512);
    let (mut rq, _rx) = rig.request_queue();
    let g = rig.mem.memory();
    let m: &Mem = &g;
    let mut evq = Ring::new(m, EVQ, 16);
    let (s, _erx) = setup(&rig.mem, 1, evq.queue());
    let mut eq = EventQueue::new(s, rig.dev.shared().clone()).unwrap();
    // The driver posts 4 event buffers.
    for i in 0..4u16 {
        evq.add_desc_chains(m, &[raw(EVBUF + 64 * u64::from(i), 16, W, 0)], i)
            .unwrap();
    }
    assert_eq!(eq.poll(), 0, "no event yet: buffers stay posted");
    assert_eq!(used_idx(m, evq.used_addr()), 0);

    let r = rig.cmd(&mut rq, 1, &[0x00], &[], 0);
    assert_eq!(r.response, VIRTIO_SCSI_S_BAD_TARGET as u8);
    rig.add(1, "Malloc1", 64, 512);
    eq.poll();
    assert_eq!(used_idx(m, evq.used_addr()), 1);
    assert_eq!(used_elem(m, evq.used_addr(), 0, 16), (0, 16));
    let mut ev = [0u8; 16];
    m.read_slice(&mut ev, GuestAddress(EVBUF)).unwrap();
    assert_eq!(
        ev,
        [1, 0, 0, 0, 1, 1, 0x40, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        "TRANSPORT_RESET RESCAN target 1"
    );
    // The request queue sees the new target.
    let r = rig.cmd(&mut rq, 1, &[0x00], &[], 0);
    assert_eq!((r.response, r.status), (0, 0));

    rig.dev.remove_target(1).unwrap();
    eq.poll();
    assert_eq!(used_idx(m, evq.used_addr()), 2);
    m.read_slice(&mut ev, GuestAddress(EVBUF + 64)).unwrap();
    assert_eq!(
        ev,
        [1, 0, 0, 0, 1, 1, 0x40, 0, 0, 0, 0, 0, 2, 0, 0, 0],
        "TRANSPORT_RESET REMOVED target 1"
    );
    let r = rig.cmd(&mut rq, 1, &[0x00], &[], 0);
    assert_eq!(r.response, VIRTIO_SCSI_S_BAD_TARGET as u8);
    assert!(rig.reg.get("Malloc1").unwrap().claimed_by().is_none());

    // Errors of the table API (SPDK's errnos).
    let b2 = malloc::create(
        &rig.reg,
        MallocOpts {
            name: Some("M2".into()),
            uuid: None,
            num_blocks: 8,
            block_size: 512,
        },
    )
    .unwrap();
    assert_eq!(
        rig.dev.add_target(0, b2.clone()).unwrap_err().errno(),
        libc::EEXIST
    );
    assert_eq!(
        rig.dev.add_target(8, b2.clone()).unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(rig.dev.add_target(-1, b2.clone()).unwrap(), 1);
    assert_eq!(rig.dev.remove_target(7).unwrap_err().errno(), libc::ENODEV);
    drop(eq);
    // No driver listening: events are not queued.
    rig.dev.remove_target(1).unwrap();
    assert!(lock(&rig.dev.shared().events).pending.is_empty());
}

#[test]
fn control_queue_tmf_and_an() {
    let rig = Rig::new();
    rig.add(0, "Malloc0", 64, 512);
    let g = rig.mem.memory();
    let m: &Mem = &g;
    let mut cq = Ring::new(m, CTLQ, 16);
    let (s, _rx) = setup(&rig.mem, 0, cq.queue());
    let mut ctl = ControlQueue::new(s, rig.dev.shared().clone());
    let mut tmf = |subtype: u32, target: u8, n: u16| -> u8 {
        let mut b = [0u8; 24];
        b[4..8].copy_from_slice(&subtype.to_le_bytes());
        b[8..16].copy_from_slice(&LunAddr::encode(target, 0));
        let at = CTLBUF + 0x100 * u64::from(n);
        m.write_slice(&b, GuestAddress(at)).unwrap();
        m.write_obj(0xEEu8, GuestAddress(at + 0x80)).unwrap();
        cq.add_desc_chains(
            m,
            &[raw(at, 24, NEXT, 2 * n + 1), raw(at + 0x80, 1, W, 0)],
            2 * n,
        )
        .unwrap();
        ctl.poll();
        assert_eq!(used_idx(m, cq.used_addr()), n + 1);
        m.read_obj(GuestAddress(at + 0x80)).unwrap()
    };
    assert_eq!(
        tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 0),
        VIRTIO_SCSI_S_FUNCTION_SUCCEEDED as u8
    );
    assert_eq!(tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, 0, 1), 0);
    assert_eq!(
        tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 3, 2),
        VIRTIO_SCSI_S_BAD_TARGET as u8
    );
    assert_eq!(
        tmf(VIRTIO_SCSI_T_TMF_CLEAR_ACA, 0, 3),
        VIRTIO_SCSI_S_FUNCTION_REJECTED as u8
    );
    // A reset waits for the LUN's in-flight commands.
    let t = rig.dev.shared().target(0).unwrap();
    t.in_flight.fetch_add(1, Relaxed);
    let at = CTLBUF + 0x400;
    let mut b = [0u8; 24];
    b[4..8].copy_from_slice(&VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET.to_le_bytes());
    b[8..16].copy_from_slice(&LunAddr::encode(0, 0));
    m.write_slice(&b, GuestAddress(at)).unwrap();
    cq.add_desc_chains(m, &[raw(at, 24, NEXT, 9), raw(at + 0x80, 1, W, 0)], 8)
        .unwrap();
    ctl.poll();
    assert_eq!(used_idx(m, cq.used_addr()), 4, "waits");
    assert!(ctl.next_deadline().is_some());
    t.in_flight.fetch_sub(1, Relaxed);
    ctl.poll();
    assert_eq!(used_idx(m, cq.used_addr()), 5);
    // AN query: event_actual 0, response OK.
    let at = CTLBUF + 0x500;
    let mut b = [0u8; 16];
    b[0] = 1;
    m.write_slice(&b, GuestAddress(at)).unwrap();
    m.write_slice(&[0xEE; 5], GuestAddress(at + 0x80)).unwrap();
    cq.add_desc_chains(m, &[raw(at, 16, NEXT, 11), raw(at + 0x80, 5, W, 0)], 10)
        .unwrap();
    ctl.poll();
    assert_eq!(used_idx(m, cq.used_addr()), 6);
    let mut r = [0u8; 5];
    m.read_slice(&mut r, GuestAddress(at + 0x80)).unwrap();
    assert_eq!(r, [0, 0, 0, 0, 0]);
}

#[test]
fn hostile_chains() {
    let mut rig = Rig::new();
    rig.add(0, "Malloc0", 64, 512);
    let (mut rq, _rx) = rig.request_queue();
    let hdr = Rig::header(LunAddr::encode(0, 0), &[0x28, 0, 0, 0, 0, 0, 0, 0, 1]);
    rig.mem
        .memory()
        .write_slice(&hdr, GuestAddress(REQ))
        .unwrap();
    let h = REQ_HEADER_LEN as u32;
    let r = RESP_LEN as u32;
    // Header too short: FAILURE.
    let x = rig.submit(&mut rq, vec![raw(REQ, 10, 0, 0), raw(RESP, r, W, 0)]);
    assert_eq!((x.response, x.used), (VIRTIO_SCSI_S_FAILURE as u8, r));
    // No room for a response: used length 0.
    let x = rig.submit(&mut rq, vec![raw(REQ, h, 0, 0), raw(RESP, 50, W, 0)]);
    assert_eq!(x.used, 0);
    // Readable after writable.
    let x = rig.submit(
        &mut rq,
        vec![raw(REQ, h, 0, 0), raw(RESP, r, W, 0), raw(OUT, 512, 0, 0)],
    );
    assert_eq!(x.response, VIRTIO_SCSI_S_FAILURE as u8);
    // Data in both directions.
    let x = rig.submit(
        &mut rq,
        vec![
            raw(REQ, h, 0, 0),
            raw(OUT, 512, 0, 0),
            raw(RESP, r, W, 0),
            raw(IN, 512, W, 0),
        ],
    );
    assert_eq!(x.response, VIRTIO_SCSI_S_FAILURE as u8);
    // Data-in outside guest memory.
    let x = rig.submit(
        &mut rq,
        vec![
            raw(REQ, h, 0, 0),
            raw(RESP, r, W, 0),
            raw(0xFFFF_0000, 512, W, 0),
        ],
    );
    assert_eq!(x.response, VIRTIO_SCSI_S_FAILURE as u8);
    // Response outside guest memory: nothing written, used 0.
    let x = rig.submit(&mut rq, vec![raw(REQ, h, 0, 0), raw(0xFFFF_0000, r, W, 0)]);
    assert_eq!(x.used, 0);
    // Header split byte-wise over descriptors and a response split in two: still parsed.
    let mut d: Vec<RawDescriptor> = (0..h as u64).map(|i| raw(REQ + i, 1, 0, 0)).collect();
    d.push(raw(RESP, 7, W, 0));
    d.push(raw(RESP + 7, r - 7, W, 0));
    d.push(raw(IN, 512, W, 0));
    let x = rig.submit(&mut rq, d);
    assert_eq!((x.response, x.status, x.used), (0, 0, r + 512));
    // The queue still serves normal commands.
    assert_eq!(rig.cmd(&mut rq, 0, &[0x00], &[], 0).status, 0);
}

/// Random descriptor tables never panic the engine and every chain it pops comes back.
#[test]
fn random_chains_never_panic() {
    let rig = Rig::new();
    rig.add(0, "Malloc0", 64, 512);
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let g = rig.mem.memory();
        let m: &Mem = &g;
        let mut mock = Ring::new(m, 0, 16);
        let (s, _rx) = setup(&rig.mem, 2, mock.queue());
        let mut rq = RequestQueue::new(s, rig.dev.shared().clone());
        // A plausible header half of the time.
        let mut hdr = Rig::header(LunAddr::encode((next() % 2) as u8, 0), &[]);
        for b in hdr[19..].iter_mut().take(16) {
            *b = next() as u8;
        }
        if round % 2 == 0 {
            hdr[19] = [0x28u8, 0x2A, 0x42, 0x41, 0x93, 0x12, 0x1A][(next() % 7) as usize];
        }
        m.write_slice(&hdr, GuestAddress(REQ)).unwrap();
        let n = 1 + (next() % 16) as usize;
        let addrs = [
            REQ,
            OUT,
            RESP,
            IN,
            0xFFFF_F000,
            0xFFFF_FFFF_FFFF_F000,
            0x100000 - 8,
        ];
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|_| {
                let addr = addrs[(next() % addrs.len() as u64) as usize] + next() % 64;
                let len = [0u32, 1, 16, 51, 108, 512, 4096, 0x8000_0000][(next() % 8) as usize];
                let flags = (next() % 4) as u16 & (W | NEXT);
                raw(addr, len, flags, (next() % 20) as u16)
            })
            .collect();
        // Descriptors verbatim (their own NEXT links), head at 0.
        mock.add_desc_chains(m, &descs, 0).unwrap();
        let avail: u16 = m.read_obj(GuestAddress(mock.avail_addr().0 + 2)).unwrap();
        for _ in 0..10 {
            rq.poll();
        }
        rq.request_stop();
        for _ in 0..10 {
            rq.poll();
        }
        assert!(rq.finished(), "round {round}: commands left in flight");
        assert_eq!(
            used_idx(m, mock.used_addr()),
            avail,
            "round {round}: every chain returned"
        );
    }
}

/// The control queue on a packed ring (virtio 1.2 §2.8): TMFs are read through the ring
/// view (virtio-queue reads split rings only) and answered with used descriptors carrying
/// the driver's buffer ids, around more than one lap of the ring.
#[test]
fn control_queue_on_a_packed_ring() {
    const F_AVAIL: u16 = 1 << 7;
    const F_USED: u16 = 1 << 15;
    const SIZE: u16 = 16;
    let rig = Rig::new();
    rig.add(0, "Malloc0", 64, 512);
    let g = rig.mem.memory();
    let m: &Mem = &g;
    let mut q = Queue::new(SIZE).unwrap();
    q.set_size(SIZE);
    q.try_set_desc_table_address(GuestAddress(CTLQ)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(CTLQ + 0x100))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(CTLQ + 0x104))
        .unwrap();
    q.set_next_avail(0x8000);
    q.set_ready(true);
    let (mut s, rx) = setup(&rig.mem, 0, q);
    s.packed = true;
    let mut ctl = ControlQueue::new(s, rig.dev.shared().clone());
    let put = |slot: u16, addr: u64, len: u32, id: u16, flags: u16| {
        let at = CTLQ + 16 * u64::from(slot);
        m.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        m.write_obj(id.to_le(), GuestAddress(at + 12)).unwrap();
        m.write_obj(flags.to_le(), GuestAddress(at + 14)).unwrap();
    };
    // Two-descriptor chains: 8 per lap, 12 go once and a half around the ring.
    for n in 0..12u16 {
        let slot = (2 * n) % SIZE;
        let wrap = (2 * n / SIZE).is_multiple_of(2);
        let avail = if wrap { F_AVAIL } else { F_USED };
        let at = CTLBUF + 0x100 * u64::from(n);
        let mut b = [0u8; 24];
        b[4..8].copy_from_slice(&VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET.to_le_bytes());
        b[8..16].copy_from_slice(&LunAddr::encode(0, 0));
        m.write_slice(&b, GuestAddress(at)).unwrap();
        m.write_obj(0xEEu8, GuestAddress(at + 0x80)).unwrap();
        let id = 100 + n;
        put(slot + 1, at + 0x80, 1, id, W | avail);
        put(slot, at, 24, id, NEXT | avail);
        ctl.poll();
        // The used descriptor at the chain's first slot (completed in order).
        let flags: u16 = m
            .read_obj(GuestAddress(CTLQ + 16 * u64::from(slot) + 14))
            .unwrap();
        let used = if wrap { F_AVAIL | F_USED } else { 0 };
        assert_eq!(flags & (F_AVAIL | F_USED), used, "chain {n} used");
        let uid: u16 = m
            .read_obj(GuestAddress(CTLQ + 16 * u64::from(slot) + 12))
            .unwrap();
        let ulen: u32 = m
            .read_obj(GuestAddress(CTLQ + 16 * u64::from(slot) + 8))
            .unwrap();
        assert_eq!((uid, ulen), (id, 1));
        let resp: u8 = m.read_obj(GuestAddress(at + 0x80)).unwrap();
        assert_eq!(resp, VIRTIO_SCSI_S_FUNCTION_SUCCEEDED as u8);
    }
    drop(ctl);
    assert_eq!(
        rx.recv().unwrap(),
        8,
        "GET_VRING_BASE: slot 8, wrap counter 0"
    );
}
