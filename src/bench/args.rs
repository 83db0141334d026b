//! Command line of `blockctl bench`.

use std::path::PathBuf;

use crate::cpumask::CpuMask;

/// I/O pattern (fio's `rw=`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads (each block once per pass, unless `--norandommap`).
    Randread,
    /// Random writes (each block once per pass, unless `--norandommap`).
    Randwrite,
    /// Random mix of reads and writes, `--rwmixread` percent reads.
    Randrw,
}

impl Pattern {
    /// Whether the pattern may write.
    pub fn writes(self) -> bool {
        !matches!(self, Pattern::Read | Pattern::Randread)
    }

    /// Whether offsets are random.
    pub fn random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
}

/// Which part of `--verify` to run: `write` and `read` split it in two runs with the same
/// `--seed`, so the data can be inspected or tampered with in between.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyPhase {
    /// Write the pattern, then read it back and compare.
    Both,
    /// Only write the pattern.
    Write,
    /// Only read back and compare.
    Read,
}

/// CPUs to pin the per-queue threads to: queue `i` runs on `cpus[i % len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Arguments of `blockctl bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// vhost-user-blk socket of the device under test.
    #[arg(short = 's', long)]
    pub socket: PathBuf,
    /// I/O pattern.
    #[arg(short = 'w', long, value_enum, default_value = "randread")]
    pub pattern: Pattern,
    /// Percentage of reads for `randrw`.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Block size in bytes (suffixes k, m: `4k`, `128k`); a multiple of 512.
    #[arg(short = 'b', long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per queue.
    #[arg(short = 'q', long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,
    /// Number of virtqueues, one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub queues: u32,
    /// Pin the queue threads to these CPUs (`1`, `0,2`, `0-3`).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// Run time in seconds (ignored with --verify, which makes one pass).
    #[arg(short = 't', long, default_value_t = 10)]
    pub runtime: u64,
    /// Bytes of the device to use, from offset 0 (default: the whole capacity).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Write a per-block pattern over --size, read it back and compare; a mismatch fails.
    #[arg(long)]
    pub verify: bool,
    /// Part of --verify to run.
    #[arg(long, value_enum, default_value = "both", requires = "verify")]
    pub verify_phase: VerifyPhase,
    /// Draw each random offset independently, so a block may come again before the
    /// others have come once (fio's `norandommap`). By default every block comes once
    /// per pass, as with fio's default random map (see src/bench/random_map.rs).
    #[arg(long)]
    pub norandommap: bool,
    /// Seed of the --verify pattern and of the random offsets.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Busy-poll for completions (lowest latency, one full core per queue).
    #[arg(long, overrides_with = "no_poll")]
    pub poll: bool,
    /// Sleep on the completion eventfd instead of polling (low CPU).
    #[arg(long, overrides_with = "poll")]
    pub no_poll: bool,
    /// Connect, start the queues, then stay idle this many seconds before the first request
    /// (measures a target's idle CPU and its wake-up latency: see `first_lat_us`).
    #[arg(long, default_value_t = 0.0, value_parser = parse_secs)]
    pub idle_before: f64,
    /// Give up when the device answers nothing for this many seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Publish each queue's completed requests in this file (created or truncated) while
    /// running: native-endian u64s, queue `i` at byte `8 * i`, updated after every batch of
    /// completions, so that a harness can count the requests of a window inside the run.
    #[arg(long)]
    pub progress_file: Option<PathBuf>,
}

impl BenchArgs {
    /// Polling is the default; `--no-poll` switches to the completion eventfd.
    pub fn polling(&self) -> bool {
        !self.no_poll
    }
}

/// Parses `4096`, `4k`, `128K`, `1m`, `2g` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(format!("'{s}': unknown size suffix '{c}' (k, m, g, t)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 4096, 4k, 1m)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a non-negative number of seconds (`0.5`, `3`).
pub fn parse_secs(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(t) if (0.0..1e6).contains(&t) => Ok(t),
        _ => Err(format!(
            "'{s}' is not a number of seconds between 0 and 1e6"
        )),
    }
}

/// Parses a CPU list (`1`, `0,2`, `0-3`).
pub fn parse_cpus(s: &str) -> Result<CpuList, String> {
    CpuMask::parse(&format!("[{s}]"))
        .map(|m| CpuList(m.cores()))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("4x").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999t").is_err());
    }

    #[test]
    fn command_line() {
        let c = Cli::try_parse_from([
            "bench",
            "-s",
            "/tmp/s",
            "-w",
            "randrw",
            "--rwmixread",
            "70",
            "-b",
            "128k",
            "-q",
            "8",
            "--queues",
            "2",
            "--cpus",
            "0-1",
            "--no-poll",
            "--json",
        ])
        .unwrap();
        let a = c.args;
        assert_eq!(a.pattern, Pattern::Randrw);
        assert_eq!(a.rwmixread, 70);
        assert_eq!(a.bs, 128 << 10);
        assert_eq!(a.cpus, Some(CpuList(vec![0, 1])));
        assert!(!a.polling());
        let a = Cli::try_parse_from(["bench", "-s", "x", "--no-poll", "--poll"])
            .unwrap()
            .args;
        assert!(a.polling());
        assert!(Cli::try_parse_from(["bench", "-s", "x", "--rwmixread", "101"]).is_err());
        assert!(Cli::try_parse_from(["bench", "-s", "x", "--verify-phase", "read"]).is_err());
        let a = Cli::try_parse_from(["bench", "-s", "x", "--idle-before", "1.5"])
            .unwrap()
            .args;
        assert_eq!(a.idle_before, 1.5);
        assert!(Cli::try_parse_from(["bench", "-s", "x", "--idle-before", "-1"]).is_err());
    }
}
