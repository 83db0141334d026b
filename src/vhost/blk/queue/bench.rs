//! Per-request cost of the request queues (virtio-blk and virtio-scsi) on a null bdev:
//! QD32 4 KiB reads through the queue's poller, the driver played by a minimal split ring
//! in guest memory (virtio 1.2 §2.7). No VM and no libblkio, which has no virtio-scsi
//! driver. Ignored by default; run in release, e.g. under `perf stat -e instructions`:
//!
//! ```text
//! BENCH_N=1000000 cargo test --release --lib queue::bench -- --ignored --nocapture
//! ```
//!
//! It lives under `blk::queue` to reach the blk controller's shared state; it uses only
//! the queues' constructors and `Poller::poll`, so it also builds on older trees.

use std::sync::atomic::{fence, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bdev::null::{self, NullOpts};
use crate::bdev::{Bdev, BdevRegistry};
use crate::reactor::Poller;
use crate::vhost::device::{GuestMem, QueueSetup};

type Mem = vm_memory::GuestMemoryMmap<()>;

const QSIZE: u16 = 256;
const DEPTH: u16 = 32;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const HDRS: u64 = 0x10000;
const RESPS: u64 = 0x20000;
const DATA: u64 = 0x40000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// The driver side of one split ring at guest address 0, through host pointers.
struct Driver {
    mem: GuestMem,
    ring: *mut u8,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn new() -> Self {
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
        let ring = m.get_host_address(GuestAddress(0)).unwrap();
        Driver {
            mem: GuestMemoryAtomic::new(m),
            ring,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn setup(&self) -> (QueueSetup, mpsc::Receiver<u16>) {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.try_set_desc_table_address(GuestAddress(0)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL as u64))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(USED as u64))
            .unwrap();
        q.set_ready(true);
        let (tx, rx) = mpsc::channel();
        let setup = QueueSetup {
            index: 2,
            queue: q,
            mem: self.mem.clone(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: None,
            stopped: tx,
            coalescing: Default::default(),
            inflight: None,
            in_flight: Default::default(),
        };
        (setup, rx)
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let m = self.mem.memory();
        let p = m.get_host_address(GuestAddress(gpa)).unwrap();
        // SAFETY: inside the 1 MiB region.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(16 * u64::from(i), &b);
    }

    /// Makes chain `head` available (§2.7.13: entry before index).
    fn make_available(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * usize::from(self.avail_idx % QSIZE);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the avail ring lies inside the mapped region; aligned.
        unsafe {
            std::ptr::write_volatile(self.ring.add(slot) as *mut u16, head.to_le());
            fence(Ordering::Release);
            std::ptr::write_volatile(self.ring.add(AVAIL + 2) as *mut u16, self.avail_idx.to_le());
        }
    }

    /// The next used chain: head and used length.
    fn next_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring lies inside the mapped region; aligned.
        let idx =
            u16::from_le(unsafe { std::ptr::read_volatile(self.ring.add(USED + 2) as *const u16) });
        if idx == self.used_seen {
            return None;
        }
        fence(Ordering::Acquire);
        let at = USED + 4 + 8 * usize::from(self.used_seen % QSIZE);
        self.used_seen = self.used_seen.wrapping_add(1);
        // SAFETY: as above.
        let (id, len) = unsafe {
            (
                std::ptr::read_volatile(self.ring.add(at) as *const u32),
                std::ptr::read_volatile(self.ring.add(at + 4) as *const u32),
            )
        };
        Some((u32::from_le(id) as u16, u32::from_le(len)))
    }

    /// Keeps `heads` in flight until `n` requests completed, each with `used_len` bytes
    /// written; the time per request.
    fn run(&mut self, q: &mut dyn Poller, heads: &[u16], n: u64, used_len: u32) -> Duration {
        for &h in heads {
            self.make_available(h);
        }
        let start = Instant::now();
        let mut done = 0u64;
        while done < n {
            q.poll();
            while let Some((head, len)) = self.next_used() {
                assert_eq!(len, used_len, "request {done} failed");
                done += 1;
                self.make_available(head);
            }
        }
        let per = start.elapsed() / u32::try_from(n).unwrap_or(u32::MAX);
        q.request_stop();
        while !q.finished() {
            q.poll();
        }
        per
    }
}

fn requests() -> u64 {
    std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

fn null_bdev(reg: &BdevRegistry) -> Arc<Bdev> {
    null::create(
        reg,
        NullOpts {
            name: "Null0".into(),
            uuid: None,
            num_blocks: 1 << 20,
            block_size: 512,
        },
    )
    .unwrap()
}

#[test]
#[ignore = "benchmark: run in release with --ignored"]
fn scsi_null_qd32_read_4k() {
    let reg = BdevRegistry::default();
    let dev = crate::vhost::scsi::ScsiDevice::new("bench").unwrap();
    dev.add_target(0, null_bdev(&reg)).unwrap();
    let mut d = Driver::new();
    let heads: Vec<u16> = (0..DEPTH).map(|i| 3 * i).collect();
    for (i, &h) in heads.iter().enumerate() {
        let i = i as u64;
        // virtio_scsi_cmd_req: LUN 0 of target 0, READ(10) of 8 blocks at LBA 8i.
        let mut req = [0u8; 51];
        req[0..4].copy_from_slice(&[1, 0, 0x40, 0]);
        req[19..29].copy_from_slice(&[0x28, 0, 0, 0, 0, 8 * i as u8, 0, 0, 8, 0]);
        d.write(HDRS + 0x100 * i, &req);
        d.desc(h, HDRS + 0x100 * i, 51, NEXT, h + 1);
        d.desc(h + 1, RESPS + 0x100 * i, 108, WRITE | NEXT, h + 2);
        d.desc(h + 2, DATA + 0x1000 * i, 4096, WRITE, 0);
    }
    let (setup, _rx) = d.setup();
    let mut q = crate::vhost::scsi::queue::RequestQueue::new(setup, dev.shared().clone());
    let n = requests();
    let per = d.run(&mut q, &heads, n, 108 + 4096);
    println!(
        "scsi null QD32 4K read: {n} requests, {} ns/request",
        per.as_nanos()
    );
}

#[test]
#[ignore = "benchmark: run in release with --ignored"]
fn blk_null_qd32_read_4k() {
    let reg = BdevRegistry::default();
    let dev = super::super::BlkDevice::new(
        "bench",
        null_bdev(&reg),
        false,
        crate::vhost::ConfigNotifier::default(),
    );
    let mut d = Driver::new();
    let heads: Vec<u16> = (0..DEPTH).map(|i| 3 * i).collect();
    for (i, &h) in heads.iter().enumerate() {
        let i = i as u64;
        // VIRTIO_BLK_T_IN of 4 KiB at sector 8i.
        let mut hdr = [0u8; 16];
        hdr[8..16].copy_from_slice(&(8 * i).to_le_bytes());
        d.write(HDRS + 0x100 * i, &hdr);
        d.desc(h, HDRS + 0x100 * i, 16, NEXT, h + 1);
        d.desc(h + 1, DATA + 0x1000 * i, 4096, WRITE | NEXT, h + 2);
        d.desc(h + 2, RESPS + 0x100 * i, 1, WRITE, 0);
    }
    let (setup, _rx) = d.setup();
    let mut q = super::BlkQueue::new(setup, dev.shared.clone()).unwrap();
    let n = requests();
    let per = d.run(&mut q, &heads, n, 4096 + 1);
    println!(
        "blk null QD32 4K read: {n} requests, {} ns/request",
        per.as_nanos()
    );
}
