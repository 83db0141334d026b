//! RPC handlers of the `malloc` backend: `bdev_malloc_create`, `bdev_malloc_delete`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::MallocOpts;
use crate::bdev::rpc::delete_product;
use crate::bdev::rpc::BdevContext;
use crate::rpc::{params, RpcError, RpcMethods, RpcResult};

/// `bdev_malloc_create` params: every field SPDK's rpc.py may send.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub name: Option<String>,
    pub num_blocks: u64,
    pub block_size: u32,
    pub uuid: Option<Uuid>,
    /// A hint to the guest; accepted and ignored.
    pub physical_block_size: Option<u32>,
    /// I/O splitting hint; accepted and ignored (blockd never splits).
    pub optimal_io_boundary: Option<u32>,
    /// Metadata/DIF change the data layout: refused unless 0/false.
    pub md_size: Option<u32>,
    pub md_interleave: Option<bool>,
    pub dif_type: Option<u32>,
    pub dif_is_head_of_md: Option<bool>,
    pub dif_pi_format: Option<u32>,
    /// NUMA placement; accepted and ignored (the kernel places pages on first touch).
    pub numa_id: Option<i32>,
}

impl CreateParams {
    /// The options, refusing what changes semantics (metadata, protection information).
    pub fn into_opts(self) -> Result<MallocOpts, RpcError> {
        if self.md_size.unwrap_or(0) != 0 || self.dif_type.unwrap_or(0) != 0 {
            return Err(RpcError::invalid_params(
                "md_size/dif_type are not supported by blockd (metadata must be 0)",
            ));
        }
        Ok(MallocOpts {
            name: self.name,
            uuid: self.uuid,
            num_blocks: self.num_blocks,
            block_size: self.block_size,
        })
    }
}

fn create<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let opts = params::<CreateParams>(p)?.into_opts()?;
    let bdev = super::create(app.bdevs(), opts)?;
    Ok(Value::String(bdev.name().to_string()))
}

fn delete<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    delete_product(app, p, super::PRODUCT_NAME)
}

/// Registers this backend's methods.
pub fn register<C: BdevContext>(m: &mut RpcMethods<C>) {
    m.add("bdev_malloc_create", create);
    m.add("bdev_malloc_delete", delete);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rpc_py_params_decode() {
        // What `rpc.py bdev_malloc_create -b M 1 512` sends.
        let p = json!({"num_blocks": 2048, "block_size": 512, "name": "M",
                       "md_interleave": false, "dif_is_head_of_md": false});
        let o = params::<CreateParams>(Some(p))
            .unwrap()
            .into_opts()
            .unwrap();
        assert_eq!((o.num_blocks, o.name.as_deref()), (2048, Some("M")));
        let p = json!({"num_blocks": 1, "block_size": 512, "dif_type": 1});
        assert!(params::<CreateParams>(Some(p))
            .unwrap()
            .into_opts()
            .is_err());
        let p = json!({"num_blocks": 1, "block_size": 512, "uuid": "nope"});
        assert_eq!(params::<CreateParams>(Some(p)).unwrap_err().code, -32602);
    }
}
