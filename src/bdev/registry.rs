//! The daemon's bdevs by name. (being written)

use std::sync::Arc;

use super::Bdev;

/// All bdevs.
#[derive(Default)]
pub struct BdevRegistry {}

impl BdevRegistry {
    /// Every bdev, in creation order.
    pub fn list(&self) -> Vec<Arc<Bdev>> {
        Vec::new()
    }

    /// The bdev named `name` (or whose uuid/alias is `name`).
    pub fn get(&self, _name: &str) -> Option<Arc<Bdev>> {
        None
    }

    /// Closes every backend (flushing what is volatile), at shutdown.
    pub fn close_all(&self) {}
}
