//! RPC handlers of the crypto bdev: `bdev_crypto_create`, `bdev_crypto_delete` (SPDK
//! doc/jsonrpc.md; `key_name` names a keyring key here, and key material in the
//! parameters is refused).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::CryptoOpts;
use crate::bdev::rpc::{delete_product, BdevContext};
use crate::keyring::rpc::KeyringContext;
use crate::rpc::{params, RpcError, RpcMethods, RpcResult};

/// `bdev_crypto_create` params: SPDK's names.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    pub base_bdev_name: String,
    pub name: String,
    /// A keyring key (`keyring_file_add_key`) of 64 bytes or 128 hex digits.
    pub key_name: Option<String>,
    /// SPDK's DPDK driver choice: accepted and ignored (blockd uses the CPU's AES).
    pub crypto_pmd: Option<String>,
    /// Only `AES_XTS`.
    pub cipher: Option<String>,
    /// Only `SIMPLE_LBA` (the tweak is the LBA).
    pub tweak_mode: Option<String>,
    /// SPDK's deprecated inline keys: refused (keys go through the keyring).
    pub key: Option<Value>,
    pub key2: Option<Value>,
    /// blockd extension: a stable uuid (the saved config carries it).
    pub uuid: Option<Uuid>,
    /// blockd extension: the key check value the key must have (the saved config carries
    /// it); a different key is refused with `EKEYREJECTED`.
    pub key_check: Option<String>,
}

fn create<C: BdevContext + KeyringContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: CreateParams = params(p)?;
    if p.key.is_some() || p.key2.is_some() {
        return Err(RpcError::invalid_params(
            "key material is not accepted in RPC parameters: put the key in a file, add it \
             with keyring_file_add_key and pass its name as key_name",
        ));
    }
    if let Some(c) = p.cipher.as_deref().filter(|c| *c != "AES_XTS") {
        return Err(RpcError::invalid_params(format!(
            "cipher {c} is not supported (only AES_XTS)"
        )));
    }
    if let Some(t) = p.tweak_mode.as_deref().filter(|t| *t != "SIMPLE_LBA") {
        return Err(RpcError::invalid_params(format!(
            "tweak_mode {t} is not supported (only SIMPLE_LBA)"
        )));
    }
    let Some(key_name) = p.key_name else {
        return Err(RpcError::invalid_params("key_name is required"));
    };
    let bdev = super::create(
        app.bdevs(),
        app.keyring(),
        CryptoOpts {
            base_bdev_name: p.base_bdev_name,
            name: p.name,
            key_name,
            key_check: p.key_check,
            uuid: p.uuid,
        },
    )?;
    Ok(Value::String(bdev.name().to_string()))
}

fn delete<C: BdevContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    delete_product(app, p, super::PRODUCT_NAME)
}

/// Registers this backend's methods.
pub fn register<C: BdevContext + KeyringContext>(m: &mut RpcMethods<C>) {
    m.add("bdev_crypto_create", create);
    m.add("bdev_crypto_delete", delete);
}
