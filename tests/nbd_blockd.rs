//! The NBD frontend of a real `blockd`, managed only with `blockctl`: a sparse raw file
//! copied into an aio export with `qemu-img convert`, compared with `qemu-img compare`,
//! its allocation map (`nbdinfo --map`) checked against `SEEK_DATA`/`SEEK_HOLE` of the
//! backing file; malloc and thin RBD images mapped too; export removal refused while a
//! client holds a connection.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[path = "common/ceph.rs"]
mod ceph;
mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// blockctl must succeed; returns its stdout.
fn ctl(d: &Daemon, args: &[&str]) -> String {
    let o = d.blockctl(args);
    assert!(
        o.status.success(),
        "blockctl {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn ctl_json(d: &Daemon, args: &[&str]) -> Value {
    let out = ctl(d, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("blockctl {args:?}: {e}: {out}"))
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// `nbdinfo --map --json`: (offset, length, type) with type 0 = data, 3 = hole+zero.
fn nbd_map(sock: &Path, export: &str) -> Vec<(u64, u64, u64)> {
    let o = run(Command::new("nbdinfo").args(["--map", "--json", &uri(sock, export)]));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The same map computed from `SEEK_DATA`/`SEEK_HOLE` on the file, independently of blockd.
fn seek_map(path: &Path, size: u64) -> Vec<(u64, u64, u64)> {
    let f = std::fs::File::open(path).unwrap();
    let seek = |pos: u64, whence| {
        // SAFETY: lseek on an open file.
        let r = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, whence) };
        if r < 0 {
            size
        } else {
            (r as u64).min(size)
        }
    };
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = seek(pos, libc::SEEK_DATA);
        if data > pos {
            out.push((pos, data - pos, 3));
        }
        if data >= size {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE);
        out.push((data, hole - data, 0));
        pos = hole;
    }
    out
}

/// Connects to `export` with a raw socket and completes NBD_OPT_GO: a client that stays.
fn hold_connection(sock: &Path, export: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut o = b"IHAVEOPT".to_vec();
    o.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    o.extend_from_slice(&(d.len() as u32).to_be_bytes());
    o.extend_from_slice(&d);
    s.write_all(&o).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        match typ {
            1 => return s, // NBD_REP_ACK
            3 => {}        // NBD_REP_INFO
            t => panic!("NBD_OPT_GO on {export}: reply {t:#x}"),
        }
    }
}

fn clients(d: &Daemon, export: &str) -> u64 {
    ctl_json(d, &["nbd_get_exports", "-n", export])[0]["clients"]
        .as_u64()
        .unwrap()
}

fn wait_clients(d: &Daemon, export: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while clients(d, export) != n {
        assert!(Instant::now() < deadline, "{export} never had {n} clients");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A 32 MiB sparse file: data at [1 MiB, 1.25 MiB) and [8 MiB, 12 MiB), holes elsewhere.
fn sparse_source(path: &Path) -> u64 {
    let size = 32 * MIB;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let pat = |len: u64, seed: u64| -> Vec<u8> {
        (0..len)
            .map(|i| ((i / 512 + seed) % 251 + 1) as u8)
            .collect()
    };
    f.write_all_at(&pat(256 * 1024, 1), MIB).unwrap();
    f.write_all_at(&pat(4 * MIB, 7), 8 * MIB).unwrap();
    f.sync_all().unwrap();
    size
}

#[test]
fn aio_export_through_blockctl_convert_compare_map_remove() {
    for t in ["qemu-img", "nbdinfo"] {
        if !have(t) {
            eprintln!("SKIP: {t} not installed (scripts/install-deps.sh)");
            return;
        }
    }
    let d = Daemon::start();
    let dir = d.tmp_dir().to_path_buf();
    let src = dir.join("src.raw");
    let size = sparse_source(&src);
    let dst = dir.join("dst.raw");
    std::fs::File::create(&dst).unwrap().set_len(size).unwrap();
    let sock = dir.join("nbd.sock");
    let sock_s = sock.display().to_string();

    ctl(
        &d,
        &[
            "bdev_aio_create",
            dst.to_str().unwrap(),
            "Disk0",
            "512",
            "--fallocate",
        ],
    );
    ctl(&d, &["nbd_server_start", "--unix-path", &sock_s]);
    assert_eq!(
        ctl(&d, &["nbd_export_add", "Disk0", "-n", "disk"]).trim(),
        "disk"
    );
    assert_eq!(
        ctl_json(&d, &["nbd_get_exports"]),
        serde_json::json!([{"name": "disk", "bdev_name": "Disk0", "readonly": false,
                            "clients": 0}])
    );
    // No kernel devices; SPDK's disk commands reach the daemon with rpc.py's arguments.
    assert_eq!(ctl_json(&d, &["nbd_get_disks"]), serde_json::json!([]));
    let o = d.blockctl(&["nbd_stop_disk", "/dev/nbd15"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("/dev/nbd15"),
        "{o:?}"
    );
    let o = d.blockctl(&["nbd_get_disks", "-n", "/dev/nbd15"]);
    assert!(!o.status.success(), "{o:?}");

    // A fresh sparse target is all hole.
    assert_eq!(nbd_map(&sock, "disk"), vec![(0, size, 3)]);

    run(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &uri(&sock, "disk"),
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &uri(&sock, "disk"),
    ]));

    // The export's map is exactly the backing file's, and has the source's holes.
    let map = nbd_map(&sock, "disk");
    assert_eq!(map, seek_map(&dst, size));
    assert_eq!(map, seek_map(&src, size), "qemu-img convert kept the holes");
    assert!(map.iter().any(|e| e.2 == 3) && map.iter().any(|e| e.2 == 0));

    // Removal is refused while a client is attached, and says why.
    let mut held = hold_connection(&sock, "disk");
    wait_clients(&d, "disk", 1);
    let o = d.blockctl(&["nbd_export_remove", "disk"]);
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Device or resource busy") && err.contains("disk"),
        "{err}"
    );
    assert_eq!(clients(&d, "disk"), 1);
    // --force disconnects it (the held socket sees EOF) and removes the export.
    ctl(&d, &["nbd_export_remove", "disk", "--force"]);
    let mut b = [0u8; 16];
    assert!(matches!(held.read(&mut b), Ok(0) | Err(_)));
    assert_eq!(ctl_json(&d, &["nbd_get_exports"]), serde_json::json!([]));
    // The bdev is free again: it can be deleted.
    ctl(&d, &["nbd_server_stop"]);
    assert!(!sock.exists(), "the unix socket is removed on stop");
    let o = d.blockctl(&["nbd_server_stop"]);
    assert!(!o.status.success(), "second stop: {o:?}");
    ctl(&d, &["bdev_aio_delete", "Disk0"]);
}

#[test]
fn malloc_is_all_data_and_thin_rbd_maps_per_object() {
    if !have("nbdinfo") || !have("qemu-io") {
        eprintln!("SKIP: nbdinfo/qemu-io not installed (scripts/install-deps.sh)");
        return;
    }
    // The cluster first: the fixture exports CEPH_CONF, which the daemon must inherit.
    let ceph_conf = ceph::conf();
    let d = Daemon::start();
    let sock = d.tmp_dir().join("nbd.sock");
    ctl(
        &d,
        &["nbd_server_start", "--unix-path", sock.to_str().unwrap()],
    );
    ctl(&d, &["bdev_malloc_create", "-b", "Mal0", "8", "512"]);
    ctl(&d, &["nbd_export_add", "Mal0"]);
    assert_eq!(nbd_map(&sock, "Mal0"), vec![(0, 8 * MIB, 0)]);

    let Some(conf) = ceph_conf else {
        eprintln!("SKIP rbd part: Ceph is not installed");
        return;
    };
    let image = ceph::unique("nbdmap");
    let spec = format!("{}/{image}", ceph::POOL);
    ceph::rbd_cli(&conf, &["create", "--size", "32M", &spec]);
    ctl(
        &d,
        &["bdev_rbd_create", "-b", "Rbd0", ceph::POOL, &image, "512"],
    );
    ctl(&d, &["nbd_export_add", "Rbd0", "-n", "thin"]);
    // A fresh image has no objects.
    assert_eq!(nbd_map(&sock, "thin"), vec![(0, 32 * MIB, 3)]);
    // 4 KiB written into the third 4 MiB object allocates that object, and only it.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 90 9M 4k",
        &uri(&sock, "thin"),
    ]));
    assert_eq!(
        nbd_map(&sock, "thin"),
        vec![
            (0, 8 * MIB, 3),
            (8 * MIB, 4 * MIB, 0),
            (12 * MIB, 20 * MIB, 3)
        ]
    );
    ctl(&d, &["nbd_export_remove", "thin"]);
    ctl(&d, &["bdev_rbd_delete", "Rbd0"]);
    ceph::rbd_cli(&conf, &["rm", "--no-progress", &spec]);
}
