//! Reactors: one thread per core of the cpumask, pinned to it, each running an event loop
//! over the pollers placed on it (virtqueues, NBD connections, backend completions).
//!
//! Adaptive polling: a reactor busy-polls while its pollers keep finding work; after
//! `idle_threshold` without any, it asks every poller to re-arm its notifications (virtqueue
//! notifications, completion eventfds) and sleeps in `epoll_wait` until one fires, so an idle
//! daemon uses no CPU while a busy one answers with polling latency. It also stops polling
//! at once while other threads are waiting for a CPU ([`cpu_demand`]): spinning then only
//! delays the librbd, io_uring or OSD threads whose work it is waiting for. Likewise while
//! a poller awaits completions that the backend's own threads produce
//! ([`Poller::awaits_helper_threads`]: librbd's), which often run on the reactor's core.

pub mod cpu_demand;
pub mod poll_window;
pub mod sched;
pub mod wake_cost;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cpumask::CpuMask;
use crate::sync::lock;

/// When a reactor sleeps instead of polling (`--poll`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PollMode {
    /// Busy-poll forever (SPDK's behaviour): lowest latency, a whole core per reactor.
    Always,
    /// Poll while work keeps coming, sleep after `idle_threshold` without any, or at once
    /// while other threads are waiting for a CPU.
    Adaptive,
    /// Sleep as soon as a pass finds no work (interrupt mode).
    Never,
}

/// How reactors poll.
#[derive(Clone, Copy, Debug)]
pub struct PollOptions {
    pub mode: PollMode,
    /// How long an adaptive reactor keeps polling without work before it sleeps.
    pub idle_threshold: Duration,
    /// What waking a reactor costs, given instead of measured at start ([`wake_cost`]).
    pub wake_cost: Option<Duration>,
}

impl Default for PollOptions {
    fn default() -> Self {
        PollOptions {
            mode: PollMode::Adaptive,
            idle_threshold: Duration::from_micros(200),
            wake_cost: None,
        }
    }
}

/// Something a reactor polls: a virtqueue, an NBD connection, a timer.
///
/// Pollers are created on the reactor thread (by a closure sent with [`Reactors::run`]) so
/// that they can own thread-local resources such as io_uring instances; they need not be
/// `Send`.
pub trait Poller {
    /// Does the work that is ready; returns how much (0 = found nothing).
    fn poll(&mut self) -> usize;

    /// The reactor is about to sleep: re-enable notifications. Returns true when work
    /// arrived in the meantime, in which case the reactor does not sleep.
    fn arm(&mut self) -> bool;

    /// The reactor woke up: disable notifications again and drain the eventfds.
    fn disarm(&mut self);

    /// File descriptors that become readable when this poller has work (kick eventfds,
    /// completion eventfds, sockets). Asked once when the poller is added.
    fn wake_fds(&self) -> Vec<RawFd>;

    /// A time at which the poller has work even without a wake-up (QoS refills).
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Asks the poller to stop taking new work. The reactor keeps polling it until
    /// [`Poller::finished`], then removes and drops it (on this thread).
    fn request_stop(&mut self) {}

    /// True once a stopping poller has nothing in flight and may be dropped.
    fn finished(&self) -> bool {
        false
    }

    /// Requests are in flight whose completions need other threads of this process to run
    /// (librbd's, [`crate::bdev::IoChannel::completed_by_helper_threads`]). An adaptive
    /// reactor then sleeps at once instead of polling: on a shared core its polling would
    /// delay the very threads it waits for, so each completion would come later than if the
    /// reactor slept (README.md, Performance: "No idle polling while librbd works").
    fn awaits_helper_threads(&self) -> bool {
        false
    }

    /// Nothing will come from this poller until its driver, woken by the interrupt it was
    /// sent, submits again (its last busy pass signalled it and left nothing in flight),
    /// or it never had work. Where wake-ups are cheap ([`wake_cost`]) an adaptive reactor
    /// whose pollers all say so polls through the driver's wake-up only as long as its
    /// [`poll_window`], then sleeps.
    fn driver_waits(&self) -> bool {
        false
    }

    /// How many requests the driver's last turn brought (those answered since it last
    /// waited). A reactor with a poll window waits longer for a driver of one request at
    /// a time than for one that reaps and refills a deep queue ([`poll_window`]).
    fn driver_batch(&self) -> usize {
        1
    }
}

/// `epoll_pwait2` is missing (Linux < 5.11): sleeps are rounded up to milliseconds.
static NO_PWAIT2: AtomicBool = AtomicBool::new(false);

/// Waits on `epoll` for at most `timeout` (None: until an event), to the microsecond
/// where the kernel has `epoll_pwait2`, so that a deadline a few microseconds away (an
/// interrupt held back by coalescing, a QoS refill) is not stretched to a millisecond.
fn sleep_on(
    epoll: &Epoll,
    timeout: Option<Duration>,
    events: &mut [EpollEvent],
) -> std::io::Result<usize> {
    if let Some(t) = timeout {
        if !NO_PWAIT2.load(Ordering::Relaxed) {
            let ts = libc::timespec {
                tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            };
            // SAFETY: a valid epoll fd; `events` is a slice of epoll_event (EpollEvent is
            // repr(transparent)); `ts` lives across the call; no signal mask.
            let n = unsafe {
                libc::epoll_pwait2(
                    epoll.as_raw_fd(),
                    events.as_mut_ptr().cast::<libc::epoll_event>(),
                    events.len().min(i32::MAX as usize) as i32,
                    &ts,
                    std::ptr::null(),
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOSYS) {
                return Err(e);
            }
            NO_PWAIT2.store(true, Ordering::Relaxed);
        }
    }
    // Round up: waking before the deadline would only spin.
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    });
    epoll.wait(ms, events)
}

/// The earlier of two optional deadlines (for [`Poller::next_deadline`]).
pub fn min_deadline(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Identifies a poller on its reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerId(u64);

/// Counters a reactor publishes for `framework_get_reactors`.
#[derive(Default)]
struct ReactorShared {
    pollers: AtomicUsize,
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    sleeping: AtomicBool,
    /// Times the reactor went to sleep (metrics).
    sleeps: AtomicU64,
    /// Wake-ups other threads sent it (messages; metrics).
    wakeups: AtomicU64,
    /// What waking it costs ([`wake_cost`]), ns; `u64::MAX`: not measured.
    wake_cost_ns: AtomicU64,
    /// Its poll window ([`poll_window`]), ns; `u64::MAX`: it has none.
    poll_window_ns: AtomicU64,
    names: Mutex<HashMap<u64, String>>,
}

/// One reactor's counters at a point in time (the metrics exporter's view).
#[derive(Clone, Debug, Default)]
pub struct ReactorStats {
    pub core: usize,
    pub busy_ns: u64,
    pub idle_ns: u64,
    /// Asleep in epoll_wait now (SPDK's `in_interrupt`).
    pub sleeping: bool,
    pub sleeps: u64,
    pub wakeups: u64,
    pub pollers: usize,
}

type Msg = Box<dyn FnOnce(&mut ReactorCtx) + Send>;

struct ReactorHandle {
    core: usize,
    tx: Mutex<Sender<Msg>>,
    wake: EventFd,
    shared: Arc<ReactorShared>,
}

/// The reactor threads of the daemon.
pub struct Reactors {
    mask: CpuMask,
    /// `--poll`, for the metrics.
    mode: PollMode,
    handles: Vec<Arc<ReactorHandle>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What a closure run on a reactor can do there.
pub struct ReactorCtx {
    core: usize,
    epoll: Epoll,
    pollers: HashMap<u64, Box<dyn Poller>>,
    fds: HashMap<u64, Vec<RawFd>>,
    next_id: u64,
    stop: bool,
    shared: Arc<ReactorShared>,
}

impl ReactorCtx {
    /// The core this reactor runs on.
    pub fn core(&self) -> usize {
        self.core
    }

    /// Starts polling `poller`; `name` shows in `framework_get_reactors`.
    pub fn add_poller(&mut self, name: &str, poller: Box<dyn Poller>) -> PollerId {
        let id = self.next_id;
        self.next_id += 1;
        let fds = poller.wake_fds();
        for fd in &fds {
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(EventSet::IN, id),
            ) {
                tracing::warn!(core = self.core, fd, "cannot watch poller fd: {e}");
            }
        }
        self.fds.insert(id, fds);
        self.pollers.insert(id, poller);
        self.shared.pollers.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.names).insert(id, name.to_string());
        PollerId(id)
    }

    /// Stops polling and returns the poller (to drain or drop it on this thread).
    pub fn remove_poller(&mut self, id: PollerId) -> Option<Box<dyn Poller>> {
        let p = self.pollers.remove(&id.0)?;
        for fd in self.fds.remove(&id.0).unwrap_or_default() {
            // Best effort: an fd that failed to be added (logged by `add_poller`) or was
            // already closed is not in the set, and a closed fd leaves it by itself.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.shared.pollers.fetch_sub(1, Ordering::Relaxed);
        lock(&self.shared.names).remove(&id.0);
        Some(p)
    }

    /// Asks a poller to stop (see [`Poller::request_stop`]); it is removed once finished.
    pub fn stop_poller(&mut self, id: PollerId) {
        if let Some(p) = self.pollers.get_mut(&id.0) {
            p.request_stop();
            if p.finished() {
                self.remove_poller(id);
            }
        }
    }
}

/// Pins the calling thread to `core`.
fn pin_to(core: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it for core < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if core >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The cores this process may run on.
pub fn online_cores() -> CpuMask {
    // SAFETY: sched_getaffinity fills the zeroed set; CPU_ISSET reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return CpuMask::from_cores(0..1);
        }
        CpuMask::from_cores((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)))
    }
}

impl Reactors {
    /// Starts one pinned reactor thread per core of `mask`. Fails, naming the core, when a
    /// core of the mask is not available to this process.
    pub fn start(mask: &CpuMask, opts: PollOptions) -> anyhow::Result<Self> {
        let online = online_cores();
        if !mask.is_subset_of(&online) {
            anyhow::bail!(
                "cpumask {mask} selects cores this machine does not offer (available: {online})"
            );
        }
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        // Where an adaptive reactor's wake-up measurement may put its waker.
        let host = wake_cost::host_cores().unwrap_or_else(|| online.cores());
        for core in mask.cores() {
            let (tx, rx) = mpsc::channel::<Msg>();
            let wake = EventFd::new(EFD_NONBLOCK)?;
            let shared = Arc::new(ReactorShared::default());
            let handle = Arc::new(ReactorHandle {
                core,
                tx: Mutex::new(tx),
                wake: wake.try_clone()?,
                shared: shared.clone(),
            });
            let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
            let host = host.clone();
            let t = std::thread::Builder::new()
                .name(format!("reactor_{core}"))
                .spawn(move || {
                    let started = pin_to(core).and_then(|_| Epoll::new());
                    let epoll = match started {
                        Ok(e) => e,
                        Err(e) => {
                            // `start` waits on `ready_rx` until it has an answer.
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if let Err(e) = epoll.ctl(
                        ControlOperation::Add,
                        wake.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, u64::MAX),
                    ) {
                        // As above: the receiver lives until it has the answer.
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    // Where waking this thread is cheap, an adaptive reactor polls for
                    // drivers that all wait for their interrupts (`Poller::driver_waits`)
                    // only as long as its poll window, then sleeps.
                    let wake_cost = (opts.mode == PollMode::Adaptive)
                        .then(|| opts.wake_cost.or_else(|| wake_cost::measure(core, &host)))
                        .flatten();
                    shared.wake_cost_ns.store(
                        wake_cost.map_or(u64::MAX, |d| d.as_nanos() as u64),
                        Ordering::Relaxed,
                    );
                    let cheap_wakes = wake_cost.is_some_and(|d| d <= wake_cost::CHEAP);
                    let window = wake_cost
                        .filter(|_| cheap_wakes)
                        .map(poll_window::PollWindow::new);
                    shared.poll_window_ns.store(
                        window.map_or(u64::MAX, |w| w.learnt().as_nanos() as u64),
                        Ordering::Relaxed,
                    );
                    tracing::info!(
                        core,
                        wake_cost_us = wake_cost.map(|d| d.as_secs_f64() * 1e6),
                        given = opts.wake_cost.is_some(),
                        cheap_wakes,
                        "reactor wake-up cost"
                    );
                    // As above.
                    let _ = ready_tx.send(Ok(()));
                    let ctx = ReactorCtx {
                        core,
                        epoll,
                        pollers: HashMap::new(),
                        fds: HashMap::new(),
                        next_id: 0,
                        stop: false,
                        shared,
                    };
                    run_loop(ctx, rx, wake, opts, window);
                })?;
            ready_rx
                .recv()
                .map_err(|_| anyhow::anyhow!("reactor on core {core} died at start"))?
                .map_err(|e| anyhow::anyhow!("reactor on core {core}: {e}"))?;
            handles.push(handle);
            threads.push(t);
        }
        tracing::info!(
            "{} reactor(s) started on cores {:?} (poll mode {:?})",
            handles.len(),
            mask.cores(),
            opts.mode
        );
        Ok(Reactors {
            mask: mask.clone(),
            mode: opts.mode,
            handles,
            threads: Mutex::new(threads),
        })
    }

    /// The daemon's cpumask.
    pub fn mask(&self) -> &CpuMask {
        &self.mask
    }

    /// The least-loaded reactor (fewest pollers) whose core is in `within`, as SPDK places
    /// vhost sessions; `None` when `within` selects none of the daemon's cores.
    pub fn pick(&self, within: &CpuMask) -> Option<usize> {
        self.handles
            .iter()
            .filter(|h| within.contains(h.core))
            .min_by_key(|h| h.shared.pollers.load(Ordering::Relaxed))
            .map(|h| h.core)
    }

    fn handle(&self, core: usize) -> Option<&Arc<ReactorHandle>> {
        self.handles.iter().find(|h| h.core == core)
    }

    /// Runs `f` on the reactor of `core` (asynchronously). Returns false when there is no
    /// such reactor or it has stopped.
    pub fn run(&self, core: usize, f: impl FnOnce(&mut ReactorCtx) + Send + 'static) -> bool {
        let Some(h) = self.handle(core) else {
            return false;
        };
        if lock(&h.tx).send(Box::new(f)).is_err() {
            return false;
        }
        h.shared.wakeups.fetch_add(1, Ordering::Relaxed);
        // The eventfd write fails only when the counter would overflow, i.e. it is already signalled.
        let _ = h.wake.write(1);
        true
    }

    /// Runs `f` on the reactor of `core` and waits for its result; `None` when the reactor
    /// is gone. Never call this from a reactor thread.
    pub fn call<R: Send + 'static>(
        &self,
        core: usize,
        f: impl FnOnce(&mut ReactorCtx) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = mpsc::channel();
        if !self.run(core, move |ctx| {
            // `call` stopped waiting only if it is gone; nobody wants the result then.
            let _ = tx.send(f(ctx));
        }) {
            return None;
        }
        rx.recv().ok()
    }

    /// Stops every reactor after the pollers it still has are dropped, and joins them.
    pub fn shutdown(&self) {
        for h in &self.handles {
            // A reactor whose receiver is gone has already exited; the wake-up is best
            // effort (the eventfd write fails only when the counter would overflow, i.e. it is already signalled).
            let _ = lock(&h.tx).send(Box::new(|ctx: &mut ReactorCtx| ctx.stop = true));
            let _ = h.wake.write(1);
        }
        for t in lock(&self.threads).drain(..) {
            let name = t.thread().name().unwrap_or("reactor").to_string();
            if t.join().is_err() {
                tracing::error!("{name} panicked; its pollers were dropped with it");
            }
        }
    }

    /// The poll mode (`--poll`).
    pub fn poll_mode(&self) -> PollMode {
        self.mode
    }

    /// Every reactor's counters (metrics).
    pub fn stats(&self) -> Vec<ReactorStats> {
        self.handles
            .iter()
            .map(|h| {
                let s = &h.shared;
                ReactorStats {
                    core: h.core,
                    busy_ns: s.busy_ns.load(Ordering::Relaxed),
                    idle_ns: s.idle_ns.load(Ordering::Relaxed),
                    sleeping: s.sleeping.load(Ordering::Relaxed),
                    sleeps: s.sleeps.load(Ordering::Relaxed),
                    wakeups: s.wakeups.load(Ordering::Relaxed),
                    pollers: s.pollers.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// `framework_get_reactors`' result (SPDK's shape; ticks are nanoseconds).
    pub fn to_json(&self) -> Value {
        let reactors: Vec<Value> = self
            .handles
            .iter()
            .map(|h| {
                let names = lock(&h.shared.names);
                let mut threads: Vec<(&u64, &String)> = names.iter().collect();
                threads.sort();
                json!({
                    "lcore": h.core,
                    "busy": h.shared.busy_ns.load(Ordering::Relaxed),
                    "idle": h.shared.idle_ns.load(Ordering::Relaxed),
                    "in_interrupt": h.shared.sleeping.load(Ordering::Relaxed),
                    // blockd extension: what a wake-up of this reactor costs (measured at
                    // start by an adaptive reactor, µs; null: not measured).
                    "wake_cost_us": match h.shared.wake_cost_ns.load(Ordering::Relaxed) {
                        u64::MAX => Value::Null,
                        ns => json!(ns as f64 / 1000.0),
                    },
                    // blockd extension: how long it polls for drivers that all wait for
                    // their interrupts (µs; null: no window, wake-ups are dear or the
                    // reactor does not adapt).
                    "poll_window_us": match h.shared.poll_window_ns.load(Ordering::Relaxed) {
                        u64::MAX => Value::Null,
                        ns => json!(ns as f64 / 1000.0),
                    },
                    "lw_threads": threads.iter().map(|(id, name)| json!({
                        "name": name, "id": id, "cpumask": CpuMask::from_cores([h.core]).to_string(),
                        "elapsed": 0
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({ "tick_rate": 1_000_000_000u64, "reactors": reactors })
    }
}

/// Adds to one of the reactor's own counters: it is their only writer (readers only load),
/// so a load and a store do, without the locked read-modify-write of `fetch_add` in every
/// poll pass.
#[inline]
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

fn run_loop(
    mut ctx: ReactorCtx,
    rx: Receiver<Msg>,
    wake: EventFd,
    opts: PollOptions,
    mut window: Option<poll_window::PollWindow>,
) {
    let mut events = vec![EpollEvent::default(); 64];
    let mut demand = cpu_demand::CpuDemand::new();
    let mut last_work = Instant::now();
    let mut last_tick = last_work;
    loop {
        // Control messages: add/remove pollers, stop.
        loop {
            match rx.try_recv() {
                Ok(f) => f(&mut ctx),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    ctx.stop = true;
                    break;
                }
            }
        }
        if ctx.stop {
            // Dropping the pollers releases their queues and channels on this thread.
            ctx.pollers.clear();
            return;
        }

        let mut work = 0;
        let mut done = false;
        for p in ctx.pollers.values_mut() {
            work += p.poll();
            done |= p.finished();
        }
        if done {
            let finished: Vec<u64> = ctx
                .pollers
                .iter()
                .filter(|(_, p)| p.finished())
                .map(|(id, _)| *id)
                .collect();
            for id in finished {
                ctx.remove_poller(PollerId(id));
            }
        }
        let now = Instant::now();
        let spent = now.duration_since(last_tick).as_nanos() as u64;
        last_tick = now;
        if work > 0 {
            add(&ctx.shared.busy_ns, spent);
            if let Some(w) = window.as_mut() {
                if w.work(now) {
                    let ns = w.learnt().as_nanos() as u64;
                    ctx.shared.poll_window_ns.store(ns, Ordering::Relaxed);
                }
            }
            last_work = now;
            continue;
        }
        add(&ctx.shared.idle_ns, spent);
        // Where wake-ups are cheap, polling for drivers that all wait for their interrupts
        // lasts the poll window (`poll_window`), then the reactor sleeps.
        let window_over = match window.as_mut() {
            Some(w) if ctx.pollers.values().all(|p| p.driver_waits()) => {
                let pollers = &ctx.pollers;
                w.over(now, last_work, || {
                    pollers
                        .values()
                        .map(|p| p.driver_batch())
                        .max()
                        .unwrap_or(1)
                })
            }
            Some(w) => {
                w.not_waiting();
                false
            }
            None => false,
        };
        match opts.mode {
            PollMode::Always => {
                std::hint::spin_loop();
                continue;
            }
            PollMode::Adaptive
                if now.duration_since(last_work) < opts.idle_threshold
                    && !ctx.pollers.values().any(|p| p.awaits_helper_threads())
                    && !window_over
                    && !demand.contended(now, now.duration_since(last_work)) =>
            {
                continue;
            }
            _ => {}
        }

        // Sleep until a poller's fd, a message or a deadline wakes us.
        let mut pending = false;
        for p in ctx.pollers.values_mut() {
            pending |= p.arm();
        }
        if !pending {
            let deadline = ctx.pollers.values().filter_map(|p| p.next_deadline()).min();
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            ctx.shared.sleeping.store(true, Ordering::Relaxed);
            if let Some(w) = window.as_mut() {
                w.sleeping();
            }
            ctx.shared.sleeps.fetch_add(1, Ordering::Relaxed);
            // An error is EINTR (the epoll is ours and valid): the loop polls and sleeps again.
            let _ = sleep_on(&ctx.epoll, timeout, &mut events);
            ctx.shared.sleeping.store(false, Ordering::Relaxed);
            // Drains the wake eventfd; EAGAIN just means nobody woke us.
            let _ = wake.read();
        }
        for p in ctx.pollers.values_mut() {
            p.disarm();
        }
        let now = Instant::now();
        add(
            &ctx.shared.idle_ns,
            now.duration_since(last_tick).as_nanos() as u64,
        );
        last_tick = now;
        last_work = now;
    }
}
