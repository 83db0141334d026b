//! The write-role hand-over of local bdevs (a live migration between two instances, here
//! two bdevs of one process: flock conflicts between open files as between processes).

use super::*;
use crate::bdev::channel::test_support::{iov, reap_all, submit};
use crate::bdev::{BdevChannel, IoOp, IoResult, IoVecs};
use crate::localpool::Pool;

const MIB: u64 = 1 << 20;

fn setup() -> (tempfile::TempDir, Pool) {
    let d = tempfile::tempdir().unwrap();
    let pool = PoolRoot::new(d.path().join("pools"))
        .create_pool("p")
        .unwrap();
    pool.create_image("vm", 4 * MIB).unwrap();
    (d, pool)
}

fn open(
    reg: &BdevRegistry,
    pool: &Pool,
    name: &str,
    incoming: bool,
) -> crate::error::Result<Arc<Bdev>> {
    create(
        reg,
        LocalPoolBdevOpts {
            name: name.into(),
            pool: "p".into(),
            image: "vm".into(),
            pool_dir: Some(pool.root().dir().to_path_buf()),
            block_size: Some(4096),
            readonly: false,
            uuid: None,
            incoming,
        },
    )
}

fn role(b: &Bdev) -> bool {
    b.to_json()["driver_specific"]["local"]["write_role"] == true
}

/// A 4 KiB buffer aligned for `O_DIRECT`.
struct Block {
    raw: Vec<u8>,
    start: usize,
}

impl Block {
    fn new(byte: u8) -> Self {
        let raw = vec![byte; 3 * 4096];
        let start = (4096 - raw.as_ptr() as usize % 4096) % 4096;
        Block { raw, start }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + 4096]
    }
}

fn io(ch: &mut BdevChannel, write: bool, byte: u8) -> (IoResult, u8) {
    let mut b = Block::new(byte);
    let v = [iov(b.bytes())];
    // SAFETY: `b` and `v` outlive the reap below.
    let iovs = unsafe { IoVecs::from_slice(&v) };
    let op = if write {
        IoOp::Write { offset: 0, iovs }
    } else {
        IoOp::Read { offset: 0, iovs }
    };
    // SAFETY: as above.
    unsafe { submit(ch, 1, op) };
    let r = reap_all(ch, 1)[0].1;
    let got = b.bytes();
    assert!(got.iter().all(|x| *x == got[0]), "torn block");
    (r, got[0])
}

fn write(ch: &mut BdevChannel, byte: u8) -> IoResult {
    io(ch, true, byte).0
}

fn read(ch: &mut BdevChannel) -> u8 {
    let (r, got) = io(ch, false, 0xEE);
    assert_eq!(r, Ok(()));
    got
}

fn ebusy<T>(r: crate::error::Result<T>) -> String {
    let Err(e) = r else {
        panic!("expected EBUSY, got a success")
    };
    assert_eq!(e.errno, libc::EBUSY, "{e}");
    e.message
}

#[test]
fn write_role_moves_between_instances_and_nothing_else_writes() {
    let (_d, pool) = setup();
    let reg = BdevRegistry::default();
    let third = |reg: &BdevRegistry| ebusy(open(reg, &pool, "C", false));
    // A: a normal open, the writer. B: incoming while A writes, a waiter.
    let a = open(&reg, &pool, "A", false).unwrap();
    let b = open(&reg, &pool, "B", true).unwrap();
    assert!(role(&a) && !role(&b));
    assert_eq!(b.to_json()["driver_specific"]["local"]["incoming"], true);
    third(&reg);
    let (mut ca, mut cb) = (a.open_channel().unwrap(), b.open_channel().unwrap());
    assert_eq!(write(&mut ca, 0x11), Ok(()));
    // The waiter reads but does not write.
    assert_eq!(write(&mut cb, 0x99), Err(Errno(libc::EBUSY)));
    assert_eq!(read(&mut cb), 0x11);
    // It cannot start while A is active (A's device runs).
    a.activate().unwrap();
    let m = ebusy(b.activate());
    assert!(
        m.contains("image p/vm is being written by another instance"),
        "{m}"
    );
    assert!(m.contains("bdev B"), "{m}");
    assert!(pool.in_use("vm").unwrap());
    // A's device stops: the role is handed over and A waits. Nobody writes in between.
    assert_eq!(write(&mut ca, 0x22), Ok(()));
    a.deactivate().unwrap();
    assert!(!role(&a) && !role(&b));
    assert_eq!(write(&mut ca, 0x98), Err(Errno(libc::EBUSY)));
    third(&reg);
    // Another incoming open waits too (the free role is the waiters', whichever starts
    // first).
    let d = open(&reg, &pool, "D", true).unwrap();
    assert!(!role(&d));
    d.backend().close().unwrap();
    assert_eq!(
        pool.remove_image("vm").unwrap_err().errno(),
        libc::EBUSY,
        "a waiter serves the image"
    );
    assert!(pool.in_use("vm").unwrap());
    // B's device starts: B writes, A is refused.
    b.activate().unwrap();
    assert!(role(&b) && !role(&a));
    assert_eq!(read(&mut cb), 0x22);
    assert_eq!(write(&mut cb, 0x33), Ok(()));
    assert_eq!(write(&mut ca, 0x97), Err(Errno(libc::EBUSY)));
    assert_eq!(read(&mut ca), 0x33);
    ebusy(a.activate());
    third(&reg);
    // And back: B stops, A starts.
    b.deactivate().unwrap();
    a.activate().unwrap();
    assert!(role(&a) && !role(&b));
    assert_eq!(write(&mut ca, 0x44), Ok(()));
    assert_eq!(read(&mut cb), 0x44);
    third(&reg);
    // A stop with nobody else waiting keeps the role... B still waits: it is handed over.
    a.deactivate().unwrap();
    assert!(!role(&a));
    drop((ca, cb));
    for bdev in [a, b] {
        bdev.backend().close().unwrap();
    }
    // Nobody serves the image any more: a normal open writes, rm works (and takes the
    // hand-over file with the image).
    assert!(!pool.in_use("vm").unwrap());
    let c = open(&reg, &pool, "C", false).unwrap();
    assert!(role(&c));
    c.deactivate().unwrap();
    assert!(role(&c), "nobody waits: the role stays");
    c.backend().close().unwrap();
    pool.remove_image("vm").unwrap();
    assert!(!crate::localpool::handover_path(&pool.data_path("vm")).exists());
}

#[test]
fn incoming_takes_a_free_role_at_once_and_is_read_write_only() {
    let (_d, pool) = setup();
    let reg = BdevRegistry::default();
    let b = open(&reg, &pool, "B", true).unwrap();
    assert!(role(&b));
    b.activate().unwrap();
    let (m, p) = b.backend().config(&b).unwrap();
    assert_eq!(
        (m, &p["incoming"]),
        ("bdev_local_create", &serde_json::json!(true))
    );
    ebusy(open(&reg, &pool, "C", false));
    let e = create(
        &reg,
        LocalPoolBdevOpts {
            readonly: true,
            ..LocalPoolBdevOpts {
                name: "R".into(),
                pool: "p".into(),
                image: "vm".into(),
                pool_dir: Some(pool.root().dir().to_path_buf()),
                block_size: None,
                readonly: false,
                uuid: None,
                incoming: true,
            }
        },
    )
    .err()
    .expect("incoming and readonly together are refused");
    assert_eq!(e.errno, libc::EINVAL, "{e}");
    b.backend().close().unwrap();
}
