//! The two scheduling policies blockd's threads run under, and setting them on the
//! calling thread or on every thread of the process (sched_setscheduler(2)).

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
