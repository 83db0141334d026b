//! Tests of the local pool on real files in a temporary root.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::meta::{rfc3339, ImageMeta, ParentRef};
use super::*;

const MIB: u64 = 1 << 20;

fn setup() -> (tempfile::TempDir, Pool) {
    let d = tempfile::tempdir().unwrap();
    let root = PoolRoot::new(d.path().join("pools"));
    let pool = root.create_pool("p").unwrap();
    (d, pool)
}

fn write(pool: &Pool, image: &str, off: u64, data: &[u8]) {
    let f = File::options()
        .write(true)
        .open(pool.data_path(image))
        .unwrap();
    f.write_all_at(data, off).unwrap();
}

fn read(pool: &Pool, image: &str, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    File::open(pool.data_path(image))
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

fn noop() -> impl FnMut(u64) {
    |_| {}
}

#[test]
fn metadata_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("vm.json");
    let mut m = ImageMeta::new("vm", 5 * MIB);
    m.parent = Some(ParentRef {
        pool: "a".into(),
        image: "b".into(),
        snapshot: "c".into(),
    });
    m.store(&path).unwrap();
    assert_eq!(ImageMeta::load(&path).unwrap(), m);
    // Atomic write leaves no temporary file behind.
    let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
    std::fs::write(&path, b"{not json").unwrap();
    assert!(matches!(ImageMeta::load(&path), Err(Error::Corrupt { .. })));
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
}

#[test]
fn names_are_checked() {
    for bad in ["", ".x", "a/b", "a@b", "a b", &"x".repeat(201)] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
    check_name("vm-1_a.b").unwrap();
    let (_d, pool) = setup();
    let e = pool.create_image("../evil", MIB).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
}

#[test]
fn pools_and_images() {
    let (_d, pool) = setup();
    let root = pool.root().clone();
    assert_eq!(root.create_pool("p").unwrap_err().errno(), libc::EEXIST);
    root.create_pool("q").unwrap();
    assert_eq!(root.list_pools().unwrap(), ["p", "q"]);
    assert_eq!(root.pool("nope").unwrap_err().errno(), libc::ENOENT);
    pool.create_image("b", 8 * MIB).unwrap();
    pool.create_image("a", MIB).unwrap();
    assert_eq!(
        pool.create_image("a", MIB).unwrap_err().errno(),
        libc::EEXIST
    );
    assert_eq!(pool.list_images().unwrap(), ["a", "b"]);
    let i = pool.info("b").unwrap();
    assert_eq!((i.size, i.used, i.snapshot_count), (8 * MIB, 0, 0));
    assert_eq!(std::fs::metadata(&i.path).unwrap().len(), 8 * MIB);
    // Resize: grow; shrink only when allowed.
    pool.resize("b", 16 * MIB, false).unwrap();
    assert_eq!(pool.info("b").unwrap().size, 16 * MIB);
    assert_eq!(
        pool.resize("b", MIB, false).unwrap_err().errno(),
        libc::EINVAL
    );
    pool.resize("b", MIB, true).unwrap();
    assert_eq!(std::fs::metadata(pool.data_path("b")).unwrap().len(), MIB);
    pool.remove_image("a").unwrap();
    assert!(!pool.data_path("a").exists());
    assert_eq!(pool.list_images().unwrap(), ["b"]);
    root.remove_pool("p").unwrap();
    assert_eq!(root.list_pools().unwrap(), ["q"]);
}

#[test]
fn snapshot_rollback_restores_data() {
    let (_d, pool) = setup();
    pool.create_image("vm", 4 * MIB).unwrap();
    write(&pool, "vm", 4096, b"before");
    pool.snap_create("vm", "s1").unwrap();
    assert_eq!(
        pool.snap_create("vm", "s1").unwrap_err().errno(),
        libc::EEXIST
    );
    write(&pool, "vm", 4096, b"after!");
    pool.resize("vm", 8 * MIB, false).unwrap();
    pool.snap_rollback("vm", "s1", &mut noop()).unwrap();
    assert_eq!(read(&pool, "vm", 4096, 6), b"before");
    assert_eq!(pool.info("vm").unwrap().size, 4 * MIB);
    assert_eq!(
        std::fs::metadata(pool.data_path("vm")).unwrap().len(),
        4 * MIB
    );
    let snaps = pool.snap_list("vm").unwrap();
    assert_eq!((snaps.len(), snaps[0].id, snaps[0].size), (1, 1, 4 * MIB));
    // The snapshot file is read-only and untouched by writes to the image.
    write(&pool, "vm", 4096, b"third!");
    let mut b = [0u8; 6];
    File::open(pool.snap_path("vm", "s1"))
        .unwrap()
        .read_exact_at(&mut b, 4096)
        .unwrap();
    assert_eq!(&b, b"before");
    // rm refuses an image with snapshots; snap rm then rm works.
    assert_eq!(pool.remove_image("vm").unwrap_err().errno(), libc::EBUSY);
    pool.snap_remove("vm", "s1").unwrap();
    assert_eq!(
        pool.snap_remove("vm", "s1").unwrap_err().errno(),
        libc::ENOENT
    );
    pool.snap_create("vm", "s2").unwrap();
    assert_eq!(pool.snap_list("vm").unwrap()[0].id, 2, "ids are not reused");
    pool.snap_remove("vm", "s2").unwrap();
    pool.remove_image("vm").unwrap();
}

#[test]
fn clone_reads_parent_then_diverges_and_flattens() {
    let (_d, pool) = setup();
    let other = pool.root().create_pool("other").unwrap();
    pool.create_image("gold", 2 * MIB).unwrap();
    write(&pool, "gold", 0, b"golden image");
    pool.snap_create("gold", "base").unwrap();
    // Cloning needs a protected snapshot.
    let e = pool
        .clone_image("gold", "base", &other, "vm1", &mut noop())
        .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    pool.snap_set_protected("gold", "base", true).unwrap();
    assert_eq!(
        pool.snap_remove("gold", "base").unwrap_err().errno(),
        libc::EBUSY
    );
    pool.clone_image("gold", "base", &other, "vm1", &mut noop())
        .unwrap();
    assert_eq!(read(&other, "vm1", 0, 12), b"golden image");
    let parent = other.info("vm1").unwrap().parent.unwrap();
    assert_eq!(
        (
            parent.pool.as_str(),
            parent.image.as_str(),
            parent.snapshot.as_str()
        ),
        ("p", "gold", "base")
    );
    // Diverge both ways.
    write(&other, "vm1", 0, b"child");
    write(&pool, "gold", 0, b"GOLD!");
    assert_eq!(read(&other, "vm1", 0, 12), b"childn image");
    assert_eq!(read(&pool, "gold", 0, 5), b"GOLD!");
    // Unprotect is refused while the clone exists; flatten drops the link.
    let e = pool.snap_set_protected("gold", "base", false).unwrap_err();
    assert!(e.to_string().contains("other/vm1"), "{e}");
    other.flatten("vm1").unwrap();
    assert!(other.info("vm1").unwrap().parent.is_none());
    assert_eq!(other.flatten("vm1").unwrap_err().errno(), libc::EINVAL);
    pool.snap_set_protected("gold", "base", false).unwrap();
    // A removed clone also releases its parent.
    pool.snap_set_protected("gold", "base", true).unwrap();
    other
        .clone_image("gold", "base", &other, "vm2", &mut noop())
        .unwrap_err();
    pool.clone_image("gold", "base", &other, "vm2", &mut noop())
        .unwrap();
    other.remove_image("vm2").unwrap();
    pool.snap_set_protected("gold", "base", false).unwrap();
}

#[test]
fn du_counts_allocated_bytes() {
    let (_d, pool) = setup();
    pool.create_image("vm", 64 * MIB).unwrap();
    write(&pool, "vm", 10 * MIB, &vec![0xab; MIB as usize]);
    pool.snap_create("vm", "s").unwrap();
    let du = pool.du("vm").unwrap();
    assert_eq!(du.len(), 2);
    assert_eq!(du[0].name, "vm@s");
    assert_eq!(du[1].name, "vm");
    for e in &du {
        assert_eq!(e.provisioned_size, 64 * MIB);
        assert!(
            (MIB..4 * MIB).contains(&e.used_size),
            "{}: {}",
            e.name,
            e.used_size
        );
    }
}

#[test]
fn import_export_keep_holes() {
    let (d, pool) = setup();
    let src = d.path().join("src.raw");
    let f = File::create(&src).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(&vec![7u8; 3 * MIB as usize], 32 * MIB)
        .unwrap();
    // Allocated zeros become holes too.
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 40 * MIB)
        .unwrap();
    f.sync_all().unwrap();
    let expect = std::fs::read(&src).unwrap();

    let f = File::open(&src).unwrap();
    let mut seen = 0;
    let n = pool
        .import("imp", ImportSource::File(&f), &mut |b| seen = b)
        .unwrap();
    assert_eq!((n, seen), (64 * MIB, 64 * MIB));
    let used = pool.info("imp").unwrap().used;
    assert!((3 * MIB..5 * MIB).contains(&used), "used {used}");
    assert_eq!(
        pool.import("imp", ImportSource::File(&f), &mut noop())
            .unwrap_err()
            .errno(),
        libc::EEXIST
    );

    // Export to a file: same bytes, still sparse.
    let out = d.path().join("out.raw");
    let o = File::create(&out).unwrap();
    pool.export("imp", None, ExportDest::File(&o), &mut noop())
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), expect);
    assert!(copy::allocated(&out).unwrap() < 5 * MIB);

    // Through streams (stdin/stdout): the same bytes.
    let mut stream = Vec::new();
    pool.export("imp", None, ExportDest::Stream(&mut stream), &mut noop())
        .unwrap();
    assert_eq!(stream, expect);
    let mut r = std::io::Cursor::new(stream);
    pool.import("imp2", ImportSource::Stream(&mut r), &mut noop())
        .unwrap();
    assert_eq!(std::fs::read(pool.data_path("imp2")).unwrap(), expect);
    assert!(pool.info("imp2").unwrap().used < 5 * MIB);

    // A snapshot exports its own point in time.
    pool.snap_create("imp", "s").unwrap();
    write(&pool, "imp", 0, b"HEAD");
    let mut s = Vec::new();
    pool.export("imp", Some("s"), ExportDest::Stream(&mut s), &mut noop())
        .unwrap();
    assert_eq!(&s[..4], b"head");
    let mut w = Vec::new();
    assert_eq!(
        pool.export("imp", Some("x"), ExportDest::Stream(&mut w), &mut noop())
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
}

#[test]
fn served_image_is_protected() {
    let (_d, pool) = setup();
    pool.create_image("vm", 4 * MIB).unwrap();
    pool.snap_create("vm", "s").unwrap();
    let served = pool.serve("vm", false).unwrap();
    assert_eq!(
        (served.size, served.path.clone()),
        (4 * MIB, pool.data_path("vm"))
    );
    assert!(pool.info("vm").unwrap().in_use);
    assert_eq!(pool.serve("vm", false).unwrap_err().errno(), libc::EBUSY);
    assert_eq!(pool.serve("vm", true).unwrap_err().errno(), libc::EBUSY);
    let e = pool.snap_rollback("vm", "s", &mut noop()).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    assert_eq!(
        pool.resize("vm", MIB, true).unwrap_err().errno(),
        libc::EBUSY
    );
    pool.resize("vm", 8 * MIB, false).unwrap();
    // Snapshots of a served image are allowed.
    pool.snap_create("vm", "live").unwrap();
    drop(served);
    // Two read-only users share.
    let a = pool.serve("vm", true).unwrap();
    let _b = pool.serve("vm", true).unwrap();
    assert_eq!(pool.serve("vm", false).unwrap_err().errno(), libc::EBUSY);
    drop(a);
    drop(_b);
    pool.snap_rollback("vm", "s", &mut noop()).unwrap();
    // Deleting the pool is refused while one of its images is served.
    let served = pool.serve("vm", true).unwrap();
    let e = pool.root().remove_pool("p").unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    drop(served);
    pool.root().remove_pool("p").unwrap();
}

#[test]
fn concurrent_writers_are_serialized() {
    // Without the root lock, concurrent read-modify-write of the metadata loses snapshots.
    let (d, pool) = setup();
    pool.create_image("vm", MIB).unwrap();
    let root_dir = d.path().join("pools");
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let root_dir = root_dir.clone();
            std::thread::spawn(move || {
                // Each thread opens its own lock file descriptions, as separate processes.
                let p = PoolRoot::new(root_dir).pool("p").unwrap();
                for j in 0..5 {
                    p.snap_create("vm", &format!("t{i}-{j}")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let snaps = pool.snap_list("vm").unwrap();
    assert_eq!(snaps.len(), 40);
    let mut ids: Vec<u64> = snaps.iter().map(|s| s.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40, "snapshot ids must be unique");
}

#[test]
fn a_waiting_bdev_keeps_the_image_in_use() {
    let (_d, pool) = setup();
    pool.create_image("vm", 4 * MIB).unwrap();
    pool.snap_create("vm", "s").unwrap();
    let a = pool.serve("vm", false).unwrap();
    let b = pool.serve_incoming("vm").unwrap();
    assert!(a.has_write_role() && !b.has_write_role());
    let e = b.take_write_role().unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY, "{e}");
    // The writer goes (its bdev deleted): only the waiter serves the image, and it is still
    // in use for rm, rollback, shrinking, and for a read-write open that does not wait.
    drop(a);
    assert!(pool.in_use("vm").unwrap());
    assert!(pool.info("vm").unwrap().in_use);
    for e in [
        pool.remove_image("vm").unwrap_err(),
        pool.snap_rollback("vm", "s", &mut noop()).unwrap_err(),
        pool.resize("vm", MIB, true).unwrap_err(),
        pool.serve("vm", false).unwrap_err(),
    ] {
        assert_eq!(e.errno(), libc::EBUSY, "{e}");
    }
    // A reader shares with a waiter; the waiter then cannot take the role until it goes.
    let r = pool.serve("vm", true).unwrap();
    assert_eq!(b.take_write_role().unwrap_err().errno(), libc::EBUSY);
    drop(r);
    b.take_write_role().unwrap();
    assert!(b.has_write_role());
    assert!(
        !b.yield_write_role().unwrap(),
        "nobody waits: the role stays"
    );
    drop(b);
    assert!(!pool.in_use("vm").unwrap());
    pool.snap_rollback("vm", "s", &mut noop()).unwrap();
}
