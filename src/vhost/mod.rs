//! vhost-user controllers: one Unix socket each in the socket directory, one frontend (QEMU,
//! libblkio) at a time, a virtio device model whose queues run on the reactors.
//!
//! Protocol messages of every controller are handled by a single control thread
//! ([`events`]), as SPDK's vhost-events thread does; the data path never leaves the
//! reactors.

pub mod blk;
pub mod coalescing;
pub mod device;
pub mod engine;
mod events;
pub mod guest_map;
pub mod guest_stream;
pub mod scsi;
pub mod session;
pub mod split_ring;
pub mod vring;

use coalescing::Coalescing;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

use crate::app::App;
use crate::cpumask::CpuMask;
use crate::rpc::RpcError;
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

/// Parses a controller's `--cpumask` and checks it against the daemon's; SPDK answers
/// -32602 "Invalid argument" and logs both masks (`vhost_dev_register`).
pub fn controller_cpumask(app: &App, ctrlr: &str, mask: Option<&str>) -> Result<CpuMask, RpcError> {
    let core_mask = app.reactors.mask();
    let Some(m) = mask else {
        return Ok(core_mask.clone());
    };
    let parsed = CpuMask::parse(m).map_err(|e| {
        tracing::error!(ctrlr, "cpumask {m} is invalid: {e}");
        RpcError::invalid_params_errno(libc::EINVAL)
    })?;
    if !parsed.is_subset_of(core_mask) {
        tracing::error!(
            ctrlr,
            "one of selected cpu is outside of core mask(={core_mask})"
        );
        tracing::error!(ctrlr, "cpumask {m} is invalid (core mask is {core_mask})");
        return Err(RpcError::invalid_params_errno(libc::EINVAL));
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Controller {
    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        lock(&self.session).is_some()
    }

    /// The object `vhost_get_controllers` returns (SPDK's shape).
    pub fn to_json(&self) -> Value {
        let sessions: Vec<Value> = lock(&self.session)
            .iter()
            .map(|s| {
                let s = lock(s);
                json!({"name": format!("{}s0", self.name), "started": s.running_rings() > 0,
                       "running_queues": s.running_rings(), "reactors": s.cores()})
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
        true
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
            self.notifier.set(None);
            tracing::info!(ctrlr = %self.name, "frontend disconnected");
        }
    }
}

/// All controllers of the daemon.
#[derive(Default)]
pub struct VhostRegistry {
    ctrlrs: Mutex<BTreeMap<String, Arc<Controller>>>,
    events: OnceLock<Arc<events::Events>>,
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
    fn events(&self, app: &App) -> Result<&Arc<events::Events>, RpcError> {
        if let Some(e) = self.events.get() {
            return Ok(e);
        }
        let e = events::Events::start(app.reactors.clone())
            .map_err(|e| RpcError::internal(format!("cannot start the vhost event thread: {e}")))?;
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
    pub fn create(&self, app: &App, c: NewController) -> Result<Arc<Controller>, RpcError> {
        let socket = app.opts.socket_dir.join(&c.name);
        let mut map = lock(&self.ctrlrs);
        if map.contains_key(&c.name) {
            return Err(RpcError::invalid_params_errno(libc::EEXIST));
        }
        let listener =
            crate::unix_socket::bind_listener(&socket, app.opts.socket_mode).map_err(|e| {
                tracing::error!(ctrlr = %c.name, "cannot create socket {}: {e}", socket.display());
                RpcError::invalid_params(format!("cannot create socket {}: {e}", socket.display()))
            })?;
        let ctrl = Arc::new(Controller {
            name: c.name.clone(),
            cpumask: c.cpumask,
            socket: socket.clone(),
            device: c.device,
            coalescing: Arc::default(),
            notifier: c.notifier,
            session: Mutex::new(None),
        });
        if let Err(e) = self.events(app).and_then(|ev| {
            ev.add_listener(ctrl.clone(), listener)
                .map_err(|e| RpcError::internal(format!("cannot watch {}: {e}", socket.display())))
        }) {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
        map.insert(c.name.clone(), ctrl.clone());
        tracing::info!(ctrlr = %c.name, socket = %socket.display(), cpumask = %ctrl.cpumask, "controller created");
        Ok(ctrl)
    }

    /// Deletes a controller; refused (-32602 "Device or resource busy") while a frontend is
    /// connected, as SPDK does.
    pub fn delete(&self, name: &str) -> Result<(), RpcError> {
        let mut map = lock(&self.ctrlrs);
        let Some(ctrl) = map.get(name).cloned() else {
            return Err(RpcError::invalid_params_errno(libc::ENODEV));
        };
        if ctrl.connected() {
            tracing::error!(ctrlr = %name, "cannot delete: a frontend is connected");
            return Err(RpcError::invalid_params_errno(libc::EBUSY));
        }
        if ctrl.device.busy() {
            tracing::error!(ctrlr = %name, "cannot delete: the controller is not empty");
            return Err(RpcError::invalid_params_errno(libc::EBUSY));
        }
        if let Some(ev) = self.events.get() {
            ev.remove_controller(&ctrl);
        }
        map.remove(name);
        drop(map);
        let _ = std::fs::remove_file(&ctrl.socket);
        ctrl.device.close();
        tracing::info!(ctrlr = %name, "controller deleted");
        Ok(())
    }

    /// Stops every controller: disconnects frontends after draining their queues, removes
    /// the sockets, releases the bdevs.
    pub fn shutdown_all(&self, _app: &App) {
        let ctrls: Vec<Arc<Controller>> = std::mem::take(&mut *lock(&self.ctrlrs))
            .into_values()
            .collect();
        for ctrl in ctrls {
            if let Some(ev) = self.events.get() {
                ev.remove_controller(&ctrl);
            }
            ctrl.detach();
            let _ = std::fs::remove_file(&ctrl.socket);
            ctrl.device.close();
        }
    }

    /// Sets a controller's interrupt coalescing (SPDK's `vhost_controller_set_coalescing`):
    /// -32602 "No such device" for an unknown controller, "Invalid argument" for values
    /// SPDK refuses. Running queues take the new values at their next notification.
    pub fn set_coalescing(
        &self,
        name: &str,
        delay_base_us: u32,
        iops_threshold: u32,
    ) -> Result<(), RpcError> {
        let ctrl = self
            .get(name)
            .ok_or_else(|| RpcError::invalid_params_errno(libc::ENODEV))?;
        ctrl.coalescing
            .set(delay_base_us, iops_threshold)
            .map_err(|e| {
                tracing::error!(ctrlr = %name, "vhost_controller_set_coalescing: {e}");
                RpcError::invalid_params_errno(libc::EINVAL)
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
