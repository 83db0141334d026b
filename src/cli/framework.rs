//! Framework commands: `rpc_get_methods`, `spdk_get_version`, `framework_*`, and the
//! client-side `save_config` / `load_config` that rpc.py assembles from them.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use super::{params_of, Ctx, Run};

/// Framework methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum FrameworkCmd {
    /// List the methods the daemon answers.
    RpcGetMethods {
        /// Only methods callable in the current state.
        #[arg(short = 'c', long)]
        current: bool,
        /// Include deprecated aliases.
        #[arg(short = 'i', long = "include-aliases")]
        include_aliases: bool,
    },
    /// Version of the daemon.
    SpdkGetVersion,
    /// Reactors with their busy/idle time and pollers.
    FrameworkGetReactors,
    /// The scheduler, and the scheduling policy of the daemon's threads (`--sched`).
    FrameworkGetScheduler,
    /// Subsystems in initialization order with their dependencies.
    FrameworkGetSubsystems,
    /// Wait until the daemon has initialized (blockd answers once it serves RPCs at all).
    FrameworkWaitInit,
    /// Send the daemon a signal: SIGTERM or SIGINT stop it cleanly, SIGKILL at once.
    SpdkKillInstance {
        /// Signal name (SIGINT, SIGTERM, SIGKILL).
        sig_name: String,
    },
    /// The calls that recreate a subsystem's objects.
    FrameworkGetConfig {
        /// Subsystem name (bdev, vhost_blk, ...).
        name: String,
    },
    /// Print the live configuration (replayable with load_config or `blockd --json`).
    SaveConfig {
        /// Indent; a negative value prints compact JSON.
        #[arg(short = 'i', long, default_value_t = 2, allow_negative_numbers = true)]
        indent: i32,
        /// Comma-separated subsystems to save (with their dependencies).
        #[arg(short = 's', long)]
        subsystems: Option<String>,
    },
    /// Replay a configuration written by save_config.
    LoadConfig {
        /// Configuration file (default: stdin).
        #[arg(short = 'j', long = "json-conf")]
        json_conf: Option<PathBuf>,
        /// Accept deprecated method aliases.
        #[arg(short = 'i', long = "include-aliases")]
        include_aliases: bool,
    },
}

impl Run for FrameworkCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            FrameworkCmd::RpcGetMethods {
                current,
                include_aliases,
            } => ctx.call_print(
                "rpc_get_methods",
                params_of(vec![
                    ("current", current.then_some(json!(true))),
                    ("include_aliases", include_aliases.then_some(json!(true))),
                ]),
            ),
            FrameworkCmd::SpdkGetVersion => ctx.call_print("spdk_get_version", None),
            FrameworkCmd::FrameworkGetReactors => ctx.call_print("framework_get_reactors", None),
            FrameworkCmd::FrameworkGetScheduler => ctx.call_print("framework_get_scheduler", None),
            FrameworkCmd::FrameworkGetSubsystems => {
                ctx.call_print("framework_get_subsystems", None)
            }
            FrameworkCmd::FrameworkWaitInit => ctx.call_print("framework_wait_init", None),
            FrameworkCmd::SpdkKillInstance { sig_name } => ctx.call_print(
                "spdk_kill_instance",
                params_of(vec![("sig_name", Some(json!(sig_name)))]),
            ),
            FrameworkCmd::FrameworkGetConfig { name } => ctx.call_print(
                "framework_get_config",
                params_of(vec![("name", Some(json!(name)))]),
            ),
            FrameworkCmd::SaveConfig { indent, subsystems } => {
                let cfg = save_config(ctx, subsystems.as_deref())?;
                println!("{}", to_json_indented(&cfg, indent));
                Ok(())
            }
            FrameworkCmd::LoadConfig {
                json_conf,
                include_aliases,
            } => {
                let text = match &json_conf {
                    Some(p) => std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))?,
                    None => {
                        let mut s = String::new();
                        std::io::stdin()
                            .read_to_string(&mut s)
                            .context("reading the configuration from stdin")?;
                        s
                    }
                };
                let cfg: Value =
                    serde_json::from_str(&text).context("the configuration is not valid JSON")?;
                load_config(ctx, &cfg, include_aliases)
            }
        }
    }
}

fn to_json_indented(v: &Value, indent: i32) -> String {
    if indent < 0 {
        return v.to_string();
    }
    let ind = vec![b' '; indent as usize];
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(&ind);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    if v.serialize(&mut ser).is_err() {
        return v.to_string();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// rpc.py's `save_config`: `framework_get_subsystems`, then `framework_get_config` of each
/// subsystem selected (with its dependencies), in the daemon's order.
pub fn save_config(ctx: &Ctx, only: Option<&str>) -> anyhow::Result<Value> {
    let subs = ctx.call("framework_get_subsystems", None)?;
    let subs = subs
        .as_array()
        .context("framework_get_subsystems did not return an array")?;
    let mut deps: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut order = Vec::new();
    for s in subs {
        let name = s
            .get("subsystem")
            .and_then(Value::as_str)
            .context("framework_get_subsystems: entry without a name")?
            .to_string();
        let mut set = BTreeSet::from([name.clone()]);
        for d in s
            .get("depends_on")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(d) = d.as_str() {
                set.extend(deps.get(d).cloned().unwrap_or_default());
                set.insert(d.to_string());
            }
        }
        deps.insert(name.clone(), set);
        order.push(name);
    }
    let selected: BTreeSet<String> = match only {
        None => order.iter().cloned().collect(),
        Some(list) => {
            let mut sel = BTreeSet::new();
            for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match deps.get(s) {
                    Some(d) => sel.extend(d.iter().cloned()),
                    None => bail!("no subsystem named '{s}' (have: {})", order.join(", ")),
                }
            }
            sel
        }
    };
    let mut out = Vec::new();
    for name in order.iter().filter(|n| selected.contains(*n)) {
        let config = ctx.call("framework_get_config", Some(json!({"name": name})))?;
        out.push(json!({"subsystem": name, "config": config}));
    }
    Ok(json!({ "subsystems": out }))
}

/// rpc.py's `load_config`: checks every method is known, then replays the entries,
/// subsystems in the daemon's initialization order ([`crate::config::plan`], as
/// `blockd --json` does). Stops at the first failure, naming the subsystem, entry and
/// method. Unlike rpc.py, it skips (and says so) the entries a configuration saved by SPDK
/// carries to tune SPDK itself ([`crate::config::SPDK_TUNING_METHODS`]).
pub fn load_config(ctx: &Ctx, cfg: &Value, include_aliases: bool) -> anyhow::Result<()> {
    let methods = ctx.call(
        "rpc_get_methods",
        params_of(vec![(
            "include_aliases",
            include_aliases.then_some(json!(true)),
        )]),
    )?;
    let known: BTreeSet<&str> = methods
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let order: Vec<String> = ctx
        .call("framework_get_subsystems", None)?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.get("subsystem").and_then(Value::as_str).map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let calls = crate::config::plan(
        cfg,
        |m| known.contains(m),
        |s| order.iter().position(|o| o == s),
        |c| {
            eprintln!(
                "skipping subsystem '{}' entry {} ({}): SPDK tuning that blockd has no use for",
                c.subsystem, c.index, c.method
            )
        },
    )?;
    for c in calls {
        ctx.call(c.method, c.params.cloned()).with_context(|| {
            format!(
                "subsystem '{}' entry {} ({})",
                c.subsystem, c.index, c.method
            )
        })?;
    }
    Ok(())
}
