//! vhost-user-blk end to end with a real client (libblkio): data integrity for every request
//! type, multiqueue, sizes and alignments, read-only, out-of-range, reconnect.
//!
//! The daemon runs in-process (the same `App`, reactors and RPC methods `blockd` runs), so
//! the tests can also look at the bdev behind the client's back.

mod common;

use std::time::Duration;

use common::blk_client::{pattern, BlkClient};
use common::in_process::InProcess;
use serde_json::{json, Value};

/// A malloc bdev of `mib` MiB exported as controller `ctrlr`; returns the socket path.
fn malloc_ctrlr(d: &InProcess, bdev: &str, ctrlr: &str, mib: u64, bs: u64, extra: Value) -> String {
    d.rpc(
        "bdev_malloc_create",
        json!({"name": bdev, "num_blocks": mib * 1024 * 1024 / bs, "block_size": bs}),
    )
    .unwrap();
    let mut p = json!({"ctrlr": ctrlr, "dev_name": bdev});
    if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    d.rpc("vhost_create_blk_controller", p).unwrap();
    d.sock(ctrlr).to_str().unwrap().to_string()
}

#[test]
fn read_write_all_sizes_and_alignments() {
    let d = InProcess::start("0x1");
    let sock = malloc_ctrlr(&d, "Malloc0", "vhost.0", 16, 512, json!({}));
    let mut c = BlkClient::connect(&sock, 1, 4 << 20).unwrap();
    assert_eq!(c.capacity, 16 << 20);
    for (i, &(off, len)) in [
        (0u64, 512usize),
        (512, 4096),
        (4096, 65536),
        (1 << 20, 1 << 20),
        (3 << 20, 3 << 20),
        ((16 << 20) - 512, 512),
        (7 * 512, 9 * 512),
    ]
    .iter()
    .enumerate()
    {
        pattern(&mut c.buf()[..len], off, i as u8);
        assert_eq!(c.write(0, off, len), 0, "write {off}+{len}");
        c.buf()[..len].fill(0xEE);
        assert_eq!(c.read(0, off, len), 0, "read {off}+{len}");
        let mut want = vec![0u8; len];
        pattern(&mut want, off, i as u8);
        assert!(c.buf()[..len] == want[..], "data mismatch at {off}+{len}");
    }
    assert_eq!(c.flush(0), 0);
}

#[test]
fn out_of_range_and_misaligned_fail_without_side_effects() {
    let d = InProcess::start("0x1");
    let sock = malloc_ctrlr(&d, "Malloc0", "vhost.0", 1, 4096, json!({}));
    let mut c = BlkClient::connect(&sock, 1, 1 << 20).unwrap();
    assert_eq!(c.capacity, 1 << 20);
    pattern(&mut c.buf()[..8192], 0, 7);
    assert_ne!(
        c.write(0, (1 << 20) - 4096, 8192),
        0,
        "write across the end"
    );
    assert_ne!(c.read(0, 1 << 20, 4096), 0, "read past the end");
    // 512-byte I/O on a 4096-byte-block bdev is misaligned.
    assert_ne!(c.write(0, 512, 512), 0, "misaligned write");
    // Nothing was written: the last block still reads as zeroes.
    assert_eq!(c.read(0, (1 << 20) - 4096, 4096), 0);
    assert!(c.buf()[..4096].iter().all(|&b| b == 0));
    // The controller still serves.
    pattern(&mut c.buf()[..4096], 0, 1);
    assert_eq!(c.write(0, 0, 4096), 0);
}

#[test]
fn discard_and_write_zeroes() {
    let d = InProcess::start("0x1");
    let sock = malloc_ctrlr(&d, "Malloc0", "vhost.0", 4, 512, json!({}));
    let mut c = BlkClient::connect(&sock, 1, 1 << 20).unwrap();
    pattern(&mut c.buf()[..1 << 20], 0, 3);
    assert_eq!(c.write(0, 0, 1 << 20), 0);
    assert_eq!(c.write_zeroes(0, 4096, 8192, false), 0);
    assert_eq!(c.write_zeroes(0, 65536, 65536, true), 0);
    assert_eq!(c.discard(0, 512 * 1024, 128 * 1024), 0);
    assert_eq!(c.read(0, 0, 1 << 20), 0);
    let buf = c.buf()[..1 << 20].to_vec();
    let mut want = vec![0u8; 1 << 20];
    pattern(&mut want, 0, 3);
    for r in [4096..12288, 65536..131072, 524288..655360] {
        want[r].fill(0);
    }
    assert!(buf == want, "zeroed ranges wrong");
}

#[test]
fn multiqueue_and_readonly() {
    let d = InProcess::start("0x1");
    let sock = malloc_ctrlr(&d, "Malloc0", "vhost.0", 8, 512, json!({}));
    let mut c = BlkClient::connect(&sock, 2, 2 << 20).unwrap();
    for q in 0..2 {
        let off = (q as u64) << 20;
        pattern(&mut c.buf()[..1 << 20], off, 9);
        assert_eq!(c.write(q, off, 1 << 20), 0);
    }
    for q in 0..2 {
        // Read each half through the other queue.
        let off = ((1 - q) as u64) << 20;
        assert_eq!(c.read(q, off, 1 << 20), 0);
        let mut want = vec![0u8; 1 << 20];
        pattern(&mut want, off, 9);
        assert!(c.buf()[..1 << 20] == want[..]);
    }
    drop(c);

    let ro = malloc_ctrlr(&d, "Malloc1", "vhost.ro", 1, 512, json!({"readonly": true}));
    // The device offers VIRTIO_BLK_F_RO: libblkio refuses read-write access...
    let err = BlkClient::connect(&ro, 1, 1 << 20)
        .err()
        .expect("read-write access granted");
    assert_eq!(err.errno(), blkio::Errno::ROFS);
    // ...and a read-only client reads. (Writes the device itself refuses are covered by the
    // request parser's unit tests and the QEMU guest tests.)
    let mut c = BlkClient::connect_with(&ro, 1, 1 << 20, true).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    assert!(
        c.buf()[..4096].iter().all(|&b| b == 0),
        "read-only bdev changed"
    );
}

#[test]
fn reconnect_after_disconnect_and_delete_refused_while_connected() {
    let d = InProcess::start("0x1");
    let sock = malloc_ctrlr(&d, "Malloc0", "vhost.0", 1, 512, json!({}));
    let mut c = BlkClient::connect(&sock, 1, 1 << 20).unwrap();
    pattern(&mut c.buf()[..4096], 0, 5);
    assert_eq!(c.write(0, 0, 4096), 0);
    let err = d
        .rpc("vhost_delete_controller", json!({"ctrlr": "vhost.0"}))
        .unwrap_err();
    assert_eq!(err.0, -32602);
    assert!(d
        .rpc("bdev_malloc_delete", json!({"name": "Malloc0"}))
        .is_err());
    drop(c);
    // The controller notices the disconnect; wait (bounded) for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.app.vhost.get("vhost.0").unwrap().connected() {
        assert!(
            std::time::Instant::now() < deadline,
            "disconnect not noticed"
        );
        std::thread::yield_now();
    }
    let mut c = BlkClient::connect(&sock, 1, 1 << 20).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    let mut want = vec![0u8; 4096];
    pattern(&mut want, 0, 5);
    assert!(c.buf()[..4096] == want[..], "data lost across reconnect");
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.app.vhost.get("vhost.0").unwrap().connected() {
        assert!(
            std::time::Instant::now() < deadline,
            "disconnect not noticed"
        );
        std::thread::yield_now();
    }
    d.rpc("vhost_delete_controller", json!({"ctrlr": "vhost.0"}))
        .unwrap();
    assert!(!std::path::Path::new(&sock).exists(), "socket left behind");
    d.rpc("bdev_malloc_delete", json!({"name": "Malloc0"}))
        .unwrap();
}

/// `vhost_get_controllers` counts each queue's requests, kicks and interrupts: a client
/// that sleeps on its completion eventfd (libblkio's blocking `do_io`) is kicked awake by
/// interrupts and kicks blockd for each request it submits alone.
#[test]
fn queue_counters_follow_requests_kicks_and_interrupts() {
    let d = InProcess::start("0x1");
    let sock = malloc_ctrlr(&d, "Malloc0", "vhost.0", 4, 512, json!({}));
    let mut c = BlkClient::connect(&sock, 2, 1 << 20).unwrap();
    let n = 50u64;
    for i in 0..n {
        assert_eq!(c.read(1, i * 4096, 4096), 0);
    }
    let queue = |index: u64| -> Value {
        let ctrl = d
            .rpc("vhost_get_controllers", json!({"name": "vhost.0"}))
            .unwrap();
        ctrl[0]["sessions"][0]["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["index"] == index)
            .cloned()
            .unwrap_or_else(|| panic!("no queue {index} in {ctrl}"))
    };
    // The poller publishes its counts right after the completion the client saw.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let q1 = loop {
        let q = queue(1);
        if q["requests"] == n || std::time::Instant::now() > deadline {
            break q;
        }
        std::thread::yield_now();
    };
    eprintln!("queue 1 after {n} lone reads: {q1}");
    assert_eq!(q1["requests"], n, "{q1}");
    assert_eq!(q1["in_flight"], 0, "{q1}");
    let irqs = q1["interrupts"].as_u64().unwrap();
    assert!((1..=n).contains(&irqs), "interrupts: {q1}");
    let kicks = q1["kicks"].as_u64().unwrap();
    assert!(kicks <= n, "kicks: {q1}");
    // Queue 0 carried none of these requests.
    assert!(queue(0)["requests"].as_u64().unwrap() < n);
}

/// A controller offering packed virtqueues (`packed_ring`) serves a client that does not
/// take them: libblkio's virtio-blk-vhost-user driver (virtio-driver 0.6) asks only for
/// VERSION_1 and EVENT_IDX on vhost-user (its packed rings are for VFIO PCI), so the
/// rings are split. Packed rings themselves are tested with QEMU (tests/guest_blockd.rs,
/// tests/guest_scsi.rs) and in-process (src/vhost/packed_ring_tests.rs).
#[test]
fn a_packed_controller_serves_a_split_only_client() {
    let d = InProcess::start("0x1");
    let extra = json!({"packed_ring": true, "packed_ring_recovery": true});
    let sock = malloc_ctrlr(&d, "Malloc0", "vhost.0", 16, 512, extra);
    let mut c = BlkClient::connect(&sock, 1, 1 << 20).unwrap();
    pattern(&mut c.buf()[..65536], 4096, 7);
    assert_eq!(c.write(0, 4096, 65536), 0);
    c.buf()[..65536].fill(0);
    assert_eq!(c.read(0, 4096, 65536), 0);
    let mut want = vec![0u8; 65536];
    pattern(&mut want, 4096, 7);
    assert!(c.buf()[..65536] == want[..]);
}
