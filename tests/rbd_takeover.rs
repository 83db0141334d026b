//! RBD after a crash: a blockd started with `--config` after its predecessor was killed
//! with SIGKILL blocklists the predecessor's RADOS client and breaks its exclusive lock, so
//! the first write after the restart does not wait ~30 s for the dead client's watch to
//! expire. Measures the I/O gap a vhost-user-blk client (libblkio) sees across
//! kill -9 + restart, against the shared cluster (`CEPH_CONF`).

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ceph::{conf, unique, POOL};
use common::blk_client::BlkClient;
use common::Daemon;
use serde_json::{json, Value};

/// The bound on the gap (issue 18: "goal < 5 s").
const MAX_GAP: Duration = Duration::from_secs(5);

fn ceph_cmd(conf: &std::path::Path, args: &[&str]) -> String {
    let o = Command::new("ceph")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("running ceph");
    assert!(
        o.status.success(),
        "ceph {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn record_addrs(path: &std::path::Path) -> Vec<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).expect("rbd client record"))
        .expect("record is JSON");
    v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["addr"].as_str().unwrap().to_string())
        .collect()
}

/// Writes for `d`, returning the time of the last completion.
fn write_for(c: &mut BlkClient, d: Duration, seq: &mut u64) -> Instant {
    let start = Instant::now();
    let mut last = start;
    while last - start < d {
        c.buf()[..8].copy_from_slice(&seq.to_le_bytes());
        let off = (*seq % 256) * 4096;
        assert_eq!(c.write(0, off, 4096), 0);
        *seq += 1;
        last = Instant::now();
    }
    last
}

#[test]
fn a_restart_after_kill_9_takes_the_image_over_within_seconds() {
    let Some(conf) = conf() else {
        eprintln!("SKIP: no Ceph");
        return;
    };
    let image = unique("takeover");
    let image2 = unique("takeover");
    for i in [&image, &image2] {
        ceph::rbd_cli(&conf, &["create", &format!("{POOL}/{i}"), "--size", "16M"]);
    }
    let lock_ls = |i: &str| {
        let o = ceph::rbd_cli(
            &conf,
            &["lock", "ls", "--format", "json", &format!("{POOL}/{i}")],
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };

    let dir = tempfile::tempdir().unwrap();
    let sockets = dir.path().join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    let config = dir.path().join("blockd.json");
    let record: PathBuf = dir.path().join("blockd.json.rbd-clients");
    let args = [
        "-m",
        "0x1",
        "-S",
        sockets.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let rpc = dir.path().join("rpc.sock");
    let start = || {
        Daemon::try_start_at(&rpc, &args)
            .unwrap_or_else(|f| panic!("blockd failed to start ({}):\n{}", f.status, f.log))
    };
    let mut d = start();
    // Two connections: the bdev's own, and a registered cluster's.
    d.rpc_ok(
        "bdev_rbd_create",
        json!({"name": "Rbd0", "pool_name": POOL, "rbd_name": image, "block_size": 512}),
    );
    d.rpc_ok(
        "bdev_rbd_register_cluster",
        json!({"name": "c1", "config_file": conf}),
    );
    d.rpc_ok(
        "bdev_rbd_create",
        json!({"name": "Rbd1", "pool_name": POOL, "rbd_name": image2, "block_size": 512,
               "cluster_name": "c1"}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Rbd0"}),
    );
    let vsock = sockets.join("vhost.0");
    let vsock = vsock.to_str().unwrap();

    let mut seq = 0u64;
    let mut c = BlkClient::connect(vsock, 1, 1 << 16).unwrap();
    let last_before = write_for(&mut c, Duration::from_millis(500), &mut seq);
    let predecessor = record_addrs(&record);
    assert_eq!(predecessor.len(), 2, "two connections: {predecessor:?}");
    let owners = lock_ls(&image);
    assert!(
        predecessor.iter().any(|a| owners.contains(a.as_str())),
        "the lock is owned by {owners}, not by {predecessor:?}"
    );

    d.signal(libc::SIGKILL);
    d.wait(Duration::from_secs(20));
    drop(c);
    let mut d = start();
    // The socket exists once the daemon answers (the configuration is replayed first).
    let mut c = BlkClient::connect(vsock, 1, 1 << 16).unwrap();
    let first_after = {
        c.buf()[..8].copy_from_slice(&seq.to_le_bytes());
        assert_eq!(c.write(0, 0, 4096), 0);
        Instant::now()
    };
    let gap = first_after - last_before;
    eprintln!("I/O gap across kill -9 + restart on RBD: {gap:?}");
    assert!(
        gap < MAX_GAP,
        "gap {gap:?} (log of the new instance:\n{})",
        d.log()
    );
    let log = d.log();
    assert!(
        log.contains("blocklisted the previous instance's rbd client"),
        "{log}"
    );
    assert!(
        log.contains("broke the previous instance's exclusive lock"),
        "{log}"
    );

    // The predecessor is blocklisted; the new instance, on new addresses, is not, and
    // owns the lock now.
    let blocklist = ceph_cmd(&conf, &["osd", "blocklist", "ls"]);
    for a in &predecessor {
        assert!(blocklist.contains(a.as_str()), "{a} not in {blocklist}");
    }
    let now = record_addrs(&record);
    assert_eq!(
        now.len(),
        2,
        "the record lists only the new instance after the start: {now:?}"
    );
    for a in &now {
        assert!(!predecessor.contains(a), "{a} is reused");
        assert!(!blocklist.contains(a.as_str()), "{a} in {blocklist}");
    }
    write_for(&mut c, Duration::from_millis(200), &mut seq);
    let owners = lock_ls(&image);
    assert!(
        now.iter().any(|a| owners.contains(a.as_str())),
        "{owners} vs {now:?}"
    );

    drop(c);
    assert!(d.stop().success());
    for a in &predecessor {
        let _ = ceph_cmd(&conf, &["osd", "blocklist", "rm", a]);
    }
    for i in [&image, &image2] {
        ceph::rbd_cli(&conf, &["rm", "--no-progress", &format!("{POOL}/{i}")]);
    }
}
