//! What the encryption tests share: key and passphrase files, and a plaintext that is easy
//! to find again on the base device or in RADOS objects (it must never be there).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes `data` to `dir/name` with permission bits `mode` (0o600 is what the keyring
/// accepts).
pub fn key_file(dir: &Path, name: &str, data: &[u8], mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// `len` bytes of 32-byte lines naming their offset from `offset`.
pub fn marked(len: usize, offset: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let line = format!("PLAINTEXT-MARK {:>16}\n", offset + v.len() as u64);
        v.extend_from_slice(line.as_bytes());
    }
    v.truncate(len);
    v
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
