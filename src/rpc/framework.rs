//! Framework methods: `rpc_get_methods`, `spdk_get_version`, `framework_get_reactors`,
//! `framework_get_subsystems`, `framework_get_config`. (being written)

use super::RpcMethods;

/// Registers the framework methods.
pub fn register(_m: &mut RpcMethods) {}
