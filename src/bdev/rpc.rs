//! Generic bdev RPCs: `bdev_get_bdevs`, `bdev_get_iostat`, `bdev_set_qos_limit`.

use crate::rpc::RpcMethods;

/// Registers the generic bdev methods.
pub fn register(_m: &mut RpcMethods) {}
