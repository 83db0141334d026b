//! vhost-user controllers: one Unix socket each in the socket directory, one frontend (QEMU,
//! libblkio) at a time, a virtio device model whose queues run on the reactors.
//!
//! Protocol messages of every controller are handled by a single control thread
//! (`events`), as SPDK's vhost-events thread does; the data path never leaves the
//! reactors.

pub mod blk;
pub mod coalescing;
pub mod device;
pub mod dirty_log;
pub mod engine;
mod events;
#[cfg(feature = "fuzzing")]
pub mod fuzz_api;
pub mod guest_fault;
pub mod guest_map;
pub mod guest_stream;
pub mod inflight;
pub mod packed_ring;
pub mod queue_stats;
pub mod rpc;
pub mod scsi;
pub mod session;
pub mod split_ring;
#[cfg(test)]
pub(crate) mod test_chains;
pub mod vring;

use coalescing::Coalescing;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

use crate::cpumask::CpuMask;
use crate::error::Error;
use crate::reactor::Reactors;
use crate::sync::lock;
use device::VirtioDevice;
use session::Session;

/// Longest controller name: the socket path must fit `sun_path` (108 bytes) with the
/// directory, so names are kept well below.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a controller name: it becomes a file name in the socket directory, so `/`, `..`,
/// empty, NUL and over-long names are refused.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("controller name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "controller name is {} bytes long, the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name.contains('/') || name.contains('\0') || name == "." || name == ".." {
        return Err(format!("controller name '{name}' is not a plain file name"));
    }
    Ok(())
}

/// Tells the connected frontend that the device's configuration space changed
/// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend request channel, when the frontend
/// set one up with BACKEND_REQ): the guest then re-reads it, e.g. a new capacity.
#[derive(Clone, Default)]
pub struct ConfigNotifier {
    channel: Arc<Mutex<Option<Backend>>>,
}

impl ConfigNotifier {
    /// Sends the notification; false when no frontend channel is there to carry it.
    pub fn notify(&self) -> bool {
        let Some(b) = lock(&self.channel).clone() else {
            return false;
        };
        match b.handle_config_change() {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("config change notification failed: {e}");
                false
            }
        }
    }

    pub(crate) fn set(&self, b: Option<Backend>) {
        *lock(&self.channel) = b;
    }
}

/// Parses a controller's `--cpumask` and checks it against the daemon's `core_mask`
/// (`EINVAL` otherwise, both masks logged, as SPDK's `vhost_dev_register`).
pub fn controller_cpumask(
    core_mask: &CpuMask,
    ctrlr: &str,
    mask: Option<&str>,
) -> crate::error::Result<CpuMask> {
    let Some(m) = mask else {
        return Ok(core_mask.clone());
    };
    let invalid = || {
        Error::new(
            libc::EINVAL,
            format!("controller {ctrlr}: cpumask {m} is invalid"),
        )
    };
    let parsed = CpuMask::parse(m).map_err(|e| {
        tracing::error!(ctrlr, "cpumask {m} is invalid: {e}");
        invalid()
    })?;
    if !parsed.is_subset_of(core_mask) {
        tracing::error!(
            ctrlr,
            "one of selected cpu is outside of core mask(={core_mask})"
        );
        tracing::error!(ctrlr, "cpumask {m} is invalid (core mask is {core_mask})");
        return Err(invalid());
    }
    Ok(parsed)
}

/// A vhost-user controller.
pub struct Controller {
    pub name: String,
    pub cpumask: CpuMask,
    pub socket: PathBuf,
    pub device: Arc<dyn VirtioDevice>,
    /// Interrupt coalescing of the controller's queues (`vhost_controller_set_coalescing`).
    pub coalescing: Arc<Coalescing>,
    notifier: ConfigNotifier,
    session: Mutex<Option<Arc<Mutex<Session>>>>,
    /// Frontends that connected and disconnected so far (metrics).
    connects: AtomicU64,
    disconnects: AtomicU64,
}

impl Controller {
    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// Frontends connected and disconnected so far.
    pub fn connections(&self) -> (u64, u64) {
        (
            self.connects.load(Ordering::Relaxed),
            self.disconnects.load(Ordering::Relaxed),
        )
    }

    /// The connected session's queues' counters, by queue index (metrics).
    pub fn queue_counts(&self) -> Vec<(usize, queue_stats::QueueCounts)> {
        let s = lock(&self.session).clone();
        s.map(|s| lock(&s).queue_counts()).unwrap_or_default()
    }

    /// The object `vhost_get_controllers` returns (SPDK's shape).
    pub fn to_json(&self) -> Value {
        let sessions: Vec<Value> = lock(&self.session)
            .iter()
            .map(|s| {
                let s = lock(s);
                let queues: Vec<Value> = s
                    .queue_counts()
                    .into_iter()
                    .map(|(i, c)| {
                        json!({"index": i, "requests": c.requests, "kicks": c.kicks,
                               "interrupts": c.interrupts, "in_flight": c.in_flight})
                    })
                    .collect();
                json!({"name": format!("{}s0", self.name), "started": s.running_rings() > 0,
                       "running_queues": s.running_rings(), "reactors": s.cores(),
                       "in_flight": s.in_flight(), "dirty_logging": s.dirty_logging(),
                       "queues": queues})
            })
            .collect();
        let (delay_base_us, iops_threshold) = self.coalescing.get();
        json!({
            "ctrlr": self.name,
            "cpumask": self.cpumask.to_string(),
            "delay_base_us": delay_base_us,
            "iops_threshold": iops_threshold,
            "interrupts_held_back": self.coalescing.held(),
            "socket": self.socket.display().to_string(),
            "sessions": sessions,
            "backend_specific": self.device.backend_specific(),
        })
    }

    fn attach(&self, s: Arc<Mutex<Session>>) -> bool {
        let mut cur = lock(&self.session);
        if cur.is_some() {
            return false;
        }
        *cur = Some(s);
        self.connects.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The daemon is stopping: the session's rings stop taking chains, and stay stopped;
    /// the frontend stays connected until [`Controller::detach`].
    fn begin_quiesce(&self) {
        let s = lock(&self.session).clone();
        if let Some(s) = s {
            lock(&s).begin_quiesce();
        }
    }

    /// Waits until the session's rings have finished, published and signalled every
    /// request they took.
    fn finish_quiesce(&self) {
        let s = lock(&self.session).clone();
        if let Some(s) = s {
            lock(&s).stop_all();
        }
    }

    /// Stops the session's rings and forgets it (frontend gone). The session stays visible
    /// (and the controller busy) until its rings have stopped and its resources (guest
    /// memory mappings, eventfds) are released.
    fn detach(&self) {
        let s = lock(&self.session).clone();
        if let Some(s) = s {
            lock(&s).stop_all();
            // Other references (the connection's request handler) are gone by now, so
            // this drop releases the mappings and eventfds.
            *lock(&self.session) = None;
            drop(s);
            self.disconnects.fetch_add(1, Ordering::Relaxed);
            self.notifier.set(None);
            tracing::info!(ctrlr = %self.name, "frontend disconnected");
        }
    }
}

/// Where controller sockets are created (`-S`) and with which mode (`--socket-mode`).
#[derive(Clone, Debug)]
pub struct SocketDir {
    pub dir: PathBuf,
    pub mode: u32,
}

fn no_such_controller(name: &str) -> Error {
    Error::new(libc::ENODEV, format!("controller {name} does not exist"))
}

/// All controllers of the daemon.
pub struct VhostRegistry {
    ctrlrs: Mutex<BTreeMap<String, Arc<Controller>>>,
    events: OnceLock<Arc<events::Events>>,
    /// The reactors the controllers' queues run on (and the event thread hands them to).
    reactors: Arc<Reactors>,
    sockets: SocketDir,
}

/// What [`VhostRegistry::create`] needs.
pub struct NewController {
    pub name: String,
    pub cpumask: CpuMask,
    pub device: Arc<dyn VirtioDevice>,
    /// The notifier the device uses to announce configuration changes.
    pub notifier: ConfigNotifier,
}

impl VhostRegistry {
    /// No controller yet; their sockets go in `sockets`, their queues on `reactors`.
    pub fn new(reactors: Arc<Reactors>, sockets: SocketDir) -> Self {
        VhostRegistry {
            ctrlrs: Mutex::default(),
            events: OnceLock::new(),
            reactors,
            sockets,
        }
    }

    /// The cores controllers may run on.
    pub fn core_mask(&self) -> &CpuMask {
        self.reactors.mask()
    }

    fn events(&self) -> crate::error::Result<&Arc<events::Events>> {
        if let Some(e) = self.events.get() {
            return Ok(e);
        }
        let e = events::Events::start(self.reactors.clone()).map_err(|e| {
            Error::internal(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("cannot start the vhost event thread: {e}"),
            )
        })?;
        Ok(self.events.get_or_init(|| e))
    }

    /// The controller named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Controller>> {
        lock(&self.ctrlrs).get(name).cloned()
    }

    /// Every controller, by name.
    pub fn list(&self) -> Vec<Arc<Controller>> {
        lock(&self.ctrlrs).values().cloned().collect()
    }

    /// Whether a controller of that name exists.
    pub fn exists(&self, name: &str) -> bool {
        lock(&self.ctrlrs).contains_key(name)
    }

    /// Creates the controller's socket and starts accepting a frontend on it. On failure
    /// nothing is left behind (the caller releases what the device holds).
    pub fn create(&self, c: NewController) -> crate::error::Result<Arc<Controller>> {
        let socket = self.sockets.dir.join(&c.name);
        let mut map = lock(&self.ctrlrs);
        if map.contains_key(&c.name) {
            return Err(Error::new(
                libc::EEXIST,
                format!("controller {} already exists", c.name),
            ));
        }
        let listener =
            crate::unix_socket::bind_listener(&socket, self.sockets.mode).map_err(|e| {
                tracing::error!(ctrlr = %c.name, "cannot create socket {}: {e}", socket.display());
                // The name or the socket directory the caller chose does not make a socket.
                Error {
                    fault: crate::error::Fault::Argument,
                    ..Error::io(
                        format_args!("cannot create socket {}", socket.display()),
                        &e,
                    )
                }
            })?;
        let ctrl = Arc::new(Controller {
            name: c.name.clone(),
            cpumask: c.cpumask,
            socket: socket.clone(),
            device: c.device,
            coalescing: Arc::default(),
            notifier: c.notifier,
            session: Mutex::new(None),
            connects: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
        });
        if let Err(e) = self.events().and_then(|ev| {
            ev.add_listener(ctrl.clone(), listener).map_err(|e| {
                Error::internal(
                    e.raw_os_error().unwrap_or(libc::EIO),
                    format!("cannot watch {}: {e}", socket.display()),
                )
            })
        }) {
            // Undo of the bind above; the error returned is the one that matters.
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
        map.insert(c.name.clone(), ctrl.clone());
        tracing::info!(ctrlr = %c.name, socket = %socket.display(), cpumask = %ctrl.cpumask, "controller created");
        Ok(ctrl)
    }

    /// Deletes a controller; refused (`EBUSY`) while a frontend is connected, as SPDK does.
    pub fn delete(&self, name: &str) -> crate::error::Result<()> {
        let mut map = lock(&self.ctrlrs);
        let Some(ctrl) = map.get(name).cloned() else {
            return Err(no_such_controller(name));
        };
        if ctrl.connected() {
            tracing::error!(ctrlr = %name, "cannot delete: a frontend is connected");
            return Err(Error::new(
                libc::EBUSY,
                format!("controller {name} has a frontend connected"),
            ));
        }
        if ctrl.device.busy() {
            tracing::error!(ctrlr = %name, "cannot delete: the controller is not empty");
            return Err(Error::new(
                libc::EBUSY,
                format!("controller {name} is not empty"),
            ));
        }
        if let Some(ev) = self.events.get() {
            ev.remove_controller(&ctrl);
        }
        map.remove(name);
        drop(map);
        if let Err(e) = std::fs::remove_file(&ctrl.socket) {
            tracing::warn!(ctrlr = %name, "cannot remove {}: {e}", ctrl.socket.display());
        }
        ctrl.device.close();
        tracing::info!(ctrlr = %name, "controller deleted");
        Ok(())
    }

    /// First half of a clean stop: no new frontend is accepted, and every ring of every
    /// session stops taking chains, finishes what it took, publishes and signals it
    /// (each ring has stopped when this returns). The frontends stay connected with their
    /// rings stopped: a frontend must see every completion before it sees the
    /// disconnection, since QEMU then restarts each ring at its used index (vhost-user.rst
    /// "Ring states": GET_VRING_BASE is not answered by a backend that went away), which is
    /// right only once nothing taken is left unreturned. The caller flushes the backends,
    /// then calls [`VhostRegistry::close_all`].
    pub fn quiesce_all(&self) {
        let ctrls = self.list();
        for ctrl in &ctrls {
            if let Some(ev) = self.events.get() {
                ev.stop_accepting(ctrl);
            }
            ctrl.begin_quiesce();
        }
        for ctrl in &ctrls {
            ctrl.finish_quiesce();
        }
    }

    /// Second half of a clean stop: disconnects the frontends, removes the sockets,
    /// releases the bdevs.
    pub fn close_all(&self) {
        let ctrls: Vec<Arc<Controller>> = std::mem::take(&mut *lock(&self.ctrlrs))
            .into_values()
            .collect();
        for ctrl in ctrls {
            if let Some(ev) = self.events.get() {
                ev.remove_controller(&ctrl);
            }
            ctrl.detach();
            if let Err(e) = std::fs::remove_file(&ctrl.socket) {
                tracing::warn!(ctrlr = %ctrl.name, "cannot remove {}: {e}", ctrl.socket.display());
            }
            ctrl.device.close();
        }
    }

    /// Stops every controller, both halves ([`VhostRegistry::quiesce_all`], then
    /// [`VhostRegistry::close_all`]) with nothing in between.
    pub fn shutdown_all(&self) {
        self.quiesce_all();
        self.close_all();
    }

    /// Sets a controller's interrupt coalescing (SPDK's `vhost_controller_set_coalescing`):
    /// `ENODEV` for an unknown controller, `EINVAL` for values SPDK refuses. Running queues
    /// take the new values at their next notification.
    pub fn set_coalescing(
        &self,
        name: &str,
        delay_base_us: u32,
        iops_threshold: u32,
    ) -> crate::error::Result<()> {
        let ctrl = self.get(name).ok_or_else(|| no_such_controller(name))?;
        ctrl.coalescing
            .set(delay_base_us, iops_threshold)
            .map_err(|e| {
                tracing::error!(ctrlr = %name, "vhost_controller_set_coalescing: {e}");
                Error::new(libc::EINVAL, format!("controller {name}: {e}"))
            })?;
        tracing::info!(ctrlr = %name, delay_base_us, iops_threshold, "interrupt coalescing set");
        Ok(())
    }

    /// `framework_get_config` entries of subsystem `vhost_blk` (method, params).
    pub fn config_entries(&self) -> Vec<(&'static str, Value)> {
        self.subsystem_config_entries("vhost_blk")
    }

    /// `framework_get_config` entries of the controllers of `subsystem` ("vhost_blk",
    /// "vhost_scsi").
    pub fn subsystem_config_entries(&self, subsystem: &str) -> Vec<(&'static str, Value)> {
        lock(&self.ctrlrs)
            .values()
            .filter(|c| c.device.subsystem() == subsystem)
            .flat_map(|c| {
                let mut v = c.device.config_entries(&c.name, &c.cpumask.to_string());
                // As SPDK saves it: only when coalescing is on.
                let (delay_base_us, iops_threshold) = c.coalescing.get();
                if delay_base_us != 0 {
                    v.push((
                        "vhost_controller_set_coalescing",
                        json!({"ctrlr": c.name, "delay_base_us": delay_base_us,
                               "iops_threshold": iops_threshold}),
                    ));
                }
                v
            })
            .collect()
    }
}
