//! `blockctl bench`: a vhost-user-blk load generator on libblkio (the `blkio` crate, driver
//! `virtio-blk-vhost-user`), like fio but talking to the vhost-user socket directly, so a
//! backend can be measured and checked without a VM.
//!
//! One thread per virtqueue keeps `--qd` requests in flight; completions are busy-polled on
//! libblkio poll queues (default) or awaited on the completion eventfd (`--no-poll`). Polling
//! threads that share a CPU (`--queues` above the number of `--cpus`) yield it whenever a
//! poll finds nothing, as fio's threads sleep in the kernel: otherwise each held the CPU for a
//! whole time slice while the others' completions waited. libblkio does not notice a dead
//! backend, so connecting and every wait are bounded by `--timeout`.

mod args;
mod histogram;
mod progress;
mod random_map;
mod verify;
mod worker;

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use blkio::{Blkio, Blkioq, MemoryRegion};
use serde::Serialize;

pub use args::{parse_size, BenchArgs, CpuList, Pattern, VerifyPhase};
pub use histogram::Histogram;
use progress::Progress;
use worker::{Job, Stats, Work};

/// Result of `blockctl bench` (printed as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// vhost-user socket.
    pub socket: String,
    /// Device capacity in bytes.
    pub capacity: u64,
    /// Bytes of the device used.
    pub size: u64,
    /// Block size.
    pub bs: u64,
    /// Requests in flight per queue.
    pub qd: u32,
    /// Queues (threads).
    pub queues: u32,
    /// Busy polling (true) or completion eventfd.
    pub poll: bool,
    /// Random offsets from a random map (each block once per pass) or drawn freely.
    pub random_map: bool,
    /// One entry per phase: the timed pattern, or `verify-write`/`verify-read`.
    pub phases: Vec<PhaseReport>,
}

/// Throughput and latency of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// `read`, `randrw`, ..., `verify-write`, `verify-read`.
    pub name: String,
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// I/Os per second.
    pub iops: f64,
    /// Throughput in MiB/s.
    pub mib_s: f64,
    /// Latency in microseconds.
    pub lat_us: Latency,
    /// Latencies of the first completions of queue 0, in microseconds, in completion order
    /// (after `--idle-before`, the first ones show how fast the target wakes up).
    pub first_lat_us: Vec<f64>,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Maximum.
    pub max: f64,
}

/// A started libblkio device with one mapped buffer region for all queues.
struct Device {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity: u64,
}

impl Drop for Device {
    fn drop(&mut self) {
        // Unmapping tells the backend to drop the region before libblkio frees it.
        self.blkio.unmap_mem_region(&self.region);
    }
}

fn blkio_err<'a>(what: &str, socket: &'a Path) -> impl Fn(blkio::Error) -> anyhow::Error + 'a {
    let what = what.to_string();
    move |e| anyhow!("{what} (vhost-user socket {}): {e}", socket.display())
}

/// Connects, configures the queues and maps the I/O buffers (libblkio's order: `path` before
/// `connect()`, queue properties before `start()`, memory regions after).
fn open_device(a: &BenchArgs) -> Result<Device> {
    let s = a.socket.as_path();
    let mut b =
        Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("creating libblkio instance", s))?;
    b.set_str("path", &s.to_string_lossy())
        .map_err(blkio_err("setting path", s))?;
    b.connect().map_err(blkio_err("connecting", s))?;
    let max_queues = b
        .get_i32("max-queues")
        .map_err(blkio_err("max-queues", s))?;
    if i64::from(a.queues) > i64::from(max_queues) {
        bail!(
            "--queues {} but the device offers {max_queues} queue(s)",
            a.queues
        );
    }
    let queues = a.queues as i32;
    if a.polling() {
        b.set_i32("num-queues", 0)
            .map_err(blkio_err("num-queues", s))?;
        b.set_i32("num-poll-queues", queues)
            .map_err(blkio_err("num-poll-queues", s))?;
    } else {
        b.set_i32("num-queues", queues)
            .map_err(blkio_err("num-queues", s))?;
    }
    // Three descriptors per request (header, data, status).
    let max_qs = b
        .get_i32("max-queue-size")
        .map_err(blkio_err("max-queue-size", s))?;
    let want = (a.qd.saturating_mul(3)).next_power_of_two().max(256);
    let qs = i32::try_from(want).unwrap_or(i32::MAX).min(max_qs);
    b.set_i32("queue-size", qs)
        .map_err(blkio_err("queue-size", s))?;

    let req_align = b
        .get_i32("request-alignment")
        .map_err(blkio_err("request-alignment", s))?;
    let max_transfer = b
        .get_i32("max-transfer")
        .map_err(blkio_err("max-transfer", s))?;
    if a.bs == 0 || !a.bs.is_multiple_of(req_align.max(512) as u64) {
        bail!(
            "--bs {} is not a multiple of the request alignment {req_align}",
            a.bs
        );
    }
    if max_transfer > 0 && a.bs > max_transfer as u64 {
        bail!(
            "--bs {} exceeds the device's max transfer {max_transfer}",
            a.bs
        );
    }
    let out = b.start().map_err(blkio_err("starting", s))?;
    let queues = if a.polling() {
        out.poll_queues
    } else {
        out.queues
    };
    if queues.len() != a.queues as usize {
        bail!(
            "libblkio started {} queues, wanted {}",
            queues.len(),
            a.queues
        );
    }
    let capacity = b.get_u64("capacity").map_err(blkio_err("capacity", s))?;
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(blkio_err("mem-region-alignment", s))?
        .max(1);
    let bytes =
        a.bs.checked_mul(u64::from(a.qd) * u64::from(a.queues))
            .and_then(|n| n.checked_next_multiple_of(align))
            .ok_or_else(|| anyhow!("--bs × --qd × --queues is too large"))?;
    let region = b
        .alloc_mem_region(usize::try_from(bytes)?)
        .map_err(blkio_err("allocating buffers", s))?;
    b.map_mem_region(&region)
        .map_err(blkio_err("mapping buffers into the device", s))?;
    Ok(Device {
        blkio: b,
        queues,
        region,
        capacity,
    })
}

/// [`open_device`] bounded by `--timeout`: a backend that accepts the connection but never
/// answers would otherwise hang the vhost-user handshake forever.
fn open_device_timeout(a: &BenchArgs) -> Result<Device> {
    let (tx, rx) = mpsc::channel();
    let args = a.clone();
    std::thread::Builder::new()
        .name("bench-connect".into())
        .spawn(move || {
            // After the timeout nobody waits for the device: dropping it is the point.
            let _ = tx.send(open_device(&args));
        })?;
    match rx.recv_timeout(Duration::from_secs(a.timeout.max(1))) {
        Ok(r) => r,
        Err(_) => bail!(
            "vhost-user socket {}: no answer within {} s while connecting",
            a.socket.display(),
            a.timeout
        ),
    }
}

/// Runs one phase on all queues in parallel and sums the results.
fn run_phase(
    dev: &mut Device,
    name: &str,
    jobs: &[Job],
    progress: Option<&Progress>,
) -> Result<PhaseReport> {
    let base = dev.region.addr;
    let per_queue = jobs.first().map_or(0, |j| j.bs as usize * j.qd);
    let results: Vec<Result<Stats>> = std::thread::scope(|scope| {
        let handles: Vec<_> = dev
            .queues
            .iter_mut()
            .zip(jobs)
            .enumerate()
            .map(|(i, (q, job))| {
                let buf = base + i * per_queue;
                let done: Option<&AtomicU64> = progress.map(|p| p.slot(i));
                scope.spawn(move || worker::run(q, buf as *mut u8, job, done))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("worker thread panicked")))
            })
            .collect()
    });
    let mut hist = Histogram::new();
    let mut first = Vec::new();
    let (mut reads, mut writes, mut secs) = (0u64, 0u64, 0f64);
    for (i, r) in results.into_iter().enumerate() {
        let st = r.with_context(|| format!("{name}: queue {i}"))?;
        reads += st.reads;
        writes += st.writes;
        secs = secs.max(st.elapsed.as_secs_f64());
        hist.merge(&st.hist);
        if i == 0 {
            first = st.first;
        }
    }
    let ios = reads + writes;
    let bs = jobs.first().map_or(0, |j| j.bs);
    let per_sec = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(PhaseReport {
        name: name.to_string(),
        reads,
        writes,
        seconds: secs,
        iops: per_sec(ios as f64),
        mib_s: per_sec((ios * bs) as f64 / (1024.0 * 1024.0)),
        lat_us: Latency {
            mean: hist.mean() / 1000.0,
            p50: us(hist.quantile(0.5)),
            p99: us(hist.quantile(0.99)),
            p99_9: us(hist.quantile(0.999)),
            max: us(hist.max()),
        },
        first_lat_us: first.into_iter().map(us).collect(),
    })
}

/// Runs the benchmark and returns the numbers (what [`run`] prints).
pub fn execute(a: &BenchArgs) -> Result<BenchReport> {
    if a.bs == 0 || !a.bs.is_multiple_of(512) {
        bail!("--bs {} is not a non-zero multiple of 512", a.bs);
    }
    let mut dev = open_device_timeout(a)?;
    let size = a.size.unwrap_or(dev.capacity);
    if size > dev.capacity {
        bail!("--size {size} exceeds the device capacity {}", dev.capacity);
    }
    let total_blocks = size / a.bs;
    let nq = u64::from(a.queues);
    if total_blocks < nq {
        bail!(
            "--size {size} holds fewer than one {}-byte block per queue",
            a.bs
        );
    }
    let cpus = a.cpus.as_ref().map(|c| c.0.as_slice()).unwrap_or(&[]);
    let jobs_for = |work: Work| -> Vec<Job> {
        (0..nq)
            .map(|i| {
                let first = total_blocks * i / nq;
                let end = total_blocks * (i + 1) / nq;
                Job {
                    work,
                    bs: a.bs,
                    qd: a.qd as usize,
                    first_block: first,
                    blocks: end - first,
                    total_blocks,
                    random_map: !a.norandommap,
                    seed: a.seed,
                    io_timeout: Duration::from_secs(a.timeout.max(1)),
                    cpu: (!cpus.is_empty()).then(|| cpus[i as usize % cpus.len()]),
                    idle_before: Duration::from_secs_f64(a.idle_before),
                    yield_when_idle: a.polling() && !cpus.is_empty() && nq as usize > cpus.len(),
                }
            })
            .collect()
    };
    let progress = a
        .progress_file
        .as_deref()
        .map(|p| Progress::create(p, a.queues as usize))
        .transpose()?;
    let progress = progress.as_ref();
    let mut phases = Vec::new();
    if a.verify {
        if matches!(a.verify_phase, VerifyPhase::Both | VerifyPhase::Write) {
            phases.push(run_phase(
                &mut dev,
                "verify-write",
                &jobs_for(Work::VerifyWrite),
                progress,
            )?);
        }
        if matches!(a.verify_phase, VerifyPhase::Both | VerifyPhase::Read) {
            phases.push(run_phase(
                &mut dev,
                "verify-read",
                &jobs_for(Work::VerifyRead),
                progress,
            )?);
        }
    } else {
        let work = Work::Timed {
            pattern: a.pattern,
            rwmixread: a.rwmixread,
            deadline: Instant::now()
                + Duration::from_secs_f64(a.idle_before)
                + Duration::from_secs(a.runtime),
        };
        let name = format!("{:?}", a.pattern).to_lowercase();
        phases.push(run_phase(&mut dev, &name, &jobs_for(work), progress)?);
    }
    Ok(BenchReport {
        socket: a.socket.display().to_string(),
        capacity: dev.capacity,
        size,
        bs: a.bs,
        qd: a.qd,
        queues: a.queues,
        poll: a.polling(),
        random_map: !a.norandommap,
        phases,
    })
}

/// Runs the benchmark and prints the result (text, or JSON with `--json`). Fails on any I/O
/// error, timeout or `--verify` mismatch.
pub fn run(a: &BenchArgs) -> Result<()> {
    let r = execute(a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{}: {} MiB, bs {}, qd {} x {} queue(s), {}",
        r.socket,
        r.size >> 20,
        r.bs,
        r.qd,
        r.queues,
        if r.poll { "polling" } else { "eventfd" }
    );
    for p in &r.phases {
        println!(
            "{:>12}: {:>10.0} IOPS {:>9.1} MiB/s  lat us: mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}  ({} reads, {} writes, {:.2} s)",
            p.name, p.iops, p.mib_s, p.lat_us.mean, p.lat_us.p50, p.lat_us.p99, p.lat_us.p99_9,
            p.lat_us.max, p.reads, p.writes, p.seconds
        );
    }
    Ok(())
}
