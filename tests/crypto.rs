//! Keys by reference and the crypto bdev, through a real daemon: the keyring RPCs and
//! blockctl, hostile key files refused over RPC, and no key byte in any RPC answer, saved
//! configuration or log line.

mod common;

use std::path::{Path, PathBuf};

use common::blk_client::BlkClient;
use common::secrets::{contains, key_file, marked};
use common::Daemon;
use serde_json::{json, Value};

/// A recognizable 64-byte XTS key (two different AES-256 keys) that no output may contain.
const KEY: &[u8; 64] = b"KEYBYTES-first-half-0123456789ab*KEYBYTES-second-half-9876543210";

/// Panics when `text` holds the key or a recognizable part of it.
fn assert_no_key(what: &str, text: &str) {
    for needle in ["KEYBYTES", "first-half", "second-half"] {
        assert!(!text.contains(needle), "{what} carries key bytes:\n{text}");
    }
    let hex: String = KEY[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        !text.contains(&hex),
        "{what} carries the key in hex:\n{text}"
    );
}

#[test]
fn keyring_rpcs_refuse_hostile_files_and_never_show_the_key() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let good = key_file(dir.path(), "good.key", KEY, 0o600);
    let open = key_file(dir.path(), "open.key", KEY, 0o644);
    let empty = key_file(dir.path(), "empty.key", b"", 0o600);
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&good, &link).unwrap();

    let mut answers = String::new();
    for (path, why) in [
        (&open, "mode 0644"),
        (&empty, "empty"),
        (&link, "symbolic link"),
        (&dir.path().to_path_buf(), "not a regular file"),
    ] {
        let (code, msg) = d
            .rpc("keyring_file_add_key", json!({"name": "k", "path": path}))
            .unwrap_err();
        assert!(msg.contains(why) && msg.contains("key k"), "{code} {msg}");
        answers.push_str(&msg);
    }
    assert_eq!(d.rpc_ok("keyring_get_keys", Value::Null), json!([]));

    // blockctl, rpc.py's positional form.
    let o = d.blockctl(&["keyring_file_add_key", "key0", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, msg) = d
        .rpc(
            "keyring_file_add_key",
            json!({"name": "key0", "path": good}),
        )
        .unwrap_err();
    assert_eq!(code, -(libc::EEXIST as i64), "{msg}");
    let keys = d.rpc_ok("keyring_get_keys", Value::Null);
    assert_eq!(keys[0]["name"], "key0");
    assert_eq!(keys[0]["path"], good.to_str().unwrap());
    assert_eq!(keys[0]["removed"], false);
    let o = d.blockctl(&["keyring_get_keys"]);
    answers.push_str(&String::from_utf8_lossy(&o.stdout));

    let saved = String::from_utf8_lossy(&d.blockctl(&["save_config"]).stdout).to_string();
    let cfg: Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(cfg["subsystems"][0]["subsystem"], "keyring");
    assert_eq!(
        cfg["subsystems"][0]["config"][0],
        json!({"method": "keyring_file_add_key", "params": {"name": "key0", "path": good}})
    );
    answers.push_str(&saved);

    let o = d.blockctl(&["keyring_file_remove_key", "key0"]);
    assert!(o.status.success());
    let (code, msg) = d
        .rpc("keyring_file_remove_key", json!({"name": "key0"}))
        .unwrap_err();
    assert_eq!(code, -(libc::ENOKEY as i64), "{msg}");
    assert_eq!(d.rpc_ok("keyring_get_keys", Value::Null), json!([]));

    assert_no_key("RPC answers and saved config", &answers);
    assert_no_key("the daemon's log", &d.log());
}

/// The local pool `p` under `dir/pools` with the image `vm` of `mib` MiB, made by blockctl;
/// returns the pool directory.
fn local_image(dir: &Path, mib: &str) -> PathBuf {
    let pools = dir.join("pools");
    for args in [
        &["pool", "create", "local:p"][..],
        &["image", "create", "local:p/vm", "-s", mib],
    ] {
        let o = std::process::Command::new(common::blockctl_bin())
            .args(args)
            .arg("--pool-dir")
            .arg(&pools)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    pools
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// AES-256-XTS of one data unit with tweak `lba`, by Python's `cryptography` package
/// (OpenSSL's XTS; `openssl enc` refuses XTS ciphers): an implementation independent of
/// RustCrypto's. `None` when the package is missing.
fn reference_xts(plain: &[u8], lba: u64) -> Option<Vec<u8>> {
    let mut tweak = [0u8; 16];
    tweak[..8].copy_from_slice(&lba.to_le_bytes());
    let script = format!(
        "import sys\n\
         from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
         e = Cipher(algorithms.AES(bytes.fromhex('{}')), modes.XTS(bytes.fromhex('{}'))).encryptor()\n\
         sys.stdout.buffer.write(e.update(bytes.fromhex('{}')) + e.finalize())\n",
        hex(KEY),
        hex(&tweak),
        hex(plain)
    );
    let o = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .ok()?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("No module named"), "{err}");
        return None;
    }
    Some(o.stdout)
}

/// Writes `data` at `off` through the vhost-user-blk socket `sock` and reads it back.
fn write_and_check(sock: &Path, off: u64, data: &[u8]) {
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, data.len()).unwrap();
    c.buf()[..data.len()].copy_from_slice(data);
    assert_eq!(c.write(0, off, data.len()), 0);
    assert_eq!(c.flush(0), 0);
    c.buf()[..data.len()].fill(0);
    assert_eq!(c.read(0, off, data.len()), 0);
    assert!(c.buf()[..data.len()] == *data, "read back differs");
}

fn read_back(sock: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, len).unwrap();
    assert_eq!(c.read(0, off, len), 0);
    c.buf()[..len].to_vec()
}

#[test]
fn crypto_bdev_over_aio_and_local_pool_matches_reference_xts_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "disk.key", KEY, 0o600);
    let file = dir.path().join("disk.raw");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let pools = local_image(dir.path(), "16");
    let cfg = dir.path().join("blockd.json");
    let args = ["-m", "0x1", "--config", cfg.to_str().unwrap()];
    let d = Daemon::start_with(&args);

    d.rpc_ok("keyring_file_add_key", json!({"name": "key0", "path": key}));
    d.rpc_ok(
        "bdev_aio_create",
        json!({"filename": file, "name": "Aio0", "block_size": 512}),
    );
    // Missing key, inline key material: clear refusals, nothing created.
    let (code, msg) = d
        .rpc(
            "bdev_crypto_create",
            json!({"base_bdev_name": "Aio0", "name": "C0", "key_name": "nokey"}),
        )
        .unwrap_err();
    assert_eq!(code, -(libc::ENOKEY as i64), "{msg}");
    assert!(msg.contains("nokey"), "{msg}");
    let (_, msg) = d
        .rpc(
            "bdev_crypto_create",
            json!({"base_bdev_name": "Aio0", "name": "C0", "key": hex(KEY)}),
        )
        .unwrap_err();
    assert!(msg.contains("keyring_file_add_key"), "{msg}");
    let o = d.blockctl(&["bdev_crypto_create", "Aio0", "C0", "-n", "key0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, _) = d
        .rpc("bdev_aio_delete", json!({"name": "Aio0"}))
        .unwrap_err();
    assert_eq!(code, -(libc::EBUSY as i64), "the base is claimed");
    d.rpc_ok(
        "bdev_local_create",
        json!({"pool": "p", "image": "vm", "name": "L0", "pool_dir": pools}),
    );
    d.rpc_ok(
        "bdev_crypto_create",
        json!({"base_bdev_name": "L0", "name": "C1", "key_name": "key0"}),
    );
    for (c, b) in [("vhost.0", "C0"), ("vhost.1", "C1")] {
        d.rpc_ok(
            "vhost_create_blk_controller",
            json!({"ctrlr": c, "dev_name": b}),
        );
    }
    let off = 1u64 << 20;
    let data = marked(128 << 10, off);
    write_and_check(&d.socket_dir().join("vhost.0"), off, &data);
    write_and_check(&d.socket_dir().join("vhost.1"), off, &data);

    // The bases hold no plaintext, and the ciphertext is OpenSSL's AES-256-XTS with the
    // LBA as tweak.
    let on_disk = std::fs::read(&file).unwrap();
    let image = std::fs::read(pools.join("p").join("vm.img")).unwrap();
    for raw in [&on_disk, &image] {
        assert!(!contains(raw, b"PLAINTEXT-MARK"), "plaintext on the base");
        assert!(raw[off as usize..][..data.len()] != *data);
    }
    assert_eq!(
        on_disk[off as usize..][..data.len()],
        image[off as usize..][..data.len()]
    );
    let lba = off / 512 + 3;
    let block = &data[3 * 512..4 * 512];
    match reference_xts(block, lba) {
        Some(expect) => assert!(
            on_disk[(lba * 512) as usize..][..512] == expect[..],
            "blockd's ciphertext differs from python-cryptography's AES-XTS"
        ),
        None => eprintln!("SKIP the XTS cross-check: python3 has no cryptography package"),
    }

    let saved = String::from_utf8_lossy(&d.blockctl(&["save_config"]).stdout).to_string();
    let cfg_v: Value = serde_json::from_str(&saved).unwrap();
    let bdev_cfg = cfg_v["subsystems"][1]["config"].to_string();
    assert!(bdev_cfg.contains(r#""key_name":"key0""#), "{bdev_cfg}");
    let bdevs = d.rpc_ok("bdev_get_bdevs", json!({"name": "C0"}));
    assert_eq!(bdevs[0]["driver_specific"]["crypto"]["key_name"], "key0");
    assert_eq!(bdevs[0]["supported_io_types"]["write_zeroes"], false);
    let mut outputs = saved + &bdevs.to_string();
    outputs.push_str(&std::fs::read_to_string(&cfg).unwrap());
    outputs.push_str(&d.rpc_ok("keyring_get_keys", Value::Null).to_string());
    assert_no_key("RPC answers and saved config", &outputs);
    assert_no_key("the daemon's log", &d.log());
    drop(d);

    // A restart with the saved configuration (the key by name) serves the same plaintext.
    let d = Daemon::start_with(&args);
    assert_eq!(
        read_back(&d.socket_dir().join("vhost.0"), off, data.len()),
        data
    );
    assert_eq!(
        read_back(&d.socket_dir().join("vhost.1"), off, data.len()),
        data
    );
    assert_no_key("the daemon's log", &d.log());
    drop(d);

    // Without the key file the restart fails, naming the key; nothing is served.
    std::fs::remove_file(&key).unwrap();
    let f = match Daemon::try_start(&args) {
        Err(f) => f,
        Ok(_) => panic!("blockd started without its key"),
    };
    assert!(
        f.log.contains("key key0") && f.log.contains("disk.key"),
        "{}",
        f.log
    );
    assert_no_key("the daemon's log", &f.log);
}

/// The crypto bdev over malloc takes the zero-copy path (the base lends its memory): a
/// libblkio client's data reads back, the base's `bdev_get_iostat` counts the accesses as
/// reads and writes, and the base holds OpenSSL's AES-256-XTS of the data, no plaintext.
#[test]
fn crypto_bdev_over_malloc_zero_copy_matches_reference_xts_and_counts_in_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "disk.key", KEY, 0o600);
    let d = Daemon::start_with(&["-m", "0x1"]);
    d.rpc_ok("keyring_file_add_key", json!({"name": "key0", "path": key}));
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": "M0", "num_blocks": 32768, "block_size": 512}),
    );
    d.rpc_ok(
        "bdev_crypto_create",
        json!({"base_bdev_name": "M0", "name": "C0", "key_name": "key0"}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.0", "dev_name": "C0"}),
    );
    let off = 1u64 << 20;
    let data = marked(128 << 10, off);
    write_and_check(&d.socket_dir().join("vhost.0"), off, &data);
    // The base lends its memory (SPDK's `zcopy` I/O type); the crypto bdev does not.
    let types =
        |b: &str| d.rpc_ok("bdev_get_bdevs", json!({"name": b}))[0]["supported_io_types"].clone();
    assert_eq!(types("M0")["zcopy"], true);
    assert_eq!(types("C0")["zcopy"], false);
    let st = d.rpc_ok("bdev_get_iostat", json!({"name": "M0"}))["bdevs"][0].clone();
    assert_eq!(st["num_write_ops"], 1, "{st}");
    assert_eq!(st["bytes_written"], data.len(), "{st}");
    assert!(st["bytes_read"].as_u64() >= Some(data.len() as u64), "{st}");
    assert_eq!(st["io_error"], 0, "{st}");

    // Release the base (the controller goes once the client's disconnect is processed)
    // and read its raw bytes through a controller of its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(e) = d.rpc("vhost_delete_controller", json!({"ctrlr": "vhost.0"})) {
        assert!(std::time::Instant::now() < deadline, "{e:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    d.rpc_ok("bdev_crypto_delete", json!({"name": "C0"}));
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.1", "dev_name": "M0"}),
    );
    let sock = d.socket_dir().join("vhost.1");
    let mut c = BlkClient::connect(sock.to_str().unwrap(), 1, data.len()).unwrap();
    assert_eq!(c.read(0, off, data.len()), 0, "{}", d.log());
    let raw = c.buf()[..data.len()].to_vec();
    assert!(!contains(&raw, b"PLAINTEXT-MARK"), "plaintext on the base");
    for blk in [0u64, 3, 255] {
        let block = &data[(blk * 512) as usize..][..512];
        match reference_xts(block, off / 512 + blk) {
            Some(expect) => assert!(
                raw[(blk * 512) as usize..][..512] == expect[..],
                "block {blk}: blockd's ciphertext differs from python-cryptography's AES-XTS"
            ),
            None => eprintln!("SKIP the XTS cross-check: python3 has no cryptography package"),
        }
    }
    assert_no_key("the daemon's log", &d.log());
}

/// HMAC-SHA256 of `msg` keyed with `key`, by Python's standard library: an implementation
/// independent of RustCrypto's.
fn reference_hmac_sha256(key: &[u8], msg: &[u8]) -> String {
    let script = format!(
        "import hmac, hashlib\n\
         print(hmac.new(bytes.fromhex('{}'), bytes.fromhex('{}'), hashlib.sha256).hexdigest())\n",
        hex(key),
        hex(msg)
    );
    let o = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// The header-less crypto bdev over a local-pool image records a key check value in the
/// saved configuration: a restart whose key file under the same name holds another key
/// fails with EKEYREJECTED naming the bdev and the key, and serves nothing (the daemon does
/// not start; `load_config` into a running daemon creates neither the crypto bdev nor the
/// controller on top); with the right key the same plaintext is served.
#[test]
fn crypto_bdev_refuses_a_wrong_key_on_restart_and_serves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "disk.key", KEY, 0o600);
    let pools = local_image(dir.path(), "8");
    let cfg = dir.path().join("blockd.json");
    let args = ["-m", "0x1", "--config", cfg.to_str().unwrap()];
    let d = Daemon::start_with(&args);
    d.rpc_ok("keyring_file_add_key", json!({"name": "key0", "path": key}));
    d.rpc_ok(
        "bdev_local_create",
        json!({"pool": "p", "image": "vm", "name": "L0", "pool_dir": pools}),
    );
    let o = d.blockctl(&["bdev_crypto_create", "L0", "C1", "-n", "key0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": "vhost.1", "dev_name": "C1"}),
    );
    let off = 3u64 << 20;
    let data = marked(64 << 10, off);
    write_and_check(&d.socket_dir().join("vhost.1"), off, &data);

    // The check value: HMAC-SHA256 of the label keyed with the key, cut to 16 bytes; in
    // the bdev's description and the saved config, and no key material.
    let check = d.rpc_ok("bdev_get_bdevs", json!({"name": "C1"}))[0]["driver_specific"]["crypto"]
        ["key_check"]
        .as_str()
        .unwrap()
        .to_string();
    let expect = reference_hmac_sha256(KEY, b"blockd bdev_crypto key check v1: AES_XTS SIMPLE_LBA");
    assert_eq!(check, expect[..32]);
    assert!(!hex(KEY).contains(&check));
    let saved = std::fs::read_to_string(&cfg).unwrap();
    let saved_v: Value = serde_json::from_str(&saved).unwrap();
    let create = saved_v["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["config"].as_array().cloned().unwrap_or_default())
        .find(|e| e["method"] == "bdev_crypto_create")
        .expect("bdev_crypto_create saved");
    assert_eq!(create["params"]["key_check"], check.as_str());
    assert_eq!(create["params"]["key_name"], "key0");
    assert_no_key("the saved config", &saved);
    drop(d);

    // Another key under the same name and path.
    let mut other = *KEY;
    other[40] ^= 0x20;
    key_file(dir.path(), "disk.key", &other, 0o600);
    let f = match Daemon::try_start(&args) {
        Err(f) => f,
        Ok(_) => panic!("blockd started with the wrong key"),
    };
    for want in [
        "crypto bdev C1",
        "key key0",
        "disk.key",
        "not the key",
        "(code -129)",
    ] {
        assert!(f.log.contains(want), "no {want:?} in:\n{}", f.log);
    }
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        saved,
        "a failed start must leave the configuration as it was"
    );
    assert_no_key("the daemon's log", &f.log);

    // The same configuration loaded into a running daemon: refused, nothing created past
    // the keyring and the base.
    let d = Daemon::start();
    let o = std::process::Command::new(common::blockctl_bin())
        .arg("-s")
        .arg(d.rpc_socket())
        .args(["load_config", "-j"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "load_config with the wrong key succeeded"
    );
    assert!(
        err.contains("crypto bdev C1") && err.contains("key key0"),
        "{err}"
    );
    assert_eq!(
        d.rpc("bdev_get_bdevs", json!({"name": "C1"}))
            .unwrap_err()
            .0,
        -(libc::ENODEV as i64)
    );
    assert_eq!(d.rpc_ok("vhost_get_controllers", Value::Null), json!([]));
    assert!(!d.socket_dir().join("vhost.1").exists());
    assert_no_key("blockctl's error", &err);
    drop(d);

    // The right key again: the same plaintext.
    key_file(dir.path(), "disk.key", KEY, 0o600);
    let d = Daemon::start_with(&args);
    assert_eq!(
        read_back(&d.socket_dir().join("vhost.1"), off, data.len()),
        data
    );
    assert_no_key("the daemon's log", &d.log());
}
