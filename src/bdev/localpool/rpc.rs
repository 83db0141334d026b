//! RPC handlers of the `local` backend: `bdev_local_create`, `bdev_local_delete` (blockd's
//! own methods; SPDK has no local pool).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::LocalPoolBdevOpts;
use crate::bdev::rpc::delete_product;
use crate::bdev::rpc::BdevContext;
use crate::rpc::{params, RpcError, RpcMethods, RpcResult};

/// `bdev_local_create` params.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub pool: String,
    pub image: String,
    /// Default: the first free `Local<N>`.
    pub name: Option<String>,
    /// Default 512; 0 means the default.
    pub block_size: Option<u32>,
    pub readonly: Option<bool>,
    /// Root of the local pools (default: the daemon's `$BLOCKD_POOL_DIR`, else
    /// /var/lib/blockd/pools).
    pub pool_dir: Option<PathBuf>,
    pub uuid: Option<Uuid>,
    /// The destination of a live migration: wait for the write role while another
    /// instance holds it, take it when the device starts (blockd extension).
    pub incoming: Option<bool>,
}

fn create<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: CreateParams = params(p)?;
    let name = match p.name {
        Some(n) if n.is_empty() => return Err(RpcError::invalid_params("name must not be empty")),
        Some(n) => n,
        None => app.bdevs().first_free_name("Local"),
    };
    let bdev = super::create(
        app.bdevs(),
        LocalPoolBdevOpts {
            name,
            pool: p.pool,
            image: p.image,
            pool_dir: p.pool_dir,
            block_size: p.block_size.filter(|&b| b != 0),
            readonly: p.readonly.unwrap_or(false),
            uuid: p.uuid,
            incoming: p.incoming.unwrap_or(false),
        },
    )?;
    Ok(Value::String(bdev.name().to_string()))
}

fn delete<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    delete_product(app, p, super::PRODUCT_NAME)
}

/// Registers this backend's methods.
pub fn register<C: BdevContext>(m: &mut RpcMethods<C>) {
    m.add("bdev_local_create", create);
    m.add("bdev_local_delete", delete);
}
