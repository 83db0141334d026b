//! The daemon's state: everything RPC handlers and the configuration replay act on, owned
//! here and handed to each module as what it uses. The application also assembles the RPC
//! method table from each module's `register`, and has the one shutdown path.

mod config;
mod context;
mod metrics;
pub mod persist;

pub use config::{load, save, SUBSYSTEMS};

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use persist::ConfigFile;

use crate::bdev::aio::AioFiles;
use crate::bdev::rbd::{RbdState, SHUTDOWN_TIMEOUT};
use crate::bdev::BdevRegistry;
use crate::cpumask::CpuMask;
use crate::keyring::Keyring;
use crate::nbd::NbdState;
use crate::reactor::Reactors;
use crate::rpc::{RpcError, RpcMethods};
use crate::vhost::{SocketDir, VhostRegistry};

/// Options given to `blockd` on its command line.
#[derive(Clone, Debug)]
pub struct AppOptions {
    /// Cores the reactors run on (`-m`).
    pub cpumask: CpuMask,
    /// Where vhost-user sockets are created (`-S`).
    pub socket_dir: PathBuf,
    /// The JSON-RPC socket (`-r`).
    pub rpc_socket: PathBuf,
    /// Mode of the vhost-user sockets (0600 by default).
    pub socket_mode: u32,
}

/// Everything the daemon manages.
pub struct App {
    pub opts: AppOptions,
    pub reactors: Arc<Reactors>,
    pub bdevs: BdevRegistry,
    /// Named keys (`keyring_file_add_key`), referred to by the crypto and rbd bdevs.
    pub keyring: Keyring,
    /// The files of aio bdevs, for `bdev_aio_rescan`.
    pub aio_files: AioFiles,
    /// Registered rbd clusters and the rbd bdevs' images.
    pub rbd: RbdState,
    pub vhost: VhostRegistry,
    pub nbd: NbdState,
    pub rpc: RpcMethods<App>,
    /// `--config`: where every configuration change is persisted (set once, at start).
    pub config_file: OnceLock<ConfigFile>,
}

impl App {
    /// Starts the reactors and returns an app with no bdev and no controller.
    pub fn new(opts: AppOptions, reactors: Reactors) -> Arc<Self> {
        let reactors = Arc::new(reactors);
        let sockets = SocketDir {
            dir: opts.socket_dir.clone(),
            mode: opts.socket_mode,
        };
        Arc::new(App {
            opts,
            vhost: VhostRegistry::new(reactors.clone(), sockets),
            reactors,
            bdevs: BdevRegistry::default(),
            keyring: Keyring::default(),
            aio_files: AioFiles::default(),
            rbd: RbdState::default(),
            nbd: NbdState::default(),
            rpc: Self::methods(),
            config_file: OnceLock::new(),
        })
    }

    /// `blockd --config FILE`: replays `FILE` when it exists (a restart), taking the rbd
    /// images over from the dead predecessor, writes the resulting configuration back, and
    /// from then on persists every change made over RPC ([`persist`]). Called before the
    /// RPC socket is served. An error (unreadable or torn file, a failed replay, a
    /// directory blockd cannot write) fails the start.
    pub fn persist_to(self: &Arc<Self>, path: &std::path::Path) -> anyhow::Result<()> {
        let file = ConfigFile::claim(path)?;
        let cfg = file.read()?;
        self.rbd.takeover.enable(&rbd_client_record(path));
        if let Some(cfg) = cfg {
            load(self, &cfg).map_err(|e| e.context(format!("replaying {}", path.display())))?;
            tracing::info!(config = %path.display(), "configuration replayed");
        } else {
            tracing::info!(config = %path.display(), "no configuration yet: starting empty");
        }
        self.rbd.takeover.settle();
        file.save(|| save(self))
            .map_err(|e| anyhow::anyhow!("cannot save the configuration: {e}"))?;
        if self.config_file.set(file).is_err() {
            anyhow::bail!("a configuration file is already set");
        }
        Ok(())
    }

    /// Persists the configuration after an RPC call, when `--config` is set and it changed.
    /// A failed write fails the call that made the change (its object exists, but would not
    /// come back after a restart) with -EIO naming the file; it is also logged as an error.
    fn persist_after_call(&self, method: &str, succeeded: bool) -> Result<(), RpcError> {
        let Some(file) = self.config_file.get() else {
            return Ok(());
        };
        match file.save(|| save(self)) {
            Ok(_) => Ok(()),
            Err(e) if succeeded => Err(RpcError::errno_msg(
                libc::EIO,
                format!(
                    "{method} succeeded, but the configuration could not be saved to {}: \
                     {e}; the change will not survive a restart",
                    file.path().display()
                ),
            )),
            // The call's own error is the answer; the save failure is logged.
            Err(_) => Ok(()),
        }
    }

    /// Every method blockd implements, each registered by the module that owns it.
    pub fn methods() -> RpcMethods<App> {
        let mut m = RpcMethods::default();
        crate::rpc::framework::register(&mut m);
        crate::rpc::log::register(&mut m);
        crate::keyring::rpc::register(&mut m);
        crate::bdev::rpc::register(&mut m);
        crate::bdev::malloc::rpc::register(&mut m);
        crate::bdev::null::rpc::register(&mut m);
        crate::bdev::aio::rpc::register(&mut m);
        crate::bdev::rbd::rpc::register(&mut m);
        crate::bdev::localpool::rpc::register(&mut m);
        crate::bdev::crypto::rpc::register(&mut m);
        crate::vhost::blk::rpc::register(&mut m);
        crate::vhost::scsi::rpc::register(&mut m);
        crate::nbd::rpc::register(&mut m);
        m
    }

    /// Orderly stop (SIGTERM/SIGINT, or a failed `--json` replay): stop accepting
    /// requests, drain in-flight I/O, flush the backends, remove the sockets, stop the
    /// reactors, then close the rbd images and cluster connections (bounded by
    /// [`SHUTDOWN_TIMEOUT`]): an image left open keeps its watch registered with the OSDs
    /// for ~30 s after the exit, holding off `rbd rm` and the next opener.
    pub fn shutdown(&self) {
        // The file must keep describing what is torn down below, for the next start.
        if let Some(f) = self.config_file.get() {
            f.freeze();
        }
        // Frontends see every completion (and the flush) before their disconnection.
        self.vhost.quiesce_all();
        self.nbd.shutdown(&self.reactors);
        self.bdevs.close_all();
        self.vhost.close_all();
        self.reactors.shutdown();
        self.rbd.shutdown(SHUTDOWN_TIMEOUT);
    }
}

/// Where `--config FILE` keeps the client addresses of the rbd connections
/// (`FILE.rbd-clients`), for the next instance to take the images over after a crash
/// ([`crate::bdev::rbd::takeover`]).
fn rbd_client_record(config: &std::path::Path) -> PathBuf {
    let mut name = config.file_name().unwrap_or_default().to_os_string();
    name.push(".rbd-clients");
    config.with_file_name(name)
}
