//! RPC handlers of the `aio` backend: `bdev_aio_create`, `bdev_aio_delete`,
//! `bdev_aio_rescan`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{AioFiles, AioOpts};
use crate::bdev::rpc::{delete_product, BdevContext, NameParams};
use crate::rpc::{params, RpcMethods, RpcResult};

/// What the aio methods act on: the bdevs and the aio files (for rescans).
pub trait AioContext: BdevContext {
    fn aio_files(&self) -> &AioFiles;
}

/// `bdev_aio_create` params: every field SPDK's rpc.py may send.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub filename: String,
    pub name: String,
    pub block_size: Option<u32>,
    pub readonly: Option<bool>,
    /// Offer unmap/write-zeroes through `fallocate` (SPDK's `--fallocate`).
    pub fallocate: Option<bool>,
    pub uuid: Option<Uuid>,
    /// `RWF_NOWAIT` for block devices: accepted and ignored (io_uring already never blocks
    /// the reactor; `EAGAIN` is retried).
    pub nowait: Option<bool>,
}

impl CreateParams {
    /// The options (`block_size` 0 means "detect", as in SPDK).
    pub fn into_opts(self) -> AioOpts {
        AioOpts {
            filename: self.filename.into(),
            name: self.name,
            block_size: self.block_size.filter(|&b| b != 0),
            readonly: self.readonly.unwrap_or(false),
            fallocate: self.fallocate.unwrap_or(false),
            uuid: self.uuid,
        }
    }
}

fn create<C: AioContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let opts = params::<CreateParams>(p)?.into_opts();
    let bdev = super::create(app.bdevs(), app.aio_files(), opts)?;
    Ok(Value::String(bdev.name().to_string()))
}

fn delete<C: AioContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    delete_product(app, p, super::PRODUCT_NAME)
}

/// `bdev_aio_rescan {name}`: re-reads the file size; true.
fn rescan<C: AioContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: NameParams = params(p)?;
    super::rescan(app.bdevs(), app.aio_files(), &p.name)?;
    Ok(Value::Bool(true))
}

/// Registers this backend's methods.
pub fn register<C: AioContext>(m: &mut RpcMethods<C>) {
    m.add("bdev_aio_create", create);
    m.add("bdev_aio_delete", delete);
    m.add("bdev_aio_rescan", rescan);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rpc_py_params_decode() {
        // What `rpc.py bdev_aio_create /tmp/f Aio0` sends.
        let p = json!({"filename": "/tmp/f", "name": "Aio0", "readonly": false,
                       "fallocate": false, "nowait": false});
        let o = params::<CreateParams>(Some(p)).unwrap().into_opts();
        assert_eq!((o.block_size, o.readonly), (None, false));
        let p = json!({"filename": "/tmp/f", "name": "Aio0", "block_size": 4096});
        assert_eq!(
            params::<CreateParams>(Some(p))
                .unwrap()
                .into_opts()
                .block_size,
            Some(4096)
        );
        let p = json!({"name": "Aio0"});
        let e = params::<CreateParams>(Some(p)).unwrap_err();
        assert!(e.message.contains("filename"), "{}", e.message);
    }
}
