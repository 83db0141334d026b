//! The registry of live NBD connections: what the server and the RPC methods know of each
//! connection (its reactor, peer, export) and the switch that asks it to close. The
//! connection itself lives on its reactor; stopping it is a request it notices on its next
//! poll, so every stop wakes the reactor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::export::Exports;
use crate::reactor::Reactors;
use crate::sync::lock;

/// What the server knows about a live connection.
pub struct ConnEntry {
    /// Reactor serving it.
    pub core: usize,
    /// Peer description for logs and `nbd_get_exports`.
    pub peer: String,
    /// Set to ask the connection to close (it notices on its next poll).
    pub stop: AtomicBool,
    /// Export the client attached to, once in transmission.
    pub export: Mutex<Option<String>>,
}

/// Live connections by id.
#[derive(Default)]
pub struct Conns {
    map: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    next: AtomicU64,
}

impl Conns {
    /// Records a new connection served on `core`.
    pub fn register(&self, core: usize, peer: String) -> (u64, Arc<ConnEntry>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let e = Arc::new(ConnEntry {
            core,
            peer,
            stop: AtomicBool::new(false),
            export: Mutex::new(None),
        });
        lock(&self.map).insert(id, e.clone());
        (id, e)
    }

    /// Forgets a connection (it is gone).
    pub fn unregister(&self, id: u64) {
        lock(&self.map).remove(&id);
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks every connection `pick` selects to close and wakes its reactor; returns their ids.
    pub fn stop_where(&self, reactors: &Reactors, pick: impl Fn(&ConnEntry) -> bool) -> Vec<u64> {
        let chosen: Vec<(u64, usize)> = lock(&self.map)
            .iter()
            .filter(|(_, e)| pick(e))
            .map(|(id, e)| {
                e.stop.store(true, Ordering::Release);
                (*id, e.core)
            })
            .collect();
        for (_, core) in &chosen {
            // An empty message wakes a sleeping reactor, which then polls every poller.
            reactors.run(*core, |_| {});
        }
        chosen.into_iter().map(|(id, _)| id).collect()
    }

    /// Waits until none of `ids` is live; false on timeout.
    pub fn wait_gone(&self, ids: &[u64], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if ids.iter().all(|id| !lock(&self.map).contains_key(id)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// What a connection shares with the server.
pub struct ConnCtx {
    pub exports: Arc<Exports>,
    pub conns: Arc<Conns>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_and_forget() {
        let conns = Conns::default();
        let (a, ea) = conns.register(0, "a".into());
        let (b, _) = conns.register(1, "b".into());
        assert_ne!(a, b);
        assert_eq!((conns.len(), ea.core, ea.peer.as_str()), (2, 0, "a"));
        assert!(!conns.wait_gone(&[a, b], Duration::ZERO));
        conns.unregister(a);
        assert!(conns.wait_gone(&[a], Duration::ZERO));
        assert!(!conns.wait_gone(&[a, b], Duration::ZERO));
        conns.unregister(b);
        assert!(conns.is_empty());
    }
}
