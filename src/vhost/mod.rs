//! vhost-user controllers. (being written)

pub mod blk;

use serde_json::Value;

use crate::app::App;

/// All controllers.
#[derive(Default)]
pub struct VhostRegistry {}

impl VhostRegistry {
    /// Stops every controller: disconnects frontends after draining their queues, removes
    /// the sockets.
    pub fn shutdown_all(&self, _app: &App) {}

    /// `framework_get_config` entries of subsystem `vhost_blk` (method, params).
    pub fn config_entries(&self) -> Vec<(&'static str, Value)> {
        Vec::new()
    }
}
