//! Prometheus exporter (`blockd --metrics ADDR`): the text exposition format 0.0.4 at
//! `/metrics`, from a small blocking HTTP server on its own thread ([`http`]).
//!
//! Nothing here runs on the I/O path: at each scrape the application fills a [`Snapshot`]
//! from the counters the domain modules keep anyway (relaxed atomics and per-channel
//! histograms, the same figures `bdev_get_iostat`, `vhost_get_controllers` and
//! `framework_get_reactors` report), and [`exposition`] turns it into metric families with
//! the `prometheus-client` crate. The module knows the domain only through these plain
//! snapshot types; `app::metrics` fills them.

pub mod exposition;
pub mod http;
pub mod process;

use crate::bdev::histogram;

/// One operation kind's totals of a bdev (as `bdev_get_iostat`).
#[derive(Clone, Debug, Default)]
pub struct KindSample {
    pub ops: u64,
    pub bytes: u64,
    /// Sum of the latencies (ns).
    pub latency_ns: u64,
}

/// One bdev's figures.
#[derive(Clone, Debug, Default)]
pub struct BdevSample {
    pub name: String,
    /// The bdev's module (`malloc`, `rbd`, ...).
    pub product: String,
    /// By kind, in [`histogram::KINDS`] order.
    pub kinds: Vec<KindSample>,
    pub errors: u64,
    pub queue_depth: i64,
    /// Sum over channels of the time each had I/O in flight (ns).
    pub io_time_ns: u64,
    pub qos_throttled_ops: u64,
    pub qos_throttled_ns: u64,
    pub histogram: histogram::Snapshot,
}

/// One queue of a vhost controller (the frontend has set it up).
#[derive(Clone, Debug, Default)]
pub struct QueueSample {
    pub queue: usize,
    /// Chains returned to the driver.
    pub requests: u64,
    /// Guest notifications received.
    pub kicks: u64,
    /// Interrupts sent to the guest.
    pub interrupts: u64,
    pub in_flight: usize,
}

/// One vhost controller's figures.
#[derive(Clone, Debug, Default)]
pub struct ControllerSample {
    pub name: String,
    pub connected: bool,
    pub connects: u64,
    pub disconnects: u64,
    pub interrupts_held_back: u64,
    pub queues: Vec<QueueSample>,
}

/// One reactor's figures.
#[derive(Clone, Debug, Default)]
pub struct ReactorSample {
    pub core: usize,
    pub busy_ns: u64,
    pub idle_ns: u64,
    pub sleeping: bool,
    pub sleeps: u64,
    pub wakeups: u64,
    pub pollers: usize,
}

/// NBD figures.
#[derive(Clone, Debug, Default)]
pub struct NbdSample {
    /// Live connections (socket clients and kernel devices).
    pub connections: usize,
    /// Exports and their clients.
    pub exports: Vec<(String, usize)>,
    /// Kernel devices (`nbd_start_disk`).
    pub disks: usize,
}

/// Everything a scrape shows, as of one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub bdevs: Vec<BdevSample>,
    pub controllers: Vec<ControllerSample>,
    pub reactors: Vec<ReactorSample>,
    /// `--poll` (always, adaptive, never).
    pub poll_mode: String,
    pub nbd: NbdSample,
    /// Registered rbd clusters and their open connections.
    pub rbd_clusters: Vec<(String, usize)>,
    /// rbd bdevs: (name, operations in flight).
    pub rbd_bdevs: Vec<(String, i64)>,
}

/// What the exporter reads at each scrape (the application implements it).
pub trait Source: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
}
