//! One queue's load loop: keeps `qd` requests in flight on a libblkio queue, recycling each
//! slot as soon as it completes, and records per-I/O latency without allocating.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use blkio::{Blkioq, Completion, ReqFlags};

use super::args::Pattern;
use super::histogram::Histogram;
use super::random_map::RandomMap;
use super::verify;

/// What a worker does.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    /// Run `pattern` until the deadline.
    Timed {
        /// I/O pattern.
        pattern: Pattern,
        /// Read percentage for `randrw`.
        rwmixread: u8,
        /// When to stop submitting.
        deadline: Instant,
    },
    /// Write the verify pattern once over the worker's range.
    VerifyWrite,
    /// Read the worker's range once and compare with the verify pattern.
    VerifyRead,
}

/// One worker's assignment.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// What to do.
    pub work: Work,
    /// Block size in bytes.
    pub bs: u64,
    /// Requests in flight.
    pub qd: usize,
    /// This worker's block range for sequential work: `[first_block, first_block + blocks)`.
    pub first_block: u64,
    /// Blocks in the range.
    pub blocks: u64,
    /// Blocks of the whole test area, for random offsets.
    pub total_blocks: u64,
    /// Random offsets come from a [`RandomMap`] (each block once per pass, as fio's
    /// default) rather than independent draws (`--norandommap`).
    pub random_map: bool,
    /// Seed of the pattern and of the random offsets.
    pub seed: u64,
    /// Longest wait for a completion before declaring the device dead.
    pub io_timeout: Duration,
    /// CPU to pin the thread to.
    pub cpu: Option<usize>,
    /// Idle time between the start of the queue and the first request.
    pub idle_before: Duration,
    /// Another polling worker runs on this CPU: poll without waiting, and yield the CPU
    /// when nothing completed (a busy-waiting worker would hold it for its whole time
    /// slice while the other queue's completions wait).
    pub yield_when_idle: bool,
}

/// How many of the first completions' latencies a worker keeps apart (wake-up latency).
pub const FIRST_LATENCIES: usize = 16;

/// What a worker did.
pub struct Stats {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Latency of every completed I/O.
    pub hist: Histogram,
    /// Wall time from the first submission to the last completion.
    pub elapsed: Duration,
    /// Latencies (ns) of the first [`FIRST_LATENCIES`] completions, in completion order.
    pub first: Vec<u64>,
}

#[derive(Clone, Copy)]
struct Slot {
    start: Instant,
    offset: u64,
    write: bool,
}

/// xorshift64*: cheap per-I/O randomness, deterministic per seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            bail!("cpu {cpu} out of range");
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to cpu {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One flush, outside the timed part of a run that writes.
///
/// Before: a guest flushes within moments of using a disk (mount, journal commits), and
/// librbd keeps a write-through cache until it sees an image's first flush
/// (`rbd_cache_writethrough_until_flush`, on by default for qemu-storage-daemon); without
/// it, a benchmark would measure a state no VM stays in.
///
/// After: a write-back cache (librbd's) must not leave its dirty data to whoever uses the
/// image next. The next target would pay for writing it back (librbd flushes before it
/// hands over the exclusive lock) inside its own timed run.
fn flush_untimed(queue: &mut Blkioq, io_timeout: Duration, when: &str) -> Result<()> {
    queue.flush(usize::MAX, ReqFlags::empty());
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let mut timeout = io_timeout;
    let n = queue
        .do_io(&mut c, 1, Some(&mut timeout), None)
        .map_err(|e| anyhow!("waiting for the flush {when} the run: {e}"))?;
    if n != 1 {
        bail!("the flush {when} the run did not complete within {io_timeout:?}");
    }
    // SAFETY: do_io initialised the first `n` (= 1) entries.
    let ret = unsafe { c[0].assume_init_ref() }.ret;
    if ret != 0 {
        bail!(
            "the flush {when} the run failed: {}",
            std::io::Error::from_raw_os_error(-ret)
        );
    }
    Ok(())
}

/// Runs `job` on `queue`. `buf` is the worker's `qd * bs` bytes inside a memory region
/// mapped into the device; slot `i` uses `buf + i * bs`. `done`, if any, gets the count of
/// completed requests after every batch (`--progress-file`).
pub fn run(queue: &mut Blkioq, buf: *mut u8, job: &Job, done: Option<&AtomicU64>) -> Result<Stats> {
    if let Some(cpu) = job.cpu {
        pin(cpu)?;
    }
    if !job.idle_before.is_zero() {
        std::thread::sleep(job.idle_before);
    }
    let writes = matches!(job.work, Work::Timed { pattern, .. } if pattern.writes());
    if writes {
        flush_untimed(queue, job.io_timeout, "before")?;
    }
    let bs = job.bs as usize;
    let mut slots = vec![
        Slot {
            start: Instant::now(),
            offset: 0,
            write: false
        };
        job.qd
    ];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..job.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut rng = Rng(job.seed ^ (job.first_block.wrapping_add(1)).wrapping_mul(0x9E37_79B9));
    if rng.0 == 0 {
        rng.0 = 1;
    }
    let mut map = job
        .random_map
        .then(|| RandomMap::new(job.total_blocks, rng.0));
    let mut stats = Stats {
        reads: 0,
        writes: 0,
        hist: Histogram::new(),
        elapsed: Duration::ZERO,
        first: Vec::with_capacity(FIRST_LATENCIES),
    };
    let mut next_seq = 0u64; // index within the range
    let mut issued = 0u64;
    let mut in_flight = 0usize;
    let started = Instant::now();

    // Chooses the next I/O, or None when the job is done.
    let mut next_io =
        |rng: &mut Rng, map: &mut Option<RandomMap>, now: Instant| -> Option<(u64, bool)> {
            let seq = |n: &mut u64| {
                let b = job.first_block + *n % job.blocks;
                *n += 1;
                b * job.bs
            };
            match job.work {
                Work::Timed {
                    pattern,
                    rwmixread,
                    deadline,
                } => {
                    if now >= deadline {
                        return None;
                    }
                    let write = match pattern {
                        Pattern::Read | Pattern::Randread => false,
                        Pattern::Write | Pattern::Randwrite => true,
                        Pattern::Randrw => rng.next() % 100 >= u64::from(rwmixread),
                    };
                    let offset = match (pattern.random(), map) {
                        (true, Some(map)) => map.next_block() * job.bs,
                        (true, None) => rng.next() % job.total_blocks * job.bs,
                        (false, _) => seq(&mut next_seq),
                    };
                    Some((offset, write))
                }
                Work::VerifyWrite | Work::VerifyRead => {
                    if issued >= job.blocks {
                        return None;
                    }
                    issued += 1;
                    Some((seq(&mut next_seq), matches!(job.work, Work::VerifyWrite)))
                }
            }
        };

    // `now`: the time of the batch this submission belongs to (libblkio sends the batch on
    // the next do_io, right after), so the client reads the clock once per batch.
    let submit =
        |queue: &mut Blkioq, slot: usize, offset: u64, write: bool, s: &mut Slot, now: Instant| {
            // SAFETY: slot buffers are disjoint `bs`-byte pieces of the mapped region, and this
            // slot's previous request has completed.
            let p = unsafe { buf.add(slot * bs) };
            if write {
                if matches!(job.work, Work::VerifyWrite) {
                    // SAFETY: as above; no request uses this buffer now.
                    verify::fill(
                        unsafe { std::slice::from_raw_parts_mut(p, bs) },
                        offset,
                        job.seed,
                    );
                }
                queue.write(offset, p, bs, slot, ReqFlags::empty());
            } else {
                queue.read(offset, p, bs, slot, ReqFlags::empty());
            }
            *s = Slot {
                start: now,
                offset,
                write,
            };
        };

    for (i, s) in slots.iter_mut().enumerate() {
        let now = Instant::now();
        let Some((offset, write)) = next_io(&mut rng, &mut map, now) else {
            break;
        };
        submit(queue, i, offset, write, s, now);
        in_flight += 1;
    }

    let mut last_completion = Instant::now();
    while in_flight > 0 {
        let waited = |e: &dyn std::fmt::Display| {
            anyhow!(
                "waiting for completions ({in_flight} in flight, timeout {:?}): {e}",
                job.io_timeout
            )
        };
        let n = if job.yield_when_idle {
            let n = queue
                .do_io(&mut completions, 0, None, None)
                .map_err(|e| waited(&e))?;
            if n == 0 {
                if last_completion.elapsed() > job.io_timeout {
                    return Err(waited(&"timed out"));
                }
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
                continue;
            }
            last_completion = Instant::now();
            n
        } else {
            let mut timeout = job.io_timeout;
            queue
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .map_err(|e| waited(&e))?
        };
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            let s = *slots
                .get(slot)
                .ok_or_else(|| anyhow!("completion for unknown request {slot}"))?;
            in_flight -= 1;
            if c.ret != 0 {
                bail!(
                    "{} of {bs} bytes at offset {} failed: {}",
                    if s.write { "write" } else { "read" },
                    s.offset,
                    std::io::Error::from_raw_os_error(-c.ret)
                );
            }
            let lat = u64::try_from(now.duration_since(s.start).as_nanos()).unwrap_or(u64::MAX);
            stats.hist.record(lat);
            if stats.first.len() < FIRST_LATENCIES {
                stats.first.push(lat);
            }
            if s.write {
                stats.writes += 1;
            } else {
                stats.reads += 1;
                if matches!(job.work, Work::VerifyRead) {
                    // SAFETY: the read into this slot's buffer has completed.
                    let data = unsafe { std::slice::from_raw_parts(buf.add(slot * bs), bs) };
                    if let Err((pos, want, got)) = verify::check(data, s.offset, job.seed) {
                        bail!(
                            "verify failed: block at offset {} differs at byte {pos}: \
                             expected {want:#018x}, read {got:#018x}",
                            s.offset
                        );
                    }
                }
            }
            if let Some((offset, write)) = next_io(&mut rng, &mut map, now) {
                submit(queue, slot, offset, write, &mut slots[slot], now);
                in_flight += 1;
            }
        }
        if let Some(d) = done {
            d.store(stats.reads + stats.writes, Ordering::Relaxed);
        }
    }
    stats.elapsed = started.elapsed();
    if writes {
        flush_untimed(queue, job.io_timeout, "after")?;
    }
    Ok(stats)
}
