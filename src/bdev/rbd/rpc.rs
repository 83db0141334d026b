//! RPC handlers of the `rbd` backend (SPDK `module/bdev/rbd/bdev_rbd_rpc.c`).
//!
//! Unlike SPDK, which answers every `bdev_rbd_create` failure with -1, errors carry the real
//! errno and name the pool/image/cluster: -2 "image testpool/nosuch not found",
//! -13 "permission denied connecting to cluster ceph as client.admin".

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::cluster::ClusterConfig;
use super::{RbdBdevConfig, RbdEncryption, RbdState};
use crate::bdev::rpc::{BdevContext, NameParams};
use crate::keyring::rpc::KeyringContext;
use crate::rbd::EncryptionFormat;
use crate::rpc::{params, RpcError, RpcMethods, RpcResult};

/// What the rbd methods act on: the bdevs and the rbd state (clusters, rbd bdevs).
pub trait RbdContext: BdevContext {
    fn rbd(&self) -> &RbdState;
}

/// Registers this backend's methods.
pub fn register<C: RbdContext + KeyringContext>(m: &mut RpcMethods<C>) {
    m.add("bdev_rbd_create", create);
    m.add("bdev_rbd_delete", delete);
    m.add("bdev_rbd_resize", resize);
    m.add("bdev_rbd_register_cluster", register_cluster);
    m.add("bdev_rbd_unregister_cluster", unregister_cluster);
    m.add("bdev_rbd_get_clusters_info", get_clusters_info);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateParams {
    name: Option<String>,
    user_id: Option<String>,
    pool_name: String,
    rbd_name: String,
    block_size: u32,
    config: Option<BTreeMap<String, String>>,
    cluster_name: Option<String>,
    uuid: Option<Uuid>,
    /// Open the image with `rbd_open_read_only` (rpc.py ≥ 24 `-r/--readonly`): no
    /// exclusive lock is taken and frontends present a read-only device.
    #[serde(default)]
    read_only: bool,
    /// `luks1` or `luks2`: load the image's LUKS encryption with the passphrase in keyring
    /// key `key_name` (blockd extension).
    encryption_format: Option<String>,
    key_name: Option<String>,
}

/// Whether `name` is taken by any bdev of the daemon.
fn name_taken<C: RbdContext>(app: &Arc<C>, name: &str) -> bool {
    app.rbd().exists(name) || app.bdevs().get(name).is_some()
}

fn create<C: RbdContext + KeyringContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: CreateParams = params(p)?;
    let encryption = match (p.encryption_format.as_deref(), p.key_name.as_deref()) {
        (None, None) => None,
        (Some(f), Some(k)) => Some(RbdEncryption {
            format: EncryptionFormat::parse(f).map_err(crate::error::Error::from)?,
            key: app.keyring().get(k)?,
        }),
        _ => {
            return Err(RpcError::invalid_params(
                "encryption_format and key_name go together",
            ))
        }
    };
    let name = match p.name {
        Some(n) if n.is_empty() => return Err(RpcError::invalid_params("name must not be empty")),
        Some(n) => {
            if name_taken(app, &n) {
                return Err(RpcError::errno_msg(
                    libc::EEXIST,
                    format!("bdev {n} already exists"),
                ));
            }
            n
        }
        // SPDK's default names: Ceph0, Ceph1, ... the first free.
        None => (0..)
            .map(|i| format!("Ceph{i}"))
            .find(|n| !name_taken(app, n))
            .unwrap_or_default(),
    };
    let bdev = app.rbd().create(RbdBdevConfig {
        name,
        user_id: p.user_id,
        pool_name: p.pool_name,
        rbd_name: p.rbd_name,
        block_size: p.block_size,
        config: p.config,
        cluster_name: p.cluster_name,
        uuid: p.uuid,
        read_only: p.read_only,
        encryption,
    })?;
    if let Err(e) = app.bdevs().add(bdev.clone()) {
        // Lost a race for the name: undo.
        if let Err(d) = app.rbd().delete(bdev.name()) {
            tracing::warn!(bdev = bdev.name(), "undoing a duplicate rbd bdev: {d}");
        }
        return Err(e.into());
    }
    Ok(json!(bdev.name()))
}

fn delete<C: RbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: NameParams = params(p)?;
    if !app.rbd().exists(&p.name) {
        return Err(RpcError::errno(libc::ENODEV));
    }
    // Refused (EBUSY, naming the owner) while a controller claims it; closes the backend.
    app.bdevs()
        .remove_product(&p.name, Some(super::PRODUCT_NAME))?;
    app.rbd().delete(&p.name)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeParams {
    name: String,
    new_size: u64,
}

fn resize<C: RbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: ResizeParams = params(p)?;
    if !app.rbd().exists(&p.name) {
        return Err(RpcError::errno(libc::ENODEV));
    }
    app.rbd().resize(&p.name, p.new_size)?;
    Ok(json!(true))
}

fn register_cluster<C: RbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let cfg: ClusterConfig = params(p)?;
    Ok(json!(app.rbd().clusters.register(cfg)?))
}

fn unregister_cluster<C: RbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: NameParams = params(p)?;
    app.rbd().clusters.unregister(&p.name)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InfoParams {
    name: Option<String>,
}

fn get_clusters_info<C: RbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: InfoParams = params(p)?;
    Ok(app.rbd().clusters.info(p.name.as_deref())?)
}
