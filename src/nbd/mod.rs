//! The NBD frontend: bdevs served over the Network Block Device protocol
//! (NetworkBlockDevice/nbd `doc/proto.md`) on a Unix socket and/or TCP, and attached to the
//! kernel's nbd driver as `/dev/nbdX` (SPDK's `nbd_start_disk`).
//!
//! - [`proto`]: the wire format (pure);
//! - [`server`]: listeners and the accept thread;
//! - [`conn`]: one client connection, a poller on the least-loaded reactor, made of
//!   [`socket`] (the non-blocking socket, receive buffer and reply queue),
//!   [`negotiation`] (the handshake and option haggling, bytes in, bytes out) and
//!   [`transmission`] (requests → bdev I/O → replies);
//! - [`conns`]: the registry of connections;
//! - [`buf`]: the pool of payload buffers;
//! - [`export`]: export name → bdev (claimed), readonly, clients;
//! - [`kernel`]: the generic-netlink attach of `/dev/nbdX`;
//! - [`offload`]: helper threads for blocking queries (allocation maps of files and RBD
//!   images for `NBD_CMD_BLOCK_STATUS`);
//! - [`rpc`]: `nbd_server_start/stop`, `nbd_export_add/remove`, `nbd_get_exports`,
//!   `nbd_start_disk`, `nbd_stop_disk`, `nbd_get_disks`.

pub mod buf;
pub mod conn;
pub mod conns;
pub mod export;
pub mod kernel;
pub mod negotiation;
pub mod offload;
pub mod proto;
pub mod rpc;
pub mod server;
pub mod socket;
pub mod transmission;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::bdev::Bdev;
use crate::error::Error;
use crate::reactor::Reactors;
use crate::sync::lock;
use conn::{ConnCtx, Conns};
use export::{Export, Exports};
use server::{Server, ServerOpts, Start};

/// How long stopping waits for connections to drain and close.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A bdev attached to the kernel as `/dev/nbdX`.
pub struct Disk {
    pub device: String,
    pub index: u32,
    pub bdev_name: String,
    export: String,
    conn: u64,
    family: u16,
}

/// The NBD state of the daemon (owned by the application).
#[derive(Default)]
pub struct NbdState {
    exports: Arc<Exports>,
    conns: Arc<Conns>,
    server: Mutex<Option<Server>>,
    disks: Mutex<BTreeMap<String, Disk>>,
}

impl NbdState {
    fn ctx(&self) -> Arc<ConnCtx> {
        Arc::new(ConnCtx {
            exports: self.exports.clone(),
            conns: self.conns.clone(),
        })
    }

    /// The export registry.
    pub fn exports(&self) -> &Arc<Exports> {
        &self.exports
    }

    /// Live connections (socket clients and kernel devices).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Starts listening. -17 when a server already runs; -32602 when nothing to listen on.
    pub fn start_server(
        &self,
        reactors: &Arc<Reactors>,
        opts: ServerOpts,
        socket_mode: u32,
    ) -> crate::error::Result<Option<std::net::SocketAddr>> {
        if opts.unix_path.is_none() && opts.tcp_addr.is_none() {
            return Err(Error::invalid(
                "nbd_server_start needs unix_path and/or tcp_addr",
            ));
        }
        let mut s = lock(&self.server);
        if s.is_some() {
            return Err(Error::new(
                libc::EEXIST,
                "the nbd server is already running (nbd_server_stop first): File exists",
            ));
        }
        let srv = Server::start(reactors.clone(), self.ctx(), opts, socket_mode)
            .map_err(|e| Error::invalid(format!("nbd_server_start: {e:#}")))?;
        let bound = srv.tcp_bound;
        *s = Some(srv);
        Ok(bound)
    }

    /// Stops listening and disconnects every socket client after its in-flight requests
    /// complete and the bdev is flushed. -19 when no server runs.
    pub fn stop_server(&self, reactors: &Reactors) -> crate::error::Result<()> {
        let Some(mut srv) = lock(&self.server).take() else {
            return Err(Error::new(
                libc::ENODEV,
                "the nbd server is not running: No such device",
            ));
        };
        srv.stop();
        let kernel: Vec<String> = lock(&self.disks)
            .values()
            .map(|d| d.export.clone())
            .collect();
        let ids = self.conns.stop_where(reactors, |e| {
            lock(&e.export).as_ref().is_none_or(|n| !kernel.contains(n))
        });
        if !self.conns.wait_gone(&ids, STOP_TIMEOUT) {
            tracing::warn!("nbd_server_stop: some connections did not close in time");
        }
        Ok(())
    }

    /// The server's listen options, when running.
    pub fn server_opts(&self) -> Option<(ServerOpts, Option<std::net::SocketAddr>)> {
        lock(&self.server)
            .as_ref()
            .map(|s| (s.opts.clone(), s.tcp_bound))
    }

    /// Adds a socket export of `bdev`.
    pub fn add_export(
        &self,
        name: &str,
        bdev: Arc<Bdev>,
        readonly: bool,
    ) -> crate::error::Result<Arc<Export>> {
        self.exports.add(name, bdev, readonly, false)
    }

    /// Removes a socket export; with `force`, its clients are disconnected first (after
    /// their in-flight requests complete).
    pub fn remove_export(
        &self,
        reactors: &Reactors,
        name: &str,
        force: bool,
    ) -> crate::error::Result<()> {
        if let Some(e) = self.exports.get(name) {
            if e.kernel {
                return Err(Error::invalid(format!(
                    "export {name} belongs to a kernel nbd device: use nbd_stop_disk"
                )));
            }
        }
        let e = self.exports.remove(name, force)?;
        if e.clients() > 0 {
            let ids = self
                .conns
                .stop_where(reactors, |c| lock(&c.export).as_deref() == Some(name));
            if !self.conns.wait_gone(&ids, STOP_TIMEOUT) {
                tracing::warn!(export = name, "some clients did not disconnect in time");
            }
        }
        Ok(())
    }

    /// Attaches `bdev` to the kernel as `/dev/nbdX` (`device`, or the first free one).
    pub fn start_disk(
        &self,
        reactors: &Reactors,
        bdev: Arc<Bdev>,
        device: Option<&str>,
    ) -> crate::error::Result<String> {
        let index = match device {
            Some(d) => Some(
                kernel::device_index(d)
                    .ok_or_else(|| Error::invalid(format!("nbd_device '{d}' is not /dev/nbdN")))?,
            ),
            None => None,
        };
        if let Some(d) = device {
            if lock(&self.disks).contains_key(d) {
                return Err(Error::new(
                    libc::EBUSY,
                    format!("{d} is already attached: Device or resource busy"),
                ));
            }
        }
        if !kernel::kernel_available() {
            return Err(kernel::unavailable());
        }
        let sys_err = |what: &str, e: std::io::Error| {
            Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("nbd_start_disk {}: {what}: {e}", bdev.name()),
            )
        };
        let mut genl = kernel::Genl::open().map_err(|e| sys_err("netlink socket", e))?;
        let family = genl
            .family(kernel::NBD_GENL_FAMILY_NAME)
            .map_err(|_| kernel::unavailable())?;
        let export_name = format!("nbd-disk-{}-{}", bdev.name(), uuid::Uuid::new_v4().simple());
        let export = self.exports.add(&export_name, bdev.clone(), false, true)?;
        let cleanup = |this: &Self| {
            // Undo of the add above: the export exists and is ours, a forced removal of it
            // does not fail.
            let _ = this.exports.remove(&export_name, true);
        };
        let (ours, theirs) = match kernel::socketpair() {
            Ok(p) => p,
            Err(e) => {
                cleanup(self);
                return Err(sys_err("socketpair", e));
            }
        };
        let Some(att) = self.exports.attach(&export_name) else {
            cleanup(self);
            return Err(Error::internal(libc::ENODEV, "export vanished"));
        };
        let Some(conn) = server::spawn_conn(
            reactors,
            &self.ctx(),
            ours,
            format!("kernel nbd ({})", bdev.name()),
            Start::Transmission(att),
        ) else {
            cleanup(self);
            return Err(Error::internal(
                libc::EAGAIN,
                "no reactor to serve the kernel nbd device",
            ));
        };
        use std::os::fd::AsRawFd;
        let params = kernel::ConnectParams {
            index,
            size_bytes: bdev.size(),
            block_size: bdev.block_size() as u64,
            server_flags: export.transmission_flags() as u64,
            timeout: 30,
            sock_fd: theirs.as_raw_fd(),
        };
        let idx = match genl.nbd_connect(family, &params) {
            Ok(i) => i,
            Err(e) => {
                self.conns.stop_where(reactors, |c| {
                    lock(&c.export).as_deref() == Some(&export_name)
                });
                cleanup(self);
                return Err(sys_err("NBD_CMD_CONNECT", e));
            }
        };
        // The kernel holds its own reference to the socket now.
        drop(theirs);
        let dev = format!("/dev/nbd{idx}");
        lock(&self.disks).insert(
            dev.clone(),
            Disk {
                device: dev.clone(),
                index: idx,
                bdev_name: bdev.name().to_string(),
                export: export_name,
                conn,
                family,
            },
        );
        tracing::info!(bdev = bdev.name(), device = %dev, "kernel nbd device attached");
        Ok(dev)
    }

    /// Detaches a kernel device: the kernel flushes and disconnects, blockd drains the
    /// connection, flushes the bdev and releases it.
    pub fn stop_disk(&self, reactors: &Reactors, device: &str) -> crate::error::Result<()> {
        let Some(d) = lock(&self.disks).remove(device) else {
            return Err(Error::new(
                libc::ENODEV,
                format!("{device} is not attached by blockd: No such device"),
            ));
        };
        match kernel::Genl::open().and_then(|mut g| g.nbd_disconnect(d.family, d.index)) {
            Ok(()) => {}
            Err(e) => tracing::warn!(device, "NBD_CMD_DISCONNECT: {e}"),
        }
        let ids = self
            .conns
            .stop_where(reactors, |c| lock(&c.export).as_deref() == Some(&d.export));
        if !self.conns.wait_gone(&ids, STOP_TIMEOUT) {
            tracing::warn!(device, "some connections did not close in time");
        }
        // The disk's own connection, normally among `ids` already: the result adds nothing
        // to the warning above.
        let _ = self.conns.wait_gone(&[d.conn], Duration::from_millis(1));
        if let Err(e) = self.exports.remove(&d.export, true) {
            tracing::warn!(device, "removing export {}: {e}", d.export);
        }
        tracing::info!(device, "kernel nbd device detached");
        Ok(())
    }

    /// `nbd_get_disks`: [{nbd_device, bdev_name}], optionally one device.
    pub fn disks_json(&self, device: Option<&str>) -> crate::error::Result<Value> {
        let disks = lock(&self.disks);
        let v: Vec<Value> = disks
            .values()
            .filter(|d| device.is_none_or(|x| x == d.device))
            .map(|d| json!({"nbd_device": d.device, "bdev_name": d.bdev_name}))
            .collect();
        if let Some(dev) = device {
            if v.is_empty() {
                return Err(Error::new(
                    libc::ENODEV,
                    format!("{dev} is not attached by blockd: No such device"),
                ));
            }
        }
        Ok(Value::Array(v))
    }

    /// `framework_get_config` entries of subsystem `nbd` (method, params): the server, the
    /// socket exports, then the kernel devices.
    pub fn config_entries(&self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some((o, _)) = self.server_opts() {
            let mut p = serde_json::Map::new();
            if let Some(u) = o.unix_path {
                p.insert("unix_path".into(), json!(u.display().to_string()));
            }
            if let Some(t) = o.tcp_addr {
                p.insert("tcp_addr".into(), json!(t));
            }
            out.push(("nbd_server_start", Value::Object(p)));
        }
        for e in self.exports.list() {
            if !e.kernel {
                out.push((
                    "nbd_export_add",
                    json!({"bdev_name": e.bdev.name(), "name": e.name, "readonly": e.readonly}),
                ));
            }
        }
        for d in lock(&self.disks).values() {
            out.push((
                "nbd_start_disk",
                json!({"bdev_name": d.bdev_name, "nbd_device": d.device}),
            ));
        }
        out
    }

    /// Orderly stop: detach kernel devices, stop the server, drain and flush every
    /// connection, release the bdevs. Call before the bdevs are closed.
    pub fn shutdown(&self, reactors: &Reactors) {
        let devs: Vec<String> = lock(&self.disks).keys().cloned().collect();
        for d in devs {
            if let Err(e) = self.stop_disk(reactors, &d) {
                tracing::warn!(device = d, "nbd shutdown: {e}");
            }
        }
        if let Some(mut s) = lock(&self.server).take() {
            s.stop();
        }
        let ids = self.conns.stop_where(reactors, |_| true);
        if !self.conns.wait_gone(&ids, STOP_TIMEOUT) {
            tracing::warn!("nbd shutdown: some connections did not close in time");
        }
        for e in self.exports.list() {
            if let Err(r) = self.exports.remove(&e.name, true) {
                tracing::warn!("nbd shutdown: removing export {}: {r}", e.name);
            }
        }
    }
}
