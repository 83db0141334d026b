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
    /// The level everything without a more specific directive logs at (TRACE and OFF from
    /// `-L` stay as they are until a level is set).
    level: LevelFilter,
    /// SPDK's name of the level, as last set (so NOTICE reads back as NOTICE).
    name: &'static str,
    /// `-L` directives that name a target (`blockd::vhost=trace`), kept across level changes.
    targets: Vec<String>,
    flags: BTreeSet<&'static str>,
}

impl State {
    /// The filter's directives: the level, the `-L` targets, then `module=debug` per flag.
    fn spec(&self) -> String {
        let mut directives = vec![self.level.to_string()];
        directives.extend(self.targets.iter().cloned());
        for (_, modules) in FLAGS.iter().filter(|(n, _)| self.flags.contains(n)) {
            directives.extend(modules.iter().map(|m| format!("{m}=debug")));
        }
        directives.join(",")
    }
}

/// The state and the handle that swaps the sink's filter.
struct Log {
    state: State,
    reload: reload::Handle<EnvFilter, Registry>,
}

static LOG: OnceLock<Mutex<Log>> = OnceLock::new();

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
    let mut state = State {
        level: LevelFilter::ERROR,
        name: "ERROR",
        targets: Vec::new(),
        flags: BTreeSet::new(),
    };
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.parse::<LevelFilter>() {
            Ok(l) if !d.contains('=') => (state.level, state.name) = (l, spdk_name(l)),
            _ => state.targets.push(d.to_string()),
        }
    }
    let first = EnvFilter::try_new(state.spec()).map_err(|e| LogError::Filter(e.to_string()))?;
    let (layer, reload) = reload::Layer::new(first);
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(Stderr {
                    journal: stderr_is_journal(),
                })
                .with_ansi(ansi),
        )
        .init();
    LOG.set(Mutex::new(Log { state, reload }))
        .map_err(|_| LogError::Filter("the log was set up twice".into()))
}

/// Whether stderr is connected to the systemd journal: `$JOURNAL_STREAM` names its
/// device and inode (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // SAFETY: fstat fills the zeroed struct it is given; fd 2 may be closed (then it fails).
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(2, &mut st) != 0 {
            return false;
        }
        st
    };
    v.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino))
}

/// The sd-daemon(3) priority prefix of a level (`<3>` error ... `<7>` debug): journald
/// reads it (`SyslogLevelPrefix=`, on by default) so that `journalctl -p warning` and the
/// colours work; it is not shown in the line.
fn journal_prefix(level: &tracing::Level) -> &'static [u8] {
    match *level {
        tracing::Level::ERROR => b"<3>",
        tracing::Level::WARN => b"<4>",
        tracing::Level::INFO => b"<6>",
        _ => b"<7>",
    }
}

/// The log's writer: stderr, each event prefixed with its priority under the journal.
struct Stderr {
    journal: bool,
}

/// One event's writer ([`Stderr`]).
struct EventWriter {
    prefix: Option<&'static [u8]>,
}

impl std::io::Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.prefix.take() {
            // One write with the prefix, so that no other thread's line comes between.
            Some(p) => {
                let mut line = Vec::with_capacity(p.len() + buf.len());
                line.extend_from_slice(p);
                line.extend_from_slice(buf);
                std::io::stderr().write_all(&line)?;
                Ok(buf.len())
            }
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter { prefix: None }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        EventWriter {
            prefix: self.journal.then(|| journal_prefix(meta.level())),
        }
    }
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

/// The installed log, locked.
fn log() -> Result<std::sync::MutexGuard<'static, Log>, LogError> {
    let cell = LOG.get().ok_or(LogError::NotInstalled)?;
    Ok(crate::sync::lock(cell))
}

/// Runs `change` on the state and swaps in the filter it gives. The filter's parts were
/// all checked before (the level and flags come from the tables, the targets from `-L`),
/// so only a sink that is gone can refuse it.
fn change(change: impl FnOnce(&mut State)) -> Result<(), LogError> {
    let mut log = log()?;
    change(&mut log.state);
    let filter =
        EnvFilter::try_new(log.state.spec()).map_err(|e| LogError::Filter(e.to_string()))?;
    log.reload
        .reload(filter)
        .map_err(|e| LogError::Filter(e.to_string()))
}

/// The level, by SPDK's name.
pub fn level() -> Result<&'static str, LogError> {
    Ok(log()?.state.name)
}

/// Sets the level from SPDK's name (any case).
pub fn set_level(name: &str) -> Result<(), LogError> {
    let (n, l) = LEVELS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .ok_or_else(|| LogError::Level(name.to_string()))?;
    change(|s| (s.level, s.name) = (*l, n))
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
    change(|s| {
        for n in names {
            if on {
                s.flags.insert(n);
            } else {
                s.flags.remove(n);
            }
        }
    })
}

/// Every flag with whether it is enabled, sorted by name.
pub fn flags() -> Result<Vec<(&'static str, bool)>, LogError> {
    let log = log()?;
    Ok(FLAGS
        .iter()
        .map(|(n, _)| (*n, log.state.flags.contains(n)))
        .collect())
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
    fn the_spec_keeps_the_level_and_targets_across_flags() {
        let mut s = State {
            level: LevelFilter::TRACE,
            name: "DEBUG",
            targets: vec!["blockd::nbd=warn".into()],
            flags: BTreeSet::new(),
        };
        assert_eq!(s.spec(), "trace,blockd::nbd=warn");
        s.flags.insert("bdev_rbd");
        assert_eq!(
            s.spec(),
            "trace,blockd::nbd=warn,blockd::bdev::rbd=debug,blockd::rbd=debug"
        );
        assert!(EnvFilter::try_new(s.spec()).is_ok());
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
