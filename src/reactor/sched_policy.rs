//! The kernel scheduling policy of the daemon's threads (`blockd --sched`, sched(7)).
//!
//! On a host whose cores are shared, a reactor and librbd's threads wake each other on
//! every request: the reactor's `rbd_aio_writev` wakes librbd's io_context thread, whose
//! completion callback wakes the reactor. Under the default policy the woken thread
//! preempts the waker at once, so on one core the two ping-pong instead of each finishing
//! its batch. With `SCHED_BATCH` a woken thread waits for the running one to block or use
//! up its slice. On the 2-core bench host (4K QD32, RBD, README "Performance") that halved
//! the context switches per write in blockd's threads (1.7 → 0.8) and took 4K writes from
//! 0.94× to 1.01–1.03× fio's rbd engine on the same core, reads from 0.92× to 0.97×.
//!
//! It costs latency at low queue depth: a 4K read at QD1 took p50 420–490 µs against
//! 210–250 µs, the same with only librbd's threads batched (likely because they no longer
//! preempt the OSD's threads either; not traced). Batching only the reactor kept that
//! latency but gained nothing. So the default, [`crate::reactor::adaptive_sched`], batches every thread only
//! while enough librbd requests are in flight for batching to pay, and returns them to
//! `SCHED_OTHER` when the queues run shallow.

/// What `blockd --sched` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedMode {
    /// `SCHED_BATCH` while rbd requests are deep in flight, `SCHED_OTHER` otherwise
    /// ([`crate::reactor::adaptive_sched`]).
    Adaptive,
    /// Always `SCHED_BATCH`.
    Batch,
    /// Always `SCHED_OTHER`.
    Normal,
}

impl SchedMode {
    /// Puts `mode` in force for the whole process; `main` calls it before any thread
    /// exists, so that every thread inherits the policy. Without a mode, a process started
    /// under `SCHED_OTHER` goes adaptive, and one started under another policy (`chrt`,
    /// systemd's `CPUSchedulingPolicy=`) keeps it. Returns the mode in force, `None` for
    /// an inherited policy.
    pub fn start(mode: Option<SchedMode>) -> std::io::Result<Option<SchedMode>> {
        let mode = match mode {
            Some(m) => m,
            None if SchedPolicy::of_current_thread() == Some(SchedPolicy::Normal) => {
                SchedMode::Adaptive
            }
            None => return Ok(None),
        };
        let start = match mode {
            SchedMode::Batch => SchedPolicy::Batch,
            SchedMode::Adaptive | SchedMode::Normal => SchedPolicy::Normal,
        };
        start.apply_to_current_thread()?;
        if mode == SchedMode::Adaptive {
            crate::reactor::adaptive_sched::enable();
        }
        let _ = IN_FORCE.set(mode);
        Ok(Some(mode))
    }

    /// The mode [`SchedMode::start`] put in force; `None` when the inherited policy stays.
    pub fn in_force() -> Option<SchedMode> {
        IN_FORCE.get().copied()
    }

    /// The name `--sched` takes.
    pub fn name(self) -> &'static str {
        match self {
            SchedMode::Adaptive => "adaptive",
            SchedMode::Batch => "batch",
            SchedMode::Normal => "normal",
        }
    }
}

static IN_FORCE: std::sync::OnceLock<SchedMode> = std::sync::OnceLock::new();

/// A scheduling policy blockd's threads run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedPolicy {
    /// `SCHED_BATCH`: woken threads do not preempt the running one (throughput on a
    /// shared core, at the cost of low-queue-depth latency).
    Batch,
    /// `SCHED_OTHER`, the kernel's default.
    Normal,
}

impl SchedPolicy {
    /// The policy the calling thread runs under, when it is one of these two.
    pub fn of_current_thread() -> Option<Self> {
        // SAFETY: sched_getscheduler has no memory-safety preconditions.
        match unsafe { libc::sched_getscheduler(0) } {
            libc::SCHED_BATCH => Some(SchedPolicy::Batch),
            libc::SCHED_OTHER => Some(SchedPolicy::Normal),
            _ => None,
        }
    }

    /// The name `--sched` and `framework_get_scheduler` use.
    pub fn name(self) -> &'static str {
        match self {
            SchedPolicy::Batch => "batch",
            SchedPolicy::Normal => "normal",
        }
    }

    fn raw(self) -> libc::c_int {
        match self {
            SchedPolicy::Batch => libc::SCHED_BATCH,
            SchedPolicy::Normal => libc::SCHED_OTHER,
        }
    }

    /// Sets the policy of the calling thread. Threads it creates afterwards inherit it
    /// (pthreads' default `PTHREAD_INHERIT_SCHED`), reactors and librbd's threads alike,
    /// so the daemon calls this first thing in `main`.
    pub fn apply_to_current_thread(self) -> std::io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that the
        // call only reads. Both policies take priority 0 and need no privilege.
        if unsafe { libc::sched_setscheduler(0, self.raw(), &param) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets the policy of every thread of the process (librbd's included, which blockd
    /// does not create); returns how many took it. A thread that exits meanwhile is
    /// skipped, and one being created inherits its creator's policy.
    pub fn apply_to_all_threads(self) -> std::io::Result<usize> {
        let param = libc::sched_param { sched_priority: 0 };
        let mut set = 0;
        for entry in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = entry?
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: as in `apply_to_current_thread`; `tid` is a thread of this process
            // (a recycled id would need the thread to exit and the id space to wrap
            // meanwhile).
            if unsafe { libc::sched_setscheduler(tid, self.raw(), &param) } == 0 {
                set += 1;
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_inherit_the_policy() {
        // On a thread of its own, so the test harness's threads keep their policy.
        std::thread::spawn(|| {
            SchedPolicy::Batch.apply_to_current_thread().unwrap();
            // SAFETY: sched_getscheduler has no memory-safety preconditions.
            let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) });
            assert_eq!(child.join().unwrap(), libc::SCHED_BATCH);
            SchedPolicy::Normal.apply_to_current_thread().unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
