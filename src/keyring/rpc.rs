//! RPC handlers of the keyring (SPDK doc/jsonrpc.md "Keyring"): `keyring_file_add_key
//! {name, path}`, `keyring_file_remove_key {name}`, `keyring_get_keys`.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::Keyring;
use crate::rpc::{no_params, params, RpcMethods, RpcResult};

/// What the keyring methods act on: the application's keyring.
pub trait KeyringContext: Send + Sync + 'static {
    fn keyring(&self) -> &Keyring;
}

/// `keyring_file_add_key` params.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct AddParams {
    pub name: String,
    pub path: PathBuf,
}

/// `keyring_file_remove_key` params.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    pub name: String,
}

fn add<C: KeyringContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: AddParams = params(p)?;
    app.keyring().add_file(&p.name, &p.path)?;
    Ok(Value::Bool(true))
}

fn remove<C: KeyringContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: RemoveParams = params(p)?;
    app.keyring().remove(&p.name)?;
    Ok(Value::Bool(true))
}

fn get_keys<C: KeyringContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    Ok(app.keyring().list_json())
}

/// Registers the keyring methods.
pub fn register<C: KeyringContext>(m: &mut RpcMethods<C>) {
    m.add("keyring_file_add_key", add);
    m.add("keyring_file_remove_key", remove);
    m.add("keyring_get_keys", get_keys);
}
