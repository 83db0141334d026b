//! RPC handlers of the `null` backend.

use crate::rpc::RpcMethods;

/// Registers this backend's methods.
pub fn register(_m: &mut RpcMethods) {}
