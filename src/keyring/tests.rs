//! Hostile and careless key files: each refused with the rule it breaks.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::*;

fn write(path: &Path, data: &[u8], mode: u32) {
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

const SECRET: &[u8] = b"0123456789abcdef-very-secret-key-bytes";

#[test]
fn accepts_a_private_regular_file_and_lists_name_and_path_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k0");
    write(&p, SECRET, 0o600);
    let r = Keyring::default();
    r.add_file("k0", &p).unwrap();
    assert_eq!(r.get("k0").unwrap().bytes(), SECRET);
    let e = r.add_file("k0", &p).unwrap_err();
    assert_eq!(e.errno, libc::EEXIST);
    let list = r.list_json().to_string();
    assert!(
        list.contains("\"k0\"") && list.contains(p.to_str().unwrap()),
        "{list}"
    );
    assert!(!list.contains("secret"), "{list}");
    let cfg = serde_json::to_string(&r.config_entries()).unwrap();
    assert!(!cfg.contains("secret"), "{cfg}");
    assert!(!format!("{:?}", r.get("k0").unwrap()).contains("secret"));
    // Read-only for the owner is fine too.
    let p4 = dir.path().join("k4");
    write(&p4, SECRET, 0o400);
    r.add_file("k4", &p4).unwrap();
}

#[test]
fn refuses_hostile_files_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let r = Keyring::default();
    let open = dir.path().join("open");
    write(&open, SECRET, 0o644);
    let e = r.add_file("a", &open).unwrap_err();
    assert_eq!(e.errno, libc::EPERM);
    assert!(e.message.contains("mode 0644"), "{}", e.message);

    let group = dir.path().join("group");
    write(&group, SECRET, 0o640);
    assert!(r
        .add_file("a", &group)
        .unwrap_err()
        .message
        .contains("group or others"));

    let target = dir.path().join("target");
    write(&target, SECRET, 0o600);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = r.add_file("a", &link).unwrap_err();
    assert!(e.message.contains("symbolic link"), "{}", e.message);

    let empty = dir.path().join("empty");
    write(&empty, b"", 0o600);
    assert!(r
        .add_file("a", &empty)
        .unwrap_err()
        .message
        .contains("empty"));

    let big = dir.path().join("big");
    write(&big, &vec![7u8; MAX_KEY_LEN + 1], 0o600);
    assert!(r
        .add_file("a", &big)
        .unwrap_err()
        .message
        .contains("more than"));

    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
    let e = r.add_file("a", &sub).unwrap_err();
    assert!(e.message.contains("not a regular file"), "{}", e.message);

    let e = r.add_file("a", Path::new("relative/key")).unwrap_err();
    assert!(e.message.contains("absolute"), "{}", e.message);
    let e = r.add_file("a", &dir.path().join("absent")).unwrap_err();
    assert_eq!(e.errno, libc::ENOENT);

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let other = dir.path().join("other");
        write(&other, SECRET, 0o600);
        std::os::unix::fs::chown(&other, Some(65534), Some(65534)).unwrap();
        let e = r.add_file("a", &other).unwrap_err();
        assert!(e.message.contains("owned by uid 65534"), "{}", e.message);
    }
    // Nothing was added, and no message carried the key.
    assert_eq!(r.list_json(), serde_json::json!([]));
}

#[test]
fn removed_keys_stay_with_their_users() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k");
    write(&p, SECRET, 0o600);
    let r = Keyring::default();
    r.add_file("k", &p).unwrap();
    let user = r.get("k").unwrap();
    r.remove("k").unwrap();
    assert_eq!(r.get("k").unwrap_err().errno, libc::ENOKEY);
    assert_eq!(r.remove("k").unwrap_err().errno, libc::ENOKEY);
    let l = r.list_json();
    assert_eq!(l[0]["removed"], true);
    assert_eq!(l[0]["refcnt"], 1);
    assert_eq!(user.bytes(), SECRET);
    // Still saved: the user's saved creation call names it.
    assert_eq!(r.config_entries().len(), 1);
    drop(user);
    assert_eq!(r.list_json(), serde_json::json!([]));
    assert!(r.config_entries().is_empty());
    // The name is free again.
    r.add_file("k", &p).unwrap();
    assert_eq!(r.list_json()[0]["refcnt"], 1);
}
