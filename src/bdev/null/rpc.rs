//! RPC handlers of the `null` backend: `bdev_null_create`, `bdev_null_delete`,
//! `bdev_null_resize`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::NullOpts;
use crate::bdev::rpc::delete_product;
use crate::bdev::rpc::BdevContext;
use crate::rpc::{params, RpcError, RpcMethods, RpcResult};

/// `bdev_null_create` params: every field SPDK's rpc.py may send.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub name: String,
    pub num_blocks: u64,
    pub block_size: u32,
    pub uuid: Option<Uuid>,
    /// A hint to the guest; accepted and ignored.
    pub physical_block_size: Option<u32>,
    /// Metadata/DIF change the data layout: refused unless 0.
    pub md_size: Option<u32>,
    pub dif_type: Option<u32>,
    pub dif_is_head_of_md: Option<bool>,
    pub dif_pi_format: Option<u32>,
    /// Topology hints; accepted and ignored.
    pub preferred_write_alignment: Option<u32>,
    pub preferred_write_granularity: Option<u32>,
    pub optimal_write_size: Option<u32>,
    pub preferred_unmap_alignment: Option<u32>,
    pub preferred_unmap_granularity: Option<u32>,
}

impl CreateParams {
    /// The options, refusing what changes semantics (metadata, protection information).
    pub fn into_opts(self) -> Result<NullOpts, RpcError> {
        if self.md_size.unwrap_or(0) != 0 || self.dif_type.unwrap_or(0) != 0 {
            return Err(RpcError::invalid_params(
                "md_size/dif_type are not supported by blockd (metadata must be 0)",
            ));
        }
        Ok(NullOpts {
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

/// `bdev_null_resize` params: the new size in MiB, as rpc.py sends it.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ResizeParams {
    pub name: String,
    pub new_size: u64,
}

/// `bdev_null_resize` (SPDK `bdev_null_resize`): grows a null bdev to `new_size` MiB, and
/// connected guests get a config change. Shrinking is refused (-22), as in SPDK: a guest
/// may be using the blocks. A name that is not a null bdev is -19.
fn resize<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let req: ResizeParams = params(p)?;
    let bdev = app
        .bdevs()
        .get(&req.name)
        .filter(|b| b.backend().product_name() == super::PRODUCT_NAME)
        .ok_or_else(|| RpcError::errno(libc::ENODEV))?;
    let bs = u64::from(bdev.block_size());
    let blocks = req
        .new_size
        .checked_mul(1 << 20)
        .map(|bytes| bytes / bs)
        .ok_or_else(|| RpcError::errno_msg(libc::EINVAL, "new_size is too large"))?;
    if blocks < bdev.num_blocks() {
        return Err(RpcError::errno_msg(
            libc::EINVAL,
            format!(
                "{}: the new size ({} MiB) must not be smaller than the current one",
                req.name, req.new_size
            ),
        ));
    }
    bdev.set_num_blocks(blocks);
    tracing::info!(bdev = %req.name, num_blocks = blocks, "null bdev resized");
    Ok(Value::Bool(true))
}

/// Registers this backend's methods.
pub fn register<C: BdevContext>(m: &mut RpcMethods<C>) {
    m.add("bdev_null_create", create);
    m.add("bdev_null_delete", delete);
    m.add("bdev_null_resize", resize);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rpc_py_params_decode() {
        // What `rpc.py bdev_null_create -u ... Null0 64 4096` sends.
        let p = json!({"num_blocks": 16384, "block_size": 4096, "name": "Null0",
                       "uuid": "bf3cde26-dad0-4496-9f02-3f856df8d775",
                       "dif_is_head_of_md": false});
        let o = params::<CreateParams>(Some(p))
            .unwrap()
            .into_opts()
            .unwrap();
        assert_eq!(o.num_blocks, 16384);
        assert!(o.uuid.is_some());
        let p = json!({"num_blocks": 1, "block_size": 512, "name": "N", "md_size": 8});
        let e = params::<CreateParams>(Some(p))
            .unwrap()
            .into_opts()
            .unwrap_err();
        assert!(e.message.contains("md_size"));
        let p = json!({"num_blocks": 1, "block_size": 512, "name": "N", "bogus": 1});
        assert_eq!(params::<CreateParams>(Some(p)).unwrap_err().code, -32602);
    }
}
