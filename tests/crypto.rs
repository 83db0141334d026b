//! Keys by reference and the crypto bdev, through a real daemon: the keyring RPCs and
//! blockctl, hostile key files refused over RPC, and no key byte in any RPC answer, saved
//! configuration or log line.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::Daemon;
use serde_json::{json, Value};

/// A recognizable 64-byte XTS key (two different AES-256 keys) that no output may contain.
const KEY: &[u8; 64] = b"KEYBYTES-first-half-0123456789ab*KEYBYTES-second-half-9876543210";

fn key_file(dir: &Path, name: &str, data: &[u8], mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

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
