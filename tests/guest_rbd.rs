//! A Ceph RBD image served to a real Linux guest over vhost-user-blk: an rbd bdev made
//! with `bdev_rbd_register_cluster` + `bdev_rbd_create` through RPC, one boot running the
//! `rbd` scenario (seed, discard of a whole object, write-zeroes, flush, online resize).
//! The data is checked on the host through `rbd export`; the discard through `rbd diff`
//! and `rbd du`; the resize is made with the `rbd` CLI and reaches the guest through the
//! image's update watch → `Bdev::set_num_blocks` → virtio config change.

#[path = "common/ceph.rs"]
mod ceph;
mod common;
#[path = "common/guest.rs"]
mod guest;

use std::path::Path;
use std::time::Duration;

use common::Daemon;
use guest::{assert_region_in_file, Disk, Guest, GuestOpts};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn json_of(out: std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("rbd printed no JSON")
}

/// Allocated extents of the image (`rbd diff`: what exists in RADOS).
fn extents(conf: &Path, spec: &str) -> Vec<(u64, u64)> {
    let v = json_of(ceph::rbd_cli(conf, &["diff", "--format", "json", spec]));
    v.as_array()
        .expect("rbd diff: array")
        .iter()
        .filter(|e| e["exists"] == "true" || e["exists"] == true)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn rbd_image_in_a_guest_seed_discard_flush_resize() {
    let Some(conf) = ceph::conf() else {
        eprintln!("SKIP: Ceph (ceph-mon, ceph-osd, rbd, librbd1) is not installed");
        return;
    };
    let image = ceph::unique("guest");
    let spec = format!("{}/{image}", ceph::POOL);
    ceph::rbd_cli(&conf, &["create", "--size", "64M", &spec]);

    let d = Daemon::start();
    let cluster = ceph::unique("cl");
    d.rpc_ok(
        "bdev_rbd_register_cluster",
        json!({"name": cluster, "config_file": conf.to_str().unwrap()}),
    );
    let bdev = d.rpc_ok(
        "bdev_rbd_create",
        json!({"name": "rbd0", "pool_name": ceph::POOL, "rbd_name": image, "block_size": 512,
               "cluster_name": cluster}),
    );
    assert_eq!(bdev, "rbd0");
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.rbd0", "dev_name": "rbd0"}),
    );
    let sock = d.socket_dir().join("vhost.rbd0");
    let opts = GuestOpts::new("rbd", d.tmp_dir().join("g")).disk(Disk::blk(&sock, 1));
    let (g, _) = Guest::spawn_until(&opts, "BLOCKD-WAIT resize", Duration::from_secs(90))
        .expect("guest never waited for the resize");
    ceph::rbd_cli(&conf, &["resize", "--size", "96M", &spec]);
    let run = g
        .finish(Duration::from_secs(60))
        .expect("finishing the guest");
    eprintln!("rbd: {:.1?}\n{}", run.elapsed, run.command_line);
    run.assert_ok();

    assert_eq!(run.require_u64("vda.size"), 64 * MIB / 512);
    assert_eq!(run.require_u64("vda.size.after"), 96 * MIB / 512);
    assert!(run.require_u64("vda.discard_max_bytes") > 0);
    assert_eq!(run.require("vda.discard.verify"), "ok");
    assert_eq!(run.require("vda.zeroout.verify"), "ok");
    assert_eq!(run.require("vda.sync"), "ok");
    let st = &d.rpc_ok("bdev_get_iostat", json!({"name": "rbd0"}))["bdevs"][0];
    for op in ["num_unmap_ops", "num_flush_ops"] {
        assert!(st[op].as_u64().unwrap() > 0, "no {op}: {st}");
    }

    // The bytes, as another client of the cluster sees them.
    let export = d.tmp_dir().join("export.img");
    ceph::rbd_cli(&conf, &["export", &spec, export.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&export).unwrap().len(), 96 * MIB);
    for tag in ["direct", "buffered", "flush", "grown"] {
        assert_region_in_file(&run, "vda", tag, &export);
    }
    assert_eq!(run.region("vda", "grown").0, 64 * MIB);
    // The discarded object (16..20 MiB) is gone from RADOS; what was written remains.
    let ext = extents(&conf, &spec);
    let (lo, hi) = (16 * MIB, 20 * MIB);
    assert!(
        !ext.iter().any(|&(o, l)| o < hi && o + l > lo),
        "discarded object still allocated: {ext:?}"
    );
    assert!(ext.iter().any(|&(o, _)| o == 0), "{ext:?}");
    let du = json_of(ceph::rbd_cli(&conf, &["du", "--format", "json", &spec]));
    let used = du["images"][0]["used_size"]
        .as_u64()
        .expect("rbd du used_size");
    // `rbd du` counts whole 4 MiB objects (object map): the guest wrote into objects
    // 0, 2, 4, 8, 10 and 16 (direct, buffered, object, zero, flush, grown); object 4 went.
    const OBJECT: u64 = 4 * MIB;
    assert!(
        used > 0 && used <= 5 * OBJECT,
        "rbd du: {used} bytes used, expected at most the 5 objects left after the discard"
    );

    d.rpc_ok("vhost_delete_controller", json!({"ctrlr": "vhost.rbd0"}));
    d.rpc_ok("bdev_rbd_delete", json!({"name": "rbd0"}));
    ceph::rbd_cli(&conf, &["rm", "--no-progress", &spec]);
}
