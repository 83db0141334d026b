//! `blockd --config FILE`: the configuration survives the process.
//!
//! The file holds exactly what `save_config` returns (SPDK's JSON config, see
//! [`crate::config`]). blockd replays it at start, before it serves RPCs or any vhost-user
//! frontend can reconnect, and rewrites it after every RPC call that changed it: the file
//! always describes the objects that exist, so a daemon restarted after a crash brings back
//! every bdev, controller, target and export under the same names and UUIDs.
//!
//! Which calls change the configuration is not declared per method: after each call the
//! configuration is serialized again and compared with what the file holds. Any method
//! (today's or a future one, or a change an RPC makes indirectly) is persisted as soon as
//! it shows in `save_config`, and read-only calls cost a serialization and no write.
//!
//! Writes are atomic (rename(2) replaces the name in one step): the new text goes to
//! `FILE.tmp` in the same directory, is fsynced, renamed over `FILE`, and the directory is
//! fsynced so that the rename itself survives a power cut. A crash at any point leaves
//! either the previous file or the new one, never a mix; a torn `FILE.tmp` is ignored and
//! overwritten by the next save.
//!
//! Secrets: the file is created mode 0600, but holds no key material, and must never: a
//! handler's `config` must save a reference to a secret (a keyring path, a key's name in a
//! key store), never the secret itself, as `bdev_rbd_register_cluster` saves `key_file`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use serde_json::Value;

use crate::atomic_file::write_atomic;
use crate::localpool::lock::{FileLock, Mode};

/// The persisted configuration file and what it holds.
pub struct ConfigFile {
    path: PathBuf,
    state: Mutex<State>,
    /// Held for the daemon's life (see [`ConfigFile::claim`]).
    _owner: Option<FileLock>,
}

#[derive(Default)]
struct State {
    /// The text the file holds (last successful write).
    written: Option<Vec<u8>>,
    /// The newest text a save tried to write, written or not: a configuration whose
    /// write failed is reported once, to the call that made the change.
    seen: Option<Vec<u8>>,
    /// Set by the shutdown: the objects being torn down must not be saved as gone.
    frozen: bool,
}

/// What [`ConfigFile::save`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Saved {
    /// The file already held this configuration (or saving is frozen).
    Unchanged,
    /// The file now holds the new configuration.
    Written,
}

impl ConfigFile {
    pub fn new(path: &Path) -> Self {
        ConfigFile {
            path: path.to_path_buf(),
            state: Mutex::new(State::default()),
            _owner: None,
        }
    }

    /// The file for a daemon that will own it: refused while another running blockd uses
    /// the same path (an exclusive flock on `FILE.lock`, released when the process dies).
    /// The file's companions name *this* daemon's predecessor (the rbd client record a
    /// restart blocklists): a second live daemon on the same path, a migration's
    /// destination started with the source's file for instance, would take the live
    /// source for a dead one and break its image locks.
    pub fn claim(path: &Path) -> anyhow::Result<Self> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let lock_path = path.with_file_name(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        let lock = FileLock::try_acquire(&lock_path, Mode::Exclusive)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{} is in use by another running blockd (it holds {}): each daemon needs \
                 its own --config",
                path.display(),
                lock_path.display()
            )
        })?;
        Ok(ConfigFile {
            _owner: Some(lock),
            ..ConfigFile::new(path)
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the configuration to replay at start: `None` when the file does not exist yet
    /// (a first start); an error naming the file when it cannot be read or is not a JSON
    /// configuration (blockd never writes a torn file, so someone else did).
    pub fn read(&self) -> anyhow::Result<Option<Value>> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.path.display()))
            }
        };
        let cfg: Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a valid JSON configuration (torn or edited by hand? blockd \
                 replaces it atomically and never leaves it half-written); fix it, or \
                 move it away to start with no configuration",
                self.path.display()
            )
        })?;
        if cfg.get("subsystems").and_then(Value::as_array).is_none() {
            anyhow::bail!(
                "{} is not a blockd configuration: no \"subsystems\" array",
                self.path.display()
            );
        }
        Ok(Some(cfg))
    }

    /// Saves the configuration `snapshot` returns, when it differs from what the file holds.
    ///
    /// `snapshot` runs under the file's lock, so that of two concurrent calls the one that
    /// writes last writes the newer configuration. An error is returned only when this
    /// configuration's write failed for the first time; a later call that changes nothing
    /// retries the write silently (logged) rather than failing a read-only call.
    pub fn save(&self, snapshot: impl FnOnce() -> Value) -> Result<Saved, io::Error> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.frozen {
            return Ok(Saved::Unchanged);
        }
        let mut text = serde_json::to_vec_pretty(&snapshot()).map_err(io::Error::other)?;
        text.push(b'\n');
        if st.written.as_ref() == Some(&text) {
            st.seen = None;
            return Ok(Saved::Unchanged);
        }
        let reported = st.seen.as_ref() == Some(&text);
        match write_atomic(&self.path, &text) {
            Ok(()) => {
                st.written = Some(text);
                st.seen = None;
                Ok(Saved::Written)
            }
            Err(e) => {
                tracing::error!(
                    config = %self.path.display(),
                    "cannot save the configuration: {e}; the last changes will not survive \
                     a restart until a save succeeds"
                );
                st.seen = Some(text);
                if reported {
                    Ok(Saved::Unchanged)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Stops saving for good (the orderly shutdown tears objects down, and the file must
    /// keep describing them for the next start). Waits for a save in progress.
    pub fn freeze(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).frozen = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atomic_file::temp_path;
    use serde_json::json;

    #[test]
    fn saves_only_changes_and_reports_a_failed_write_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockd.json");
        let f = ConfigFile::new(&path);
        assert_eq!(f.read().unwrap(), None);
        let a = json!({"subsystems": [{"subsystem": "bdev", "config": []}]});
        assert_eq!(f.save(|| a.clone()).unwrap(), Saved::Written);
        assert_eq!(f.save(|| a.clone()).unwrap(), Saved::Unchanged);
        assert_eq!(f.read().unwrap(), Some(a.clone()));

        // A directory where the temporary file goes: the write fails before `path` is
        // touched, the change is reported once, and the old file stays whole.
        std::fs::create_dir(temp_path(&path)).unwrap();
        let b = json!({"subsystems": [{"subsystem": "bdev", "config": [{"method": "x"}]}]});
        let e = f.save(|| b.clone()).unwrap_err();
        assert!(e.to_string().contains("blockd.json.tmp"), "{e}");
        assert_eq!(f.save(|| b.clone()).unwrap(), Saved::Unchanged);
        assert_eq!(f.read().unwrap(), Some(a.clone()));
        std::fs::remove_dir(temp_path(&path)).unwrap();
        assert_eq!(f.save(|| b.clone()).unwrap(), Saved::Written);
        assert_eq!(f.read().unwrap(), Some(b));

        f.freeze();
        assert_eq!(f.save(|| a.clone()).unwrap(), Saved::Unchanged);
        assert_ne!(f.read().unwrap(), Some(a));
    }

    #[test]
    fn a_second_daemon_cannot_claim_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let first = ConfigFile::claim(&path).unwrap();
        let e = ConfigFile::claim(&path).err().unwrap().to_string();
        assert!(e.contains("in use by another running blockd"), "{e}");
        drop(first);
        ConfigFile::claim(&path).unwrap();
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, b"{\"subsystems\": [{\"subsys").unwrap();
        let e = ConfigFile::new(&path).read().unwrap_err();
        assert!(
            format!("{e:#}").contains("not a valid JSON configuration"),
            "{e:#}"
        );
        std::fs::write(&path, b"[1]").unwrap();
        let e = ConfigFile::new(&path).read().unwrap_err();
        assert!(e.to_string().contains("no \"subsystems\""), "{e}");
    }
}
