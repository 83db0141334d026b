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
//! It is not the default because it costs latency: a 4K read at QD1 took p50 420–490 µs
//! against 210–250 µs, the same with only librbd's threads batched (likely because they no
//! longer preempt the OSD's threads either; not traced). Batching only the reactor kept
//! that latency but gained nothing. Without `--sched` blockd leaves the policy it was
//! started with.

/// The scheduling policy blockd's threads run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedPolicy {
    /// `SCHED_BATCH`: woken threads do not preempt the running one (throughput on a
    /// shared core, at the cost of low-queue-depth latency).
    Batch,
    /// `SCHED_OTHER`, the kernel's default.
    Normal,
}

impl SchedPolicy {
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
