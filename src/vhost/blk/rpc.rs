//! RPC handlers of vhost-user-blk controllers.

use crate::rpc::RpcMethods;

/// Registers the vhost-blk methods.
pub fn register(_m: &mut RpcMethods) {}
