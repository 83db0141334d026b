//! NBD methods: SPDK's `nbd_start_disk`, `nbd_stop_disk`, `nbd_get_disks` (same params and
//! results, `lib/nbd/nbd_rpc.c`), and blockd's socket-export methods `nbd_server_start`,
//! `nbd_server_stop`, `nbd_export_add`, `nbd_export_remove`, `nbd_get_exports`.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::server::{parse_tcp_addr, ServerOpts};
use super::NbdState;
use crate::bdev::rpc::BdevContext;
use crate::bdev::Bdev;
use crate::reactor::Reactors;
use crate::rpc::{no_params, params, RpcError, RpcMethods, RpcResult};

/// What the nbd methods act on: the bdevs, the NBD state, the reactors that serve the
/// connections, and the mode of Unix sockets.
pub trait NbdContext: BdevContext {
    fn nbd(&self) -> &NbdState;
    fn nbd_reactors(&self) -> &Arc<Reactors>;
    fn socket_mode(&self) -> u32;
}

/// Registers the nbd methods.
pub fn register<C: NbdContext>(m: &mut RpcMethods<C>) {
    m.add("nbd_server_start", server_start);
    m.add("nbd_server_stop", server_stop);
    m.add("nbd_export_add", export_add);
    m.add("nbd_export_remove", export_remove);
    m.add("nbd_get_exports", get_exports);
    m.add("nbd_start_disk", start_disk);
    m.add("nbd_stop_disk", stop_disk);
    m.add("nbd_get_disks", get_disks);
}

fn bdev<C: NbdContext>(app: &C, name: &str) -> Result<Arc<Bdev>, RpcError> {
    app.bdevs().get(name).ok_or_else(|| {
        RpcError::errno_msg(
            libc::ENODEV,
            format!("bdev {name} not found: No such device"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerStart {
    unix_path: Option<PathBuf>,
    tcp_addr: Option<String>,
}

/// `nbd_server_start {unix_path?, tcp_addr?}` → true. A bare port binds 127.0.0.1.
fn server_start<C: NbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: ServerStart = params(p)?;
    if let Some(a) = &p.tcp_addr {
        parse_tcp_addr(a).map_err(RpcError::invalid_params)?;
    }
    let opts = ServerOpts {
        unix_path: p.unix_path,
        tcp_addr: p.tcp_addr,
    };
    app.nbd()
        .start_server(app.nbd_reactors(), opts, app.socket_mode())?;
    Ok(json!(true))
}

/// `nbd_server_stop` → true: stops listening, drains, flushes and disconnects clients.
fn server_stop<C: NbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    no_params(p)?;
    app.nbd().stop_server(app.nbd_reactors())?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportAdd {
    bdev_name: String,
    name: Option<String>,
    #[serde(default)]
    readonly: bool,
}

/// `nbd_export_add {bdev_name, name?, readonly?}` → the export name (default: the bdev
/// name). Claims the bdev: one export per bdev.
fn export_add<C: NbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: ExportAdd = params(p)?;
    let b = bdev(app.as_ref(), &p.bdev_name)?;
    let name = p.name.unwrap_or_else(|| b.name().to_string());
    let e = app.nbd().add_export(&name, b, p.readonly)?;
    Ok(json!(e.name))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportRemove {
    name: String,
    #[serde(default)]
    force: bool,
}

/// `nbd_export_remove {name, force?}` → true; refused (-16) while clients are connected
/// unless `force`.
fn export_remove<C: NbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: ExportRemove = params(p)?;
    app.nbd()
        .remove_export(app.nbd_reactors(), &p.name, p.force)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetExports {
    name: Option<String>,
}

/// `nbd_get_exports {name?}` → [{name, bdev_name, readonly, clients}].
fn get_exports<C: NbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: GetExports = params(p)?;
    let v: Vec<Value> = app
        .nbd()
        .exports()
        .list()
        .iter()
        .filter(|e| !e.kernel && p.name.as_ref().is_none_or(|n| *n == e.name))
        .map(|e| e.to_json())
        .collect();
    if let Some(n) = &p.name {
        if v.is_empty() {
            return Err(RpcError::errno_msg(
                libc::ENODEV,
                format!("nbd export {n} does not exist: No such device"),
            ));
        }
    }
    Ok(Value::Array(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartDisk {
    bdev_name: String,
    nbd_device: Option<String>,
}

/// `nbd_start_disk {bdev_name, nbd_device?}` → "/dev/nbdX"; -19 when the kernel has no
/// nbd driver.
fn start_disk<C: NbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: StartDisk = params(p)?;
    let b = bdev(app.as_ref(), &p.bdev_name)?;
    let dev = app
        .nbd()
        .start_disk(app.nbd_reactors(), b, p.nbd_device.as_deref())?;
    Ok(json!(dev))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StopDisk {
    nbd_device: String,
}

/// `nbd_stop_disk {nbd_device}` → true.
fn stop_disk<C: NbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: StopDisk = params(p)?;
    app.nbd().stop_disk(app.nbd_reactors(), &p.nbd_device)?;
    Ok(json!(true))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetDisks {
    nbd_device: Option<String>,
}

/// `nbd_get_disks {nbd_device?}` → [{nbd_device, bdev_name}].
fn get_disks<C: NbdContext>(app: &Arc<C>, p: Option<Value>) -> RpcResult {
    let p: GetDisks = params(p)?;
    Ok(app.nbd().disks_json(p.nbd_device.as_deref())?)
}
