//! What the vhost controller methods (`blk/rpc.rs`, `scsi/rpc.rs`) share: the context they
//! act on, and how a failed controller operation is answered.

use crate::bdev::rpc::BdevContext;
use crate::error::{Error, Fault};
use crate::rpc::RpcError;

use super::VhostRegistry;

/// What the vhost methods act on: the bdevs (controllers claim them) and the controllers.
pub trait VhostContext: BdevContext {
    fn vhost(&self) -> &VhostRegistry;
}

/// SPDK's vhost RPCs answer a refused operation with -32602 and `strerror(errno)` alone
/// ("File exists", "No such device", "Device or resource busy", "Invalid argument"; see
/// `lib/vhost/vhost_rpc.c`); an argument that cannot make a socket is -32602 with the
/// message, a failure of the daemon itself -32603.
pub fn vhost_error(e: Error) -> RpcError {
    match e.fault {
        Fault::Failed => RpcError::invalid_params_errno(e.errno),
        Fault::Argument | Fault::Internal => e.into(),
    }
}
