//! JSON-RPC 2.0 on a Unix socket, compatible with SPDK's (`doc/jsonrpc.md`).
//!
//! This layer only parses and validates: every handler decodes its params with [`params`]
//! and calls the same library functions the configuration loader uses. Handlers live beside
//! the module they drive (`bdev/malloc/rpc.rs`, `vhost/blk/rpc.rs`, ...), as SPDK's
//! `bdev_<name>_rpc.c`, and register themselves in an [`RpcMethods`] table that the
//! application assembles. The table is generic over the context its handlers act on, so
//! this layer knows neither the application nor the modules: each module's `register`
//! asks of the context only what its handlers use (a small trait the application
//! implements).

pub mod framework;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz_api;
pub mod log;
pub mod server;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Fault};

/// JSON-RPC 2.0 error codes (SPDK `include/spdk/jsonrpc.h`).
pub mod code {
    pub const PARSE_ERROR: i32 = -32700;
    pub const INVALID_REQUEST: i32 = -32600;
    pub const METHOD_NOT_FOUND: i32 = -32601;
    pub const INVALID_PARAMS: i32 = -32602;
    pub const INTERNAL_ERROR: i32 = -32603;
}

/// An error answered to a JSON-RPC request: `{"code": C, "message": M}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// -32602 with a message saying which parameter is wrong and why.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }

    /// -32602 with `strerror(errno)` as message, as SPDK answers most vhost/bdev failures
    /// ("Invalid argument", "File exists", "No such device").
    pub fn invalid_params_errno(errno: i32) -> Self {
        Self::new(code::INVALID_PARAMS, strerror(errno))
    }

    /// Code `-errno` with `strerror(errno)`, as SPDK answers backend failures
    /// (`bdev_get_bdevs` of an unknown name: -19 "No such device").
    pub fn errno(errno: i32) -> Self {
        Self::new(-errno, strerror(errno))
    }

    /// Code `-errno` with a message of our own that names what failed.
    pub fn errno_msg(errno: i32, message: impl Into<String>) -> Self {
        Self::new(-errno, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(code::INTERNAL_ERROR, message)
    }

    pub fn method_not_found() -> Self {
        Self::new(code::METHOD_NOT_FOUND, "Method not found")
    }
}

pub use crate::error::strerror;

impl From<Error> for RpcError {
    /// How blockd answers a failed domain operation: code `-errno` with the message naming
    /// the object (as SPDK's backends answer, e.g. -17 for a duplicate bdev); -32602 for an
    /// invalid argument, -32603 for the daemon's own failure, both with the message.
    fn from(e: Error) -> Self {
        match e.fault {
            Fault::Failed => RpcError::errno_msg(e.errno, e.message),
            Fault::Argument => RpcError::invalid_params(e.message),
            Fault::Internal => RpcError::internal(e.message),
        }
    }
}

/// The result of a handler.
pub type RpcResult = Result<Value, RpcError>;

/// A method handler: the context it acts on (the application) and the request's `params`
/// (absent when the request had none).
pub type RpcHandler<C> = fn(&Arc<C>, Option<Value>) -> RpcResult;

/// A context RPC requests are served on: it holds its method table.
pub trait RpcContext: Send + Sync + Sized + 'static {
    fn methods(&self) -> &RpcMethods<Self>;

    /// Runs after every call a client made (not after a configuration replay), with whether
    /// it succeeded: the application persists a changed configuration here. An error fails
    /// the call with it (the change is made but not saved).
    fn after_call(&self, _method: &str, _succeeded: bool) -> Result<(), RpcError> {
        Ok(())
    }
}

/// Decodes `params` into `T`, answering -32602 with serde's description of what is wrong
/// (missing field `num_blocks`, unknown field `foo`, invalid type ...). Absent params decode
/// as `{}` so that all-optional parameter sets work.
pub fn params<T: DeserializeOwned>(p: Option<Value>) -> Result<T, RpcError> {
    let v = p.unwrap_or_else(|| Value::Object(Default::default()));
    serde_json::from_value(v)
        .map_err(|e| RpcError::invalid_params(format!("Invalid parameters: {e}")))
}

/// Rejects any params, for methods that take none (SPDK answers -32602 for
/// `spdk_get_version` with params).
pub fn no_params(p: Option<Value>) -> Result<(), RpcError> {
    match p {
        None => Ok(()),
        Some(Value::Object(m)) if m.is_empty() => Ok(()),
        Some(_) => Err(RpcError::invalid_params("this method takes no parameters")),
    }
}

/// The methods the daemon answers, by name, with handlers acting on a `C`.
pub struct RpcMethods<C> {
    map: BTreeMap<&'static str, RpcHandler<C>>,
}

impl<C> Default for RpcMethods<C> {
    fn default() -> Self {
        RpcMethods {
            map: BTreeMap::new(),
        }
    }
}

impl<C> RpcMethods<C> {
    pub fn add(&mut self, name: &'static str, handler: RpcHandler<C>) {
        self.map.insert(name, handler);
    }

    pub fn get(&self, name: &str) -> Option<RpcHandler<C>> {
        self.map.get(name).copied()
    }

    /// Method names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.map.keys().copied().collect()
    }

    /// Runs `method` with `params` on `ctx`.
    pub fn call(&self, ctx: &Arc<C>, method: &str, params: Option<Value>) -> RpcResult {
        match self.get(method) {
            Some(h) => h(ctx, params),
            None => Err(RpcError::method_not_found()),
        }
    }
}
