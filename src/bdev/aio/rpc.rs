//! RPC handlers of the `aio` backend.

use crate::rpc::RpcMethods;

/// Registers this backend's methods.
pub fn register(_m: &mut RpcMethods) {}
