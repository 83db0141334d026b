//! SPDK-compatible RPCs of vhost-scsi controllers (`lib/vhost/vhost_rpc.c`):
//! `vhost_create_scsi_controller`, `vhost_start_scsi_controller`,
//! `vhost_scsi_controller_add_target`, `vhost_scsi_controller_remove_target`.
//! `vhost_get_controllers` and `vhost_delete_controller` are shared with blk.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::ScsiDevice;
use crate::rpc::{params, RpcError, RpcMethods, RpcResult};
use crate::vhost::rpc::{vhost_error, VhostContext};
use crate::vhost::{controller_cpumask, validate_name, Controller, NewController};

/// Registers the vhost-scsi methods.
pub fn register<C: VhostContext>(m: &mut RpcMethods<C>) {
    m.add("vhost_create_scsi_controller", create_scsi_controller);
    m.add("vhost_start_scsi_controller", start_scsi_controller);
    m.add("vhost_scsi_controller_add_target", add_target);
    m.add("vhost_scsi_controller_remove_target", remove_target);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateScsi {
    ctrlr: String,
    cpumask: Option<String>,
    /// SPDK: do not start the controller until `vhost_start_scsi_controller`. blockd
    /// listens at once (targets added later are hot-plugged), see the module doc.
    #[serde(default)]
    delay: bool,
    /// Offer packed virtqueues (a blockd extension, as `vhost_create_blk_controller`'s).
    #[serde(default)]
    packed_ring: bool,
}

fn create_scsi_controller<C: VhostContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: CreateScsi = params(p)?;
    if let Err(e) = validate_name(&p.ctrlr) {
        tracing::error!("vhost_create_scsi_controller: {e}");
        return Err(RpcError::invalid_params_errno(libc::EINVAL));
    }
    let cpumask = controller_cpumask(app.vhost().core_mask(), &p.ctrlr, p.cpumask.as_deref())
        .map_err(vhost_error)?;
    if app.vhost().exists(&p.ctrlr) {
        tracing::error!(ctrlr = %p.ctrlr, "controller already exists");
        return Err(RpcError::invalid_params_errno(libc::EEXIST));
    }
    let device = ScsiDevice::new(&p.ctrlr)
        .map_err(|e| RpcError::internal(format!("controller {}: cannot create: {e}", p.ctrlr)))?
        .with_packed_ring(p.packed_ring);
    if p.delay {
        tracing::info!(ctrlr = %p.ctrlr, "delay requested: the controller listens at once, targets are hot-plugged");
    }
    app.vhost()
        .create(NewController {
            name: p.ctrlr,
            cpumask,
            device: Arc::new(device),
            // SCSI capacity changes travel as unit attentions, not config changes.
            notifier: Default::default(),
        })
        .map_err(vhost_error)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartScsi {
    ctrlr: String,
}

/// The scsi controller named `name`: -32602 "No such device" when there is none or it is
/// not a scsi controller (as SPDK's `vhost_scsi_dev_get`).
fn scsi_ctrlr<C: VhostContext>(app: &C, name: &str) -> Result<Arc<Controller>, RpcError> {
    match app.vhost().get(name) {
        Some(c) if scsi_device(&c).is_some() => Ok(c),
        _ => {
            tracing::error!(ctrlr = name, "no such scsi controller");
            Err(RpcError::invalid_params_errno(libc::ENODEV))
        }
    }
}

fn scsi_device(c: &Controller) -> Option<&ScsiDevice> {
    c.device.as_any()?.downcast_ref::<ScsiDevice>()
}

fn start_scsi_controller<C: VhostContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: StartScsi = params(p)?;
    scsi_ctrlr(app.as_ref(), &p.ctrlr)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddTarget {
    ctrlr: String,
    scsi_target_num: i64,
    bdev_name: String,
}

fn add_target<C: VhostContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: AddTarget = params(p)?;
    let c = scsi_ctrlr(app.as_ref(), &p.ctrlr)?;
    let Some(dev) = scsi_device(&c) else {
        return Err(RpcError::invalid_params_errno(libc::ENODEV));
    };
    let Some(bdev) = app.bdevs().get(&p.bdev_name) else {
        tracing::error!(ctrlr = %p.ctrlr, "bdev '{}' does not exist", p.bdev_name);
        return Err(RpcError::invalid_params_errno(libc::ENODEV));
    };
    match dev.add_target(p.scsi_target_num, bdev) {
        Ok(id) => Ok(json!(id)),
        Err(e @ super::TargetError::Claimed { .. }) => Err(RpcError::invalid_params(e.to_string())),
        Err(super::TargetError::NotActivated(e)) => Err(e.into()),
        Err(e) => {
            tracing::error!(ctrlr = %p.ctrlr, "cannot add target: {e}");
            Err(RpcError::invalid_params_errno(e.errno()))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveTarget {
    ctrlr: String,
    scsi_target_num: i64,
}

fn remove_target<C: VhostContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: RemoveTarget = params(p)?;
    let c = scsi_ctrlr(app.as_ref(), &p.ctrlr)?;
    let Some(dev) = scsi_device(&c) else {
        return Err(RpcError::invalid_params_errno(libc::ENODEV));
    };
    match dev.remove_target(p.scsi_target_num) {
        Ok(()) => Ok(json!(true)),
        Err(e) => {
            tracing::error!(ctrlr = %p.ctrlr, "cannot remove target: {e}");
            Err(RpcError::invalid_params_errno(e.errno()))
        }
    }
}
