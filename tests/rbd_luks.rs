//! LUKS on RBD through librbd, against the real tools: an image formatted by
//! `rbd encryption format … luks2` and written through blockd reads back the same through
//! QEMU's rbd driver (`encrypt.format=luks2`), and what QEMU writes reads back through
//! blockd; RADOS holds no plaintext; a wrong passphrase is refused naming the image, and
//! nothing is served. Without Ceph the test prints SKIP and passes.

mod common;

use std::path::Path;
use std::process::Command;

#[path = "common/ceph.rs"]
mod ceph;
use ceph::{rbd_cli, RbdImage, POOL};
use common::blk_client::BlkClient;
use common::secrets::{contains, key_file, marked};
use common::Daemon;
use serde_json::{json, Value};

const PASS: &[u8] = b"correct horse battery staple";

/// QEMU's `--image-opts` for the image with LUKS2 and the passphrase file as `sec0`.
fn qemu_opts(conf: &Path, image: &str) -> String {
    format!(
        "driver=rbd,pool={POOL},image={image},conf={},encrypt.format=luks2,encrypt.key-secret=sec0",
        conf.display()
    )
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `bdev_rbd_create` with encryption: unlocking a LUKS key slot runs the PBKDF its format
/// calibrated to about 2 s of CPU (`rbd encryption format`'s cryptsetup defaults), far
/// longer on a loaded machine, so the call gets more than the default 30 s.
fn create_encrypted(d: &Daemon, params: Value) -> Result<Value, (i64, String)> {
    let mut c = blockd::cli::client::RpcClient::connect(
        d.rpc_socket(),
        std::time::Duration::from_secs(300),
    )
    .unwrap();
    match c.call("bdev_rbd_create", Some(params)) {
        Ok(v) => Ok(v),
        Err(blockd::cli::client::ClientError::Rpc { code, message, .. }) => Err((code, message)),
        Err(e) => panic!("bdev_rbd_create: {e}\nlog:\n{}", d.log()),
    }
}

/// Deletes a controller once its client's disconnect has been processed (bounded poll).
fn delete_controller(d: &Daemon, ctrlr: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match d.rpc("vhost_delete_controller", json!({ "ctrlr": ctrlr })) {
            Ok(_) => return,
            Err((_, m)) if m.contains("busy") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("deleting {ctrlr}: {e:?}"),
        }
    }
}

#[test]
fn luks2_image_interoperates_with_rbd_and_qemu_and_refuses_a_wrong_passphrase() {
    let Some(conf) = ceph::conf() else {
        eprintln!("SKIP: no Ceph cluster");
        return;
    };
    if blockd::rbd::ffi::encryption_api().is_err() {
        eprintln!("SKIP: librbd without rbd_encryption_load (Ceph < 16)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pass = key_file(dir.path(), "pass", PASS, 0o600);
    let wrong = key_file(dir.path(), "wrong", b"not the passphrase", 0o600);
    let img = RbdImage::create(conf.clone(), "luks", 64);
    rbd_cli(
        &conf,
        &[
            "encryption",
            "format",
            &img.spec,
            "luks2",
            pass.to_str().unwrap(),
        ],
    );
    let name = img.image_name().to_string();

    let d = Daemon::start();
    d.rpc_ok(
        "keyring_file_add_key",
        json!({"name": "pass0", "path": pass}),
    );
    d.rpc_ok(
        "keyring_file_add_key",
        json!({"name": "bad", "path": wrong}),
    );
    let create = |key: &str| {
        create_encrypted(
            &d,
            json!({"name": "Luks0", "pool_name": POOL, "rbd_name": name, "block_size": 512,
                   "encryption_format": "luks2", "key_name": key}),
        )
    };
    let (code, msg) = create("bad").unwrap_err();
    assert!(
        msg.contains(&img.spec) && msg.contains("wrong passphrase"),
        "{code} {msg}"
    );
    assert_eq!(d.rpc_ok("bdev_get_bdevs", Value::Null), json!([]));
    let (_, msg) = create("nokey").unwrap_err();
    assert!(msg.contains("key nokey not found"), "{msg}");

    // blockctl's flags.
    let o = d.blockctl(&[
        "-t",
        "300",
        "bdev_rbd_create",
        "-b",
        "Luks0",
        "--encryption-format",
        "luks2",
        "--key",
        "pass0",
        POOL,
        &name,
        "512",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = d.rpc_ok("bdev_get_bdevs", json!({"name": "Luks0"}));
    assert_eq!(b[0]["driver_specific"]["rbd"]["encryption_format"], "luks2");
    assert_eq!(b[0]["driver_specific"]["rbd"]["key_name"], "pass0");
    let size = b[0]["num_blocks"].as_u64().unwrap() * 512;
    assert!(size > 32 << 20 && size <= 64 << 20, "{size}");
    let saved = String::from_utf8_lossy(&d.blockctl(&["save_config"]).stdout).to_string();
    assert!(saved.contains(r#""key_name": "pass0""#), "{saved}");
    assert!(!saved.contains("horse"), "{saved}");

    // blockd writes, QEMU reads.
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "luks.0", "dev_name": "Luks0"}),
    );
    let off = 1u64 << 20;
    let data = marked(256 << 10, off);
    {
        let sock = d.socket_dir().join("luks.0");
        let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, data.len()).unwrap();
        c.buf()[..data.len()].copy_from_slice(&data);
        assert_eq!(c.write(0, off, data.len()), 0);
        assert_eq!(c.flush(0), 0);
        c.buf().fill(0);
        assert_eq!(c.read(0, off, data.len()), 0);
        assert!(c.buf()[..data.len()] == data[..]);
    }
    delete_controller(&d, "luks.0");
    d.rpc_ok("bdev_rbd_delete", json!({"name": "Luks0"}));

    let secret = format!("secret,id=sec0,file={}", pass.display());
    let raw = dir.path().join("qemu.raw");
    run(Command::new("qemu-img")
        .args([
            "convert",
            "--object",
            &secret,
            "--image-opts",
            &qemu_opts(&conf, &name),
        ])
        .args(["-O", "raw"])
        .arg(&raw));
    let plain = std::fs::read(&raw).unwrap();
    assert_eq!(
        plain.len() as u64,
        size,
        "QEMU and blockd see the same size"
    );
    assert!(
        plain[off as usize..][..data.len()] == data[..],
        "QEMU reads other data than blockd wrote"
    );

    // QEMU writes, blockd reads.
    let qoff = 8u64 << 20;
    let qdata = marked(64 << 10, qoff);
    let src = dir.path().join("qemu-src");
    std::fs::write(&src, &qdata).unwrap();
    run(Command::new("qemu-io")
        .args([
            "--object",
            &secret,
            "--image-opts",
            &qemu_opts(&conf, &name),
        ])
        .args([
            "-c",
            &format!("write -s {} {qoff} {}", src.display(), qdata.len()),
        ]));
    create("pass0").unwrap();
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "luks.1", "dev_name": "Luks0"}),
    );
    {
        let sock = d.socket_dir().join("luks.1");
        let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, qdata.len()).unwrap();
        assert_eq!(c.read(0, qoff, qdata.len()), 0);
        assert!(
            c.buf()[..qdata.len()] == qdata[..],
            "blockd reads other data than QEMU wrote"
        );
        assert_eq!(c.read(0, off, qdata.len()), 0);
        assert!(c.buf()[..qdata.len()] == data[..qdata.len()]);
    }
    delete_controller(&d, "luks.1");
    d.rpc_ok("bdev_rbd_delete", json!({"name": "Luks0"}));

    // RADOS holds ciphertext only.
    let info: Value = serde_json::from_str(
        &rbd_cli(&conf, &["info", &img.spec, "--format", "json"])
            .stdout
            .iter()
            .map(|&b| b as char)
            .collect::<String>(),
    )
    .unwrap();
    let prefix = info["block_name_prefix"].as_str().unwrap().to_string();
    let objs = run(Command::new("rados")
        .arg("-c")
        .arg(&conf)
        .args(["-p", POOL, "ls"]));
    let mut n = 0;
    for obj in objs.lines().filter(|o| o.starts_with(&prefix)) {
        let out = dir.path().join("obj");
        run(Command::new("rados")
            .arg("-c")
            .arg(&conf)
            .args(["-p", POOL, "get", obj])
            .arg(&out));
        let bytes = std::fs::read(&out).unwrap();
        assert!(
            !contains(&bytes, b"PLAINTEXT-MARK"),
            "plaintext in RADOS object {obj}"
        );
        n += 1;
    }
    assert!(n >= 2, "expected the image's data objects, found {n}");
    assert!(!d.log().contains("horse"), "passphrase in the log");
}

#[test]
fn blockctl_formats_luks1_as_rbd_does_and_refuses_careless_passphrase_files() {
    let Some(conf) = ceph::conf() else {
        eprintln!("SKIP: no Ceph cluster");
        return;
    };
    if blockd::rbd::ffi::encryption_api().is_err() {
        eprintln!("SKIP: librbd without rbd_encryption_format (Ceph < 16)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pass = key_file(dir.path(), "pass", PASS, 0o600);
    let open = key_file(dir.path(), "open", PASS, 0o644);
    let img = RbdImage::create(conf.clone(), "luks1", 32);
    let ctl = |args: &[&str]| {
        Command::new(common::blockctl_bin())
            .args(args)
            .env("CEPH_CONF", &conf)
            .output()
            .unwrap()
    };
    let o = ctl(&[
        "image",
        "encryption",
        "format",
        &img.spec,
        "luks1",
        open.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("mode 0644"));
    let o = ctl(&[
        "image",
        "encryption",
        "format",
        &img.spec,
        "luks1",
        pass.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // QEMU opens it as LUKS1 (its `encrypt.format=luks`) with the passphrase.
    let secret = format!("secret,id=sec0,file={}", pass.display());
    let opts = qemu_opts(&conf, img.image_name()).replace("luks2", "luks");
    run(Command::new("qemu-io")
        .args(["--object", &secret, "--image-opts", &opts])
        .args(["-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k"]));
    // And blockd, as LUKS1 only.
    let d = Daemon::start();
    d.rpc_ok("keyring_file_add_key", json!({"name": "p", "path": pass}));
    let create = |f: &str| {
        create_encrypted(
            &d,
            json!({"name": "L1", "pool_name": POOL, "rbd_name": img.image_name(),
                   "block_size": 512, "encryption_format": f, "key_name": "p"}),
        )
    };
    let (_, msg) = create("luks2").unwrap_err();
    assert!(
        msg.contains("not a LUKS2 image") && msg.contains(&img.spec),
        "{msg}"
    );
    create("luks1").unwrap();
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "l1", "dev_name": "L1"}),
    );
    let sock = d.socket_dir().join("l1");
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, 65536).unwrap();
    assert_eq!(c.read(0, 0, 65536), 0);
    assert!(c.buf()[..65536].iter().all(|&b| b == 0x5a));
}
