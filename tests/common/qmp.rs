//! A QMP client for tests (QEMU's JSON monitor, docs/interop/qmp-spec.rst) and the live
//! migration steps built on it: `migrate-incoming` on the destination, `migrate` on the
//! source, `query-migrate` polled until the migration ends, with QEMU's own figures
//! (`total-time`, `downtime`). Include with `#[path = "common/qmp.rs"] mod qmp;`.
//!
//! QEMU opens the monitor socket itself (`-qmp unix:PATH,server=on,wait=off`), so
//! [`Qmp::connect`] retries until it is there. Asynchronous events (STOP, RESUME, ...) share
//! the stream with the answers: they are skipped. Every read has a deadline.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long one command may take to be answered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`Qmp::wait_migration`] and [`Qmp::wait_status`] ask.
const POLL: Duration = Duration::from_millis(20);

/// One QMP connection, in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the monitor at `path` (retrying until QEMU created it, up to `timeout`),
    /// reads the greeting and leaves capabilities negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("connecting to QMP {}", path.display()))
                }
                Err(_) => std::thread::sleep(POLL),
            }
        };
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        if n == 0 {
            bail!("QMP connection closed (QEMU exited?)");
        }
        serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
    }

    /// Runs `cmd` with `args` (`Value::Null`: none); the `return` value, or the error QEMU
    /// answered as an `Err`.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let mut msg = json!({ "execute": cmd });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .with_context(|| format!("sending {cmd} to QMP"))?;
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                bail!("QMP {cmd} failed: {e}");
            }
            bail!("unexpected QMP answer to {cmd}: {m}");
        }
    }

    /// `query-status`'s `status` (`running`, `inmigrate`, `postmigrate`, `paused`, ...).
    pub fn status(&mut self) -> Result<String> {
        let s = self.execute("query-status", Value::Null)?;
        s["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("query-status without status: {s}"))
    }

    /// Waits (at most `timeout`) until the VM's status is `want`.
    pub fn wait_status(&mut self, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status()?;
            if s == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("VM status {s:?}, not {want:?} after {timeout:?}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value> {
        self.execute("query-migrate", Value::Null)
    }

    /// Destination: listens for the incoming migration on the unix socket `sock` (the QEMU
    /// was started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, sock: &Path) -> Result<()> {
        self.execute(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", sock.display()) }),
        )
        .map(drop)
    }

    /// Source: starts the migration to the destination listening on `sock`. Fails at once
    /// when QEMU reports reasons that block migration (`blocked-reasons` of
    /// `query-migrate`, e.g. a vhost-user backend without dirty logging).
    pub fn migrate(&mut self, sock: &Path) -> Result<()> {
        let q = self.query_migrate()?;
        if let Some(reasons) = q.get("blocked-reasons") {
            bail!("QEMU blocks migration: {reasons}");
        }
        self.execute(
            "migrate",
            json!({ "uri": format!("unix:{}", sock.display()) }),
        )
        .map(drop)
    }

    /// `migrate-set-parameters` with `params`.
    pub fn set_parameters(&mut self, params: Value) -> Result<()> {
        self.execute("migrate-set-parameters", params).map(drop)
    }

    /// Source: polls `query-migrate` until the status is one of `until` (e.g. `completed`)
    /// and returns the last answer; fails on `failed` (unless asked for) or at `timeout`.
    pub fn wait_migration(&mut self, until: &[&str], timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.query_migrate()?;
            let status = q["status"].as_str().unwrap_or("none");
            if until.contains(&status) {
                return Ok(q);
            }
            if status == "failed" {
                bail!("migration failed: {q}");
            }
            if Instant::now() >= deadline {
                bail!("migration not {until:?} after {timeout:?}: {q}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// `quit`: QEMU exits (the connection closes with it).
    pub fn quit(mut self) {
        let _ = self.execute("quit", Value::Null);
    }
}

/// What QEMU reports about a completed migration (`query-migrate`, milliseconds and bytes).
#[derive(Debug, Clone, Copy)]
pub struct MigrationFigures {
    pub total_ms: u64,
    pub downtime_ms: u64,
    pub setup_ms: u64,
    /// RAM bytes sent.
    pub ram_bytes: u64,
}

impl MigrationFigures {
    /// The figures of a `completed` `query-migrate` answer.
    pub fn of(q: &Value) -> Result<Self> {
        let n = |v: &Value, what: &str| {
            v.as_u64()
                .ok_or_else(|| anyhow!("query-migrate without {what}: {q}"))
        };
        Ok(Self {
            total_ms: n(&q["total-time"], "total-time")?,
            downtime_ms: n(&q["downtime"], "downtime")?,
            setup_ms: q["setup-time"].as_u64().unwrap_or(0),
            ram_bytes: q["ram"]["transferred"].as_u64().unwrap_or(0),
        })
    }
}
