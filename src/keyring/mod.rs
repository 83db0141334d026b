//! Named keys loaded from files, as SPDK's keyring with its `file` module
//! (doc/jsonrpc.md "Keyring": `keyring_file_add_key`, `keyring_file_remove_key`,
//! `keyring_get_keys`).
//!
//! Users of a key (the crypto bdev, LUKS on RBD) refer to it by name: the RPC parameters,
//! the saved configuration, results, errors and logs carry the key's name and path, never
//! its bytes. A key file is refused unless it is a regular file (not followed through a
//! symlink: opened `O_NOFOLLOW`, checked with `fstat` on the opened descriptor, so it cannot
//! be swapped between the check and the read), of mode 0600 or stricter (no group or other
//! bits), owned by the daemon's effective user, and between 1 byte and [`MAX_KEY_LEN`].
//!
//! The bytes live in one [`KeyBytes`] buffer per key: `mlock`ed (best effort: a warning when
//! `RLIMIT_MEMLOCK` refuses, the key still loads), excluded from core dumps
//! (`MADV_DONTDUMP`), and zeroed when the last user drops the key.
//!
//! A removed key disappears from the names a new user may take, but the bdevs that use it
//! keep their reference; `keyring_get_keys` lists it with `removed: true` until they are gone
//! (as SPDK does).

pub mod rpc;
#[cfg(test)]
mod tests;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use serde_json::{json, Value};
use zeroize::Zeroize;

use crate::error::{Error, Result};

/// Largest key file accepted: a LUKS passphrase may be up to 8 MiB in cryptsetup, but
/// blockd's keys are XTS keys (64 bytes, 128 in hex) and passphrases; 64 KiB is plenty and
/// bounds the locked memory per key.
pub const MAX_KEY_LEN: usize = 64 * 1024;

/// A key's bytes: page-aligned, locked in RAM where the limit allows, excluded from core
/// dumps, zeroed on drop.
pub struct KeyBytes {
    ptr: *mut u8,
    len: usize,
    cap: usize,
    locked: bool,
}

// SAFETY: the buffer is owned memory, only read through `&self` after construction.
unsafe impl Send for KeyBytes {}
// SAFETY: as above: no interior mutability.
unsafe impl Sync for KeyBytes {}

impl KeyBytes {
    /// A copy of `data` in a fresh locked buffer (`what` names the key for the warning).
    fn new(data: &[u8], what: &str) -> std::io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize;
        let cap = data.len().max(1).div_ceil(page) * page;
        // SAFETY: a fresh anonymous private mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: advice on the mapping just created; failure is harmless.
        unsafe { libc::madvise(p, cap, libc::MADV_DONTDUMP) };
        // SAFETY: as above.
        let locked = unsafe { libc::mlock(p, cap) } == 0;
        if !locked {
            tracing::warn!(
                key = what,
                "cannot mlock the key's memory ({}): it may be swapped out",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the mapping is `cap >= data.len()` bytes, writable, and not `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast(), data.len()) };
        Ok(KeyBytes {
            ptr: p.cast(),
            len: data.len(),
            cap,
            locked,
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `cap >= len` bytes, written once by `new`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and writable; nothing borrows it any more (`&mut self`).
        let all = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.cap) };
        all.zeroize();
        // SAFETY: the mapping made by `new`, unlocked and unmapped once.
        unsafe {
            if self.locked {
                libc::munlock(self.ptr.cast(), self.cap);
            }
            libc::munmap(self.ptr.cast(), self.cap);
        }
    }
}

impl std::fmt::Debug for KeyBytes {
    /// Never the bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyBytes({} bytes)", self.len)
    }
}

/// A named key.
#[derive(Debug)]
pub struct Key {
    name: String,
    path: PathBuf,
    bytes: KeyBytes,
}

impl Key {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key material: for the crypto code only, never to be printed.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }
}

/// Reads and checks a key file (see the module doc for the rules); the error names the
/// path and the rule that failed, never the content.
pub fn load_key_file(name: &str, path: &Path) -> Result<KeyBytes> {
    let what = format!("key {name} file {}", path.display());
    if !path.is_absolute() {
        return Err(Error::invalid(format!("{what}: the path must be absolute")));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Error::new(
                    libc::EPERM,
                    format!("{what}: is a symbolic link (key files must be regular files)"),
                )
            } else {
                Error::io(format_args!("{what}: cannot open"), &e)
            }
        })?;
    let md = file
        .metadata()
        .map_err(|e| Error::io(format_args!("{what}: cannot stat"), &e))?;
    if !md.file_type().is_file() {
        return Err(Error::new(
            libc::EPERM,
            format!("{what}: not a regular file"),
        ));
    }
    if md.mode() & 0o077 != 0 {
        return Err(Error::new(
            libc::EPERM,
            format!(
                "{what}: mode {:04o} gives access to group or others (must be 0600 or stricter)",
                md.mode() & 0o7777
            ),
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if md.uid() != euid {
        return Err(Error::new(
            libc::EPERM,
            format!(
                "{what}: owned by uid {}, not by blockd's user (uid {euid})",
                md.uid()
            ),
        ));
    }
    if md.len() == 0 {
        return Err(Error::invalid(format!("{what}: the file is empty")));
    }
    if md.len() > MAX_KEY_LEN as u64 {
        return Err(Error::invalid(format!(
            "{what}: {} bytes, more than the {MAX_KEY_LEN} a key file may hold",
            md.len()
        )));
    }
    // Read into a zeroizing buffer of fixed capacity (no reallocation leaves copies behind),
    // one byte more than allowed to notice a file that grew since the fstat.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_KEY_LEN + 1]);
    let mut n = 0;
    let mut f = &file;
    loop {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if n > MAX_KEY_LEN {
                    return Err(Error::invalid(format!(
                        "{what}: more than the {MAX_KEY_LEN} bytes a key file may hold"
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format_args!("{what}: cannot read"), &e)),
        }
    }
    if n == 0 {
        return Err(Error::invalid(format!("{what}: the file is empty")));
    }
    KeyBytes::new(&buf[..n], name)
        .map_err(|e| Error::io(format_args!("{what}: cannot allocate key memory"), &e))
}

#[derive(Default)]
struct Keys {
    active: Vec<Arc<Key>>,
    /// Removed keys still used by someone (listed as `removed: true`).
    removed: Vec<Weak<Key>>,
}

/// The daemon's keys, owned by the application.
#[derive(Default)]
pub struct Keyring {
    keys: Mutex<Keys>,
}

impl Keyring {
    /// `keyring_file_add_key`: loads `path` as key `name`. EEXIST when the name is taken.
    pub fn add_file(&self, name: &str, path: &Path) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("key name must not be empty"));
        }
        if crate::sync::lock(&self.keys)
            .active
            .iter()
            .any(|k| k.name == name)
        {
            return Err(Error::new(
                libc::EEXIST,
                format!("key {name} already exists: File exists"),
            ));
        }
        let bytes = load_key_file(name, path)?;
        let mut keys = crate::sync::lock(&self.keys);
        if keys.active.iter().any(|k| k.name == name) {
            return Err(Error::new(
                libc::EEXIST,
                format!("key {name} already exists: File exists"),
            ));
        }
        keys.active.push(Arc::new(Key {
            name: name.to_string(),
            path: path.to_path_buf(),
            bytes,
        }));
        tracing::info!(key = name, path = %path.display(), "key added");
        Ok(())
    }

    /// `keyring_file_remove_key`: new users cannot take it any more; current users keep it.
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut keys = crate::sync::lock(&self.keys);
        let pos = keys
            .active
            .iter()
            .position(|k| k.name == name)
            .ok_or_else(|| not_found(name))?;
        let key = keys.active.remove(pos);
        keys.removed.retain(|w| w.strong_count() > 0);
        keys.removed.push(Arc::downgrade(&key));
        tracing::info!(key = name, "key removed");
        Ok(())
    }

    /// The key named `name`, for a new user; ENOKEY when there is none (or it was removed).
    pub fn get(&self, name: &str) -> Result<Arc<Key>> {
        crate::sync::lock(&self.keys)
            .active
            .iter()
            .find(|k| k.name == name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    /// `keyring_get_keys`: `[{name, path, removed, probed, refcnt}]` (SPDK's fields; never
    /// the key).
    pub fn list_json(&self) -> Value {
        let keys = crate::sync::lock(&self.keys);
        let entry = |k: &Arc<Key>, removed: bool| {
            // As SPDK: the keyring's own reference counts for an active key; the temporary
            // one `upgrade` made for a removed key does not.
            let refcnt = Arc::strong_count(k) - usize::from(removed);
            json!({"name": k.name, "path": k.path, "removed": removed, "probed": false,
                   "refcnt": refcnt})
        };
        let mut out: Vec<Value> = keys.active.iter().map(|k| entry(k, false)).collect();
        out.extend(
            keys.removed
                .iter()
                .filter_map(Weak::upgrade)
                .map(|k| entry(&k, true)),
        );
        Value::Array(out)
    }

    /// The `keyring_file_add_key` calls that recreate the keys (names and paths): the
    /// active ones, and the removed ones a bdev still uses, whose saved creation call
    /// names them (else the saved configuration could not be replayed; after a restart
    /// such a key is active again) unless their name was given to another key since.
    pub fn config_entries(&self) -> Vec<(&'static str, Value)> {
        let keys = crate::sync::lock(&self.keys);
        let mut all: Vec<Arc<Key>> = keys.active.clone();
        for k in keys.removed.iter().filter_map(Weak::upgrade) {
            if !all.iter().any(|a| a.name == k.name) {
                all.push(k);
            }
        }
        all.iter()
            .map(|k| {
                (
                    "keyring_file_add_key",
                    json!({"name": k.name, "path": k.path}),
                )
            })
            .collect()
    }
}

fn not_found(name: &str) -> Error {
    Error::new(
        libc::ENOKEY,
        format!(
            "key {name} not found (add it with keyring_file_add_key): Required key not available"
        ),
    )
}
