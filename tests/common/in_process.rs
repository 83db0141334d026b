//! blockd in the test's own process: the same `App`, reactors and RPC methods the daemon
//! runs, so a test can also look at bdevs and controllers behind the client's back.

use std::path::PathBuf;
use std::sync::Arc;

use blockd::app::{App, AppOptions};
use blockd::cpumask::CpuMask;
use blockd::reactor::{PollOptions, Reactors};
use serde_json::Value;

/// An in-process daemon with a private socket directory; shut down when dropped.
pub struct InProcess {
    pub app: Arc<App>,
    pub dir: tempfile::TempDir,
}

impl InProcess {
    /// Reactors on the cores of `mask` (hex or list).
    pub fn start(mask: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let opts = AppOptions {
            cpumask: CpuMask::parse(mask).unwrap(),
            socket_dir: dir.path().to_path_buf(),
            rpc_socket: dir.path().join("blockd.sock"),
            socket_mode: 0o600,
        };
        let reactors = Reactors::start(&opts.cpumask, PollOptions::default()).unwrap();
        InProcess {
            app: App::new(opts, reactors),
            dir,
        }
    }

    /// Calls an RPC method as the RPC server would.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value, (i32, String)> {
        self.app
            .rpc
            .call(&self.app, method, Some(params))
            .map_err(|e| (e.code, e.message))
    }

    /// Path of controller `ctrlr`'s socket.
    pub fn sock(&self, ctrlr: &str) -> PathBuf {
        self.dir.path().join(ctrlr)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.app.shutdown();
    }
}
