//! The metric families of a [`Snapshot`], encoded by `prometheus-client` in the
//! Prometheus text format 0.0.4 (names, labels and units: docs/metrics.md).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::process::{self, ProcessSample};
use super::{Snapshot, Source};
use crate::bdev::histogram::KINDS;
use crate::bdev::IoKind;

/// `Content-Type` of what [`Exporter::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the latency histogram's buckets: 2^10 ns (~1 µs) to 2^34 ns (~17 s),
/// ×4 apart. Powers of two fall on the boundaries of the recorded buckets
/// ([`crate::bdev::histogram`]), so the counts are exact.
pub const LATENCY_BOUNDS_NS: [u64; 13] = [
    1 << 10,
    1 << 12,
    1 << 14,
    1 << 16,
    1 << 18,
    1 << 20,
    1 << 22,
    1 << 24,
    1 << 26,
    1 << 28,
    1 << 30,
    1 << 32,
    1 << 34,
];

/// The `operation` label of a kind (SPDK's I/O type name).
pub fn operation(kind: IoKind) -> &'static str {
    crate::bdev::histogram::io_type_name(kind)
}

const NS: f64 = 1e-9;

/// The collector registered with `prometheus-client`: one snapshot per scrape.
struct SnapshotCollector {
    source: Arc<dyn Source>,
    start_time: f64,
}

impl std::fmt::Debug for SnapshotCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCollector")
    }
}

type Fmt = Result<(), std::fmt::Error>;

/// Writes one family (skipped when it has no sample).
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(L, M)>,
) -> Fmt {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let mut m = enc.encode_descriptor(name, help, None, first.1.metric_type())?;
    for (labels, metric) in &rows {
        metric.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter<L: EncodeLabelSet, N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(L, N)>,
) -> Fmt
where
    ConstCounter<N>: EncodeMetric,
{
    let rows = rows
        .into_iter()
        .map(|(l, v)| (l, ConstCounter::new(v)))
        .collect();
    family(enc, name, help, rows)
}

fn gauge<L: EncodeLabelSet, N>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(L, N)>,
) -> Fmt
where
    ConstGauge<N>: EncodeMetric,
{
    let rows = rows
        .into_iter()
        .map(|(l, v)| (l, ConstGauge::new(v)))
        .collect();
    family(enc, name, help, rows)
}

type Labels2<'a> = [(&'static str, &'a str); 2];
type Labels1<'a> = [(&'static str, &'a str); 1];

fn encode_bdevs(enc: &mut DescriptorEncoder, s: &Snapshot) -> Fmt {
    fn per_kind<'a, T>(
        s: &'a Snapshot,
        f: &dyn Fn(&super::KindSample) -> T,
    ) -> Vec<(Labels2<'a>, T)> {
        s.bdevs
            .iter()
            .flat_map(|b| {
                KINDS.iter().zip(&b.kinds).map(move |(k, v)| {
                    (
                        [("bdev", b.name.as_str()), ("operation", operation(*k))],
                        f(v),
                    )
                })
            })
            .collect()
    }
    counter(
        enc,
        "blockd_bdev_operations",
        "Completed operations by type (bdev_get_iostat num_*_ops).",
        per_kind(s, &|k| k.ops),
    )?;
    counter(
        enc,
        "blockd_bdev_bytes",
        "Bytes moved by completed operations by type (bdev_get_iostat bytes_*).",
        per_kind(s, &|k| k.bytes),
    )?;
    counter(
        enc,
        "blockd_bdev_operation_seconds",
        "Sum of the latencies of completed operations by type (bdev_get_iostat *_latency_ticks).",
        per_kind(s, &|k| k.latency_ns as f64 * NS),
    )?;
    fn per_bdev<'a, T>(
        s: &'a Snapshot,
        f: &dyn Fn(&super::BdevSample) -> T,
    ) -> Vec<(Labels1<'a>, T)> {
        s.bdevs
            .iter()
            .map(|b| ([("bdev", b.name.as_str())], f(b)))
            .collect()
    }
    counter(
        enc,
        "blockd_bdev_errors",
        "Failed operations (bdev_get_iostat io_error).",
        per_bdev(s, &|b| b.errors),
    )?;
    gauge(
        enc,
        "blockd_bdev_queue_depth",
        "Operations in the backend now.",
        per_bdev(s, &|b| b.queue_depth.max(0)),
    )?;
    counter(
        enc,
        "blockd_bdev_io_seconds",
        "Time the bdev's channels had operations in flight, summed over channels (bdev_get_iostat io_time).",
        per_bdev(s, &|b| b.io_time_ns as f64 * NS),
    )?;
    counter(
        enc,
        "blockd_bdev_qos_throttled_operations",
        "Operations that waited for QoS tokens.",
        per_bdev(s, &|b| b.qos_throttled_ops),
    )?;
    counter(
        enc,
        "blockd_bdev_qos_throttled_seconds",
        "Time operations waited for QoS tokens, summed.",
        per_bdev(s, &|b| b.qos_throttled_ns as f64 * NS),
    )?;
    gauge(
        enc,
        "blockd_bdev_info",
        "The bdev's module, as a label.",
        s.bdevs
            .iter()
            .map(|b| {
                (
                    [("bdev", b.name.as_str()), ("product", b.product.as_str())],
                    1u64,
                )
            })
            .collect(),
    )?;
    if s.bdevs.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(
        "blockd_bdev_latency_seconds",
        "Latency of completed operations by type.",
        None,
        MetricType::Histogram,
    )?;
    for b in &s.bdevs {
        for (ki, k) in KINDS.iter().enumerate() {
            let h = &b.histogram.kinds[ki];
            let cum = b.histogram.cumulative_below(ki, &LATENCY_BOUNDS_NS);
            let mut prev = 0;
            let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_NS
                .iter()
                .zip(cum)
                .map(|(&bound, c)| {
                    let n = c - prev;
                    prev = c;
                    (bound as f64 * NS, n)
                })
                .collect();
            let labels = [("bdev", b.name.as_str()), ("operation", operation(*k))];
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                h.sum_ns as f64 * NS,
                h.count(),
                &buckets,
                None,
            )?;
        }
    }
    Ok(())
}

fn encode_controllers(enc: &mut DescriptorEncoder, s: &Snapshot) -> Fmt {
    fn per<'a, T>(
        s: &'a Snapshot,
        f: &dyn Fn(&super::ControllerSample) -> T,
    ) -> Vec<(Labels1<'a>, T)> {
        s.controllers
            .iter()
            .map(|c| ([("controller", c.name.as_str())], f(c)))
            .collect()
    }
    gauge(
        enc,
        "blockd_vhost_frontend_connected",
        "1 while a vhost-user frontend is connected.",
        per(s, &|c| c.connected as u64),
    )?;
    counter(
        enc,
        "blockd_vhost_connects",
        "Frontend connections accepted.",
        per(s, &|c| c.connects),
    )?;
    counter(
        enc,
        "blockd_vhost_disconnects",
        "Frontend disconnections.",
        per(s, &|c| c.disconnects),
    )?;
    counter(
        enc,
        "blockd_vhost_interrupts_held_back",
        "Guest interrupts held back by coalescing (vhost_get_controllers interrupts_held_back).",
        per(s, &|c| c.interrupts_held_back),
    )?;
    let queues: Vec<(&str, String, &super::QueueSample)> = s
        .controllers
        .iter()
        .flat_map(|c| {
            c.queues
                .iter()
                .map(move |q| (c.name.as_str(), q.queue.to_string(), q))
        })
        .collect();
    fn per_queue<'a, T>(
        queues: &'a [(&'a str, String, &'a super::QueueSample)],
        f: &dyn Fn(&super::QueueSample) -> T,
    ) -> Vec<(Labels2<'a>, T)> {
        queues
            .iter()
            .map(|(c, q, s)| ([("controller", *c), ("queue", q.as_str())], f(s)))
            .collect()
    }
    counter(
        enc,
        "blockd_vhost_queue_requests",
        "Requests (chains) the queue returned to the driver.",
        per_queue(&queues, &|q| q.requests),
    )?;
    counter(
        enc,
        "blockd_vhost_queue_kicks",
        "Notifications (kicks) the guest sent the queue.",
        per_queue(&queues, &|q| q.kicks),
    )?;
    counter(
        enc,
        "blockd_vhost_queue_interrupts",
        "Interrupts the queue sent the guest.",
        per_queue(&queues, &|q| q.interrupts),
    )?;
    gauge(
        enc,
        "blockd_vhost_queue_in_flight",
        "Requests taken from the queue's ring and not yet returned.",
        per_queue(&queues, &|q| q.in_flight as u64),
    )
}

fn encode_reactors(enc: &mut DescriptorEncoder, s: &Snapshot) -> Fmt {
    let cores: Vec<String> = s.reactors.iter().map(|r| r.core.to_string()).collect();
    fn per<'a, T>(
        s: &'a Snapshot,
        cores: &'a [String],
        f: &dyn Fn(&super::ReactorSample) -> T,
    ) -> Vec<(Labels1<'a>, T)> {
        s.reactors
            .iter()
            .zip(cores)
            .map(|(r, c)| ([("reactor", c.as_str())], f(r)))
            .collect()
    }
    counter(
        enc,
        "blockd_reactor_busy_seconds",
        "Time the reactor spent in passes that found work.",
        per(s, &cores, &|r| r.busy_ns as f64 * NS),
    )?;
    counter(
        enc,
        "blockd_reactor_idle_seconds",
        "Time the reactor spent idle (polling without work or asleep).",
        per(s, &cores, &|r| r.idle_ns as f64 * NS),
    )?;
    counter(
        enc,
        "blockd_reactor_sleeps",
        "Times the reactor went to sleep.",
        per(s, &cores, &|r| r.sleeps),
    )?;
    counter(
        enc,
        "blockd_reactor_wakeups",
        "Wake-ups other threads sent the reactor.",
        per(s, &cores, &|r| r.wakeups),
    )?;
    gauge(
        enc,
        "blockd_reactor_sleeping",
        "1 while the reactor sleeps (interrupt mode), 0 while it polls.",
        per(s, &cores, &|r| r.sleeping as u64),
    )?;
    gauge(
        enc,
        "blockd_reactor_pollers",
        "Pollers (queues, NBD connections) on the reactor.",
        per(s, &cores, &|r| r.pollers as u64),
    )?;
    gauge(
        enc,
        "blockd_reactor_poll_mode",
        "The --poll mode, as a label.",
        vec![([("mode", s.poll_mode.as_str())], 1u64)],
    )
}

fn encode_nbd_rbd(enc: &mut DescriptorEncoder, s: &Snapshot) -> Fmt {
    gauge(
        enc,
        "blockd_nbd_connections",
        "Live NBD connections (socket clients and kernel devices).",
        vec![(NoLabels, s.nbd.connections as u64)],
    )?;
    gauge(
        enc,
        "blockd_nbd_exports",
        "NBD exports.",
        vec![(NoLabels, s.nbd.exports.len() as u64)],
    )?;
    gauge(
        enc,
        "blockd_nbd_disks",
        "Kernel NBD devices served (nbd_start_disk).",
        vec![(NoLabels, s.nbd.disks as u64)],
    )?;
    gauge(
        enc,
        "blockd_nbd_export_clients",
        "Clients of each NBD export.",
        s.nbd
            .exports
            .iter()
            .map(|(e, n)| ([("export", e.as_str())], *n as u64))
            .collect(),
    )?;
    gauge(
        enc,
        "blockd_rbd_cluster_connections",
        "Open connections of each registered rbd cluster.",
        s.rbd_clusters
            .iter()
            .map(|(c, n)| ([("cluster", c.as_str())], *n as u64))
            .collect(),
    )?;
    gauge(
        enc,
        "blockd_rbd_in_flight",
        "Operations of each rbd bdev in librbd now.",
        s.rbd_bdevs
            .iter()
            .map(|(b, n)| ([("bdev", b.as_str())], (*n).max(0)))
            .collect(),
    )
}

/// An empty label set for families without labels.
#[derive(Clone, Copy, Debug)]
struct NoLabels;

impl EncodeLabelSet for NoLabels {
    fn encode(
        &self,
        _encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

fn encode_process(enc: &mut DescriptorEncoder, p: &ProcessSample, start_time: f64) -> Fmt {
    gauge(
        enc,
        "blockd_build_info",
        "blockd's version, as a label.",
        vec![([("version", env!("CARGO_PKG_VERSION"))], 1u64)],
    )?;
    gauge(
        enc,
        "process_start_time_seconds",
        "Start time of the process since the epoch.",
        vec![(NoLabels, start_time)],
    )?;
    counter(
        enc,
        "process_cpu_seconds",
        "User and system CPU time spent.",
        vec![(NoLabels, p.cpu_seconds)],
    )?;
    for (name, help, v) in [
        (
            "process_resident_memory_bytes",
            "Resident memory size.",
            p.resident_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size.",
            p.virtual_bytes,
        ),
        ("process_open_fds", "Open file descriptors.", p.open_fds),
        (
            "process_max_fds",
            "Limit of open file descriptors.",
            p.max_fds,
        ),
        ("process_threads", "Threads of the process.", p.threads),
    ] {
        gauge(enc, name, help, vec![(NoLabels, v)])?;
    }
    Ok(())
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.source.snapshot();
        encode_bdevs(&mut enc, &s)?;
        encode_controllers(&mut enc, &s)?;
        encode_reactors(&mut enc, &s)?;
        encode_nbd_rbd(&mut enc, &s)?;
        encode_process(&mut enc, &process::sample(), self.start_time)
    }
}

/// Renders the exposition of a [`Source`].
pub struct Exporter {
    registry: Registry,
}

impl Exporter {
    /// `start_time`: when the process started (seconds since the epoch).
    pub fn new(source: Arc<dyn Source>, start_time: f64) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SnapshotCollector { source, start_time }));
        Exporter { registry }
    }

    /// The text exposition (format 0.0.4) as of now.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String does not fail; the encoder fails only on writer errors.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::histogram::Histograms;
    use crate::metrics::{BdevSample, ControllerSample, KindSample, ReactorSample};

    struct Fixed(Snapshot);
    impl Source for Fixed {
        fn snapshot(&self) -> Snapshot {
            self.0.clone()
        }
    }

    #[test]
    fn exposition_has_the_families_and_values() {
        let h = Histograms::default();
        let ch = h.open_channel();
        ch.tally(IoKind::Read, 1500); // in (1024, 4096]
        ch.tally(IoKind::Read, 3_000_000);
        let mut kinds = vec![KindSample::default(); 5];
        kinds[0] = KindSample {
            ops: 2,
            bytes: 8192,
            latency_ns: 3_001_500,
        };
        let snap = Snapshot {
            bdevs: vec![BdevSample {
                name: "Malloc0".into(),
                product: "Malloc disk".into(),
                kinds,
                errors: 1,
                queue_depth: 3,
                histogram: h.snapshot(),
                ..Default::default()
            }],
            controllers: vec![ControllerSample {
                name: "vhost.0".into(),
                connected: true,
                connects: 1,
                ..Default::default()
            }],
            reactors: vec![ReactorSample {
                core: 0,
                busy_ns: 2_000_000_000,
                ..Default::default()
            }],
            poll_mode: "adaptive".into(),
            ..Default::default()
        };
        let text = Exporter::new(Arc::new(Fixed(snap)), 1.0).render();
        for line in [
            "# TYPE blockd_bdev_operations_total counter",
            "blockd_bdev_operations_total{bdev=\"Malloc0\",operation=\"read\"} 2",
            "blockd_bdev_operations_total{bdev=\"Malloc0\",operation=\"write_zeroes\"} 0",
            "blockd_bdev_bytes_total{bdev=\"Malloc0\",operation=\"read\"} 8192",
            "blockd_bdev_operation_seconds_total{bdev=\"Malloc0\",operation=\"read\"} 0.003001",
            "blockd_bdev_errors_total{bdev=\"Malloc0\"} 1",
            "blockd_bdev_queue_depth{bdev=\"Malloc0\"} 3",
            "# TYPE blockd_bdev_latency_seconds histogram",
            "blockd_bdev_latency_seconds_bucket{bdev=\"Malloc0\",operation=\"read\",le=\"1.024e-06\"} 0",
            "blockd_bdev_latency_seconds_bucket{bdev=\"Malloc0\",operation=\"read\",le=\"4.096e-06\"} 1",
            "blockd_bdev_latency_seconds_bucket{bdev=\"Malloc0\",operation=\"read\",le=\"+Inf\"} 2",
            "blockd_bdev_latency_seconds_count{bdev=\"Malloc0\",operation=\"read\"} 2",
            "blockd_vhost_frontend_connected{controller=\"vhost.0\"} 1",
            "blockd_vhost_connects_total{controller=\"vhost.0\"} 1",
            "blockd_reactor_busy_seconds_total{reactor=\"0\"} 2.0",
            "blockd_reactor_poll_mode{mode=\"adaptive\"} 1",
            "blockd_nbd_connections 0",
            "blockd_build_info{version=",
            "process_start_time_seconds 1.0",
            "process_open_fds ",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // The 3 ms read is below the 2^22 ns bound (4.19 ms) and above 2^20 ns.
        assert!(text.contains(
            "blockd_bdev_latency_seconds_bucket{bdev=\"Malloc0\",operation=\"read\",le=\"0.004194304\"} 2"
        ), "{text}");
    }
}
