//! blockd's vhost-user-scsi controllers serving a real Linux guest (virtio_scsi + sd):
//! controllers made through RPC as a user would, disk geometry as sd sees it, data
//! checked in the host file, `blkdiscard` arriving as SCSI UNMAP, and targets hot-added
//! and hot-removed while the guest runs (TRANSPORT_RESET events, virtio 1.2 §5.6.6.3.1),
//! and a read-only bdev seen by sd as a write-protected disk.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Daemon;
use guest::{
    assert_region_in_file, read_at, sha256_hex, write_host_pattern, Disk, Guest, GuestOpts,
    GuestRun,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(60);

/// An aio bdev (with `fallocate`, so UNMAP is offered) on a new sparse image.
fn aio_bdev(d: &Daemon, name: &str, block_size: u32, size: u64) -> PathBuf {
    let image = d.tmp_dir().join(format!("{name}.img"));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .unwrap();
    d.rpc_ok(
        "bdev_aio_create",
        json!({"filename": image.to_str().unwrap(), "name": name, "block_size": block_size,
               "fallocate": true}),
    );
    image
}

/// A scsi controller with `bdev` as target 0; its socket.
fn scsi_controller(d: &Daemon, ctrlr: &str, bdev: &str) -> PathBuf {
    scsi_controller_with(d, ctrlr, bdev, false)
}

/// [`scsi_controller`], offering packed virtqueues when `packed`.
fn scsi_controller_with(d: &Daemon, ctrlr: &str, bdev: &str, packed: bool) -> PathBuf {
    d.rpc_ok(
        "vhost_create_scsi_controller",
        json!({"ctrlr": ctrlr, "cpumask": "0x1", "packed_ring": packed}),
    );
    let t = d.rpc_ok(
        "vhost_scsi_controller_add_target",
        json!({"ctrlr": ctrlr, "scsi_target_num": 0, "bdev_name": bdev}),
    );
    assert_eq!(t, 0);
    d.socket_dir().join(ctrlr)
}

fn iostat(d: &Daemon, bdev: &str) -> Value {
    d.rpc_ok("bdev_get_iostat", json!({"name": bdev}))["bdevs"][0].clone()
}

/// The range was punched out of the sparse file (no data between offset and offset+len).
fn assert_hole(image: &Path, off: u64, len: u64) {
    let f = std::fs::File::open(image).unwrap();
    // SAFETY: lseek on a valid fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    assert!(
        data < 0 || data as u64 >= off + len,
        "discarded range {off}+{len} still allocated in {}: data at {data}",
        image.display()
    );
}

fn check_sda(run: &GuestRun, d: &Daemon, bdev: &str, image: &Path, block_size: u64) {
    assert_eq!(run.require_u64("sda.size"), 64 * MIB / 512);
    assert_eq!(run.require_u64("sda.logical_block_size"), block_size);
    assert_eq!(run.require("sda.ro"), "0");
    assert_eq!(run.require("sda.provisioning_mode"), "unmap");
    assert!(run.require_u64("sda.discard_max_bytes") > 0);
    assert_region_in_file(run, "sda", "direct", image);
    assert_region_in_file(run, "sda", "buffered", image);
    assert_eq!(run.require("sda.discard"), "ok");
    let (off, len) = run.region("sda", "discard");
    assert_hole(image, off, len);
    let st = iostat(d, bdev);
    assert!(st["num_unmap_ops"].as_u64().unwrap() > 0, "{st}");
}

#[test]
fn scsi_disk_512_and_4k() {
    let d = Daemon::start();
    for (bs, name) in [(512u32, "s512"), (4096, "s4k")] {
        let image = aio_bdev(&d, name, bs, 64 * MIB);
        let sock = scsi_controller(&d, &format!("vhost.{name}"), name);
        let opts = GuestOpts::new("scsi", d.tmp_dir().join(name))
            .arg("dev", "sd")
            .disk(Disk::scsi(&sock, 1));
        let run = Guest::boot(&opts).expect("booting the guest");
        eprintln!("scsi {name}: {:.1?}\n{}", run.elapsed, run.command_line);
        run.assert_ok();
        check_sda(&run, &d, name, &image, bs as u64);
    }
}

#[test]
fn scsi_target_hot_add_and_remove() {
    hot_add_and_remove(false);
}

/// The same on packed virtqueues (virtio 1.2 §2.8, QEMU's `packed=on`): the request,
/// control and event queues (the hot-plug events) all packed.
#[test]
fn scsi_packed_virtqueues_with_hot_plug() {
    hot_add_and_remove(true);
}

fn hot_add_and_remove(packed: bool) {
    let d = Daemon::start();
    let image = aio_bdev(&d, "t0", 512, 64 * MIB);
    let hot = aio_bdev(&d, "t1", 4096, 32 * MIB);
    let sock = scsi_controller_with(&d, "vhost.hp", "t0", packed);
    let disk = Disk::scsi(&sock, 2);
    let opts = GuestOpts::new("scsi", d.tmp_dir().join("g"))
        .arg("dev", "sd")
        .arg("hotplug", "1")
        .disk(if packed { disk.packed() } else { disk });
    let (mut g, _) = Guest::spawn_until(&opts, "BLOCKD-WAIT hotadd", WAIT).unwrap();
    let t = d.rpc_ok(
        "vhost_scsi_controller_add_target",
        json!({"ctrlr": "vhost.hp", "scsi_target_num": 1, "bdev_name": "t1"}),
    );
    assert_eq!(t, 1);
    g.wait_for("BLOCKD-WAIT hotremove", WAIT).unwrap();
    d.rpc_ok(
        "vhost_scsi_controller_remove_target",
        json!({"ctrlr": "vhost.hp", "scsi_target_num": 1}),
    );
    let run = g.finish(WAIT).unwrap();
    eprintln!("scsi hot-plug: {:.1?}\n{}", run.elapsed, run.command_line);
    run.assert_ok();
    let negotiated = if packed { "1" } else { "0" };
    assert_eq!(run.require("sda.ring_packed"), negotiated);
    check_sda(&run, &d, "t0", &image, 512);
    assert_eq!(run.require_u64("sdb.size"), 32 * MIB / 512);
    assert_eq!(run.require_u64("sdb.logical_block_size"), 4096);
    assert_region_in_file(&run, "sdb", "hot", &hot);
    assert_eq!(run.require("sdb.removed"), "yes");
    assert_region_in_file(&run, "sda", "after", &image);
    // The removed target's bdev is free again.
    assert_eq!(
        d.rpc_ok("bdev_get_bdevs", json!({"name": "t1"}))[0]["claimed"],
        false
    );
}

#[test]
fn scsi_read_only_lun() {
    let d = Daemon::start();
    let image = d.tmp_dir().join("ro.img");
    let host = write_host_pattern(&image, 64 * MIB);
    d.rpc_ok(
        "bdev_aio_create",
        json!({"filename": image.to_str().unwrap(), "name": "ro", "block_size": 512,
               "readonly": true}),
    );
    let sock = scsi_controller(&d, "vhost.ro", "ro");
    let opts = GuestOpts::new("readonly", d.tmp_dir().join("g"))
        .arg("dev", "sd")
        .disk(Disk::scsi(&sock, 1));
    let run = Guest::boot(&opts).expect("booting the guest");
    eprintln!("scsi read-only: {:.1?}\n{}", run.elapsed, run.command_line);
    run.assert_ok();
    // MODE SENSE's WP bit made sd mark the disk read-only; the write the guest forced
    // through O_DIRECT anyway came back as DATA PROTECT.
    assert_eq!(run.require("sda.ro"), "1");
    assert_eq!(run.require("sda.write"), "rejected");
    assert_eq!(
        run.require(&format!("sda.read.sha256.0+{MIB}")),
        sha256_hex(&host),
        "the guest read other data than the image holds"
    );
    assert_eq!(
        read_at(&image, 0, MIB).unwrap(),
        host,
        "read-only image changed"
    );
    assert_eq!(iostat(&d, "ro")["num_write_ops"], 0);
}
