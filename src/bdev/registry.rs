//! The daemon's bdevs by name. (being written)

/// All bdevs.
#[derive(Default)]
pub struct BdevRegistry {}
