//! RBD tests against a real single-node Ceph cluster.
//!
//! The cluster comes from tests/common/ceph.rs (`$CEPH_CONF`, or one started by
//! scripts/ceph-cluster.sh). Without Ceph binaries every test prints a SKIP line and passes.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd::bdev::rbd::cluster::ClusterConfig;
use blockd::bdev::rbd::{RbdBdevConfig, RbdState};
use blockd::bdev::{Bdev, IoOp, IoVecs};
use blockd::rbd::{ConnectOptions, CreateOptions, Rados};

#[path = "common/ceph.rs"]
mod ceph;
#[path = "common/rbd.rs"]
mod rbd;
use ceph::{unique, POOL};
use rbd::*;

/// blockd's connections start librbd's cache without the write-through-until-flush guard
/// (the frontends keep drivers that cannot flush write-through), unless `config` asks.
#[test]
fn connections_drop_the_writethrough_until_flush_guard() {
    let conf = need_ceph!();
    let key = "rbd_cache_writethrough_until_flush";
    assert_eq!(connect(&conf).conf_get(key).unwrap(), "false");
    let kept = Rados::connect(&ConnectOptions {
        config_file: Some(conf.to_path_buf()),
        config: BTreeMap::from([(key.to_string(), "true".to_string())]),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(kept.conf_get(key).unwrap(), "true");
    assert_eq!(
        kept.conf_get("no_such_option").unwrap_err().errno,
        libc::ENOENT
    );
}

/// blockd's connections turn librbd's cache off (its default `writearound` policy completes
/// writes still in blockd's process, which a crash of blockd would lose), unless `config`
/// chooses a cache. What the setting buys is shown by tests/guest_restart.rs on RBD.
#[test]
fn connections_turn_the_librbd_cache_off_unless_configured() {
    let conf = need_ceph!();
    assert_eq!(connect(&conf).conf_get("rbd_cache").unwrap(), "false");
    let chosen = Rados::connect(&ConnectOptions {
        config_file: Some(conf.to_path_buf()),
        config: BTreeMap::from([("rbd_cache_policy".to_string(), "writeback".to_string())]),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(chosen.conf_get("rbd_cache").unwrap(), "true");
    assert_eq!(chosen.conf_get("rbd_cache_policy").unwrap(), "writeback");
}

#[test]
fn bindings_create_stat_resize_remove() {
    let conf = need_ceph!();
    let r = connect(&conf);
    assert!(r.pool_list().unwrap().contains(&POOL.to_string()));
    let io = r.ioctx(POOL).unwrap();
    let name = unique("life");
    io.create_image(&name, 8 << 20, &CreateOptions::default())
        .unwrap();
    assert!(io.list_images().unwrap().contains(&name));
    let e = io
        .create_image(&name, 8 << 20, &CreateOptions::default())
        .unwrap_err();
    assert_eq!(e.errno, libc::EEXIST, "{e}");
    {
        let img = io.open(&name, None).unwrap();
        let info = img.info().unwrap();
        assert_eq!(info.size, 8 << 20);
        assert_eq!(info.order, 22);
        assert_eq!(info.num_objs, 2);
        assert!(info.block_name_prefix.starts_with("rbd_data."), "{info:?}");
        assert!(
            blockd::rbdcli::present::feature_names(info.features).contains(&"layering"),
            "{info:?}"
        );
        img.resize(16 << 20).unwrap();
        assert_eq!(img.size().unwrap(), 16 << 20);
        // The rbd tool sees the same image.
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&conf)
            .args(["info", "--format", "json", &format!("{POOL}/{name}")])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["size"], 16 << 20);
        assert_eq!(v["block_name_prefix"], info.block_name_prefix.as_str());
    }
    io.remove_image(&name).unwrap();
    assert!(!io.list_images().unwrap().contains(&name));
    let e = io.open(&name, None).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
}

#[test]
fn missing_image_is_enoent_with_its_name() {
    let rbd = RbdState::default();
    let conf = need_ceph!();
    let r = connect(&conf);
    let e = r.ioctx(POOL).unwrap().open("nosuch", None).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(e.message, "image testpool/nosuch not found");
    let e = r.ioctx("nosuchpool").unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(e.message, "pool nosuchpool not found");
    // Through the bdev layer, with the default connection (CEPH_CONF).
    let e = rbd
        .create(RbdBdevConfig {
            name: unique("nosuch"),
            pool_name: POOL.into(),
            rbd_name: "nosuch".into(),
            block_size: 512,
            ..Default::default()
        })
        .err()
        .unwrap();
    assert_eq!(e.errno, libc::ENOENT);
    assert_eq!(e.message, "image testpool/nosuch not found");
}

#[test]
fn bad_keyring_is_permission_denied_naming_the_cluster() {
    let rbd = RbdState::default();
    let conf = need_ceph!();
    let dir = tempfile::tempdir().unwrap();
    let kr = dir.path().join("bad.keyring");
    // A well-formed key that the cluster does not know.
    std::fs::write(
        &kr,
        "[client.admin]\n\tkey = AQBQ3ZVmAAAAABAAx1FJ6m7nLpNRSnC5fRBT+Q==\n",
    )
    .unwrap();
    let t = Instant::now();
    let e = Rados::connect(&ConnectOptions {
        label: "badcluster".into(),
        config_file: Some(conf.clone()),
        key_file: Some(kr.clone()),
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(
        e.errno == libc::EACCES || e.errno == libc::EPERM,
        "errno {}: {e}",
        e.errno
    );
    assert_eq!(
        e.message,
        "permission denied connecting to cluster badcluster as client.admin"
    );
    assert!(t.elapsed() < Duration::from_secs(20));
    // Registering a cluster with that keyring fails the same way and registers nothing.
    let name = unique("bad");
    let e = rbd
        .clusters
        .register(ClusterConfig {
            name: name.clone(),
            config_file: Some(conf.display().to_string()),
            key_file: Some(kr.display().to_string()),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.message.contains(&format!("cluster {name}")), "{e}");
    assert_eq!(
        rbd.clusters.info(Some(&name)).unwrap_err().errno,
        libc::ENOENT
    );
}

fn register_test_cluster(rbd: &RbdState, conf: &Path) -> String {
    let name = unique("cl");
    rbd.clusters
        .register(ClusterConfig {
            name: name.clone(),
            config_file: Some(conf.display().to_string()),
            connections: Some(2),
            ..Default::default()
        })
        .unwrap();
    name
}

fn make_bdev(rbd: &RbdState, conf: &Path, cluster: Option<&str>, size: u64) -> (Arc<Bdev>, String) {
    let r = connect(conf);
    let image = unique("bdev");
    r.ioctx(POOL)
        .unwrap()
        .create_image(&image, size, &CreateOptions::default())
        .unwrap();
    let bdev = rbd
        .create(RbdBdevConfig {
            name: unique("Ceph"),
            pool_name: POOL.into(),
            rbd_name: image.clone(),
            block_size: 4096,
            cluster_name: cluster.map(String::from),
            ..Default::default()
        })
        .unwrap();
    (bdev, image)
}

#[test]
fn channel_write_read_discard_zeroes_flush() {
    let rbd = RbdState::default();
    let conf = need_ceph!();
    let cl = register_test_cluster(&rbd, &conf);
    let (bdev, image) = make_bdev(&rbd, &conf, Some(&cl), 8 << 20);
    assert_eq!(bdev.num_blocks(), 2048);
    let j = bdev.to_json();
    assert_eq!(j["product_name"], "Ceph Rbd Disk");
    assert_eq!(j["driver_specific"]["rbd"]["pool_name"], POOL);
    assert_eq!(j["driver_specific"]["rbd"]["rbd_name"], image.as_str());
    assert_eq!(j["driver_specific"]["rbd"]["cluster_name"], cl.as_str());
    let (m, p) = bdev.backend().config(&bdev).unwrap();
    assert_eq!(m, "bdev_rbd_create");
    assert_eq!(p["block_size"], 4096);

    // Unregistering a cluster in use is refused, naming the bdev.
    let e = rbd.clusters.unregister(&cl).unwrap_err();
    assert_eq!(e.errno, libc::EBUSY);
    assert!(e.message.contains(bdev.name()), "{e}");

    let mut ch = bdev.open_channel().unwrap();
    // Two-iovec write of 12 KiB at 1 MiB: pattern A then pattern B.
    let mut a = vec![0xA5u8; 8192];
    let mut b: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    let iovs = [iov(&mut a), iov(&mut b)];
    let w = IoOp::Write {
        offset: 1 << 20,
        // SAFETY: `a`, `b`, `iovs` outlive the I/O.
        iovs: unsafe { IoVecs::from_slice(&iovs) },
    };
    assert_eq!(io(&mut ch, 1, w), Ok(()));
    assert_eq!(io(&mut ch, 2, IoOp::Flush), Ok(()));

    // A second, independent open sees the data.
    let r = connect(&conf);
    let other = r.ioctx(POOL).unwrap().open(&image, None).unwrap();
    let mut got = vec![0u8; 12288];
    other.read_at(1 << 20, &mut got).unwrap();
    assert_eq!(&got[..8192], &a[..]);
    assert_eq!(&got[8192..], &b[..]);

    // Read it back through the channel into a three-iovec list.
    let mut r1 = vec![0u8; 4096];
    let mut r2 = vec![0u8; 4096];
    let mut r3 = vec![0u8; 4096];
    let riovs = [iov(&mut r1), iov(&mut r2), iov(&mut r3)];
    let rd = IoOp::Read {
        offset: 1 << 20,
        // SAFETY: as above.
        iovs: unsafe { IoVecs::from_slice(&riovs) },
    };
    assert_eq!(io(&mut ch, 3, rd), Ok(()));
    assert_eq!(r1, a[..4096]);
    assert_eq!(r2, a[4096..]);
    assert_eq!(r3, b);

    // Write zeroes over the first 4 KiB.
    let wz = IoOp::WriteZeroes {
        offset: 1 << 20,
        len: 4096,
        may_unmap: false,
    };
    assert_eq!(io(&mut ch, 4, wz), Ok(()));
    // Another client sees the zeroes (after a flush, which a cache turned on in `config`
    // would need).
    assert_eq!(io(&mut ch, 41, IoOp::Flush), Ok(()));
    other.read_at(1 << 20, &mut got).unwrap();
    assert!(got[..4096].iter().all(|x| *x == 0));
    assert_eq!(&got[4096..8192], &a[4096..]);
    assert_eq!(&got[8192..], &b[..]);
    // Discard the whole first object (librbd skips partial-object discards by default,
    // rbd_skip_partial_discard, which discard semantics allow).
    let um = IoOp::Unmap {
        offset: 0,
        len: 4 << 20,
    };
    assert_eq!(io(&mut ch, 5, um), Ok(()));
    assert_eq!(io(&mut ch, 51, IoOp::Flush), Ok(()));
    other.read_at(1 << 20, &mut got).unwrap();
    assert!(got.iter().all(|x| *x == 0));

    // Out of range: librbd's error comes back through reap.
    let mut big = vec![0u8; 4096];
    let biov = [iov(&mut big)];
    let oob = IoOp::Read {
        offset: 16 << 20,
        // SAFETY: as above.
        iovs: unsafe { IoVecs::from_slice(&biov) },
    };
    assert!(io(&mut ch, 6, oob).is_err());

    // Many in flight at once: all complete, each tag once.
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|i| vec![i as u8; 4096]).collect();
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter_mut().map(|b| [iov(b)]).collect();
    for (i, v) in iovs.iter().enumerate() {
        let op = IoOp::Write {
            offset: i as u64 * 4096,
            // SAFETY: `bufs`/`iovs` outlive the wait below.
            iovs: unsafe { IoVecs::from_slice(v) },
        };
        // SAFETY: as above.
        unsafe { ch.submit(100 + i as u64, op) };
    }
    ch.kick();
    let mut done = wait(&mut ch, 32);
    done.sort_by_key(|d| d.0);
    assert_eq!(
        done.iter().map(|d| d.0).collect::<Vec<_>>(),
        (100..132).collect::<Vec<_>>()
    );
    assert!(done.iter().all(|d| d.1.is_ok()));
    assert_eq!(io(&mut ch, 200, IoOp::Flush), Ok(()));
    other.read_at(31 * 4096, &mut got[..4096]).unwrap();
    assert!(got[..4096].iter().all(|x| *x == 31));

    drop(ch);
    drop(other);
    rbd.delete(bdev.name()).unwrap();
    drop(bdev);
    rbd.clusters.unregister(&cl).unwrap();
    r.ioctx(POOL).unwrap().remove_image(&image).unwrap();
}

#[test]
fn resize_from_rbd_cli_reaches_the_bdev() {
    let rbd = RbdState::default();
    let conf = need_ceph!();
    // No cluster: the bdev's own connection through CEPH_CONF.
    let (bdev, image) = make_bdev(&rbd, &conf, None, 8 << 20);
    let seen = Arc::new(AtomicU32::new(0));
    let s2 = seen.clone();
    bdev.subscribe_resize(Box::new(move |n| s2.store(n as u32, Ordering::SeqCst)));
    let t = Instant::now();
    rbd_cli(
        &conf,
        &["resize", "--size", "16M", &format!("{POOL}/{image}")],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while bdev.num_blocks() != 4096 {
        assert!(
            Instant::now() < deadline,
            "bdev still has {} blocks",
            bdev.num_blocks()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(seen.load(Ordering::SeqCst), 4096);
    eprintln!("resize seen after {:?}", t.elapsed());

    // bdev_rbd_resize: grows, refuses to shrink.
    rbd.resize(bdev.name(), 24).unwrap();
    assert_eq!(bdev.num_blocks(), 24 * 256);
    let e = rbd.resize(bdev.name(), 8).unwrap_err();
    assert_eq!(e.errno, libc::EINVAL);
    assert_eq!(
        connect(&conf)
            .ioctx(POOL)
            .unwrap()
            .open(&image, None)
            .unwrap()
            .size()
            .unwrap(),
        24 << 20
    );
    rbd.delete(bdev.name()).unwrap();
    drop(bdev);
    connect(&conf)
        .ioctx(POOL)
        .unwrap()
        .remove_image(&image)
        .unwrap();
}

#[test]
fn cli_import_export_snap_rollback_clone() {
    let conf = need_ceph!();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let orig = pattern(6 << 20, 1);
    std::fs::write(&src, &orig).unwrap();
    let img = format!("{POOL}/{}", unique("cli"));
    let s = |p: &Path| p.display().to_string();

    blockctl(&conf, &["pool", "ls"]).unwrap();
    blockctl(&conf, &["image", "import", &s(&src), &img]).unwrap();
    blockctl(&conf, &["image", "info", &img]).unwrap();
    let out = dir.path().join("out.img");
    blockctl(&conf, &["image", "export", "--overwrite", &img, &s(&out)]).unwrap();
    assert!(std::fs::read(&out).unwrap() == orig, "export differs");

    // Snapshot, overwrite, roll back.
    blockctl(&conf, &["image", "snap", "create", &format!("{img}@s1")]).unwrap();
    let other = dir.path().join("other.img");
    std::fs::write(&other, pattern(6 << 20, 99)).unwrap();
    {
        let im = open_image(&conf, &img);
        im.write_at(0, &pattern(1 << 20, 42)).unwrap();
    }
    blockctl(&conf, &["image", "export", "--overwrite", &img, &s(&out)]).unwrap();
    assert!(std::fs::read(&out).unwrap() != orig);
    blockctl(&conf, &["image", "snap", "rollback", &format!("{img}@s1")]).unwrap();
    blockctl(&conf, &["image", "export", "--overwrite", &img, &s(&out)]).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == orig,
        "rollback did not restore"
    );

    // Clone a protected snapshot: the child reads the parent's data.
    blockctl(&conf, &["image", "snap", "protect", &format!("{img}@s1")]).unwrap();
    blockctl(&conf, &["image", "snap", "ls", &img]).unwrap();
    let child = format!("{img}-child");
    blockctl(&conf, &["image", "clone", &format!("{img}@s1"), &child]).unwrap();
    blockctl(&conf, &["image", "export", "--overwrite", &child, &s(&out)]).unwrap();
    assert!(std::fs::read(&out).unwrap() == orig, "clone differs");
    // Parent of the clone shows in info; the snapshot cannot be unprotected while it exists.
    {
        let im = open_image(&conf, &child);
        assert_eq!(im.info().unwrap().parent, Some(format!("{img}@s1")));
    }
    assert!(blockctl(&conf, &["image", "snap", "unprotect", &format!("{img}@s1")]).is_err());

    // Resize and rm; errors name the image.
    blockctl(&conf, &["image", "resize", "--size", "8", &child]).unwrap();
    assert!(blockctl(&conf, &["image", "resize", "--size", "1", &child]).is_err());
    blockctl(&conf, &["image", "rm", &child]).unwrap();
    blockctl(&conf, &["image", "snap", "unprotect", &format!("{img}@s1")]).unwrap();
    let e = blockctl(&conf, &["image", "rm", &img]).unwrap_err();
    assert!(e.to_string().contains(&img), "{e}");
    blockctl(&conf, &["image", "snap", "rm", &format!("{img}@s1")]).unwrap();
    blockctl(&conf, &["image", "rm", &img]).unwrap();
    let e = blockctl(&conf, &["image", "info", &img]).unwrap_err();
    assert_eq!(e.to_string(), format!("image {img} not found"));

    // Create + ls.
    let small = unique("small");
    blockctl(
        &conf,
        &["image", "create", "--size", "4", &format!("{POOL}/{small}")],
    )
    .unwrap();
    let names = connect(&conf).ioctx(POOL).unwrap().list_images().unwrap();
    assert!(names.contains(&small));
    blockctl(&conf, &["image", "rm", &format!("{POOL}/{small}")]).unwrap();
}

#[test]
fn cluster_info_and_default_names_via_rpc() {
    let rbd = RbdState::default();
    let conf = need_ceph!();
    let mut p = BTreeMap::new();
    p.insert("rbd_cache".to_string(), "false".to_string());
    let name = unique("info");
    rbd.clusters
        .register(ClusterConfig {
            name: name.clone(),
            config_file: Some(conf.display().to_string()),
            config_param: Some(p),
            ..Default::default()
        })
        .unwrap();
    let v = rbd.clusters.info(Some(&name)).unwrap();
    assert_eq!(v["cluster_name"], name.as_str());
    assert_eq!(v["config_param"]["rbd_cache"], "false");
    let all = rbd.clusters.info(None).unwrap();
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["cluster_name"] == name.as_str()));
    let e = rbd
        .clusters
        .register(ClusterConfig {
            name: name.clone(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e.errno, libc::EEXIST);
    rbd.clusters.unregister(&name).unwrap();
}

#[test]
fn rpc_errors_carry_errno_and_names() {
    let conf = need_ceph!();
    let _ = conf;
    let daemon = common::in_process::InProcess::start("0x1");
    let app = &daemon.app;
    let call = |m: &str, p: serde_json::Value| app.rpc.call(app, m, Some(p));
    let e = call(
        "bdev_rbd_create",
        serde_json::json!({"pool_name": POOL, "rbd_name": "nosuch", "block_size": 512}),
    )
    .unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (-2, "image testpool/nosuch not found")
    );
    let e = call(
        "bdev_rbd_create",
        serde_json::json!({"pool_name": POOL, "rbd_name": "x", "block_size": 512,
                           "cluster_name": "nosuch"}),
    )
    .unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (-2, "cluster nosuch is not registered")
    );
    let e = call("bdev_rbd_create", serde_json::json!({"pool_name": POOL})).unwrap_err();
    assert_eq!(e.code, -32602);
    let e = call("bdev_rbd_delete", serde_json::json!({"name": "nosuch"})).unwrap_err();
    assert_eq!(e.code, -19);

    // Default name Ceph<N>, then delete.
    let image = unique("rpc");
    connect(&conf)
        .ioctx(POOL)
        .unwrap()
        .create_image(&image, 4 << 20, &CreateOptions::default())
        .unwrap();
    let n = call(
        "bdev_rbd_create",
        serde_json::json!({"pool_name": POOL, "rbd_name": image, "block_size": 512}),
    )
    .unwrap();
    assert!(n.as_str().unwrap().starts_with("Ceph"), "{n}");
    let b = app
        .bdevs
        .get(n.as_str().unwrap())
        .expect("published in app.bdevs");
    assert_eq!(b.to_json()["product_name"], "Ceph Rbd Disk");
    drop(b);
    assert_eq!(
        call(
            "bdev_rbd_resize",
            serde_json::json!({"name": n, "new_size": 8})
        )
        .unwrap(),
        true
    );
    assert_eq!(
        app.rbd.get(n.as_str().unwrap()).unwrap().num_blocks(),
        16384
    );
    assert_eq!(
        call("bdev_rbd_delete", serde_json::json!({"name": n})).unwrap(),
        true
    );
    assert!(app.bdevs.get(n.as_str().unwrap()).is_none());
    connect(&conf)
        .ioctx(POOL)
        .unwrap()
        .remove_image(&image)
        .unwrap();
}

/// A live migration's storage hand-over on RBD, in one process: two bdevs (two RADOS
/// clients) on one image. librbd's exclusive lock moves cooperatively both ways as each
/// writes in turn (blockd never takes it in a mode that refuses transitions), and
/// `activate` (`rbd_invalidate_cache`) makes a bdev with librbd's cache read what the
/// other wrote after it had cached the block.
#[test]
fn two_instances_hand_the_image_over() {
    let rbd = RbdState::default();
    let conf = need_ceph!();
    let r = connect(&conf);
    let image = unique("handover");
    r.ioctx(POOL)
        .unwrap()
        .create_image(&image, 8 << 20, &CreateOptions::default())
        .unwrap();
    let open = |cache: bool| {
        rbd.create(RbdBdevConfig {
            name: unique("Ceph"),
            pool_name: POOL.into(),
            rbd_name: image.clone(),
            block_size: 4096,
            config: cache.then(|| {
                BTreeMap::from([("rbd_cache_policy".to_string(), "writeback".to_string())])
            }),
            ..Default::default()
        })
        .unwrap()
    };
    // `a` has librbd's cache (writeback), as an operator may configure; `b` the default.
    let (a, b) = (open(true), open(false));
    a.activate().unwrap();
    b.activate().unwrap();
    let mut ca = a.open_channel().unwrap();
    let mut cb = b.open_channel().unwrap();
    let mut tag = 0;
    let mut write = |ch: &mut blockd::bdev::BdevChannel, block: u64, byte: u8| {
        let mut buf = vec![byte; 4096];
        let iovs = [iov(&mut buf)];
        let op = IoOp::Write {
            offset: block * 4096,
            // SAFETY: `buf`/`iovs` outlive the I/O (`io` waits for it).
            iovs: unsafe { IoVecs::from_slice(&iovs) },
        };
        tag += 2;
        assert_eq!(io(ch, tag, op), Ok(()), "write of {byte:#x}");
        assert_eq!(io(ch, tag + 1, IoOp::Flush), Ok(()));
    };
    let read = |ch: &mut blockd::bdev::BdevChannel, block: u64| -> u8 {
        let mut buf = vec![0xEEu8; 4096];
        let iovs = [iov(&mut buf)];
        let op = IoOp::Read {
            offset: block * 4096,
            // SAFETY: as above.
            iovs: unsafe { IoVecs::from_slice(&iovs) },
        };
        assert_eq!(io(ch, 1 << 40, op), Ok(()));
        assert!(buf.iter().all(|x| *x == buf[0]), "torn block {block}");
        buf[0]
    };
    let owners = || open_image(&conf, &format!("{POOL}/{image}")).lock_owners();
    // Writes alternate: each asks the other for the lock, which moves every time.
    let mut last_owner = None;
    for (round, byte) in [0x11u8, 0x22, 0x33, 0x44].into_iter().enumerate() {
        let (w, rd) = if round % 2 == 0 {
            (&mut ca, &mut cb)
        } else {
            (&mut cb, &mut ca)
        };
        write(w, 0, byte);
        assert_eq!(read(rd, 0), byte, "round {round}");
        let o = owners().unwrap();
        assert_eq!(o.len(), 1, "{o:?}");
        assert_ne!(
            last_owner.as_ref(),
            Some(&o[0]),
            "round {round}: the lock did not move"
        );
        last_owner = Some(o[0].clone());
    }
    // `a` caches block 1 while `b` holds the lock, then `b` writes it: `a`'s cache is stale
    // (nothing told it) until its device is activated, as on a migration's destination.
    assert_eq!(read(&mut ca, 1), 0);
    write(&mut cb, 1, 0x55);
    let before = read(&mut ca, 1);
    a.activate().unwrap();
    assert_eq!(read(&mut ca, 1), 0x55, "activate must drop the stale cache");
    assert_eq!(
        before, 0,
        "librbd's cache served the cached block (the case activate fixes)"
    );
    // The source's stop: deactivate flushes; the other side reads everything.
    write(&mut ca, 2, 0x66);
    a.deactivate().unwrap();
    b.activate().unwrap();
    assert_eq!(read(&mut cb, 2), 0x66);
    b.deactivate().unwrap();

    drop((ca, cb));
    for bdev in [&a, &b] {
        rbd.delete(bdev.name()).unwrap();
    }
    drop((a, b));
    r.ioctx(POOL).unwrap().remove_image(&image).unwrap();
}
