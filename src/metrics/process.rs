//! The process's own figures from procfs (proc(5)), read at scrape time, under the
//! conventional `process_*` names of the Prometheus client libraries.

use std::time::{SystemTime, UNIX_EPOCH};

/// CPU time, memory and file descriptors of this process.
#[derive(Clone, Debug, Default)]
pub struct ProcessSample {
    /// User + system CPU time (s).
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
}

/// `sysconf` value, or `default` when unknown.
fn sysconf(name: libc::c_int, default: u64) -> u64 {
    // SAFETY: sysconf reads a configuration value and has no memory effects.
    let v = unsafe { libc::sysconf(name) };
    if v > 0 {
        v as u64
    } else {
        default
    }
}

/// Reads /proc/self; figures it cannot read stay 0.
pub fn sample() -> ProcessSample {
    let mut s = ProcessSample::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is in parentheses and may hold spaces.
        if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let tck = sysconf(libc::_SC_CLK_TCK, 100) as f64;
            // proc(5): utime is field 14, stime 15, num_threads 20, vsize 23, rss 24; `f`
            // starts at field 3.
            s.cpu_seconds = (num(11) + num(12)) as f64 / tck;
            s.threads = num(17);
            s.virtual_bytes = num(20);
            s.resident_bytes = num(21) * sysconf(libc::_SC_PAGESIZE, 4096);
        }
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle itself is one of the entries.
        s.open_fds = (d.count() as u64).saturating_sub(1);
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        s.max_fds = lim.rlim_cur;
    }
    s
}

/// Seconds since the epoch (the process's start time is taken with it).
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_itself() {
        let s = super::sample();
        assert!(
            s.resident_bytes > 0 && s.open_fds >= 3 && s.threads >= 1,
            "{s:?}"
        );
    }
}
