//! Saved configurations: how one is replayed (the calls and their order), shared by
//! `blockd --json` and `blockctl load_config`. What each subsystem saves, and the replay
//! itself through the daemon's RPC methods, belong to the application (`app::config`).
//!
//! A configuration is SPDK's JSON config file:
//! `{"subsystems":[{"subsystem":"bdev","config":[{"method":..,"params":{..}},..]},..]}`.
//! Each entry is the RPC call that recreates one object, so replaying a configuration is
//! calling those methods in dependency order (bdevs before the controllers that use them).

use anyhow::Context;
use serde_json::Value;

/// Methods that `save_config` of an SPDK target writes into every configuration to tune
/// SPDK's own machinery (buffer pools, sockets, accel, the NVMe, RAID and iSCSI bdev
/// modules, the thread scheduler, the NVMe-oF and iSCSI targets), with no object behind
/// them for blockd to recreate. A configuration saved by SPDK replays in blockd with these
/// entries skipped and logged; any other method blockd lacks still fails the load before
/// anything is created. Shared with `blockctl load_config`.
pub const SPDK_TUNING_METHODS: &[&str] = &[
    "accel_set_options",
    "bdev_iscsi_set_options",
    "bdev_nvme_set_hotplug",
    "bdev_nvme_set_options",
    "bdev_raid_set_options",
    "bdev_set_options",
    "framework_set_scheduler",
    "fsdev_set_opts",
    "iobuf_set_options",
    "iscsi_set_options",
    "nvmf_set_config",
    "nvmf_set_crdt",
    "nvmf_set_max_subsystems",
    "sock_impl_set_options",
    "sock_set_default_impl",
];

/// Whether `method` only tunes SPDK internals ([`SPDK_TUNING_METHODS`]).
fn is_spdk_tuning(method: &str) -> bool {
    SPDK_TUNING_METHODS.contains(&method)
}

/// One call of a configuration, in replay order.
#[derive(Debug)]
pub struct PlannedCall<'a> {
    pub subsystem: &'a str,
    /// The entry's index in its subsystem's `config` (a batch's calls share it).
    pub index: usize,
    pub method: &'a str,
    pub params: Option<&'a Value>,
}

/// The calls of configuration `cfg` in replay order: subsystems by `rank` (their place in
/// the daemon's initialization order; `None`, a subsystem the daemon does not have, goes
/// last), entries in file order, batch arrays (SPDK 25+ `--with-batches`) flattened.
///
/// A configuration saved by SPDK plans too: an absent or empty `config` is nothing to do,
/// and SPDK's tuning entries ([`SPDK_TUNING_METHODS`]) the daemon lacks are handed to
/// `skipped` instead of planned. Any other method the daemon lacks (`known` false) fails
/// the plan, so a configuration it cannot recreate changes nothing. Shared by
/// `blockd --json` (`app::load`) and `blockctl load_config`.
pub fn plan<'a>(
    cfg: &'a Value,
    known: impl Fn(&str) -> bool,
    rank: impl Fn(&str) -> Option<usize>,
    mut skipped: impl FnMut(&PlannedCall<'a>),
) -> anyhow::Result<Vec<PlannedCall<'a>>> {
    let list = cfg
        .get("subsystems")
        .and_then(Value::as_array)
        .context("the configuration has no \"subsystems\" array")?;
    let mut plan = Vec::new();
    for (i, s) in list.iter().enumerate() {
        let subsystem = s
            .get("subsystem")
            .and_then(Value::as_str)
            .with_context(|| format!("subsystems[{i}] has no \"subsystem\" name"))?;
        let place = rank(subsystem);
        let entries = match s.get("config") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(a)) => a.as_slice(),
            Some(_) => anyhow::bail!("subsystem '{subsystem}': \"config\" is not an array"),
        };
        for (index, e) in entries.iter().enumerate() {
            let items: Vec<&Value> = match e {
                Value::Array(batch) => batch.iter().collect(),
                one => vec![one],
            };
            for call in items {
                let method = call
                    .get("method")
                    .and_then(Value::as_str)
                    .with_context(|| {
                        format!("subsystem '{subsystem}' entry {index}: no \"method\"")
                    })?;
                let c = PlannedCall {
                    subsystem,
                    index,
                    method,
                    params: call.get("params").filter(|p| !p.is_null()),
                };
                if known(method) {
                    plan.push((place.unwrap_or(usize::MAX), c));
                } else if is_spdk_tuning(method) {
                    skipped(&c);
                } else {
                    let lacking = if place.is_some() {
                        ""
                    } else {
                        ", a subsystem blockd does not have,"
                    };
                    anyhow::bail!(
                        "subsystem '{subsystem}'{lacking} entry {index} ({method}): blockd has \
                         no such method (Method not found); nothing was created"
                    );
                }
            }
        }
    }
    // Stable: entries keep their file order within a subsystem.
    plan.sort_by_key(|(place, _)| *place);
    Ok(plan.into_iter().map(|(_, c)| c).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plan_orders_by_rank_flattens_batches_and_skips_only_tuning() {
        let cfg = json!({"subsystems": [
            {"subsystem": "iobuf", "config": [{"method": "iobuf_set_options", "params": {}}]},
            {"subsystem": "vhost_blk", "config": [{"method": "c", "params": {"x": 1}}]},
            {"subsystem": "bdev", "config": [[{"method": "a"}, {"method": "b"}], {"method": "d"}]},
            {"subsystem": "scsi", "config": null},
        ]});
        let rank = |s: &str| ["bdev", "vhost_blk"].iter().position(|k| *k == s);
        let mut skipped = Vec::new();
        let calls = plan(
            &cfg,
            |m| m != "iobuf_set_options",
            rank,
            |c| skipped.push(c.method),
        )
        .unwrap();
        let got: Vec<(&str, usize, &str)> = calls
            .iter()
            .map(|c| (c.subsystem, c.index, c.method))
            .collect();
        assert_eq!(
            got,
            [
                ("bdev", 0, "a"),
                ("bdev", 0, "b"),
                ("bdev", 1, "d"),
                ("vhost_blk", 0, "c")
            ]
        );
        assert_eq!(calls[3].params, Some(&json!({"x": 1})));
        assert_eq!(skipped, ["iobuf_set_options"]);

        let e = plan(&cfg, |m| m != "d" && m != "iobuf_set_options", rank, |_| {}).unwrap_err();
        assert!(e.to_string().contains("entry 1 (d)"), "{e}");
        let bad = json!({"subsystems": [{"subsystem": "nvmf", "config": [{"method": "n"}]}]});
        let e = plan(&bad, |_| false, rank, |_| {}).unwrap_err();
        assert!(
            e.to_string().contains("a subsystem blockd does not have"),
            "{e}"
        );
    }
}
