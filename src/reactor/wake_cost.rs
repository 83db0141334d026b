//! What it costs to wake this reactor's thread once its core has gone idle: an `eventfd`
//! write from another core until the thread runs (what a guest's kick costs a sleeping
//! reactor).
//!
//! On bare metal and in a VM whose idle vCPUs poll before they halt (cpuidle-haltpoll)
//! that is a few microseconds; in a VM that halts idle vCPUs at once every wake-up is an
//! IPI through the hypervisor and takes tens (bench/README.md, "Wake-ups"). An adaptive
//! reactor uses it to choose how to wait for a driver that sleeps between batches
//! ([`super::Poller::driver_waits`]): where wake-ups are cheap it sleeps at once after
//! signalling the driver, as interrupt mode does, instead of polling through the driver's
//! own wake-up; where they are dear, polling on is faster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Wake-ups at most this long count as cheap.
pub const CHEAP: Duration = Duration::from_micros(10);

/// Rounds measured (the median is taken).
const ROUNDS: usize = 15;

/// How long the waker waits after the sleeper went to sleep: about one turn of a driver
/// that sleeps between batches, long enough for the core to go idle.
const IDLE: Duration = Duration::from_micros(20);

/// The median wake-up time of the calling thread (pinned to `core`) by a helper thread
/// pinned to another online core; `None` on a single core or when the helper cannot run.
/// Takes about a millisecond where wake-ups are dear, at start-up only.
pub fn measure(core: usize, online: &[usize]) -> Option<Duration> {
    let other = *online.iter().find(|&&c| c != core)?;
    let efd = EventFd::new(0).ok()?;
    let waker_fd = efd.try_clone().ok()?;
    let base = Instant::now();
    // The waker's write time (ns since `base`) for the round it wakes, and the round the
    // sleeper is about to sleep in (1-based; 0: none yet).
    let written = Arc::new(AtomicU64::new(0));
    let asleep = Arc::new(AtomicU64::new(0));
    let (w, a) = (written.clone(), asleep.clone());
    let waker = std::thread::Builder::new()
        .name(format!("wake_cost_{core}"))
        .spawn(move || {
            if super::pin_to(other).is_err() {
                // The sleeper is woken once with a zero time and gives up.
                let _ = waker_fd.write(1);
                return;
            }
            for round in 1..=ROUNDS as u64 {
                while a.load(Ordering::Acquire) < round {
                    std::hint::spin_loop();
                }
                let t = Instant::now();
                while t.elapsed() < IDLE {
                    std::hint::spin_loop();
                }
                w.store(base.elapsed().as_nanos() as u64, Ordering::Release);
                let _ = waker_fd.write(1);
            }
        })
        .ok()?;
    let mut times = Vec::with_capacity(ROUNDS);
    for round in 1..=ROUNDS as u64 {
        asleep.store(round, Ordering::Release);
        if efd.read().is_err() {
            break;
        }
        let now = base.elapsed().as_nanos() as u64;
        let at = written.load(Ordering::Acquire);
        if at == 0 {
            break;
        }
        times.push(Duration::from_nanos(now.saturating_sub(at)));
    }
    let _ = waker.join();
    if times.len() < ROUNDS {
        return None;
    }
    times.sort();
    Some(times[ROUNDS / 2])
}

/// The cores the kernel has online (`/sys/devices/system/cpu/online`), whatever this
/// process's affinity: blockd may be confined to its reactors' cores (`taskset`), and the
/// waker must run on another one.
pub fn host_cores() -> Option<Vec<usize>> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    crate::cpumask::CpuMask::parse(&format!("[{}]", list.trim()))
        .ok()
        .map(|m| m.cores())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_wake_up_on_two_cores_and_nothing_on_one() {
        let online = super::super::online_cores().cores();
        assert_eq!(measure(online[0], &online[..1]), None);
        if online.len() < 2 {
            return;
        }
        super::super::pin_to(online[0]).unwrap();
        let d = measure(online[0], &online).expect("two cores");
        // A wake-up takes some time, and not seconds, even on a loaded machine.
        assert!(
            d > Duration::ZERO && d < Duration::from_millis(100),
            "{d:?}"
        );
    }
}
