//! The daemon's log: one `tracing` sink on stderr (journald under systemd), whose filter
//! SPDK's log methods change at run time (`lib/log/log_rpc.c`).
//!
//! SPDK keeps two thresholds, one for syslog (`log_set_level`) and one for the console
//! (`log_set_print_level`), and debug flags that enable one component's debug messages
//! (`log_set_flag vhost_blk`), compiled in only in debug builds. blockd has one sink, so
//! both thresholds are its one level, and its flags name module paths, enabled at `debug`
//! in every build whatever the level. The filter is the level, then the `-L` directives
//! that name a target, then one `target=debug` per enabled flag.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// SPDK's level names (`_parse_log_level`), most severe first, with the `tracing` level
/// each maps to. SPDK's NOTICE has no `tracing` peer and shares INFO's.
const LEVELS: &[(&str, LevelFilter)] = &[
    ("ERROR", LevelFilter::ERROR),
    ("WARNING", LevelFilter::WARN),
    ("NOTICE", LevelFilter::INFO),
    ("INFO", LevelFilter::INFO),
    ("DEBUG", LevelFilter::DEBUG),
];

/// SPDK's flag names that have a counterpart in blockd, with the modules they enable.
/// `all` enables every one of them.
pub const FLAGS: &[(&str, &[&str])] = &[
    ("aio", &["blockd::bdev::aio"]),
    ("app_config", &["blockd::config"]),
    ("bdev", &["blockd::bdev"]),
    ("bdev_malloc", &["blockd::bdev::malloc"]),
    ("bdev_null", &["blockd::bdev::null"]),
    ("bdev_rbd", &["blockd::bdev::rbd", "blockd::rbd"]),
    ("nbd", &["blockd::nbd"]),
    ("reactor", &["blockd::reactor"]),
    ("rpc", &["blockd::rpc"]),
    ("vhost", &["blockd::vhost"]),
    ("vhost_blk", &["blockd::vhost::blk"]),
    (
        "vhost_ring",
        &["blockd::vhost::vring", "blockd::vhost::split_ring"],
    ),
    ("vhost_scsi", &["blockd::vhost::scsi"]),
];

/// What the filter is built from.
struct State {
    /// SPDK's name of the level, as last set (so NOTICE reads back as NOTICE).
    level: &'static str,
    /// `-L` directives that name a target (`blockd::vhost=trace`), kept across level changes.
    targets: Vec<String>,
    flags: BTreeSet<&'static str>,
    reload: reload::Handle<EnvFilter, Registry>,
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

/// Why a log request was refused: the message for an RPC error (-32602).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log level '{0}' (ERROR, WARNING, NOTICE, INFO or DEBUG)")]
    Level(String),
    #[error("unknown log flag '{0}' (see log_get_flags)")]
    Flag(String),
    #[error("invalid log filter: {0}")]
    Filter(String),
    #[error("the log is not set up in this process")]
    NotInstalled,
}

/// Installs the stderr sink with the `-L` filter (`tracing` directives: `info`,
/// `debug,blockd::vhost=trace`). A filter without a bare level gets ERROR, so errors from
/// every module are always shown.
pub fn init(filter: &str, ansi: bool) -> Result<(), LogError> {
    let mut level = None;
    let mut targets = Vec::new();
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.parse::<LevelFilter>() {
            Ok(l) if !d.contains('=') => level = Some(l),
            _ => targets.push(d.to_string()),
        }
    }
    // The sink starts with exactly what -L said (TRACE stays TRACE until a level is set).
    let mut first = EnvFilter::try_new(filter).map_err(|e| LogError::Filter(e.to_string()))?;
    if level.is_none() {
        first = first.add_directive(LevelFilter::ERROR.into());
    }
    let (layer, reload) = reload::Layer::new(first);
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .init();
    let state = State {
        level: spdk_name(level.unwrap_or(LevelFilter::ERROR)),
        targets,
        flags: BTreeSet::new(),
        reload,
    };
    STATE
        .set(Mutex::new(state))
        .map_err(|_| LogError::Filter("the log was set up twice".into()))
}

/// SPDK's name for a `tracing` level (TRACE reads as DEBUG, OFF as ERROR).
fn spdk_name(l: LevelFilter) -> &'static str {
    match l {
        LevelFilter::OFF | LevelFilter::ERROR => "ERROR",
        LevelFilter::WARN => "WARNING",
        LevelFilter::INFO => "INFO",
        _ => "DEBUG",
    }
}

fn with_state<T>(f: impl FnOnce(&mut State) -> Result<T, LogError>) -> Result<T, LogError> {
    let cell = STATE.get().ok_or(LogError::NotInstalled)?;
    let mut s = cell.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut s)
}

/// Rebuilds the filter from the state and swaps it in.
fn apply(s: &State) -> Result<(), LogError> {
    let level = LEVELS
        .iter()
        .find(|(n, _)| *n == s.level)
        .map_or(LevelFilter::ERROR, |(_, l)| *l);
    let mut directives = vec![level.to_string()];
    directives.extend(s.targets.iter().cloned());
    for flag in &s.flags {
        for (_, modules) in FLAGS.iter().filter(|(n, _)| n == flag) {
            directives.extend(modules.iter().map(|m| format!("{m}=debug")));
        }
    }
    let filter =
        EnvFilter::try_new(directives.join(",")).map_err(|e| LogError::Filter(e.to_string()))?;
    s.reload
        .reload(filter)
        .map_err(|e| LogError::Filter(e.to_string()))
}

/// The level, by SPDK's name.
pub fn level() -> Result<&'static str, LogError> {
    with_state(|s| Ok(s.level))
}

/// Sets the level from SPDK's name (any case).
pub fn set_level(name: &str) -> Result<(), LogError> {
    let (n, _) = LEVELS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .ok_or_else(|| LogError::Level(name.to_string()))?;
    with_state(|s| {
        let before = s.level;
        s.level = n;
        apply(s).inspect_err(|_| s.level = before)
    })
}

/// Enables (`on`) or disables a flag; `all` means every flag.
pub fn set_flag(name: &str, on: bool) -> Result<(), LogError> {
    let names: Vec<&'static str> = if name == "all" {
        FLAGS.iter().map(|(n, _)| *n).collect()
    } else {
        let (n, _) = FLAGS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| LogError::Flag(name.to_string()))?;
        vec![*n]
    };
    with_state(|s| {
        for n in names {
            if on {
                s.flags.insert(n);
            } else {
                s.flags.remove(n);
            }
        }
        apply(s)
    })
}

/// Every flag with whether it is enabled, sorted by name.
pub fn flags() -> Result<Vec<(&'static str, bool)>, LogError> {
    with_state(|s| {
        Ok(FLAGS
            .iter()
            .map(|(n, _)| (*n, s.flags.contains(n)))
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_sorted_and_name_real_modules() {
        let names: Vec<&str> = FLAGS.iter().map(|(n, _)| *n).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        for (_, modules) in FLAGS {
            for m in *modules {
                assert!(m.starts_with("blockd::"), "{m}");
                assert!(EnvFilter::try_new(format!("{m}=debug")).is_ok(), "{m}");
            }
        }
    }

    #[test]
    fn spdk_names_round_trip_where_tracing_can() {
        for (name, l) in LEVELS {
            if *name != "NOTICE" {
                assert_eq!(spdk_name(*l), *name);
            }
        }
        assert_eq!(spdk_name(LevelFilter::TRACE), "DEBUG");
        assert_eq!(spdk_name(LevelFilter::OFF), "ERROR");
    }
}
