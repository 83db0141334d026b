//! The crypto bdev over a malloc bdev, through real channels.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::bdev::channel::test_support::{err, iov, reap_all, submit};
use crate::bdev::malloc::{self, MallocOpts};
use crate::bdev::qos::QosLimits;
use crate::bdev::{Errno, IoChannel, IoOp, IoResult, IoVecs};

const KEY: &[u8; 64] = b"0123456789abcdef0123456789abcdefFEDCBA9876543210fedcba9876543210";

struct Setup {
    reg: BdevRegistry,
    keys: Keyring,
    _dir: tempfile::TempDir,
}

fn setup(key: &[u8]) -> Setup {
    setup_with(key, 512, 64)
}

/// A keyring holding `key` as `k`, and a malloc bdev `M0` of `num_blocks` blocks.
fn setup_with(key: &[u8], block_size: u32, num_blocks: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k");
    std::fs::write(&p, key).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let keys = Keyring::default();
    keys.add_file("k", &p).unwrap();
    let reg = BdevRegistry::default();
    malloc::create(
        &reg,
        MallocOpts {
            name: Some("M0".into()),
            uuid: None,
            num_blocks,
            block_size,
        },
    )
    .unwrap();
    Setup {
        reg,
        keys,
        _dir: dir,
    }
}

fn opts(key: &str) -> CryptoOpts {
    CryptoOpts {
        base_bdev_name: "M0".into(),
        name: "C0".into(),
        key_name: key.into(),
        key_check: None,
        uuid: None,
    }
}

/// Runs one op on `bdev` over `bufs` (split as given) and returns its result.
fn run(bdev: &Arc<Bdev>, write: bool, offset: u64, bufs: &mut [&mut [u8]]) -> IoResult {
    let mut ch = bdev.open_channel().unwrap();
    let v: Vec<libc::iovec> = bufs.iter_mut().map(|b| iov(b)).collect();
    // SAFETY: `v` and the buffers outlive the reap below.
    let iovs = unsafe { IoVecs::from_slice(&v) };
    let op = if write {
        IoOp::Write { offset, iovs }
    } else {
        IoOp::Read { offset, iovs }
    };
    // SAFETY: as above.
    unsafe { submit(&mut ch, 1, op) };
    reap_all(&mut ch, 1)[0].1
}

#[test]
fn round_trip_and_ciphertext_on_the_base() {
    let s = setup(KEY);
    let c = create(&s.reg, &s.keys, opts("k")).unwrap();
    assert_eq!(c.num_blocks(), 64);
    assert!(!c.backend().io_types().write_zeroes);
    let base = s.reg.get("M0").unwrap();
    assert_eq!(base.claimed_by().as_deref(), Some("crypto bdev C0"));
    assert_eq!(
        err(s.reg.remove("M0")).to_string(),
        "bdev M0 is claimed by crypto bdev C0: Device or resource busy"
    );

    let plain: Vec<u8> = (0..4 * 512).map(|i| (i % 251) as u8).collect();
    // Split so that blocks straddle iovecs.
    let mut data = plain.clone();
    let (a, rest) = data.split_at_mut(700);
    let (b, cc) = rest.split_at_mut(3);
    run(&c, true, 8 * 512, &mut [a, b, cc]).unwrap();
    assert_eq!(
        data, plain,
        "the caller's buffers must not be touched by a write"
    );

    let mut back = vec![0u8; plain.len()];
    let (x, y) = back.split_at_mut(1000);
    run(&c, false, 8 * 512, &mut [x, y]).unwrap();
    assert_eq!(back, plain);

    // The base holds XTS ciphertext: block 9 is the encryption of plaintext block 1 with
    // tweak 9, and it differs from the plaintext.
    let mut raw = vec![0u8; plain.len()];
    run(&base, false, 8 * 512, &mut [&mut raw]).unwrap();
    assert_ne!(raw[..512], plain[..512]);
    let cipher = cipher_of(&s.keys.get("k").unwrap()).unwrap();
    let mut expect = plain[512..1024].to_vec();
    cipher.encrypt_unit(&mut expect, 9);
    assert_eq!(raw[512..1024], expect[..]);
    // Identical plaintext blocks at different LBAs encrypt differently.
    let same = vec![0xAAu8; 1024];
    run(&c, true, 0, &mut [&mut same.clone()]).unwrap();
    let mut raw = vec![0u8; 1024];
    run(&base, false, 0, &mut [&mut raw]).unwrap();
    assert_ne!(raw[..512], raw[512..]);

    s.reg.remove("C0").unwrap();
    assert_eq!(base.claimed_by(), None);
    s.reg.remove("M0").unwrap();
}

#[test]
fn keys_are_checked_and_errors_name_them_only() {
    let s = setup(KEY);
    let e = err(create(&s.reg, &s.keys, opts("nope")));
    assert_eq!(e.errno, libc::ENOKEY);
    assert!(
        e.message.contains("crypto bdev C0") && e.message.contains("nope"),
        "{}",
        e.message
    );
    let mut o = opts("k");
    o.base_bdev_name = "absent".into();
    assert_eq!(err(create(&s.reg, &s.keys, o)).errno, libc::ENODEV);
    assert!(s.reg.get("C0").is_none());

    for (bad, why) in [
        (&b"short"[..], "64 bytes or 128 hex digits"),
        (&[7u8; 64][..], "halves"),
        (&[b'z'; 128][..], "hex"),
    ] {
        let s = setup(bad);
        let e = err(create(&s.reg, &s.keys, opts("k")));
        assert!(e.message.contains(why), "{}", e.message);
        assert_eq!(s.reg.get("M0").unwrap().claimed_by(), None);
    }
    // 128 hex digits with a newline is the same key as the 64 raw bytes.
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n";
    let h = setup(hex.as_bytes());
    let ch = create(&h.reg, &h.keys, opts("k")).unwrap();
    let r = setup(KEY);
    let cr = create(&r.reg, &r.keys, opts("k")).unwrap();
    let mut d = vec![5u8; 512];
    run(&ch, true, 0, &mut [&mut d]).unwrap();
    run(&cr, true, 0, &mut [&mut d]).unwrap();
    let (mut a, mut b) = (vec![0u8; 512], vec![0u8; 512]);
    run(&h.reg.get("M0").unwrap(), false, 0, &mut [&mut a]).unwrap();
    run(&r.reg.get("M0").unwrap(), false, 0, &mut [&mut b]).unwrap();
    assert_eq!(a, b);
    // A removed key stays with the bdev that uses it.
    r.keys.remove("k").unwrap();
    let mut back = vec![0u8; 512];
    run(&cr, false, 0, &mut [&mut back]).unwrap();
    assert_eq!(back, d);
}

/// The key check value of the saved config lets the right key in (raw or hex) and refuses
/// another key under the same name with EKEYREJECTED, creating nothing.
#[test]
fn a_key_check_refuses_another_key_and_creates_nothing() {
    let s = setup(KEY);
    let c = create(&s.reg, &s.keys, opts("k")).unwrap();
    let check = c.backend().driver_specific()["crypto"]["key_check"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(check.len(), 2 * KEY_CHECK_LEN);
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!hex.contains(&check) && !check.contains(&hex[..16]));
    s.reg.remove("C0").unwrap();

    // The same key, raw or as hex, upper-case check digits: accepted.
    for key in [&KEY[..], hex.as_bytes()] {
        let s = setup(key);
        let mut o = opts("k");
        o.key_check = Some(check.to_uppercase());
        create(&s.reg, &s.keys, o).unwrap();
    }
    // Another key under the same name: refused, naming the bdev and the key; the base
    // stays unclaimed and no bdev exists.
    let mut other = *KEY;
    other[5] ^= 1;
    let s = setup(&other);
    let mut o = opts("k");
    o.key_check = Some(check.clone());
    let e = err(create(&s.reg, &s.keys, o));
    assert_eq!(e.errno, libc::EKEYREJECTED, "{}", e.message);
    assert!(
        e.message.contains("crypto bdev C0") && e.message.contains("key k ("),
        "{}",
        e.message
    );
    assert!(s.reg.get("C0").is_none());
    assert_eq!(s.reg.get("M0").unwrap().claimed_by(), None);
    // A malformed check value is an invalid argument.
    for bad in ["", "00", &"g".repeat(32), &"0".repeat(64)] {
        let mut o = opts("k");
        o.key_check = Some(bad.to_string());
        let e = err(create(&s.reg, &s.keys, o));
        assert_eq!(e.errno, libc::EINVAL, "{bad:?}: {}", e.message);
    }
    assert!(s.reg.get("C0").is_none());
}

/// A base that keeps its data in a malloc bdev's memory but does not lend it, as files,
/// RBD and the local pool do not: the crypto bdev over it takes the copy path.
struct NoLend(Arc<Bdev>);

struct NoLendChannel(Box<dyn IoChannel>);

impl IoChannel for NoLendChannel {
    unsafe fn submit(&mut self, tag: u64, op: IoOp) {
        // SAFETY: our caller's promise, passed on.
        unsafe { self.0.submit(tag, op) }
    }
    fn kick(&mut self) {
        self.0.kick()
    }
    fn reap(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        self.0.reap(done)
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
}

impl BdevBackend for NoLend {
    fn product_name(&self) -> &'static str {
        "no-lend test"
    }
    fn io_types(&self) -> IoTypes {
        IoTypes {
            zcopy: false,
            ..self.0.backend().io_types()
        }
    }
    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
        Ok(Box::new(NoLendChannel(self.0.backend().open_channel()?)))
    }
    fn config(&self, _: &Bdev) -> Option<(&'static str, Value)> {
        None
    }
}

/// Adds a malloc bdev `M1` like `M0`, the bdev `P1` over its memory that does not lend it,
/// and crypto bdevs `C0` over `M0` (zero-copy) and `C1` over `P1` (copy path), same key.
fn two_paths(s: &Setup) -> (Arc<Bdev>, Arc<Bdev>) {
    let m0 = s.reg.get("M0").unwrap();
    let m1 = malloc::create(
        &s.reg,
        MallocOpts {
            name: Some("M1".into()),
            uuid: None,
            num_blocks: m0.num_blocks(),
            block_size: m0.block_size(),
        },
    )
    .unwrap();
    let p1 = Bdev::new(
        BdevParams {
            name: "P1".into(),
            uuid: None,
            block_size: m1.block_size(),
            num_blocks: m1.num_blocks(),
        },
        Box::new(NoLend(m1)),
    );
    s.reg.add(p1).unwrap();
    let c0 = create(&s.reg, &s.keys, opts("k")).unwrap();
    let mut o = opts("k");
    o.base_bdev_name = "P1".into();
    o.name = "C1".into();
    let c1 = create(&s.reg, &s.keys, o).unwrap();
    assert!(m0.open_channel().unwrap().zcopy_supported());
    assert!(!s
        .reg
        .get("P1")
        .unwrap()
        .open_channel()
        .unwrap()
        .zcopy_supported());
    (c0, c1)
}

/// `plain` split into iovecs at `cuts` (blocks straddle them), written or read at `offset`.
fn run_split(bdev: &Arc<Bdev>, write: bool, offset: u64, buf: &mut [u8], cuts: &[usize]) {
    let mut parts: Vec<&mut [u8]> = Vec::new();
    let mut rest = buf;
    let mut at = 0;
    for &c in cuts {
        let (a, b) = rest.split_at_mut(c - at);
        parts.push(a);
        rest = b;
        at = c;
    }
    parts.push(rest);
    run(bdev, write, offset, &mut parts).unwrap();
}

/// The zero-copy path (crypto over malloc) and the copy path (crypto over a base that does
/// not lend) store the same ciphertext for the same key and LBAs, whatever the split of
/// the caller's buffers, and each reads back what either wrote.
#[test]
fn zero_copy_and_copy_paths_store_the_same_bytes() {
    for bs in [512usize, 4096] {
        let s = setup_with(KEY, bs as u32, 32);
        let (c0, c1) = two_paths(&s);
        let plain: Vec<u8> = (0..8 * bs).map(|i| (i * 13 % 253) as u8).collect();
        let offset = 3 * bs as u64;
        for cuts in [
            vec![],
            vec![bs + 188, bs + 191, 5 * bs],
            vec![1, 2 * bs - 1],
        ] {
            run_split(&c0, true, offset, &mut plain.clone(), &cuts);
            run_split(&c1, true, offset, &mut plain.clone(), &cuts);
            let (mut raw0, mut raw1) = (vec![0u8; 32 * bs], vec![0u8; 32 * bs]);
            run(&s.reg.get("M0").unwrap(), false, 0, &mut [&mut raw0]).unwrap();
            run(&s.reg.get("M1").unwrap(), false, 0, &mut [&mut raw1]).unwrap();
            assert!(raw0 == raw1, "bs {bs} cuts {cuts:?}: the bases differ");
            let o = offset as usize;
            assert_ne!(raw0[o..o + bs], plain[..bs], "plaintext on the base");
            for c in [&c0, &c1] {
                let mut back = vec![0u8; plain.len()];
                run_split(c, false, offset, &mut back, &cuts);
                assert!(
                    back == plain,
                    "bs {bs} cuts {cuts:?}: read back through {}",
                    c.name()
                );
            }
        }
        // What one path wrote, the other reads: the base's bytes copied across.
        let mut raw = vec![0u8; 32 * bs];
        run(&s.reg.get("M0").unwrap(), false, 0, &mut [&mut raw]).unwrap();
        run(&s.reg.get("M1").unwrap(), true, 0, &mut [&mut raw]).unwrap();
        let mut back = vec![0u8; plain.len()];
        run(&c1, false, offset, &mut [&mut back]).unwrap();
        assert!(
            back == plain,
            "bs {bs}: the copy path reads the zero-copy path's bytes"
        );
    }
}

/// Zero-copy accesses count in the base's statistics as the reads and writes they are.
#[test]
fn zero_copy_counts_in_the_base_iostat() {
    let s = setup(KEY);
    let c = create(&s.reg, &s.keys, opts("k")).unwrap();
    let base = s.reg.get("M0").unwrap();
    let mut d = vec![7u8; 4 * 512];
    run(&c, true, 512, &mut [&mut d]).unwrap();
    run(&c, false, 512, &mut [&mut d[..1024]]).unwrap();
    run(&c, false, 4096, &mut [&mut d[..512]]).unwrap();
    for (bdev, name) in [(&base, "M0"), (&c, "C0")] {
        let st = bdev.stats.to_json(name);
        assert_eq!(st["num_write_ops"], 1, "{name}: {st}");
        assert_eq!(st["bytes_written"], 2048, "{name}");
        assert_eq!(st["num_read_ops"], 2, "{name}");
        assert_eq!(st["bytes_read"], 1536, "{name}");
        assert_eq!(st["io_error"], 0, "{name}");
    }
}

/// A range outside the bdev, or not whole blocks, is refused with EINVAL by the base's
/// zero-copy start (counted as an error, nothing lent), and through the crypto bdev
/// changes nothing on the base.
#[test]
fn out_of_range_zero_copy_is_refused_and_changes_nothing() {
    let s = setup(KEY);
    let base = s.reg.get("M0").unwrap();
    let size = base.size();
    let mut ch = base.open_channel().unwrap();
    for (offset, len, populate) in [
        (size, 512, true),
        (size - 512, 1024, false),
        (u64::MAX - 511, 512, false),
        (u64::MAX, u64::MAX, true),
        (100, 512, true),
        (0, 100, false),
    ] {
        match ch.zcopy_start(offset, len, populate) {
            Some(Err(e)) => assert_eq!(e.0, libc::EINVAL, "{offset} + {len}"),
            Some(Ok(_)) => panic!("{offset} + {len}: memory lent"),
            None => panic!("{offset} + {len}: malloc did not answer"),
        }
    }
    // An access dropped without `end` counts as failed.
    drop(ch.zcopy_start(0, 512, true).unwrap().unwrap());
    drop(ch);
    assert_eq!(base.stats.to_json("M0")["io_error"], 7);
    assert_eq!(base.stats.to_json("M0")["num_read_ops"], 0);

    let c = create(&s.reg, &s.keys, opts("k")).unwrap();
    let mut d = vec![0x42u8; 64 * 512];
    run(&c, true, 0, &mut [&mut d]).unwrap();
    let mut before = vec![0u8; 64 * 512];
    run(&base, false, 0, &mut [&mut before]).unwrap();
    for (offset, len) in [(size, 512), (size - 512, 1024), (u64::MAX - 511, 512)] {
        let mut w = vec![0x99u8; len];
        assert_eq!(
            run(&c, true, offset, &mut [&mut w]),
            Err(Errno(libc::EINVAL))
        );
        assert_eq!(
            run(&c, false, offset, &mut [&mut w]),
            Err(Errno(libc::EINVAL))
        );
    }
    let mut after = vec![0u8; 64 * 512];
    run(&base, false, 0, &mut [&mut after]).unwrap();
    assert!(before == after, "a refused request changed the base");
}

/// The base's QoS limits still apply: a write the base's byte limit does not admit takes
/// the copy path and waits in the base's throttle queue.
#[test]
fn base_qos_applies_to_zero_copy() {
    let s = setup_with(KEY, 512, 1024);
    let c = create(&s.reg, &s.keys, opts("k")).unwrap();
    let base = s.reg.get("M0").unwrap();
    base.qos
        .set_limits(QosLimits {
            w_mbytes_per_sec: 1,
            ..Default::default()
        })
        .unwrap();
    let mut ch = c.open_channel().unwrap();
    let mut a = vec![1u8; 128 << 10];
    let mut b = vec![2u8; 128 << 10];
    let (va, vb) = ([iov(&mut a)], [iov(&mut b)]);
    // SAFETY: the buffers outlive the reap.
    unsafe {
        ch.submit(
            1,
            IoOp::Write {
                offset: 0,
                iovs: IoVecs::from_slice(&va),
            },
        );
        ch.submit(
            2,
            IoOp::Write {
                offset: 128 << 10,
                iovs: IoVecs::from_slice(&vb),
            },
        );
        ch.kick();
    }
    // The first write took the 64 KiB the bucket starts with (and went into debt); the
    // second waited for about 62 ms of refill.
    assert!(reap_all(&mut ch, 2).iter().all(|(_, r)| r.is_ok()));
    let throttled = base
        .stats
        .qos_throttled_ops
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(throttled, 1);
    let st = base.stats.to_json("M0");
    assert_eq!(
        (st["num_write_ops"].as_u64(), st["bytes_written"].as_u64()),
        (Some(2), Some(256 << 10))
    );
    let mut back = vec![0u8; 256 << 10];
    run(&c, false, 0, &mut [&mut back]).unwrap();
    assert!(back[..128 << 10].iter().all(|&x| x == 1) && back[128 << 10..].iter().all(|&x| x == 2));
}

/// `CRYPTO_COST_PATH=zcopy|copy CRYPTO_COST_BS=512|4096 CRYPTO_COST_REQS=N cargo test
/// --release --lib crypto::tests::cost -- --ignored --nocapture`: N 128K writes, then N
/// 128K reads, through a crypto bdev over malloc by the zero-copy path, or over the same
/// memory by the copy path. Under `valgrind --tool=callgrind`, (Ir at N − Ir at 0) / N is
/// the instructions of one write and one read (bench/README.md).
#[test]
#[ignore]
fn cost() {
    let env = |k: &str| std::env::var(k).ok();
    let reqs: usize = env("CRYPTO_COST_REQS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let bs: u32 = env("CRYPTO_COST_BS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let copy = env("CRYPTO_COST_PATH").as_deref() == Some("copy");
    const REQ: usize = 128 << 10;
    let s = setup_with(KEY, bs, (16 * REQ) as u64 / bs as u64);
    let (c0, c1) = two_paths(&s);
    let c = if copy { c1 } else { c0 };
    let mut ch = c.open_channel().unwrap();
    let mut buf = vec![0x5au8; REQ];
    let v = [iov(&mut buf)];
    let t = std::time::Instant::now();
    for write in [true, false] {
        for r in 0..reqs {
            // SAFETY: `iovs` describes `buf`, alive until the reap below.
            let iovs = unsafe { IoVecs::from_slice(&v) };
            let offset = (r % 16 * REQ) as u64;
            let op = if write {
                IoOp::Write { offset, iovs }
            } else {
                IoOp::Read { offset, iovs }
            };
            // SAFETY: as above.
            unsafe { submit(&mut ch, r as u64, op) };
            assert!(reap_all(&mut ch, 1)[0].1.is_ok());
        }
    }
    let path = if copy { "copy" } else { "zero-copy" };
    println!(
        "{path}, {bs}-byte blocks: {reqs} writes and reads of 128K in {:?}",
        t.elapsed()
    );
}
