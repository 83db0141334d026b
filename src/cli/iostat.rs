//! `blockctl iostat`: a live per-bdev table from `bdev_get_iostat`, like SPDK's
//! `scripts/iostat.py`: every interval, each bdev's read and write rates (IOPS and MB/s,
//! 1 MB = 2^20 bytes as iostat.py), average latency and queue depth over that interval.
//! In a terminal the table is redrawn in place; piped, each interval appends plain lines
//! (with a timestamp) that scripts can parse.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Ctx, Run};

/// Live per-bdev I/O statistics (interval, count).
#[derive(clap::Args, Debug)]
pub struct IostatArgs {
    /// Seconds between reports.
    #[arg(short = 'i', long, default_value_t = 1.0, value_parser = parse_interval)]
    interval: f64,
    /// Number of reports (default: until interrupted).
    #[arg(short = 'c', long)]
    count: Option<u64>,
    /// Only these bdevs (repeat or comma-separate).
    #[arg(short = 'b', long = "bdev", value_delimiter = ',')]
    bdevs: Vec<String>,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if (0.01..1e6).contains(&t) => Ok(t),
        _ => Err(format!(
            "'{s}' is not an interval in seconds (0.01 or more)"
        )),
    }
}

/// The counters of one bdev that the rates are computed from.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    pub reads: f64,
    pub writes: f64,
    pub bytes_read: f64,
    pub bytes_written: f64,
    /// Sum of every operation's latency (ticks).
    pub latency_ticks: f64,
    /// Every completed operation (all kinds).
    pub ops: f64,
    pub queue_depth: f64,
}

impl Counters {
    fn of(b: &Value) -> Self {
        let n = |k: &str| b[k].as_f64().unwrap_or(0.0);
        Counters {
            reads: n("num_read_ops"),
            writes: n("num_write_ops"),
            bytes_read: n("bytes_read"),
            bytes_written: n("bytes_written"),
            latency_ticks: n("read_latency_ticks")
                + n("write_latency_ticks")
                + n("unmap_latency_ticks")
                + n("flush_latency_ticks")
                + n("write_zeroes_latency_ticks"),
            ops: n("num_read_ops")
                + n("num_write_ops")
                + n("num_unmap_ops")
                + n("num_flush_ops")
                + n("num_write_zeroes_ops"),
            queue_depth: n("queue_depth"),
        }
    }
}

/// One bdev's figures over an interval.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub r_iops: f64,
    pub w_iops: f64,
    pub r_mbs: f64,
    pub w_mbs: f64,
    /// Average latency of the operations completed in the interval (ms).
    pub lat_ms: f64,
    pub queue_depth: f64,
}

/// The rates between two samples `secs` apart with `tick_rate` ticks per second. A counter
/// that went down (`bdev_reset_iostat`) counts from zero.
pub fn rates(name: &str, a: &Counters, b: &Counters, secs: f64, tick_rate: f64) -> Row {
    let d = |x: f64, y: f64| if y >= x { y - x } else { y };
    let ops = d(a.ops, b.ops);
    let lat = d(a.latency_ticks, b.latency_ticks);
    const MB: f64 = 1048576.0;
    Row {
        name: name.to_string(),
        r_iops: d(a.reads, b.reads) / secs,
        w_iops: d(a.writes, b.writes) / secs,
        r_mbs: d(a.bytes_read, b.bytes_read) / MB / secs,
        w_mbs: d(a.bytes_written, b.bytes_written) / MB / secs,
        lat_ms: if ops > 0.0 {
            lat / ops / tick_rate * 1e3
        } else {
            0.0
        },
        queue_depth: b.queue_depth,
    }
}

const HEADER: &str = "Device            r/s       w/s     rMB/s     wMB/s  lat(ms)   qd";

fn line(r: &Row) -> String {
    format!(
        "{:<12} {:>9.1} {:>9.1} {:>9.2} {:>9.2} {:>8.3} {:>4}",
        r.name, r.r_iops, r.w_iops, r.r_mbs, r.w_mbs, r.lat_ms, r.queue_depth
    )
}

/// One `bdev_get_iostat` sample: (seconds of the daemon's clock, tick rate, bdevs).
fn sample(ctx: &Ctx, bdevs: &[String]) -> anyhow::Result<(f64, f64, BTreeMap<String, Counters>)> {
    let p = (!bdevs.is_empty()).then(|| json!({"names": bdevs}));
    let v = ctx.call("bdev_get_iostat", p)?;
    let tick_rate = v["tick_rate"].as_f64().unwrap_or(1e9).max(1.0);
    let ticks = v["ticks"].as_f64().unwrap_or(0.0);
    let list = v["bdevs"].as_array().cloned().unwrap_or_default();
    let map = list
        .iter()
        .filter_map(|b| Some((b["name"].as_str()?.to_string(), Counters::of(b))))
        .collect();
    Ok((ticks / tick_rate, tick_rate, map))
}

impl Run for IostatArgs {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let tty = std::io::stdout().is_terminal();
        let mut out = std::io::stdout().lock();
        let (mut t0, _, mut prev) = sample(ctx, &self.bdevs)?;
        let mut next = Instant::now();
        let mut n = 0u64;
        if !tty {
            writeln!(out, "{:<19} {HEADER}", "time")?;
        }
        while self.count.is_none_or(|c| n < c) {
            next += Duration::from_secs_f64(self.interval);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            let (t1, tick_rate, cur) = sample(ctx, &self.bdevs)?;
            let secs = (t1 - t0).max(1e-6);
            let rows: Vec<Row> = cur
                .iter()
                .map(|(name, c)| rates(name, prev.get(name).unwrap_or(c), c, secs, tick_rate))
                .collect();
            if tty {
                // Home, clear, then the table: one screen that refreshes in place.
                write!(out, "\x1b[H\x1b[2J")?;
                writeln!(
                    out,
                    "blockctl iostat: {} bdev(s), every {}s (Ctrl-C to stop)\n\n{HEADER}",
                    rows.len(),
                    self.interval
                )?;
                for r in &rows {
                    writeln!(out, "{}", line(r))?;
                }
            } else {
                let stamp = format_time(t1);
                for r in &rows {
                    writeln!(out, "{stamp:<19} {}", line(r))?;
                }
            }
            out.flush()?;
            (t0, prev) = (t1, cur);
            n += 1;
        }
        Ok(())
    }
}

/// UTC `YYYY-MM-DDTHH:MM:SS` of seconds since the epoch: the local pool's RFC 3339 stamp
/// without its `Z`.
fn format_time(secs: f64) -> String {
    let mut t = crate::localpool::meta::rfc3339(secs.max(0.0) as u64);
    t.pop(); // the trailing 'Z'
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_an_interval() {
        let a = Counters {
            reads: 100.0,
            bytes_read: 100.0 * 4096.0,
            latency_ticks: 1e6,
            ops: 100.0,
            ..Default::default()
        };
        let b = Counters {
            reads: 2100.0,
            writes: 1000.0,
            bytes_read: 2100.0 * 4096.0,
            bytes_written: 1000.0 * 4096.0,
            latency_ticks: 1e6 + 3000.0 * 20_000.0,
            ops: 3100.0,
            queue_depth: 4.0,
        };
        let r = rates("Malloc0", &a, &b, 2.0, 1e9);
        assert_eq!((r.r_iops, r.w_iops), (1000.0, 500.0));
        assert!((r.r_mbs - 1000.0 * 4096.0 / 1048576.0).abs() < 1e-9);
        assert!((r.lat_ms - 0.02).abs() < 1e-9, "{r:?}");
        assert_eq!(r.queue_depth, 4.0);
        // A reset in between: the new totals are the interval's.
        let r = rates("x", &b, &a, 1.0, 1e9);
        assert_eq!(r.r_iops, 100.0);
        assert_eq!(format_time(0.0), "1970-01-01T00:00:00");
        assert_eq!(format_time(1_796_000_000.0), "2026-11-30T00:53:20");
    }
}
