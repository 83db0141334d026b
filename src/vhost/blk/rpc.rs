//! SPDK-compatible RPCs of vhost controllers (`lib/vhost/vhost_rpc.c`):
//! `vhost_create_blk_controller`, `vhost_get_controllers`, `vhost_delete_controller`,
//! `vhost_controller_set_coalescing`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{claim_name, BlkDevice};
use crate::rpc::{params, RpcError, RpcMethods, RpcResult};
use crate::vhost::device::VirtioDevice;
use crate::vhost::rpc::{vhost_error, VhostContext};
use crate::vhost::{controller_cpumask, validate_name, ConfigNotifier, NewController};

/// Registers the vhost methods.
pub fn register<C: VhostContext>(m: &mut RpcMethods<C>) {
    m.add("vhost_create_blk_controller", create_blk_controller);
    m.add("vhost_get_controllers", get_controllers);
    m.add("vhost_delete_controller", delete_controller);
    m.add("vhost_controller_set_coalescing", set_coalescing);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBlk {
    ctrlr: String,
    dev_name: String,
    cpumask: Option<String>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    packed_ring: bool,
    #[serde(default)]
    packed_ring_recovery: bool,
    transport: Option<String>,
}

fn create_blk_controller<C: VhostContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: CreateBlk = params(p)?;
    if let Err(e) = validate_name(&p.ctrlr) {
        tracing::error!("vhost_create_blk_controller: {e}");
        return Err(RpcError::invalid_params_errno(libc::EINVAL));
    }
    if let Some(t) = &p.transport {
        if t != "vhost_user_blk" {
            return Err(RpcError::invalid_params(format!("unknown transport '{t}'")));
        }
    }
    let cpumask = controller_cpumask(app.vhost().core_mask(), &p.ctrlr, p.cpumask.as_deref())
        .map_err(vhost_error)?;
    if app.vhost().exists(&p.ctrlr) {
        tracing::error!(ctrlr = %p.ctrlr, "controller already exists");
        return Err(RpcError::invalid_params_errno(libc::EEXIST));
    }
    let Some(bdev) = app.bdevs().get(&p.dev_name) else {
        tracing::error!(ctrlr = %p.ctrlr, "bdev '{}' does not exist", p.dev_name);
        return Err(RpcError::invalid_params_errno(libc::ENODEV));
    };
    let owner = claim_name(&p.ctrlr);
    if let Err(holder) = bdev.claim(&owner) {
        return Err(RpcError::invalid_params(format!(
            "bdev {} is already claimed by {holder}",
            bdev.name()
        )));
    }
    let notifier = ConfigNotifier::default();
    let device = Arc::new(
        BlkDevice::new(&p.ctrlr, bdev.clone(), p.readonly, notifier.clone())
            .with_packed_ring(p.packed_ring, p.packed_ring_recovery),
    );
    match app.vhost().create(NewController {
        name: p.ctrlr.clone(),
        cpumask,
        device: device.clone(),
        notifier,
    }) {
        Ok(_) => Ok(json!(true)),
        Err(e) => {
            device.close();
            Err(vhost_error(e))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetControllers {
    name: Option<String>,
}

fn get_controllers<C: VhostContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: GetControllers = params(p)?;
    match p.name {
        Some(n) => match app.vhost().get(&n) {
            Some(c) => Ok(json!([c.to_json()])),
            None => Err(RpcError::new(
                crate::rpc::code::INTERNAL_ERROR,
                crate::rpc::strerror(libc::ENODEV),
            )),
        },
        None => Ok(Value::Array(
            app.vhost().list().iter().map(|c| c.to_json()).collect(),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteController {
    ctrlr: String,
}

fn delete_controller<C: VhostContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: DeleteController = params(p)?;
    app.vhost().delete(&p.ctrlr).map_err(vhost_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCoalescing {
    ctrlr: String,
    delay_base_us: u32,
    iops_threshold: u32,
}

fn set_coalescing<C: VhostContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: SetCoalescing = params(p)?;
    app.vhost()
        .set_coalescing(&p.ctrlr, p.delay_base_us, p.iops_threshold)
        .map_err(vhost_error)?;
    Ok(json!(true))
}
