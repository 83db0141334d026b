//! Taking the rbd images over from a predecessor that died (`kill -9`, a crash).
//!
//! A dead librbd client keeps its images' exclusive locks, and its watches on the image
//! headers stay registered with the OSDs until `osd_client_watch_timeout` (30 s) expires:
//! librbd will not break a lock whose owner still watches, so a restarted daemon's first
//! write waits that long, and the guest with it.
//!
//! So blockd records the client address of each of its RADOS connections (with the
//! cluster's fsid) in a small file next to its `--config`, written atomically before the
//! connection opens any image. At the next start it reads the file: those addresses are its
//! predecessor's, which is dead (a live blockd on the same RPC socket stops the start before
//! the file is read). Before a bdev's image serves I/O, every predecessor address on that
//! cluster is blocklisted (the OSDs drop its watches and refuse its requests, so a process
//! that is somehow still alive cannot write any more), and an exclusive lock owned by one of
//! them is broken. Locks held by any other client are left alone: only the predecessor is
//! known to be dead. The new connections have new addresses (librados draws a random
//! nonce per connection), so the blocklist entries never match this instance.
//!
//! A live peer on the same image, such as the other side of a live migration, is never
//! blocklisted and its lock never broken: it is not in this configuration's record (the
//! file belongs to one `--config`), and lock moves between live instances are librbd's
//! cooperative hand-over (see [`super`]). This holds as long as each instance has a
//! `--config` of its own: two live daemons started on the same configuration file would
//! each take the other for a dead predecessor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::atomic_file::write_atomic;
use crate::rbd::{Image, Rados, RbdError};

/// How long the predecessor's blocklist entries last: far longer than any watch or request
/// of the dead client could linger, short enough not to accumulate.
pub const BLOCKLIST_EXPIRE: Duration = Duration::from_secs(3600);

/// Blocklist commands sent at once (the record lists one client per connection the
/// predecessor ever opened, closed ones included).
const BLOCKLIST_BATCH: usize = 16;

/// `RBD_FEATURE_EXCLUSIVE_LOCK` (librbd.h).
const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

/// One RADOS connection of an instance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Client {
    pub fsid: String,
    pub addr: String,
}

#[derive(Default, Serialize, Deserialize)]
struct Record {
    /// The instance that wrote the file (for the operator).
    pid: u32,
    clients: Vec<Client>,
}

#[derive(Default)]
struct State {
    /// Where the record is kept; `None`: takeover is off (no `--config`).
    path: Option<PathBuf>,
    /// The predecessor's connections, from the record found at start.
    predecessors: BTreeSet<Client>,
    /// Predecessor addresses already blocklisted.
    blocklisted: BTreeSet<Client>,
    /// This instance's connections.
    own: BTreeSet<Client>,
    /// The start-up replay is done: the record lists only `own`.
    settled: bool,
}

/// The record of this instance's RADOS clients and the predecessor's (part of
/// [`super::RbdState`]).
#[derive(Default)]
pub struct Takeover {
    state: Mutex<State>,
}

impl Takeover {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns the takeover on with the record at `path`: reads the predecessor's clients
    /// from it (a missing file: none; an unreadable one is logged and ignored, as the
    /// cost is only the 30 s wait). Call before any rbd bdev is created.
    pub fn enable(&self, path: &Path) {
        let predecessors = match std::fs::read(path) {
            Ok(b) => match serde_json::from_slice::<Record>(&b) {
                Ok(r) => {
                    if !r.clients.is_empty() {
                        tracing::info!(
                            record = %path.display(),
                            pid = r.pid,
                            clients = r.clients.len(),
                            "rbd clients of the previous instance found: its image locks \
                             will be taken over"
                        );
                    }
                    r.clients.into_iter().collect()
                }
                Err(e) => {
                    tracing::warn!(record = %path.display(), "ignoring an unreadable rbd \
                                   client record: {e}");
                    BTreeSet::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => {
                tracing::warn!(record = %path.display(), "cannot read the rbd client record: {e}");
                BTreeSet::new()
            }
        };
        let mut st = self.lock();
        st.path = Some(path.to_path_buf());
        st.predecessors = predecessors;
    }

    /// Records `conn`'s address before it opens an image (so that the next instance can
    /// take over what it locks). Fails when the record cannot be written: an image opened
    /// anyway would hold off the next instance for the watch timeout after a crash.
    pub fn adopt(&self, conn: &Rados) -> Result<(), RbdError> {
        let mut st = self.lock();
        if st.path.is_none() {
            return Ok(());
        }
        let me = Client {
            fsid: conn.fsid()?,
            addr: conn.addrs()?,
        };
        if st.own.contains(&me) {
            return Ok(());
        }
        st.own.insert(me.clone());
        if let Err(e) = write_record(&st) {
            st.own.remove(&me);
            return Err(e);
        }
        tracing::debug!(fsid = me.fsid, addr = me.addr, "rbd client recorded");
        Ok(())
    }

    /// Takes `image` (opened on `conn`) over from the predecessor: blocklists every
    /// predecessor address on this cluster (once each), then breaks the image's exclusive
    /// lock if one of them owns it. Returns the owners whose lock was broken.
    pub fn take_over(&self, conn: &Rados, image: &Image) -> Result<Vec<String>, RbdError> {
        let mut st = self.lock();
        if st.predecessors.is_empty() {
            return Ok(Vec::new());
        }
        let fsid = conn.fsid()?;
        let mine: Vec<Client> = st
            .predecessors
            .iter()
            .filter(|c| c.fsid == fsid && !st.own.contains(c))
            .cloned()
            .collect();
        // Each command waits for the monitors to commit a new OSD map: sent together,
        // they share one commit instead of one each.
        let todo: Vec<&Client> = mine
            .iter()
            .filter(|c| !st.blocklisted.contains(*c))
            .collect();
        let mut results: Vec<Result<(), RbdError>> = Vec::with_capacity(todo.len());
        for batch in todo.chunks(BLOCKLIST_BATCH) {
            std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|c| s.spawn(|| conn.blocklist_add(&c.addr, BLOCKLIST_EXPIRE)))
                    .collect();
                results.extend(handles.into_iter().map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(RbdError::new(libc::EIO, "blocklisting thread panicked"))
                    })
                }));
            });
        }
        for (c, r) in todo.into_iter().zip(results) {
            r?;
            tracing::info!(
                addr = c.addr,
                fsid = c.fsid,
                "blocklisted the previous instance's rbd client"
            );
            st.blocklisted.insert(c.clone());
        }
        drop(st);
        let mut broken = Vec::new();
        if image.features()? & RBD_FEATURE_EXCLUSIVE_LOCK == 0 {
            // No lock to break (librbd answers EINVAL for its owners).
            return Ok(broken);
        }
        for owner in image.lock_owners()? {
            if mine.iter().any(|c| same_client(&c.addr, &owner)) {
                image.lock_break(&owner)?;
                tracing::info!(
                    image = image.what(),
                    owner,
                    "broke the previous instance's exclusive lock"
                );
                broken.push(owner);
            }
        }
        Ok(broken)
    }

    /// The start-up replay is done: every image of the configuration is taken over, so the
    /// record now lists only this instance's clients. The predecessor's stay known in
    /// memory: an image created later over RPC (an agent recreating the configuration
    /// itself) is taken over too.
    pub fn settle(&self) {
        let mut st = self.lock();
        if st.path.is_none() {
            return;
        }
        st.settled = true;
        if let Err(e) = write_record(&st) {
            tracing::warn!("{e}");
        }
    }
}

fn write_record(st: &State) -> Result<(), RbdError> {
    let Some(path) = &st.path else {
        return Ok(());
    };
    // Until `settle`, the predecessor's clients stay listed: an instance that dies while
    // starting must not make its successor forget them.
    let clients = if st.settled {
        st.own.iter().cloned().collect()
    } else {
        st.own.union(&st.predecessors).cloned().collect()
    };
    let rec = Record {
        pid: std::process::id(),
        clients,
    };
    let text =
        serde_json::to_vec_pretty(&rec).map_err(|e| RbdError::new(libc::EIO, e.to_string()))?;
    write_atomic(path, &text).map_err(|e| {
        RbdError::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("cannot write the rbd client record {}: {e}", path.display()),
        )
    })
}

/// Whether lock owner `owner` is client address `addr`. Both are entity addresses; one may
/// be printed as an address vector (`[v2:IP:PORT/NONCE,...]`) or with a type prefix: the
/// IP and nonce (`IP:PORT/NONCE`, port 0 for clients) identify the client.
fn same_client(addr: &str, owner: &str) -> bool {
    let norm = |s: &str| -> BTreeSet<String> {
        s.trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|a| {
                let a = a.trim();
                let a = a
                    .strip_prefix("v1:")
                    .or_else(|| a.strip_prefix("v2:"))
                    .or_else(|| a.strip_prefix("any:"))
                    .unwrap_or(a);
                a.to_string()
            })
            .filter(|a| !a.is_empty())
            .collect()
    };
    let (a, o) = (norm(addr), norm(owner));
    a.intersection(&o).next().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_match_their_address_in_any_notation() {
        assert!(same_client("127.0.0.1:0/123", "127.0.0.1:0/123"));
        assert!(same_client("[v2:127.0.0.1:0/123]", "127.0.0.1:0/123"));
        assert!(same_client(
            "any:127.0.0.1:0/123",
            "[any:127.0.0.1:0/123,v1:127.0.0.1:0/123]"
        ));
        assert!(!same_client("127.0.0.1:0/123", "127.0.0.1:0/1234"));
        assert!(!same_client("", ""));
    }
}
