//! The kernel scheduling policy of the daemon's threads (`blockd --sched`, sched(7)):
//! [`policy`] names the two policies and sets them on threads, [`adaptive`] is the governor
//! that switches between them, and [`SchedMode`] is what `--sched` puts in force at start.
//!
//! On a host whose cores are shared, a reactor and librbd's threads wake each other on
//! every request: the reactor's `rbd_aio_writev` wakes librbd's io_context thread, whose
//! completion callback wakes the reactor. Under the default policy the woken thread
//! preempts the waker at once, so on one core the two ping-pong instead of each finishing
//! its batch. With `SCHED_BATCH` a woken thread waits for the running one to block or use
//! up its slice, so each side takes a batch of requests per context switch: fewer switches
//! per request and more throughput at high queue depth.
//!
//! It costs latency at low queue depth: with one request in flight there is no batch to
//! finish, and every hop of the request waits for the running thread instead of preempting
//! it (the same with only librbd's threads batched, likely because they no longer preempt
//! the OSD's threads either; not traced). Batching only the reactor kept that latency but
//! gained nothing, as the ping-pong takes both sides. So the default, [`adaptive`], batches
//! every thread only while enough librbd requests are in flight for batching to pay, and
//! returns them to `SCHED_OTHER` when the queues run shallow. The measurements behind this
//! are in README.md (Performance) and bench/README.md (RBD).

pub mod adaptive;
pub mod policy;

pub use policy::SchedPolicy;

/// What `blockd --sched` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedMode {
    /// `SCHED_BATCH` while rbd requests are deep in flight, `SCHED_OTHER` otherwise
    /// ([`adaptive`]).
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
            adaptive::enable();
        }
        // Already set by an earlier call in this process (tests): the first mode stays.
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
