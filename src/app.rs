//! The daemon's state: what every RPC handler and the configuration loader act on.

use std::path::PathBuf;
use std::sync::Arc;

use crate::bdev::BdevRegistry;
use crate::cpumask::CpuMask;
use crate::reactor::Reactors;
use crate::rpc::RpcMethods;
use crate::vhost::VhostRegistry;

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
    pub vhost: VhostRegistry,
    pub nbd: crate::nbd::NbdState,
    pub rpc: RpcMethods,
}

impl App {
    /// Starts the reactors and returns an app with no bdev and no controller.
    pub fn new(opts: AppOptions, reactors: Reactors) -> Arc<Self> {
        Arc::new(App {
            opts,
            reactors: Arc::new(reactors),
            bdevs: BdevRegistry::default(),
            vhost: VhostRegistry::default(),
            nbd: crate::nbd::NbdState::default(),
            rpc: RpcMethods::all(),
        })
    }
}

impl App {
    /// Orderly stop (SIGTERM/SIGINT): stop accepting requests, drain in-flight I/O, flush the
    /// backends, remove the sockets, stop the reactors.
    pub fn shutdown(&self) {
        self.vhost.shutdown_all(self);
        self.nbd.shutdown(&self.reactors);
        self.bdevs.close_all();
        self.reactors.shutdown();
    }
}
