//! Online resize reaching a running guest: the host grows an aio bdev's file and calls
//! `bdev_aio_rescan`; blockd sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, QEMU raises the
//! virtio config-change interrupt and virtio_blk re-reads the capacity (virtio 1.2
//! §5.2.2) — no reboot. The guest then writes into the new space, checked on the host.

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::time::Duration;

use common::Daemon;
use guest::{assert_region_in_file, Disk, Guest, GuestOpts};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[test]
fn aio_rescan_grows_the_disk_of_a_running_guest() {
    let d = Daemon::start();
    let image = d.tmp_dir().join("grow.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 * MIB))
        .unwrap();
    d.rpc_ok(
        "bdev_aio_create",
        json!({"filename": image.to_str().unwrap(), "name": "grow", "block_size": 512}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.grow", "dev_name": "grow"}),
    );
    let sock = d.socket_dir().join("vhost.grow");
    let opts = GuestOpts::new("resize", d.tmp_dir().join("g")).disk(Disk::blk(&sock, 1));
    let (g, _) = Guest::spawn_until(&opts, "BLOCKD-WAIT resize", Duration::from_secs(60))
        .expect("guest never waited for the resize");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(96 * MIB))
        .unwrap();
    // blockctl, as an operator would.
    let out = d.blockctl(&["bdev_aio_rescan", "grow"]);
    assert!(
        out.status.success(),
        "blockctl bdev_aio_rescan: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = d.rpc_ok("bdev_get_bdevs", json!({"name": "grow"}));
    assert_eq!(b[0]["num_blocks"], 96 * MIB / 512);

    let run = g
        .finish(Duration::from_secs(60))
        .expect("finishing the guest");
    eprintln!("resize: {:.1?}\n{}", run.elapsed, run.command_line);
    run.assert_ok();
    assert_eq!(run.require_u64("vda.size"), 64 * MIB / 512);
    assert_eq!(run.require_u64("vda.size.after"), 96 * MIB / 512);
    assert!(run.require_u64("vda.capacity_change_logged") > 0);
    let (off, _) = run.region("vda", "grown");
    assert_eq!(off, 64 * MIB, "the pattern is not in the new space");
    assert_region_in_file(&run, "vda", "grown", &image);
    assert!(
        d.log().contains("notified=true"),
        "no config change was sent:\n{}",
        d.log()
    );
}

#[test]
fn aio_rescan_errors() {
    let d = Daemon::start();
    let e = d
        .rpc("bdev_aio_rescan", json!({"name": "nope"}))
        .unwrap_err();
    assert_eq!(e.0, -(libc::ENODEV as i64), "{e:?}");
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "m0", "num_blocks": 2048, "block_size": 512}),
    );
    assert!(d.rpc("bdev_aio_rescan", json!({"name": "m0"})).is_err());
    let image = d.tmp_dir().join("s.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(8 * MIB))
        .unwrap();
    d.rpc_ok(
        "bdev_aio_create",
        json!({"filename": image.to_str().unwrap(), "name": "s"}),
    );
    // Unchanged size: fine, nothing happens.
    assert_eq!(d.rpc_ok("bdev_aio_rescan", json!({"name": "s"})), true);
    // Shrinking an unclaimed bdev is allowed; a claimed one is refused (EBUSY).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .and_then(|f| f.set_len(4 * MIB))
        .unwrap();
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.s", "dev_name": "s"}),
    );
    let e = d.rpc("bdev_aio_rescan", json!({"name": "s"})).unwrap_err();
    assert_eq!(e.0, -(libc::EBUSY as i64), "{e:?}");
    d.rpc_ok("vhost_delete_controller", json!({"ctrlr": "vhost.s"}));
    assert_eq!(d.rpc_ok("bdev_aio_rescan", json!({"name": "s"})), true);
    let b = d.rpc_ok("bdev_get_bdevs", json!({"name": "s"}));
    assert_eq!(b[0]["num_blocks"], 4 * MIB / 512);
}
