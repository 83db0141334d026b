//! Closing every rbd image and cluster connection when the daemon exits.
//!
//! A process that exits with an image open leaves its header watch behind: the OSDs keep
//! listing it in `rbd status` until it times out (`osd_client_watch_timeout`, 30 s), and
//! `rbd rm` or another client's exclusive lock wait for it. So at shutdown, once the
//! controllers are stopped and the reactors have dropped their channels, every image is
//! closed (`rbd_close`) and every connection shut down (`rados_shutdown`). An unreachable
//! cluster can block those calls for good: they run on a helper thread that the daemon
//! waits for at most [`SHUTDOWN_TIMEOUT`], then logs and exits anyway.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::RbdState;

/// How long daemon shutdown waits for the cluster to acknowledge the closes.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `f` on a helper thread and waits up to `timeout` for its result; `None` (logged,
/// naming `what`) when it did not finish in time. The thread is then left to finish or
/// block on its own; `f` must own what it uses.
pub(super) fn bounded<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("rbd-close".into())
        .spawn(move || {
            // After the timeout nobody waits for the result: dropping it is the point.
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        tracing::warn!("{what}: cannot start a helper thread: {e}");
        return None;
    }
    match rx.recv_timeout(timeout) {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::warn!("{what}: not done after {timeout:?} (cluster unreachable?): giving up");
            None
        }
    }
}

impl RbdState {
    /// Closes every rbd image and every registered cluster connection (bounded by
    /// `timeout`), at the end of `App::shutdown`. Call after the reactors have stopped: an
    /// image still used by a channel is left open (and logged). The rbd bdevs and clusters
    /// are gone from the state afterwards.
    pub fn shutdown(&self, timeout: Duration) {
        let entries: Vec<_> = std::mem::take(&mut *self.lock()).into_values().collect();
        let clusters = self.clusters.take_all();
        if entries.is_empty() && clusters.is_empty() {
            return;
        }
        let (n_images, n_clusters) = (entries.len(), clusters.len());
        let start = Instant::now();
        let done = bounded(
            "closing rbd images and cluster connections",
            timeout,
            move || {
                for e in entries {
                    e.shared.close_image();
                }
                // The images held their cluster connection: each is now the last user.
                for (name, conns) in clusters {
                    for conn in conns {
                        if let Err(conn) = Arc::try_unwrap(conn) {
                            tracing::warn!(
                            "cluster {name}: connection still used ({} references): not shut down",
                            Arc::strong_count(&conn) - 1
                        );
                        }
                    }
                }
            },
        );
        if done.is_some() {
            tracing::info!(
                images = n_images,
                clusters = n_clusters,
                elapsed_ms = start.elapsed().as_millis() as u64,
                "rbd images and cluster connections closed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_returns_the_result_or_gives_up() {
        assert_eq!(bounded("quick", Duration::from_secs(5), || 7), Some(7));
        let (tx, rx) = mpsc::channel::<()>();
        let start = Instant::now();
        // Blocks until the test drops `tx`, long after the timeout.
        let r = bounded("stuck", Duration::from_millis(50), move || {
            rx.recv().is_ok()
        });
        assert_eq!(r, None);
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(tx);
    }
}
