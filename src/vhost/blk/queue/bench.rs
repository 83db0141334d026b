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

use std::sync::Arc;

use super::driver::{Driver, NEXT, USED, WRITE};
use crate::bdev::null::{self, NullOpts};
use crate::bdev::{Bdev, BdevRegistry};
use crate::vhost::dirty_log::{DirtyLog, LogRegion};

const DEPTH: u16 = 32;
const HDRS: u64 = 0x10000;
const RESPS: u64 = 0x20000;
const DATA: u64 = 0x40000;

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
    blk_null_read(DEPTH, false);
}

/// One request per poll pass, as when a driver submits its requests one at a time and
/// the reactor keeps up with it (a client woken by an interrupt, resubmitting what
/// completed): the poll pass's fixed cost is not shared with other requests.
#[test]
#[ignore = "benchmark: run in release with --ignored"]
fn blk_null_qd1_read_4k() {
    blk_null_read(1, false);
}

/// The same with dirty-page logging on (a live migration in progress): every returned
/// chain's writable buffers and used element marked in the bitmap.
#[test]
#[ignore = "benchmark: run in release with --ignored"]
fn blk_null_qd32_read_4k_dirty_log() {
    blk_null_read(DEPTH, true);
}

/// The same on a packed ring (virtio 1.2 §2.8): each request a chain of three
/// consecutive ring descriptors.
#[test]
#[ignore = "benchmark: run in release with --ignored"]
fn blk_null_qd32_read_4k_packed() {
    let per = blk_null_packed(requests());
    println!(
        "blk null QD32 4K read (packed ring): {} requests, {} ns/request",
        requests(),
        per.as_nanos()
    );
}

/// Not a benchmark: the blk queue serves a packed ring around many laps (the ring's
/// and the wrap counters' wrap-around), every request answered in full.
#[test]
fn blk_queue_serves_a_packed_ring() {
    blk_null_packed(20_000);
}

/// QD32 4 KiB reads on a null bdev through a packed ring; the time per request.
fn blk_null_packed(n: u64) -> std::time::Duration {
    use super::packed_driver::{PackedDriver, W};
    let reg = BdevRegistry::default();
    let dev = super::super::BlkDevice::new(
        "bench",
        null_bdev(&reg),
        false,
        crate::vhost::ConfigNotifier::default(),
    );
    let mut d = PackedDriver::new();
    for i in 0..u64::from(DEPTH) {
        let mut hdr = [0u8; 16];
        hdr[8..16].copy_from_slice(&(8 * i).to_le_bytes());
        d.write(HDRS + 0x100 * i, &hdr);
        d.chains.push(vec![
            (HDRS + 0x100 * i, 16, 0),
            (DATA + 0x1000 * i, 4096, W),
            (RESPS + 0x100 * i, 1, W),
        ]);
    }
    let (setup, rx) = d.setup();
    let mut q = super::BlkQueue::new(setup, dev.shared.clone()).unwrap();
    let per = d.run(&mut q, n, 4096 + 1);
    drop(q);
    // GET_VRING_BASE: where the device stopped taking chains, the wrap counter in bit 15;
    // every chain it took was used, so that is where the driver's used position is.
    while d.next_used().is_some() {}
    assert_eq!(rx.recv().unwrap(), d.used_base());
    per
}

fn blk_null_read(depth: u16, logging: bool) {
    let reg = BdevRegistry::default();
    let dev = super::super::BlkDevice::new(
        "bench",
        null_bdev(&reg),
        false,
        crate::vhost::ConfigNotifier::default(),
    );
    let mut d = Driver::new();
    let heads: Vec<u16> = (0..depth).map(|i| 3 * i).collect();
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
    let (mut setup, _rx) = d.setup();
    let log_file = tempfile::tempfile().unwrap();
    let log = Arc::new(DirtyLog::default());
    if logging {
        log_file.set_len(4096).unwrap();
        log.set_region(Some(LogRegion::map(&log_file, 4096, 0).unwrap()));
        log.set_log_all(true);
        log.set_used(setup.index, Some(USED as u64));
    }
    setup.log = log.ring(setup.index);
    let mut q = super::BlkQueue::new(setup, dev.shared.clone()).unwrap();
    let n = requests();
    let per = d.run(&mut q, &heads, n, 4096 + 1);
    println!(
        "blk null QD{depth} 4K read{}: {n} requests, {} ns/request",
        if logging { " (dirty log on)" } else { "" },
        per.as_nanos()
    );
}

/// Not a benchmark: with dirty logging on, a packed ring marks the descriptor ring (where
/// the used descriptors go) and every returned chain's writable buffers (as read when
/// the chain was taken), and not the buffers it only read.
#[test]
fn a_packed_ring_is_dirty_logged() {
    use super::packed_driver::{PackedDriver, W};
    use crate::vhost::dirty_log::LOG_PAGE;
    use std::os::unix::fs::FileExt;
    let reg = BdevRegistry::default();
    let dev = super::super::BlkDevice::new(
        "log",
        null_bdev(&reg),
        false,
        crate::vhost::ConfigNotifier::default(),
    );
    let mut d = PackedDriver::new();
    for i in 0..4u64 {
        let mut hdr = [0u8; 16];
        hdr[8..16].copy_from_slice(&(8 * i).to_le_bytes());
        d.write(HDRS + 0x100 * i, &hdr);
        d.chains.push(vec![
            (HDRS + 0x100 * i, 16, 0),
            (DATA + 0x1000 * i, 4096, W),
            (RESPS + 0x100 * i, 1, W),
        ]);
    }
    let (mut setup, _rx) = d.setup();
    let log_file = tempfile::tempfile().unwrap();
    log_file.set_len(4096).unwrap();
    let log = Arc::new(DirtyLog::default());
    log.set_region(Some(LogRegion::map(&log_file, 4096, 0).unwrap()));
    log.set_log_all(true);
    setup.log = log.ring(setup.index);
    let mut q = super::BlkQueue::new(setup, dev.shared.clone()).unwrap();
    d.run(&mut q, 4, 4096 + 1);
    let mut b = [0u8; 64];
    log_file.read_exact_at(&mut b, 0).unwrap();
    let marked = |gpa: u64| {
        let p = gpa / LOG_PAGE;
        b[(p / 8) as usize] & (1 << (p % 8)) != 0
    };
    assert!(marked(0), "the descriptor ring");
    for i in 0..4 {
        assert!(marked(DATA + 0x1000 * i), "data buffer {i}");
        assert!(marked(RESPS + 0x100 * i), "status of request {i}");
    }
    assert!(!marked(HDRS), "headers are only read");
}

/// Not a benchmark: a packed ring records its position in the in-flight region, and a
/// new instance started at the stale base QEMU keeps for a packed ring after a
/// disconnection (here the first one: slot 0, wrap counter 1) resumes there instead.
#[test]
fn a_restarted_packed_ring_resumes_at_its_recorded_position() {
    use super::packed_driver::{PackedDriver, W};
    use crate::vhost::inflight::InflightRegion;
    let reg = BdevRegistry::default();
    let dev = super::super::BlkDevice::new(
        "restart",
        null_bdev(&reg),
        false,
        crate::vhost::ConfigNotifier::default(),
    );
    let (region, _fd, _msg) = InflightRegion::create(1, super::driver::QSIZE, true).unwrap();
    let mut d = PackedDriver::new();
    for i in 0..4u64 {
        let mut hdr = [0u8; 16];
        hdr[8..16].copy_from_slice(&(8 * i).to_le_bytes());
        d.write(HDRS + 0x100 * i, &hdr);
        d.chains.push(vec![
            (HDRS + 0x100 * i, 16, 0),
            (DATA + 0x1000 * i, 4096, W),
            (RESPS + 0x100 * i, 1, W),
        ]);
    }
    let start = |d: &PackedDriver| {
        let (mut setup, rx) = d.setup();
        setup.inflight = region.queue(0);
        (super::BlkQueue::new(setup, dev.shared.clone()).unwrap(), rx)
    };
    let (mut q, rx) = start(&d);
    d.run(&mut q, 333, 4096 + 1);
    drop(q);
    while d.next_used().is_some() {}
    let pos = rx.recv().unwrap();
    assert_eq!(pos, d.used_base());
    assert_ne!(pos, 0x8000, "the ring moved");

    let (q, rx) = start(&d);
    drop(q);
    assert_eq!(rx.recv().unwrap(), pos, "resumed at the recorded position");
    let (mut q, _rx) = start(&d);
    d.run(&mut q, 100, 4096 + 1);
}
