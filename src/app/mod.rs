//! The daemon's state: everything RPC handlers and the configuration replay act on, owned
//! here and handed to each module as what it uses. The application also assembles the RPC
//! method table from each module's `register`, and has the one shutdown path.

mod config;
mod context;

pub use config::{load, save, SUBSYSTEMS};

use std::path::PathBuf;
use std::sync::Arc;

use crate::bdev::aio::AioFiles;
use crate::bdev::rbd::{RbdState, SHUTDOWN_TIMEOUT};
use crate::bdev::BdevRegistry;
use crate::cpumask::CpuMask;
use crate::nbd::NbdState;
use crate::reactor::Reactors;
use crate::rpc::RpcMethods;
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
    /// The files of aio bdevs, for `bdev_aio_rescan`.
    pub aio_files: AioFiles,
    /// Registered rbd clusters and the rbd bdevs' images.
    pub rbd: RbdState,
    pub vhost: VhostRegistry,
    pub nbd: NbdState,
    pub rpc: RpcMethods<App>,
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
            aio_files: AioFiles::default(),
            rbd: RbdState::default(),
            nbd: NbdState::default(),
            rpc: Self::methods(),
        })
    }

    /// Every method blockd implements, each registered by the module that owns it.
    pub fn methods() -> RpcMethods<App> {
        let mut m = RpcMethods::default();
        crate::rpc::framework::register(&mut m);
        crate::rpc::log::register(&mut m);
        crate::bdev::rpc::register(&mut m);
        crate::bdev::malloc::rpc::register(&mut m);
        crate::bdev::null::rpc::register(&mut m);
        crate::bdev::aio::rpc::register(&mut m);
        crate::bdev::rbd::rpc::register(&mut m);
        crate::bdev::local::rpc::register(&mut m);
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
        // Frontends see every completion (and the flush) before their disconnection.
        self.vhost.quiesce_all();
        self.nbd.shutdown(&self.reactors);
        self.bdevs.close_all();
        self.vhost.close_all();
        self.reactors.shutdown();
        self.rbd.shutdown(SHUTDOWN_TIMEOUT);
    }
}
