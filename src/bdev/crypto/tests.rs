//! The crypto bdev over a malloc bdev, through real channels.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::bdev::channel::test_support::{err, iov, reap_all, submit};
use crate::bdev::malloc::{self, MallocOpts};
use crate::bdev::{IoOp, IoResult, IoVecs};

const KEY: &[u8; 64] = b"0123456789abcdef0123456789abcdefFEDCBA9876543210fedcba9876543210";

struct Setup {
    reg: BdevRegistry,
    keys: Keyring,
    _dir: tempfile::TempDir,
}

fn setup(key: &[u8]) -> Setup {
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
            num_blocks: 64,
            block_size: 512,
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
fn round_trip_zero_copy_reads_bounce_writes_and_ciphertext_on_the_base() {
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
