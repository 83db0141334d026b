//! The embedded local pool through the real binaries: `blockctl image/pool` on `local:`
//! specs, and a real `blockd` serving a local image (`bdev_local_create`) over
//! vhost-user-blk to libblkio.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::blk_client::{pattern, BlkClient};
use common::{blockctl_bin, Daemon};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// `blockctl image|pool ... --pool-dir <root>`.
fn ctl(root: &Path, args: &[&str]) -> Output {
    Command::new(blockctl_bin())
        .args(args)
        .arg("--pool-dir")
        .arg(root)
        .env_remove("BLOCKD_POOL_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run blockctl")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let o = ctl(root, args);
    assert!(
        o.status.success(),
        "blockctl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(root: &Path, args: &[&str], msg: &str) {
    let o = ctl(root, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "blockctl {args:?} succeeded");
    assert!(
        err.contains(msg),
        "blockctl {args:?}: {err:?} lacks {msg:?}"
    );
}

fn json_of(root: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    serde_json::from_str(&ok(root, &a)).unwrap()
}

fn image_path(root: &Path, pool: &str, image: &str) -> PathBuf {
    root.join(pool).join(format!("{image}.img"))
}

#[test]
fn cli_image_workflow() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("pools");
    let root = root.as_path();
    ok(root, &["pool", "create", "local:p"]);
    fails(root, &["pool", "create", "local:p"], "already exists");
    assert_eq!(json_of(root, &["pool", "ls", "--local"]), json!(["p"]));
    fails(
        root,
        &["image", "create", "local:nopool/x", "-s", "1"],
        "does not exist",
    );
    ok(root, &["image", "create", "local:p/vm", "-s", "64"]);
    assert_eq!(json_of(root, &["image", "ls", "local:p"]), json!(["vm"]));
    // -L makes unprefixed specs local.
    assert_eq!(json_of(root, &["image", "-L", "ls", "p"]), json!(["vm"]));
    let info = json_of(root, &["image", "info", "local:p/vm"]);
    assert_eq!(
        (info["size"].as_u64(), info["used"].as_u64()),
        (Some(64 * MIB), Some(0))
    );
    let path = image_path(root, "p", "vm");
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(b"version one", 5 * MIB)
        .unwrap();

    // Snapshot, protect, clone, diverge, flatten.
    ok(root, &["image", "snap", "create", "local:p/vm@s1"]);
    fails(
        root,
        &["image", "clone", "local:p/vm@s1", "local:p/c"],
        "not protected",
    );
    ok(root, &["image", "snap", "protect", "local:p/vm@s1"]);
    ok(root, &["image", "clone", "local:p/vm@s1", "local:p/c"]);
    let snaps = json_of(root, &["image", "snap", "ls", "local:p/vm"]);
    assert_eq!(snaps[0]["name"], "s1");
    assert_eq!(snaps[0]["protected"], true);
    assert_eq!(snaps[0]["children"], json!([{"pool": "p", "image": "c"}]));
    let c = json_of(root, &["image", "info", "local:p/c"]);
    assert_eq!(
        c["parent"],
        json!({"pool": "p", "image": "vm", "snapshot": "s1"})
    );
    let mut b = [0u8; 11];
    File::open(image_path(root, "p", "c"))
        .unwrap()
        .read_exact_at(&mut b, 5 * MIB)
        .unwrap();
    assert_eq!(&b, b"version one");
    fails(
        root,
        &["image", "snap", "unprotect", "local:p/vm@s1"],
        "p/c",
    );
    ok(root, &["image", "flatten", "local:p/c"]);
    assert!(json_of(root, &["image", "info", "local:p/c"])["parent"].is_null());
    ok(root, &["image", "snap", "unprotect", "local:p/vm@s1"]);

    // Rollback restores the snapshot's data.
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(b"version two", 5 * MIB)
        .unwrap();
    ok(root, &["image", "snap", "rollback", "local:p/vm@s1"]);
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut b, 5 * MIB)
        .unwrap();
    assert_eq!(&b, b"version one");

    // du: provisioned and allocated, snapshots first.
    let du = json_of(root, &["image", "du", "local:p/vm"]);
    assert_eq!(du["images"][0]["name"], "vm@s1");
    assert_eq!(du["images"][1]["provisioned_size"], 64 * MIB);
    let used = du["images"][1]["used_size"].as_u64().unwrap();
    assert!(used > 0 && used <= MIB, "used {used}");
    assert!(ok(root, &["image", "du", "local:p/vm"]).contains("<TOTAL>"));

    // Resize and rm rules, as rbd.
    fails(
        root,
        &["image", "resize", "local:p/vm", "-s", "32"],
        "--allow-shrink",
    );
    ok(root, &["image", "resize", "local:p/vm", "-s", "128"]);
    ok(
        root,
        &[
            "image",
            "resize",
            "local:p/vm",
            "-s",
            "32",
            "--allow-shrink",
        ],
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 32 * MIB);
    fails(root, &["image", "rm", "local:p/vm"], "snapshot");
    ok(root, &["image", "snap", "rm", "local:p/vm@s1"]);
    ok(root, &["image", "rm", "local:p/vm"]);
    assert!(!path.exists());
    assert!(ok(root, &["image", "status", "local:p/c"]).contains("not served"));
    fails(root, &["pool", "rm", "local:p"], "--yes-i-really-mean-it");
    ok(root, &["pool", "rm", "local:p", "--yes-i-really-mean-it"]);
    assert_eq!(json_of(root, &["pool", "ls", "-L"]), json!([]));
}

#[test]
fn cli_import_export_sparse() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("pools");
    let root = root.as_path();
    ok(root, &["pool", "create", "local:p"]);
    let src = d.path().join("disk.raw");
    let f = File::create(&src).unwrap();
    f.set_len(48 * MIB).unwrap();
    f.write_all_at(b"MBR!", 510).unwrap();
    f.write_all_at(&vec![0x5a; 2 * MIB as usize], 20 * MIB)
        .unwrap();
    drop(f);
    let expect = std::fs::read(&src).unwrap();
    let src_s = src.to_str().unwrap();

    ok(root, &["image", "import", src_s, "local:p/a"]);
    let used = json_of(root, &["image", "info", "local:p/a"])["used"]
        .as_u64()
        .unwrap();
    assert!(
        (2 * MIB..3 * MIB).contains(&used),
        "holes kept: used {used}"
    );

    // Import from a pipe (stdin), export to a pipe (stdout).
    let mut child = Command::new(blockctl_bin())
        .args(["image", "import", "-", "local:p/b", "--pool-dir"])
        .arg(root)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &expect).unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("done"));
    let b = json_of(root, &["image", "info", "local:p/b"]);
    assert_eq!(b["size"], 48 * MIB);
    assert!(
        b["used"].as_u64().unwrap() < 3 * MIB,
        "stdin import is sparse"
    );
    let out = Command::new(blockctl_bin())
        .args(["image", "export", "local:p/b", "-", "--pool-dir"])
        .arg(root)
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout == expect, "stdout export differs");

    // Export to a file: same bytes, holes preserved.
    let dst = d.path().join("out.raw");
    ok(
        root,
        &["image", "export", "local:p/a", dst.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&dst).unwrap() == expect,
        "file export differs"
    );
    let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(blocks < 3 * MIB, "export allocated {blocks}");
    fails(
        root,
        &["image", "import", src_s, "local:p/a"],
        "already exists",
    );
}

#[test]
fn concurrent_blockctl_calls_are_serialized() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("pools");
    ok(&root, &["pool", "create", "local:p"]);
    ok(&root, &["image", "create", "local:p/vm", "-s", "4"]);
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(blockctl_bin())
                .args(["image", "snap", "create", &format!("local:p/vm@s{i}")])
                .arg("--pool-dir")
                .arg(&root)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let snaps = json_of(&root, &["image", "snap", "ls", "local:p/vm"]);
    let mut names: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]);
}

#[test]
fn daemon_serves_local_image() {
    let mut d = Daemon::start();
    let root = d.tmp_dir().join("pools");
    let root_s = root.to_str().unwrap().to_string();
    ok(&root, &["pool", "create", "local:p"]);
    ok(&root, &["image", "create", "local:p/vm", "-s", "16"]);
    let out = d.blockctl(&[
        "bdev_local_create",
        "-p",
        "local:p",
        "vm",
        "--pool-dir",
        &root_s,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Local0");
    let bdevs = d.rpc_ok("bdev_get_bdevs", json!({"name": "Local0"}));
    assert_eq!(bdevs[0]["num_blocks"], 16 * MIB / 512);
    assert_eq!(bdevs[0]["supported_io_types"]["unmap"], true);
    assert_eq!(bdevs[0]["driver_specific"]["local"]["image"], "vm");
    // A second writer on the same image is refused.
    let (code, msg) = d
        .rpc(
            "bdev_local_create",
            json!({"pool": "p", "image": "vm", "pool_dir": root_s}),
        )
        .unwrap_err();
    assert_eq!(code, -(libc::EBUSY as i64), "{msg}");
    let (code, _) = d
        .rpc(
            "bdev_local_create",
            json!({"pool": "p", "image": "nope", "pool_dir": root_s}),
        )
        .unwrap_err();
    assert_eq!(code, -(libc::ENOENT as i64));

    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Local0"}),
    );
    let sock = d.socket_dir().join("vhost.0");
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, MIB as usize).unwrap();
    assert_eq!(c.capacity, 16 * MIB);
    let off = 3 * MIB;
    pattern(&mut c.buf()[..65536], off, 1);
    let first = c.buf()[..65536].to_vec();
    assert_eq!(c.write(0, off, 65536), 0);
    assert_eq!(c.flush(0), 0);
    // The data is in the image file.
    let path = image_path(&root, "p", "vm");
    let mut got = vec![0u8; 65536];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut got, off)
        .unwrap();
    assert!(got == first, "written data not in the image file");

    // Snapshot while served (after the flush above), then keep writing.
    ok(&root, &["image", "snap", "create", "local:p/vm@live"]);
    pattern(&mut c.buf()[..65536], off, 2);
    let second = c.buf()[..65536].to_vec();
    assert_eq!(c.write(0, off, 65536), 0);
    assert_eq!(c.flush(0), 0);
    let snap = d.tmp_dir().join("snap.raw");
    ok(
        &root,
        &["image", "export", "local:p/vm@live", snap.to_str().unwrap()],
    );
    File::open(&snap)
        .unwrap()
        .read_exact_at(&mut got, off)
        .unwrap();
    assert!(
        got == first,
        "the snapshot lacks the data flushed before it"
    );
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut got, off)
        .unwrap();
    assert!(
        got == second,
        "the image lacks the data written after the snapshot"
    );
    // Discard punches a hole: the image stays sparse.
    assert_eq!(c.discard(0, 0, 16 * MIB), 0);
    assert_eq!(
        json_of(&root, &["image", "info", "local:p/vm"])["in_use"],
        true
    );

    // A served image cannot be rolled back or removed.
    fails(
        &root,
        &["image", "snap", "rollback", "local:p/vm@live"],
        "served",
    );
    ok(&root, &["image", "snap", "rm", "local:p/vm@live"]);
    fails(&root, &["image", "rm", "local:p/vm"], "served");

    // The configuration replays: stop, restart from the saved config.
    let cfg = d.rpc_ok("framework_get_config", json!({"name": "bdev"}));
    let entry = cfg
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["method"] == "bdev_local_create")
        .expect("bdev_local_create in the bdev config")
        .clone();
    assert_eq!(entry["params"]["pool"], "p");
    assert_eq!(entry["params"]["image"], "vm");
    let uuid = bdevs[0]["uuid"].clone();
    assert_eq!(entry["params"]["uuid"], uuid);
    drop(c);
    // Bounded wait for the daemon to notice the disconnect.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = d.rpc("vhost_delete_controller", json!({"ctrlr": "vhost.0"})) {
        assert!(std::time::Instant::now() < deadline, "still refused: {e:?}");
        std::thread::yield_now();
    }
    d.rpc_ok("bdev_local_delete", json!({"name": "Local0"}));
    assert_eq!(
        json_of(&root, &["image", "info", "local:p/vm"])["in_use"],
        false
    );
    let saved = d.tmp_dir().join("config.json");
    let full = json!({"subsystems": [{"subsystem": "bdev", "config": [entry]}]});
    std::fs::write(&saved, full.to_string()).unwrap();
    d.stop();
    let d2 = Daemon::start_with(&["-m", "0x1", "--json", saved.to_str().unwrap()]);
    let b2 = d2.rpc_ok("bdev_get_bdevs", json!({"name": "Local0"}));
    assert_eq!(b2[0]["uuid"], uuid);
    assert_eq!(
        json_of(&root, &["image", "info", "local:p/vm"])["in_use"],
        true
    );
}

/// The hand-over of a live migration between two daemons on one image: the destination's
/// bdev is created `--incoming` while the source writes, waits, and takes the write role
/// when its vhost device starts, after the source's device stopped (here: its frontend
/// disconnected) and gave the role up. `incoming` is kept in the saved configuration.
#[test]
fn incoming_bdev_takes_the_write_role_over() {
    let src = Daemon::start();
    let dst = Daemon::start();
    let root = src.tmp_dir().join("pools");
    let root_s = root.to_str().unwrap().to_string();
    ok(&root, &["pool", "create", "local:p"]);
    ok(&root, &["image", "create", "local:p/vm", "-s", "16"]);
    let local = |d: &Daemon| {
        d.rpc_ok("bdev_get_bdevs", json!({"name": "Local0"}))[0]["driver_specific"]["local"].clone()
    };
    src.rpc_ok(
        "bdev_local_create",
        json!({"pool": "p", "image": "vm", "pool_dir": root_s}),
    );
    src.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "Local0"}),
    );
    let sock = src.socket_dir().join("vhost.0");
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, MIB as usize).unwrap();
    pattern(&mut c.buf()[..65536], 0, 7);
    let written = c.buf()[..65536].to_vec();
    assert_eq!(c.write(0, MIB, 65536), 0);

    // Without --incoming the destination is refused, as any second writer.
    let (code, msg) = dst
        .rpc(
            "bdev_local_create",
            json!({"pool": "p", "image": "vm", "pool_dir": root_s}),
        )
        .unwrap_err();
    assert_eq!(code, -(libc::EBUSY as i64), "{msg}");
    let out = dst.blockctl(&[
        "bdev_local_create",
        "-p",
        "p",
        "vm",
        "--pool-dir",
        &root_s,
        "--incoming",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(local(&dst)["incoming"], true);
    assert_eq!(local(&dst)["write_role"], false);
    assert_eq!(local(&src)["write_role"], true);
    let cfg = dst.rpc_ok("framework_get_config", json!({"name": "bdev"}));
    let entry = cfg
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["method"] == "bdev_local_create")
        .expect("bdev_local_create in the bdev config")
        .clone();
    assert_eq!(entry["params"]["incoming"], true);
    // Read-only and incoming contradict each other.
    let (code, _) = dst
        .rpc(
            "bdev_local_create",
            json!({"name": "X", "pool": "p", "image": "vm", "pool_dir": root_s,
                   "incoming": true, "readonly": true}),
        )
        .unwrap_err();
    assert_eq!(code, -32602);

    // The source's device stops (its frontend goes): it syncs and hands the role over.
    drop(c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while local(&src)["write_role"] == true {
        assert!(
            std::time::Instant::now() < deadline,
            "the source kept the role"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The destination's device starts: it takes the role, reads what the source wrote,
    // and writes.
    dst.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.1", "dev_name": "Local0"}),
    );
    let sock = dst.socket_dir().join("vhost.1");
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, MIB as usize).unwrap();
    assert_eq!(c.read(0, MIB, 65536), 0);
    assert!(
        c.buf()[..65536] == written[..],
        "the source's write is missing"
    );
    assert_eq!(local(&dst)["write_role"], true);
    pattern(&mut c.buf()[..65536], 0, 8);
    assert_eq!(c.write(0, 2 * MIB, 65536), 0);
    assert_eq!(c.flush(0), 0);
    assert_eq!(local(&src)["write_role"], false);
    // The image stays in use while either serves it.
    fails(&root, &["image", "rm", "local:p/vm"], "served");
    // The source's device cannot start again while the destination writes.
    let sock = src.socket_dir().join("vhost.0");
    assert!(BlkClient::connect(sock.to_str().unwrap(), 1, MIB as usize).is_err());
    assert!(
        src.log()
            .contains("activating bdev Local0: image p/vm is being written by another instance"),
        "{}",
        src.log()
    );
    // And back: the destination's device stops, the source (waiting since it gave the
    // role up) starts and reads the destination's write.
    drop(c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while local(&dst)["write_role"] == true {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination kept the role"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, MIB as usize).unwrap();
    let mut expected = vec![0u8; 65536];
    pattern(&mut expected, 0, 8);
    assert_eq!(c.read(0, 2 * MIB, 65536), 0);
    assert!(
        c.buf()[..65536] == expected[..],
        "the destination's write is missing"
    );
    assert_eq!(c.write(0, 3 * MIB, 65536), 0);
    assert_eq!(local(&src)["write_role"], true);
}
