//! NBD exports: a name under which a bdev is served, and the connections attached to it.
//!
//! One export per bdev: creating an export claims the bdev (`nbd export NAME`), so a second
//! export of the same bdev, or a vhost controller on it, is refused with the claimer's name.
//! Any number of clients may attach to one export (each on its own reactor channel).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::proto;
use crate::bdev::Bdev;
use crate::error::Error;
use crate::sync::lock;

/// Largest request payload (read or write) accepted: 32 MiB, advertised as the maximum
/// block size (proto.md "Block size constraints").
pub const MAX_REQUEST_BYTES: u32 = 32 * 1024 * 1024;

/// An export.
pub struct Export {
    /// Name clients ask for (NBD_OPT_GO / EXPORT_NAME).
    pub name: String,
    pub bdev: Arc<Bdev>,
    /// Refuse writes with EPERM and advertise NBD_FLAG_READ_ONLY.
    pub readonly: bool,
    /// Created by `nbd_start_disk` for a kernel device (not listed as a socket export).
    pub kernel: bool,
    clients: AtomicUsize,
}

impl Export {
    /// Clients currently attached.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// The owner name of the bdev claim.
    pub fn claim_name(name: &str) -> String {
        format!("nbd export {name}")
    }

    /// Transmission flags (proto.md "Transmission flags").
    ///
    /// CAN_MULTI_CONN is advertised when the backend flushes natively: every connection's
    /// channel submits to the same backend object (one mapping, one file, one image), so a
    /// flush on any connection covers writes completed on all of them.
    pub fn transmission_flags(&self) -> u16 {
        let t = self.bdev.backend().io_types();
        let mut f = proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_FUA;
        if self.readonly {
            f |= proto::TFLAG_READ_ONLY;
        } else {
            if t.unmap {
                f |= proto::TFLAG_SEND_TRIM;
            }
            if t.write_zeroes {
                f |= proto::TFLAG_SEND_WRITE_ZEROES;
            }
        }
        if t.flush {
            f |= proto::TFLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// (minimum, preferred, maximum) block sizes: the bdev's block size, 4 KiB (or the block
    /// size when larger), 32 MiB.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let bs = self.bdev.block_size();
        (bs, bs.max(4096), MAX_REQUEST_BYTES)
    }

    /// The object `nbd_get_exports` returns.
    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "bdev_name": self.bdev.name(), "readonly": self.readonly,
               "clients": self.clients()})
    }
}

/// A client attached to an export; detaches on drop.
pub struct Attachment {
    pub export: Arc<Export>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.export.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Exports by name.
#[derive(Default)]
pub struct Exports {
    map: Mutex<BTreeMap<String, Arc<Export>>>,
}

/// Checks an export name: a non-empty proto.md string (≤ 4096 bytes, no NUL).
pub fn validate_name(name: &str) -> crate::error::Result<()> {
    if name.is_empty() || name.len() > proto::MAX_STRING || name.contains('\0') {
        return Err(Error::invalid(format!(
            "export name '{}' must be 1 to {} bytes without NUL",
            name.escape_debug(),
            proto::MAX_STRING
        )));
    }
    Ok(())
}

impl Exports {
    /// Adds an export of `bdev`, claiming it. -17 when the name exists, -16 (naming the
    /// claimer) when the bdev is claimed.
    pub fn add(
        &self,
        name: &str,
        bdev: Arc<Bdev>,
        readonly: bool,
        kernel: bool,
    ) -> crate::error::Result<Arc<Export>> {
        validate_name(name)?;
        let mut map = lock(&self.map);
        if map.contains_key(name) {
            return Err(Error::new(
                libc::EEXIST,
                format!("nbd export {name} already exists: File exists"),
            ));
        }
        if let Err(holder) = bdev.claim(&Export::claim_name(name)) {
            return Err(Error::new(
                libc::EBUSY,
                format!(
                    "bdev {} is already claimed by {holder}: Device or resource busy",
                    bdev.name()
                ),
            ));
        }
        let readonly = readonly || bdev.backend().read_only();
        let e = Arc::new(Export {
            name: name.to_string(),
            bdev,
            readonly,
            kernel,
            clients: AtomicUsize::new(0),
        });
        map.insert(name.to_string(), e.clone());
        tracing::info!(
            export = name,
            bdev = e.bdev.name(),
            readonly,
            "nbd export added"
        );
        Ok(e)
    }

    /// Removes an export and releases its bdev; refused (-16) while clients are attached
    /// unless `force` (the caller then disconnects them).
    pub fn remove(&self, name: &str, force: bool) -> crate::error::Result<Arc<Export>> {
        let mut map = lock(&self.map);
        let Some(e) = map.get(name).cloned() else {
            return Err(Error::new(
                libc::ENODEV,
                format!("nbd export {name} does not exist: No such device"),
            ));
        };
        if !force && e.clients() > 0 {
            return Err(Error::new(
                libc::EBUSY,
                format!(
                    "nbd export {name} has {} client(s) connected: Device or resource busy \
                     (disconnect them or pass force)",
                    e.clients()
                ),
            ));
        }
        map.remove(name);
        e.bdev.release(&Export::claim_name(name));
        tracing::info!(export = name, "nbd export removed");
        Ok(e)
    }

    /// Attaches a client to the export `name`; an empty name selects the default export
    /// (the only socket export, when there is exactly one).
    pub fn attach(&self, name: &str) -> Option<Attachment> {
        let map = lock(&self.map);
        let e = if name.is_empty() {
            let mut socket = map.values().filter(|e| !e.kernel);
            match (socket.next(), socket.next()) {
                (Some(e), None) => e.clone(),
                _ => return None,
            }
        } else {
            map.get(name)?.clone()
        };
        e.clients.fetch_add(1, Ordering::AcqRel);
        Some(Attachment { export: e })
    }

    /// The export named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.map).get(name).cloned()
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        lock(&self.map).values().cloned().collect()
    }

    /// Names of the socket exports (NBD_OPT_LIST).
    pub fn socket_names(&self) -> Vec<String> {
        lock(&self.map)
            .values()
            .filter(|e| !e.kernel)
            .map(|e| e.name.clone())
            .collect()
    }
}
