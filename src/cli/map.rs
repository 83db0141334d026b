//! `blockctl map BDEV [--device /dev/nbdX]`, `blockctl unmap DEVICE`, `blockctl showmapped`:
//! attach bdevs to the kernel's nbd driver over `nbd_start_disk` / `nbd_stop_disk` /
//! `nbd_get_disks` (as `rbd map` does for RBD images).
//!
//! The RPC transport is the caller's: [`run`] takes a function that sends one JSON-RPC call
//! and returns its result, so blockctl wires in its client and tests pass a fake.

use std::io::Write;

use serde_json::{json, Value};

use crate::rpc::RpcError;

/// The map subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum MapCommand {
    /// Attach a bdev as /dev/nbdX (prints the device).
    Map(MapArgs),
    /// Flush and detach /dev/nbdX.
    Unmap(UnmapArgs),
    /// List the bdevs attached as /dev/nbdX.
    Showmapped,
}

/// `blockctl map`.
#[derive(clap::Args, Debug, Clone)]
pub struct MapArgs {
    /// The bdev to attach.
    pub bdev: String,
    /// The device to use (default: the first free /dev/nbdX).
    #[arg(long)]
    pub device: Option<String>,
}

/// `blockctl unmap`.
#[derive(clap::Args, Debug, Clone)]
pub struct UnmapArgs {
    /// The /dev/nbdX to detach.
    pub device: String,
}

/// A JSON-RPC call: method and params → result or the daemon's error.
pub type Call<'a> = &'a mut dyn FnMut(&str, Value) -> Result<Value, RpcError>;

/// Runs a map subcommand, printing to `out`.
pub fn run(cmd: &MapCommand, call: Call<'_>, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        MapCommand::Map(a) => {
            let mut p = json!({"bdev_name": a.bdev});
            if let Some(d) = &a.device {
                p["nbd_device"] = json!(d);
            }
            match call("nbd_start_disk", p) {
                Ok(v) => {
                    writeln!(out, "{}", v.as_str().unwrap_or_default())?;
                    Ok(())
                }
                Err(e) if e.code == -libc::ENODEV && e.message.contains("nbd support") => {
                    anyhow::bail!(
                        "cannot map {}: {}\nwithout kernel nbd, export the bdev over a socket:\n  \
                         blockctl rpc nbd_server_start '{{\"unix_path\":\"/var/tmp/nbd.sock\"}}'\n  \
                         blockctl rpc nbd_export_add '{{\"bdev_name\":\"{}\"}}'\n  \
                         then e.g. qemu-img info 'nbd+unix:///{}?socket=/var/tmp/nbd.sock'",
                        a.bdev,
                        e.message,
                        a.bdev,
                        a.bdev
                    )
                }
                Err(e) => anyhow::bail!("cannot map {}: {} (code {})", a.bdev, e.message, e.code),
            }
        }
        MapCommand::Unmap(a) => {
            // Make the page cache's dirty data reach blockd before the device goes away
            // (the kernel flushes on disconnect too; this reports errors here).
            if let Ok(f) = std::fs::File::open(&a.device) {
                if let Err(e) = f.sync_all() {
                    writeln!(out, "warning: flushing {} failed: {e}", a.device)?;
                }
            }
            call("nbd_stop_disk", json!({"nbd_device": a.device})).map_err(|e| {
                anyhow::anyhow!("cannot unmap {}: {} (code {})", a.device, e.message, e.code)
            })?;
            Ok(())
        }
        MapCommand::Showmapped => {
            let v = call("nbd_get_disks", json!({}))
                .map_err(|e| anyhow::anyhow!("nbd_get_disks: {} (code {})", e.message, e.code))?;
            let rows: Vec<(String, String)> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|d| {
                            (
                                d["nbd_device"].as_str().unwrap_or("?").to_string(),
                                d["bdev_name"].as_str().unwrap_or("?").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
            writeln!(out, "{:<w$}  BDEV", "DEVICE")?;
            for (d, b) in rows {
                writeln!(out, "{d:<w$}  {b}")?;
            }
            Ok(())
        }
    }
}

impl super::Run for MapCommand {
    fn run(self, ctx: &super::Ctx) -> anyhow::Result<()> {
        let mut transport_err = None;
        let mut call = |m: &str, p: Value| -> Result<Value, RpcError> {
            ctx.call(m, Some(p)).map_err(|e| match e {
                super::client::ClientError::Rpc { code, message, .. } => {
                    RpcError::new(code as i32, message)
                }
                other => {
                    let r = RpcError::internal(other.to_string());
                    transport_err = Some(other);
                    r
                }
            })
        };
        let r = run(&self, &mut call, &mut std::io::stdout());
        match transport_err {
            // Connection problems read better in the client's own words.
            Some(e) => Err(e.into()),
            None => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_unmap_showmapped() {
        let mut calls = Vec::new();
        let mut fake = |m: &str, p: Value| -> Result<Value, RpcError> {
            calls.push((m.to_string(), p.clone()));
            match m {
                "nbd_start_disk" if p["bdev_name"] == "Malloc0" => Ok(json!("/dev/nbd3")),
                "nbd_start_disk" => Err(RpcError::errno_msg(
                    libc::ENODEV,
                    "kernel nbd support is not available (modprobe nbd)",
                )),
                "nbd_get_disks" => Ok(json!([{"nbd_device": "/dev/nbd3", "bdev_name": "Malloc0"}])),
                _ => Ok(json!(true)),
            }
        };
        let mut out = Vec::new();
        let map = MapCommand::Map(MapArgs {
            bdev: "Malloc0".into(),
            device: Some("/dev/nbd3".into()),
        });
        run(&map, &mut fake, &mut out).unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "/dev/nbd3\n");
        let e = run(
            &MapCommand::Map(MapArgs {
                bdev: "Other".into(),
                device: None,
            }),
            &mut fake,
            &mut out,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains(r#"nbd_export_add '{"bdev_name":"Other"}'"#),
            "{e}"
        );
        out.clear();
        run(&MapCommand::Showmapped, &mut fake, &mut out).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "DEVICE     BDEV\n/dev/nbd3  Malloc0\n"
        );
        run(
            &MapCommand::Unmap(UnmapArgs {
                device: "/dev/nbd-none".into(),
            }),
            &mut fake,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            calls[0].1,
            json!({"bdev_name": "Malloc0", "nbd_device": "/dev/nbd3"})
        );
        assert_eq!(calls[1].1, json!({"bdev_name": "Other"}));
        assert_eq!(
            calls[3],
            (
                "nbd_stop_disk".to_string(),
                json!({"nbd_device": "/dev/nbd-none"})
            )
        );
    }
}
