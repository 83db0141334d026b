//! RBD tests against a real single-node Ceph cluster: blockctl against the `rbd` tool, and a
//! real blockd daemon serving RBD images.
//!
//! The cluster comes from tests/common/ceph.rs (`$CEPH_CONF`, or one started by
//! scripts/ceph-cluster.sh). Without Ceph binaries every test prints a SKIP line and passes.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockd::bdev::rbd::{RbdBdevConfig, RbdState};
use blockd::bdev::{IoOp, IoVecs};

#[path = "common/ceph.rs"]
mod ceph;
#[path = "common/rbd.rs"]
mod rbd;
use ceph::{unique, POOL};
use common::blk_client::{self, BlkClient};
use rbd::*;
use serde_json::{json, Value};

/// `rbd ARGS --format json` (with the test cluster's conf).
fn rbd_json(conf: &Path, args: &[&str]) -> Value {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The `blockctl` binary with `--conf`; panics (with stderr) on failure; returns stdout.
fn blockctl_bin(conf: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(common::blockctl_bin())
        .args(args)
        .arg("--conf")
        .arg(conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "blockctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn blockctl_json(conf: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    let out = blockctl_bin(conf, &a);
    serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("blockctl {args:?}: {e}: {}", String::from_utf8_lossy(&out)))
}

/// The facts both tools must agree on.
const INFO_KEYS: &[&str] = &[
    "name",
    "id",
    "size",
    "objects",
    "order",
    "object_size",
    "snapshot_count",
    "block_name_prefix",
    "format",
    "features",
    "op_features",
    "flags",
    "create_timestamp",
];

fn same_info(a: &Value, b: &Value) {
    for k in INFO_KEYS {
        assert_eq!(a[k], b[k], "{k}: blockctl {a} vs rbd {b}");
    }
}

fn used(v: &Value, snapshot: Option<&str>) -> u64 {
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["snapshot"].as_str() == snapshot)
        .unwrap_or_else(|| panic!("no row {snapshot:?} in {v}"))["used_size"]
        .as_u64()
        .unwrap()
}

#[test]
fn interop_with_the_rbd_tool() {
    let conf = need_ceph!();
    let t = Instant::now();
    let a = format!("{POOL}/{}", unique("mk"));
    let b = format!("{POOL}/{}", unique("rbdmk"));
    // blockctl creates, rbd reads.
    blockctl_bin(
        &conf,
        &[
            "image",
            "create",
            "--size",
            "64M",
            "--object-size",
            "1M",
            "--image-feature",
            "layering,exclusive-lock",
            "--image-feature",
            "object-map,fast-diff",
            &a,
        ],
    );
    let ri = rbd_json(&conf, &["info", &a]);
    assert_eq!(ri["size"], 64 << 20);
    assert_eq!(ri["order"], 20);
    assert_eq!(ri["object_size"], 1 << 20);
    assert_eq!(ri["format"], 2);
    assert_eq!(
        ri["features"],
        json!(["layering", "exclusive-lock", "object-map", "fast-diff"])
    );
    same_info(&blockctl_json(&conf, &["image", "info", &a]), &ri);
    // A plain number is MiB, as in rbd.
    blockctl_bin(&conf, &["image", "resize", "--size", "96", &a]);
    assert_eq!(rbd_json(&conf, &["info", &a])["size"], 96 << 20);

    // rbd creates, blockctl reads.
    rbd_cli(
        &conf,
        &["create", "--size", "32", "--object-size", "2M", &b],
    );
    same_info(
        &blockctl_json(&conf, &["image", "info", &b]),
        &rbd_json(&conf, &["info", &b]),
    );
    // Snapshots both ways.
    rbd_cli(&conf, &["snap", "create", &format!("{b}@byrbd")]);
    blockctl_bin(
        &conf,
        &["image", "snap", "create", &format!("{b}@byblockctl")],
    );
    let mine = blockctl_json(&conf, &["image", "snap", "ls", &b]);
    let theirs = rbd_json(&conf, &["snap", "ls", &b]);
    for v in [&mine, &theirs] {
        let names: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["byrbd", "byblockctl"], "{v}");
    }
    for (m, t) in mine
        .as_array()
        .unwrap()
        .iter()
        .zip(theirs.as_array().unwrap())
    {
        for k in ["id", "name", "size", "protected", "timestamp"] {
            assert_eq!(m[k], t[k], "{k}: {m} vs {t}");
        }
    }
    let ls = blockctl_json(&conf, &["image", "ls", "-l", POOL]);
    let bname = b.split('/').nth(1).unwrap();
    assert!(
        ls.as_array()
            .unwrap()
            .iter()
            .any(|r| r["image"] == bname && r["snapshot"] == "byrbd"),
        "{ls}"
    );

    // du agrees (whole objects): 3 objects of 2 MiB written after the snapshots.
    {
        let im = open_image(&conf, &b);
        for obj in [0u64, 3, 7] {
            im.write_at(obj * (2 << 20) + 4096, &[0xAB; 4096]).unwrap();
        }
        im.flush().unwrap();
        // An open read-write handle is a watcher, for both tools.
        let st = blockctl_json(&conf, &["image", "status", &b]);
        assert_eq!(st["watchers"].as_array().unwrap().len(), 1, "{st}");
        assert_eq!(
            st["watchers"][0]["client"],
            rbd_json(&conf, &["status", &b])["watchers"][0]["client"]
        );
    }
    let mine = blockctl_json(&conf, &["image", "du", &b]);
    let theirs = rbd_json(&conf, &["du", &b]);
    assert_eq!(used(&mine, None), 3 * (2 << 20), "{mine}");
    assert_eq!(used(&mine, None), used(&theirs, None), "{mine} vs {theirs}");
    assert_eq!(used(&mine, Some("byrbd")), used(&theirs, Some("byrbd")));
    assert_eq!(
        blockctl_json(&conf, &["image", "status", &b])["watchers"],
        json!([])
    );

    // export to stdout | import from stdin, then both tools export the same bytes.
    let c = format!("{b}-copy");
    let pipe = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "\"$0\" image export --conf \"$1\" {b} - | \"$0\" image import --conf \"$1\" - {c}"
        ))
        .arg(common::blockctl_bin())
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        pipe.status.success(),
        "{}",
        String::from_utf8_lossy(&pipe.stderr)
    );
    assert!(
        pipe.stderr.is_empty(),
        "progress on a non-terminal: {pipe:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (fb, fc) = (dir.path().join("b"), dir.path().join("c"));
    rbd_cli(&conf, &["export", &b, &fb.display().to_string()]);
    rbd_cli(&conf, &["export", &c, &fc.display().to_string()]);
    let (vb, vc) = (std::fs::read(&fb).unwrap(), std::fs::read(&fc).unwrap());
    assert_eq!(vb.len(), 32 << 20);
    assert!(vb == vc, "stdin import differs");
    // Sparse: the copy (default 4 MiB objects) holds only the three written regions.
    assert_eq!(used(&rbd_json(&conf, &["du", &c]), None), 3 * (4 << 20));
    // export refuses to replace a file unless told to.
    let e = Command::new(common::blockctl_bin())
        .args(["image", "export", &b, &fb.display().to_string(), "--conf"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("--overwrite"),
        "{e:?}"
    );

    // Clone + flatten.
    let d = format!("{b}-clone");
    blockctl_bin(&conf, &["image", "snap", "protect", &format!("{b}@byrbd")]);
    blockctl_bin(&conf, &["image", "clone", &format!("{b}@byrbd"), &d]);
    assert!(rbd_json(&conf, &["info", &d])["parent"].is_object());
    blockctl_bin(&conf, &["image", "flatten", &d]);
    assert!(rbd_json(&conf, &["info", &d])["parent"].is_null());
    blockctl_bin(
        &conf,
        &["image", "snap", "unprotect", &format!("{b}@byrbd")],
    );

    for i in [&a, &c, &d] {
        blockctl_bin(&conf, &["image", "rm", i]);
    }
    rbd_cli(&conf, &["snap", "purge", &b]);
    rbd_cli(&conf, &["rm", &b]);
    eprintln!("interop took {:?}", t.elapsed());
}

fn num_blocks(d: &common::Daemon, name: &str) -> u64 {
    d.rpc_ok("bdev_get_bdevs", json!({ "name": name }))[0]["num_blocks"]
        .as_u64()
        .unwrap()
}

/// Waits (bounded) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The default `--sched adaptive`: blockd's threads, librbd's included, run under
/// SCHED_BATCH while rbd requests are deep in flight and under SCHED_OTHER otherwise
/// (src/reactor/sched/adaptive.rs); a QD1 client never sees the batch policy.
#[test]
fn threads_batch_only_while_rbd_queues_are_deep() {
    let conf = need_ceph!();
    let image = unique("adaptive");
    rbd_cli(
        &conf,
        &["create", "--size", "64M", &format!("{POOL}/{image}")],
    );
    let d = common::Daemon::start();
    d.rpc_ok(
        "bdev_rbd_create",
        json!({"pool_name": POOL, "rbd_name": image, "block_size": 512}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Ceph0"}),
    );
    let vsock = d.socket_dir().join("vhost.0").display().to_string();
    let bench = |qd: &str, secs: &str| {
        Command::new(common::blockctl_bin())
            .args(["bench", "-s", &vsock, "-w", "randread", "-b", "4k"])
            .args(["-q", qd, "-t", secs, "--no-poll"])
            .output()
            .unwrap()
    };
    let policy = || d.rpc_ok("framework_get_scheduler", Value::Null)["thread_policy"].clone();
    let all_threads = |want: i32| {
        let threads = common::thread_policies(d.pid());
        assert!(
            threads.iter().any(|(n, _)| n == "io_context_pool"),
            "{threads:?}"
        );
        assert!(threads.iter().all(|(_, p)| *p == want), "{threads:?}");
    };

    let out = bench("1", "1");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        policy(),
        json!({"mode": "adaptive", "policy": "normal", "rbd_in_flight": 0, "switches": 0})
    );
    all_threads(0);

    let mut deep = Command::new(common::blockctl_bin())
        .args(["bench", "-s", &vsock, "-w", "randread", "-b", "4k"])
        .args(["-q", "32", "-t", "3", "--no-poll"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the batch policy under QD32", || {
        policy()["policy"] == "batch"
    });
    all_threads(3);
    assert!(deep.wait().unwrap().success());

    // Shallow again: back to normal at the first completion SHALLOW_FOR (20 ms) after the
    // queue was last deep, well within a second of QD1.
    let out = bench("1", "1");
    assert!(out.status.success(), "{out:?}");
    let p = policy();
    assert_eq!(p["policy"], "normal", "{p}");
    assert_eq!(p["rbd_in_flight"], 0, "{p}");
    assert!(p["switches"].as_u64().unwrap() >= 2, "{p}");
    all_threads(0);
}

#[test]
fn daemon_serves_an_rbd_image() {
    let conf = need_ceph!();
    let t = Instant::now();
    let image = unique("served");
    let spec = format!("{POOL}/{image}");
    rbd_cli(&conf, &["create", "--size", "32M", &spec]);
    // `--sched batch`: librbd's threads, started later, must inherit it.
    let d = common::Daemon::start_with(&["--sched", "batch"]);
    let sock = d.rpc_socket().display().to_string();

    // SPDK's own rpc.py, unchanged.
    // SPDK's own rpc.py, unchanged (scripts/install-deps.sh installs it).
    let rpc = common::spdk_rpc().expect("spdk-rpc is not installed: run scripts/install-deps.sh");
    let out = Command::new(rpc)
        .args(["-s", &sock, "bdev_rbd_create", POOL, &image, "512"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Ceph0");
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Ceph0"}),
    );
    // librbd's threads inherit the daemon's policy (src/reactor/sched/policy.rs).
    let threads = common::thread_policies(d.pid());
    for name in ["io_context_pool", "msgr-worker-0", "reactor_0"] {
        assert!(
            threads.iter().any(|(n, _)| n == name),
            "{name}: {threads:?}"
        );
    }
    assert!(threads.iter().all(|(_, p)| *p == 3), "{threads:?}");

    // Every error with its own errno and message.
    let create = |p: Value| d.rpc("bdev_rbd_create", p).unwrap_err();
    let base = json!({"pool_name": POOL, "rbd_name": image, "block_size": 512});
    let mut p = base.clone();
    p["name"] = json!("Ceph0");
    let (code, msg) = create(p);
    assert_eq!(code, -17, "{msg}");
    assert!(msg.contains("Ceph0"), "{msg}");
    let mut p = base.clone();
    p["pool_name"] = json!("nosuchpool");
    assert_eq!(create(p), (-2, "pool nosuchpool not found".to_string()));
    let mut p = base.clone();
    p["rbd_name"] = json!("nosuch");
    assert_eq!(create(p), (-2, format!("image {POOL}/nosuch not found")));
    let mut p = base.clone();
    p["user_id"] = json!("nosuchuser");
    let (code, msg) = create(p);
    assert!(code == -13 || code == -1, "{code} {msg}");
    assert!(msg.contains("cluster ceph as client.nosuchuser"), "{msg}");
    let (code, msg) = d
        .rpc("bdev_rbd_delete", json!({"name": "Ceph0"}))
        .unwrap_err();
    assert_eq!(code, -16, "{msg}");
    assert!(msg.contains("vhost.0"), "{msg}");
    // A cluster in use cannot be unregistered; the error names the bdev.
    d.rpc_ok(
        "bdev_rbd_register_cluster",
        json!({"name": "cl", "config_file": conf}),
    );
    let mut p = base.clone();
    p["name"] = json!("OnCluster");
    p["cluster_name"] = json!("cl");
    d.rpc_ok("bdev_rbd_create", p);
    let (code, msg) = d
        .rpc("bdev_rbd_unregister_cluster", json!({"name": "cl"}))
        .unwrap_err();
    assert_eq!(code, -16, "{msg}");
    assert!(msg.contains("OnCluster"), "{msg}");
    d.rpc_ok("bdev_rbd_delete", json!({"name": "OnCluster"}));
    d.rpc_ok("bdev_rbd_unregister_cluster", json!({"name": "cl"}));

    // Data written by a vhost-user client reads back with the rbd tool and qemu-img.
    let vsock = d.socket_dir().join("vhost.0").display().to_string();
    let mut c = BlkClient::connect(&vsock, 1, 1 << 20).unwrap();
    assert_eq!(c.capacity, 32 << 20);
    let writes: [(u64, usize); 3] = [
        (0, 65536),
        ((4 << 20) - 4096, 8192),
        ((13 << 20) + 512, 4608),
    ];
    for (i, (off, len)) in writes.iter().enumerate() {
        blk_client::pattern(&mut c.buf()[..*len], *off, i as u8 + 1);
        assert_eq!(c.write_at(0, *off, 0, *len), 0);
    }
    assert_eq!(c.flush(0), 0);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export.raw");
    rbd_cli(&conf, &["export", &spec, &file.display().to_string()]);
    let data = std::fs::read(&file).unwrap();
    assert_eq!(data.len(), 32 << 20);
    let mut expect = vec![0u8; 32 << 20];
    for (i, (off, len)) in writes.iter().enumerate() {
        let o = *off as usize;
        blk_client::pattern(&mut expect[o..o + len], *off, i as u8 + 1);
    }
    assert!(data == expect, "rbd export differs from what was written");
    let qemu_rbd = Command::new("sh")
        .args(["-c", "qemu-img --help | grep -qw rbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if qemu_rbd {
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&file)
            .arg(format!("rbd:{spec}:conf={}", conf.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-img compare: {out:?}");
    } else {
        eprintln!("SKIP qemu-img compare: qemu-img has no rbd driver (qemu-block-extra)");
    }

    // Discard and write-zeroes of whole objects free them (rbd du counts objects).
    for obj in [2u64, 3, 4] {
        blk_client::pattern(&mut c.buf()[..4096], obj << 22, 9);
        assert_eq!(c.write_at(0, obj << 22, 0, 4096), 0);
    }
    assert_eq!(c.flush(0), 0);
    let before = used(&rbd_json(&conf, &["du", &spec]), None);
    assert_eq!(before, 5 << 22, "objects 0-4 written");
    assert_eq!(c.discard(0, 2 << 22, 2 << 22), 0);
    assert_eq!(c.write_zeroes(0, 4 << 22, 1 << 22, true), 0);
    assert_eq!(c.flush(0), 0);
    let after = used(&rbd_json(&conf, &["du", &spec]), None);
    assert_eq!(after, 2 << 22, "objects 2-4 freed");
    assert_eq!(c.read(0, 2 << 22, 4096), 0);
    assert!(c.buf()[..4096].iter().all(|b| *b == 0));

    // Resize through bdev_rbd_resize and through `rbd resize`.
    assert_eq!(num_blocks(&d, "Ceph0"), (32 << 20) / 512);
    d.rpc_ok("bdev_rbd_resize", json!({"name": "Ceph0", "new_size": 48}));
    assert_eq!(num_blocks(&d, "Ceph0"), (48 << 20) / 512);
    assert_eq!(rbd_json(&conf, &["info", &spec])["size"], 48 << 20);
    rbd_cli(&conf, &["resize", "--size", "64M", &spec]);
    wait_until("the bdev to see rbd resize", || {
        num_blocks(&d, "Ceph0") == (64 << 20) / 512
    });

    drop(c);
    // The session ends asynchronously after the client disconnects.
    wait_until("the controller to be deletable", || {
        d.rpc("vhost_delete_controller", json!({"ctrlr": "vhost.0"}))
            .is_ok()
    });
    d.rpc_ok("bdev_rbd_delete", json!({"name": "Ceph0"}));
    rbd_cli(&conf, &["rm", &spec]);
    eprintln!("daemon test took {:?}", t.elapsed());
}

/// The seed command line with nothing but /etc/ceph/ceph.conf and the admin keyring:
/// blockd runs in a private mount namespace where the test cluster's files are
/// bind-mounted at /etc/ceph, without CEPH_CONF.
#[test]
fn seed_command_line_with_only_etc_ceph() {
    let conf = need_ceph!();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root for unshare -m and mount --bind");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc-ceph");
    std::fs::create_dir(&etc).unwrap();
    // The cluster's conf without its keyring path: the default search must find it.
    let text = std::fs::read_to_string(&conf).unwrap();
    let stripped: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("keyring"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(etc.join("ceph.conf"), stripped).unwrap();
    std::fs::copy(
        conf.with_file_name("ceph.client.admin.keyring"),
        etc.join("ceph.client.admin.keyring"),
    )
    .unwrap();
    let image = unique("seed");
    rbd_cli(
        &conf,
        &["create", "--size", "16M", &format!("{POOL}/{image}")],
    );

    let sockets = dir.path().join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    let rpc = dir.path().join("blockd.sock");
    let log = dir.path().join("blockd.log");
    let mut child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/ceph && exec \"$@\"")
        .arg(&etc)
        .arg(common::blockd_bin())
        .args(["-m", "0x1", "-S"])
        .arg(&sockets)
        .arg("-r")
        .arg(&rpc)
        .env_remove("CEPH_CONF")
        .env_remove("CEPH_ARGS")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("unshare.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let err = std::fs::read_to_string(dir.path().join("unshare.err")).unwrap_or_default();
            if err.contains("unshare failed") || err.contains("Operation not permitted") {
                eprintln!("SKIP: private mount namespaces are not permitted here: {err}");
                let _ = connect(&conf).ioctx(POOL).unwrap().remove_image(&image);
                return;
            }
            panic!(
                "blockd exited ({st}): {err}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if std::os::unix::net::UnixStream::connect(&rpc).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "blockd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctl = |args: &[&str]| {
        let out = Command::new(common::blockctl_bin())
            .arg("-s")
            .arg(&rpc)
            .args(args)
            .env_remove("CEPH_CONF")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "blockctl {args:?}: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(ctl(&["bdev_rbd_create", POOL, &image, "512"]), "Ceph0");
    ctl(&[
        "vhost_create_blk_controller",
        "--cpumask",
        "0x1",
        "vhost.1",
        "Ceph0",
    ]);
    let vsock = sockets.join("vhost.1").display().to_string();
    let mut c = BlkClient::connect(&vsock, 1, 65536).unwrap();
    assert_eq!(c.capacity, 16 << 20);
    blk_client::pattern(&mut c.buf()[..65536], 1 << 20, 3);
    let sent = c.buf()[..65536].to_vec();
    assert_eq!(c.write(0, 1 << 20, 65536), 0);
    c.buf().fill(0);
    assert_eq!(c.read(0, 1 << 20, 65536), 0);
    assert!(c.buf()[..65536] == sent[..], "read back differs");
    assert_eq!(c.flush(0), 0);
    drop(c);
    let mut got = vec![0u8; 65536];
    connect(&conf)
        .ioctx(POOL)
        .unwrap()
        .open(&image, None)
        .unwrap()
        .read_at(1 << 20, &mut got)
        .unwrap();
    assert!(got == sent, "the cluster has other data");
    // Close the image (releasing its lock and watch) before stopping the daemon.
    wait_until("the controller to be deletable", || {
        Command::new(common::blockctl_bin())
            .arg("-s")
            .arg(&rpc)
            .args(["vhost_delete_controller", "vhost.1"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    ctl(&["bdev_rbd_delete", "Ceph0"]);
    let _ = child.kill();
    let _ = child.wait();
    connect(&conf)
        .ioctx(POOL)
        .unwrap()
        .remove_image(&image)
        .unwrap();
}

/// `rbd status`'s watchers and `rbd lock ls`'s lockers of `spec`.
fn watchers_and_locks(conf: &Path, spec: &str) -> (Vec<Value>, Vec<Value>) {
    let st = rbd_json(conf, &["status", spec]);
    let watchers = st["watchers"]
        .as_array()
        .unwrap_or_else(|| panic!("rbd status {spec}: {st}"))
        .clone();
    let locks = rbd_json(conf, &["lock", "ls", spec]);
    let locks = locks
        .as_array()
        .unwrap_or_else(|| panic!("rbd lock ls {spec}: {locks}"))
        .clone();
    (watchers, locks)
}

/// SIGTERM closes every image (header unwatched, exclusive lock released) and every
/// cluster connection: right after blockd exits, `rbd status` lists no watcher and
/// `rbd rm` succeeds, without waiting for the OSDs to time a dead watch out.
#[test]
fn sigterm_leaves_no_watcher_behind() {
    let conf = need_ceph!();
    let own = format!("{POOL}/{}", unique("term-own"));
    let shared = format!("{POOL}/{}", unique("term-cl"));
    for spec in [&own, &shared] {
        rbd_cli(&conf, &["create", "--size", "8M", spec]);
    }
    let mut d = common::Daemon::start();
    // One bdev with a connection of its own, one on a registered cluster.
    d.rpc_ok(
        "bdev_rbd_create",
        json!({"name": "Own", "pool_name": POOL, "rbd_name": &own[POOL.len() + 1..],
               "block_size": 512}),
    );
    d.rpc_ok(
        "bdev_rbd_register_cluster",
        json!({"name": "cl", "config_file": conf}),
    );
    d.rpc_ok(
        "bdev_rbd_create",
        json!({"name": "OnCluster", "pool_name": POOL, "rbd_name": &shared[POOL.len() + 1..],
               "block_size": 512, "cluster_name": "cl"}),
    );
    // A connected client writes, so the bdev holds the image's exclusive lock.
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "term.0", "dev_name": "Own"}),
    );
    let vsock = d.socket_dir().join("term.0").display().to_string();
    let mut c = BlkClient::connect(&vsock, 1, 1 << 16).unwrap();
    blk_client::pattern(&mut c.buf()[..4096], 0, 3);
    assert_eq!(c.write(0, 0, 4096), 0);
    let (w, l) = watchers_and_locks(&conf, &own);
    assert_eq!((w.len(), l.len()), (1, 1), "watchers {w:?} locks {l:?}");
    let (w, _) = watchers_and_locks(&conf, &shared);
    assert_eq!(w.len(), 1, "watchers {w:?}");

    let st = d.stop();
    assert!(st.success(), "{st:?}:\n{}", d.log());
    assert!(
        d.log()
            .contains("rbd images and cluster connections closed"),
        "{}",
        d.log()
    );
    drop(c);
    for spec in [&own, &shared] {
        let (w, l) = watchers_and_locks(&conf, spec);
        assert!(
            w.is_empty() && l.is_empty(),
            "{spec}: watchers {w:?} locks {l:?}"
        );
        rbd_cli(&conf, &["rm", "--no-progress", spec]);
    }
}

/// `read_only` (rpc.py `-r`): the image opens with `rbd_open_read_only` (no watch, no
/// lock), the channel refuses writes with EROFS, the vhost-blk device offers
/// VIRTIO_BLK_F_RO, and `save_config` carries the flag so a replay restores it.
#[test]
fn read_only_bdev_serves_reads_and_refuses_writes() {
    let rbd = RbdState::default();
    let conf = need_ceph!();
    let name = unique("ro");
    let spec = format!("{POOL}/{name}");
    rbd_cli(&conf, &["create", "--size", "8M", &spec]);
    let mut data = vec![0u8; 1 << 20];
    blk_client::pattern(&mut data, 0, 7);
    {
        let r = connect(&conf);
        let img = r.ioctx(POOL).unwrap().open(&name, None).unwrap();
        img.write_at(0, &data).unwrap();
        img.flush().unwrap();
    }
    let expect = |conf: &Path| {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ro.raw");
        rbd_cli(
            conf,
            &[
                "export",
                "--no-progress",
                &spec,
                &file.display().to_string(),
            ],
        );
        let got = std::fs::read(&file).unwrap();
        assert!(got[..data.len()] == data[..], "image data changed");
        assert!(
            got[data.len()..].iter().all(|b| *b == 0),
            "image data changed"
        );
    };

    // In-process: the channel fails writes with EROFS and still reads.
    {
        let bdev = rbd
            .create(RbdBdevConfig {
                name: unique("CephRo"),
                pool_name: POOL.into(),
                rbd_name: name.clone(),
                block_size: 512,
                read_only: true,
                ..Default::default()
            })
            .unwrap();
        assert!(bdev.backend().read_only());
        let t = bdev.backend().io_types();
        assert!(!t.unmap && !t.write_zeroes);
        let mut ch = bdev.open_channel().unwrap();
        let mut buf = vec![0x5Au8; 4096];
        let iovs = [iov(&mut buf)];
        let w = IoOp::Write {
            offset: 0,
            // SAFETY: `buf` and `iovs` outlive each I/O.
            iovs: unsafe { IoVecs::from_slice(&iovs) },
        };
        let erofs = Err(blockd::bdev::Errno(libc::EROFS));
        assert_eq!(io(&mut ch, 1, w), erofs);
        let um = IoOp::Unmap {
            offset: 0,
            len: 4096,
        };
        // Unmap and write-zeroes are not offered (io_types): the bdev layer may refuse
        // them before the backend does.
        let r = io(&mut ch, 2, um);
        assert!(
            r == erofs || r == Err(blockd::bdev::Errno(libc::EOPNOTSUPP)),
            "{r:?}"
        );
        let wz = IoOp::WriteZeroes {
            offset: 0,
            len: 4096,
            may_unmap: false,
        };
        let r = io(&mut ch, 3, wz);
        assert!(
            r == erofs || r == Err(blockd::bdev::Errno(libc::EOPNOTSUPP)),
            "{r:?}"
        );
        assert_eq!(io(&mut ch, 4, IoOp::Flush), Ok(()));
        let rd = IoOp::Read {
            offset: 0,
            // SAFETY: as above.
            iovs: unsafe { IoVecs::from_slice(&iovs) },
        };
        assert_eq!(io(&mut ch, 5, rd), Ok(()));
        assert_eq!(buf, data[..4096]);
        drop(ch);
        rbd.delete(bdev.name()).unwrap();
    }

    // Through the daemon, created by SPDK's rpc.py with its -r flag.
    let mut d = common::Daemon::start();
    let sock = d.rpc_socket().display().to_string();
    let rpc = common::spdk_rpc().expect("spdk-rpc is not installed: run scripts/install-deps.sh");
    let out = Command::new(rpc)
        .args(["-s", &sock, "bdev_rbd_create", "-r", POOL, &name, "512"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Ceph0");
    let b = d.rpc_ok("bdev_get_bdevs", json!({"name": "Ceph0"}));
    assert_eq!(b[0]["driver_specific"]["rbd"]["read_only"], true, "{b}");
    assert_eq!(
        d.rpc("bdev_rbd_resize", json!({"name": "Ceph0", "new_size": 16}))
            .unwrap_err()
            .0,
        -libc::EROFS as i64
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "ro.0", "dev_name": "Ceph0"}),
    );
    let vsock = d.socket_dir().join("ro.0").display().to_string();
    // The device offers VIRTIO_BLK_F_RO: libblkio refuses read-write access.
    assert!(BlkClient::connect(&vsock, 1, 1 << 20).is_err());
    let mut c = BlkClient::connect_with(&vsock, 1, 1 << 20, true).unwrap();
    assert_eq!(c.capacity, 8 << 20);
    assert_eq!(c.read(0, 0, 1 << 20), 0);
    assert!(c.buf()[..] == data[..], "read-only bdev reads differ");
    blk_client::pattern(&mut c.buf()[..4096], 0, 9);
    assert!(
        c.write(0, 0, 4096) < 0,
        "a write to a read-only bdev succeeded"
    );
    assert!(c.write_zeroes(0, 0, 4096, false) < 0);
    let (w, l) = watchers_and_locks(&conf, &spec);
    assert!(w.is_empty() && l.is_empty(), "watchers {w:?} locks {l:?}");
    expect(&conf);

    // save_config carries read_only; a replay opens the image read-only again.
    let cfg = d.rpc_ok("framework_get_config", json!({"name": "bdev"}));
    let create = cfg
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["method"] == "bdev_rbd_create")
        .unwrap_or_else(|| panic!("{cfg}"))
        .clone();
    assert_eq!(create["params"]["read_only"], true, "{create}");
    let saved = d.blockctl(&["save_config"]);
    assert!(saved.status.success(), "{saved:?}");
    drop(c);
    assert!(d.stop().success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.json");
    std::fs::write(&file, &saved.stdout).unwrap();
    let mut d = common::Daemon::start_with(&["--json", &file.display().to_string()]);
    let b = d.rpc_ok("bdev_get_bdevs", json!({"name": "Ceph0"}));
    assert_eq!(b[0]["driver_specific"]["rbd"]["read_only"], true, "{b}");
    let mut c = BlkClient::connect_with(&vsock_of(&d, "ro.0"), 1, 1 << 16, true).unwrap();
    assert!(c.write(0, 0, 4096) < 0);
    drop(c);
    assert!(d.stop().success());
    expect(&conf);
    rbd_cli(&conf, &["rm", "--no-progress", &spec]);
}

fn vsock_of(d: &common::Daemon, ctrlr: &str) -> String {
    d.socket_dir().join(ctrlr).display().to_string()
}
