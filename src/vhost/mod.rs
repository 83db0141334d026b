//! vhost-user controllers. (being written)

pub mod blk;

/// All controllers.
#[derive(Default)]
pub struct VhostRegistry {}
