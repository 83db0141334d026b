//! Blocking bdev queries of NBD connections (allocation maps for `NBD_CMD_BLOCK_STATUS`)
//! run on a small pool of helper threads, never on a reactor.
//!
//! A connection owns a [`Results`] queue whose eventfd sits in the connection's epoll:
//! a helper runs the job, pushes `(cookie, outcome)` and signals the eventfd; the reactor
//! wakes, reaps on its own thread and sends the reply. The pool is shared by every
//! connection of the process, started on first use with [`HELPERS`] threads (a query
//! occupies one for as long as the backend takes: a round trip per RBD object without
//! fast-diff).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bdev::{Errno, Extent};
use crate::sync::lock;

/// Helper threads of the pool.
pub const HELPERS: usize = 2;

/// What a finished query answers: the request's cookie and the backend's extents.
pub type Outcome = (u64, Result<Vec<Extent>, Errno>);

/// Finished queries of one connection, reaped on its reactor.
pub struct Results {
    done: Mutex<Vec<Outcome>>,
    efd: EventFd,
}

impl Results {
    /// An empty queue with its (non-blocking) eventfd.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Results {
            done: Mutex::new(Vec::new()),
            efd: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// The eventfd that becomes readable when [`Results::take`] has something.
    pub fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    fn push(&self, o: Outcome) {
        lock(&self.done).push(o);
        // The eventfd write fails only when the counter would overflow, i.e. it is already signalled.
        let _ = self.efd.write(1);
    }

    /// Moves the finished queries into `out` (clearing the eventfd first, so a push that
    /// races with this signals it again).
    pub fn take(&self, out: &mut Vec<Outcome>) {
        // Clears the eventfd; EAGAIN just means it was not signalled.
        let _ = self.efd.read();
        out.append(&mut lock(&self.done));
    }
}

type Job = Box<dyn FnOnce() + Send>;

fn pool() -> Option<&'static Mutex<Sender<Job>>> {
    static POOL: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..HELPERS {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-offload{i}"))
                .spawn(move || loop {
                    let job = lock(&rx).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::error!("cannot start an nbd helper thread: {e}"),
            }
        }
        (started > 0).then(|| Mutex::new(tx))
    })
    .as_ref()
}

/// Runs `query` on a helper thread and pushes `(cookie, its result)` to `results`.
/// When no helper thread could be started the query fails with `EAGAIN` (through
/// `results`, like any other outcome).
pub fn run(
    results: &Arc<Results>,
    cookie: u64,
    query: impl FnOnce() -> Result<Vec<Extent>, Errno> + Send + 'static,
) {
    let r = results.clone();
    let job: Job = Box::new(move || r.push((cookie, query())));
    let sent = pool().is_some_and(|p| lock(p).send(job).is_ok());
    if !sent {
        results.push((cookie, Err(Errno(libc::EAGAIN))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::AllocState;
    use std::time::{Duration, Instant};

    #[test]
    fn results_come_back_through_the_eventfd() {
        let r = Results::new().unwrap();
        for c in 0..5u64 {
            run(&r, c, move || {
                Ok(vec![Extent {
                    len: c,
                    state: AllocState::Data,
                }])
            });
        }
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 5 {
            assert!(Instant::now() < deadline, "only {} results", got.len());
            let mut p = libc::pollfd {
                fd: r.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            r.take(&mut got);
        }
        got.sort_by_key(|o| o.0);
        for (i, (c, e)) in got.iter().enumerate() {
            assert_eq!(*c, i as u64);
            assert_eq!(e.as_ref().unwrap()[0].len, i as u64);
        }
    }
}
