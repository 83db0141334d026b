//! The application's side of the metrics exporter: fills a [`metrics::Snapshot`] from the
//! daemon's state at each scrape (control thread; the reactors are not involved).

use crate::bdev::histogram::KINDS;
use crate::metrics::{
    self, BdevSample, ControllerSample, KindSample, NbdSample, QueueSample, ReactorSample,
};
use crate::reactor::PollMode;

use super::App;

impl metrics::Source for App {
    fn snapshot(&self) -> metrics::Snapshot {
        let bdevs: Vec<BdevSample> = self
            .bdevs
            .list()
            .iter()
            .map(|b| {
                let s = &b.stats;
                let t = s.totals();
                let kinds = KINDS
                    .iter()
                    .map(|&k| {
                        let k = t.kind(k);
                        KindSample {
                            ops: k.ops,
                            bytes: k.bytes,
                            latency_ns: k.lat_sum,
                        }
                    })
                    .collect();
                let l =
                    |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
                BdevSample {
                    name: b.name().to_string(),
                    product: b.backend().product_name().to_string(),
                    kinds,
                    errors: t.io_errors,
                    queue_depth: t.queue_depth,
                    io_time_ns: t.io_time,
                    qos_throttled_ops: l(&s.qos_throttled_ops),
                    qos_throttled_ns: l(&s.qos_throttled_ns),
                    histogram: s.histograms.snapshot(),
                }
            })
            .collect();
        let controllers = self
            .vhost
            .list()
            .iter()
            .map(|c| {
                let (connects, disconnects) = c.connections();
                ControllerSample {
                    name: c.name.clone(),
                    connected: c.connected(),
                    connects,
                    disconnects,
                    interrupts_held_back: c.coalescing.held(),
                    queues: c
                        .queue_counts()
                        .into_iter()
                        .map(|(queue, q)| QueueSample {
                            queue,
                            requests: q.requests,
                            kicks: q.kicks,
                            interrupts: q.interrupts,
                            in_flight: q.in_flight,
                        })
                        .collect(),
                }
            })
            .collect();
        let reactors = self
            .reactors
            .stats()
            .into_iter()
            .map(|r| ReactorSample {
                core: r.core,
                busy_ns: r.busy_ns,
                idle_ns: r.idle_ns,
                sleeping: r.sleeping,
                sleeps: r.sleeps,
                wakeups: r.wakeups,
                pollers: r.pollers,
            })
            .collect();
        let poll_mode = match self.reactors.poll_mode() {
            PollMode::Always => "always",
            PollMode::Adaptive => "adaptive",
            PollMode::Never => "never",
        };
        let nbd = NbdSample {
            connections: self.nbd.connections(),
            exports: self
                .nbd
                .exports()
                .list()
                .iter()
                .map(|e| (e.name.clone(), e.clients()))
                .collect(),
            disks: self
                .nbd
                .disks_json(None)
                .ok()
                .and_then(|v| v.as_array().map(Vec::len))
                .unwrap_or(0),
        };
        let rbd_bdevs = self
            .rbd
            .names()
            .into_iter()
            .filter_map(|n| {
                let b = self.rbd.get(&n)?;
                let q = b.stats.totals().queue_depth;
                Some((n, q))
            })
            .collect();
        metrics::Snapshot {
            bdevs,
            controllers,
            reactors,
            poll_mode: poll_mode.to_string(),
            nbd,
            rbd_clusters: self.rbd.clusters.connection_counts(),
            rbd_bdevs,
        }
    }
}
