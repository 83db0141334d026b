//! The generic side of an I/O channel: range checks, statistics, QoS, then the backend.
//!
//! Every operation gets a slot in a small slab (user tag, kind, bytes, start time); the
//! backend sees the slot index as its tag, so the channel can time each operation and give
//! the caller back its own tag without allocating in steady state. Operations that fail
//! validation never reach the backend: they complete with `EINVAL`/`ENOTSUP` on the next
//! [`BdevChannel::poll`]. Operations refused by QoS wait, in order, in a queue that `poll`
//! drains as tokens come back; [`BdevChannel::next_deadline`] tells the reactor when.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::histogram::ChannelHistogram;
use super::stats::{ChannelCounters, ChannelStats};
use super::{Bdev, Errno, IoChannel, IoKind, IoOp, IoResult, Lent};

/// An operation handed to the backend, indexed by the tag the backend sees.
#[derive(Clone, Copy)]
struct Slot {
    user_tag: u64,
    kind: IoKind,
    bytes: u64,
    /// Submission time, nanoseconds since the channel's `epoch`.
    start_ns: u64,
    /// A write submitted with [`BdevChannel::submit_fua`]: once it succeeds, a flush under
    /// the same user tag follows before the caller hears of it.
    then_flush: bool,
}

/// One clock reading, as an `Instant` (QoS) and as nanoseconds since the channel's epoch
/// (latency statistics: a subtraction per completion instead of `Duration` arithmetic).
#[derive(Clone, Copy)]
struct Now {
    at: Instant,
    ns: u64,
}

/// A frontend queue's handle for I/O on one bdev, opened on (and used from) one reactor.
pub struct BdevChannel {
    bdev: Arc<Bdev>,
    inner: Box<dyn IoChannel>,
    /// In-flight slots; `None` = free.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Completions decided without the backend (validation failures).
    immediate: VecDeque<(u64, IoResult)>,
    /// Operations waiting for QoS tokens, in submission order, with their FUA flag and
    /// since when they wait.
    throttled: VecDeque<(u64, IoOp, bool, Instant)>,
    /// FUA writes that completed in the last reap and now wait for their flush (scratch).
    to_flush: Vec<u64>,
    /// When the head of `throttled` may be admitted.
    retry_at: Option<Instant>,
    /// Since when this channel has had something in the backend (for `io_time`).
    busy_since: Option<Instant>,
    /// This channel's statistics, published to `counters` at each poll and kick.
    stats: ChannelStats,
    counters: Arc<ChannelCounters>,
    /// The time of this batch of submissions (one clock read per batch, reset by `kick`
    /// and `poll`): start time of the operations and QoS clock.
    batch_now: Option<Now>,
    /// Origin of the `ns` clock readings.
    epoch: Instant,
    /// This channel's latency histogram (the bdev's [`super::histogram::Histograms`]).
    hist: Arc<ChannelHistogram>,
}

impl BdevChannel {
    pub(super) fn new(bdev: Arc<Bdev>, inner: Box<dyn IoChannel>) -> Self {
        let hist = bdev.stats.histograms.open_channel();
        let counters = bdev.stats.open_channel();
        BdevChannel {
            counters,
            hist,
            bdev,
            inner,
            slots: Vec::new(),
            free: Vec::new(),
            immediate: VecDeque::new(),
            throttled: VecDeque::new(),
            to_flush: Vec::new(),
            retry_at: None,
            busy_since: None,
            stats: ChannelStats::default(),
            batch_now: None,
            epoch: Instant::now(),
        }
    }

    /// Reads the clock.
    fn clock(&self) -> Now {
        let at = Instant::now();
        Now {
            at,
            ns: at.saturating_duration_since(self.epoch).as_nanos() as u64,
        }
    }

    /// The current batch's time.
    #[inline]
    fn now(&mut self) -> Now {
        match self.batch_now {
            Some(n) => n,
            None => *self.batch_now.insert(self.clock()),
        }
    }

    /// Publishes the statistics to the bdev's readers.
    #[inline]
    fn flush_stats(&mut self) {
        if self.stats.is_dirty() {
            self.stats
                .publish(&self.counters, self.bdev.stats.extremes_gen());
        }
    }

    /// The bdev.
    pub fn bdev(&self) -> &Arc<Bdev> {
        &self.bdev
    }

    /// Why `op` cannot be sent to the backend: out of range or misaligned (`EINVAL`), or not
    /// supported by the backend (`ENOTSUP`).
    fn check(&self, op: &IoOp) -> IoResult {
        let supported = match op.kind() {
            IoKind::Read | IoKind::Write => true,
            IoKind::Flush => self.bdev.backend().io_types().flush,
            IoKind::Unmap => self.bdev.backend().io_types().unmap,
            IoKind::WriteZeroes => self.bdev.backend().io_types().write_zeroes,
        };
        if !supported {
            return Err(Errno(libc::ENOTSUP));
        }
        match op.range() {
            Some((offset, len)) => self.check_range(offset, len),
            None => Ok(()),
        }
    }

    /// `EINVAL` unless `[offset, offset + len)` is whole blocks inside the bdev.
    fn check_range(&self, offset: u64, len: u64) -> IoResult {
        let bs = self.bdev.block_size() as u64;
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.bdev.size());
        if !in_range || !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Errno(libc::EINVAL));
        }
        Ok(())
    }

    /// Whether the backend lends its memory ([`IoChannel::zcopy_supported`]).
    pub fn zcopy_supported(&self) -> bool {
        self.inner.zcopy_supported()
    }

    /// Starts a zero-copy access to `[offset, offset + len)` (SPDK's
    /// `spdk_bdev_zcopy_start`): `populate` for a read of the range, else a write. It is
    /// checked as a read or write is (a range outside the bdev or not whole blocks:
    /// `EINVAL`, counted as an error, nothing lent), admitted by QoS and counted in the
    /// statistics as a read or write of `len` bytes when it ends (as SPDK counts a zcopy
    /// by its start's direction). `None` when the caller must submit a read or write
    /// instead: the backend does not lend, or QoS holds I/O back (the submitted operation
    /// then waits its turn behind what is throttled already; a zero-copy access cannot
    /// wait, being synchronous).
    pub fn zcopy_start(
        &mut self,
        offset: u64,
        len: u64,
        populate: bool,
    ) -> Option<Result<Zcopy<'_>, Errno>> {
        if !self.inner.zcopy_supported() {
            return None;
        }
        let kind = if populate {
            IoKind::Read
        } else {
            IoKind::Write
        };
        if let Err(e) = self.check_range(offset, len) {
            self.stats.record(kind, 0, 0, false);
            return Some(Err(e));
        }
        let now = self.now();
        if !self.throttled.is_empty() || self.bdev.qos.try_admit(kind, len, now.at).is_err() {
            return None;
        }
        let lent = match self.inner.zcopy_start(offset, len, populate)? {
            Ok(l) if l.len() as u64 == len => l,
            Ok(l) => {
                tracing::error!(
                    bdev = self.bdev.name(),
                    len,
                    lent = l.len(),
                    "backend lent a wrong length"
                );
                let _ = self.inner.zcopy_end(l, false);
                self.stats.record(kind, 0, 0, false);
                return Some(Err(Errno(libc::EIO)));
            }
            Err(e) => {
                self.stats.record(kind, 0, 0, false);
                return Some(Err(e));
            }
        };
        Some(Ok(Zcopy {
            ch: self,
            lent,
            kind,
            start: now,
            ended: false,
        }))
    }

    /// Submits `op` under the caller's `tag`; out-of-range and unsupported operations
    /// complete with an error through [`BdevChannel::poll`].
    ///
    /// # Safety
    /// The buffers of `op` must stay valid until the completion of `tag` is reported.
    pub unsafe fn submit(&mut self, tag: u64, op: IoOp) {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.submit_op(tag, op, false) }
    }

    /// Submits an operation that is reported only once what it wrote is durable: forced
    /// unit access (SCSI WRITE with FUA, NBD_CMD_FLAG_FUA) and write-through caching
    /// (virtio-blk without `VIRTIO_BLK_F_CONFIG_WCE` writeback, virtio 1.2 §5.2.6.2). The
    /// channel follows a successful write, unmap or write-zeroes with a flush under the same
    /// tag when the backend has a volatile cache to flush; one completion reports both.
    /// Reads and flushes are submitted as by [`BdevChannel::submit`].
    ///
    /// # Safety
    /// As [`BdevChannel::submit`].
    pub unsafe fn submit_fua(&mut self, tag: u64, op: IoOp) {
        let writes = matches!(
            op,
            IoOp::Write { .. } | IoOp::Unmap { .. } | IoOp::WriteZeroes { .. }
        );
        let fua = writes && self.bdev.backend().io_types().flush;
        // SAFETY: the caller's promise, passed on.
        unsafe { self.submit_op(tag, op, fua) }
    }

    /// [`BdevChannel::submit`], with a flush after the write when `then_flush`.
    ///
    /// # Safety
    /// As [`BdevChannel::submit`].
    unsafe fn submit_op(&mut self, tag: u64, op: IoOp, then_flush: bool) {
        if let Err(e) = self.check(&op) {
            self.stats.record(op.kind(), 0, 0, false);
            self.immediate.push_back((tag, Err(e)));
            return;
        }
        let now = self.now();
        if !self.throttled.is_empty() {
            self.throttled.push_back((tag, op, then_flush, now.at));
            return;
        }
        let bytes = op.range().map_or(0, |r| r.1);
        match self.bdev.qos.try_admit(op.kind(), bytes, now.at) {
            // SAFETY: the caller's promise, passed on.
            Ok(()) => unsafe { self.dispatch(tag, op, then_flush, now) },
            Err(at) => {
                self.retry_at = Some(at);
                self.throttled.push_back((tag, op, then_flush, now.at));
            }
        }
    }

    /// Hands `op` to the backend under a fresh slot.
    ///
    /// # Safety
    /// As [`BdevChannel::submit`].
    unsafe fn dispatch(&mut self, user_tag: u64, op: IoOp, then_flush: bool, now: Now) {
        let slot = Slot {
            user_tag,
            kind: op.kind(),
            bytes: op.range().map_or(0, |r| r.1),
            start_ns: now.ns,
            then_flush,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        if self.busy_since.is_none() {
            self.busy_since = Some(now.at);
        }
        self.stats.add_queue_depth(1);
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.submit(idx as u64, op) };
    }

    /// Hands queued submissions to the backend.
    pub fn kick(&mut self) {
        self.batch_now = None;
        self.flush_stats();
        self.inner.kick()
    }

    /// Reports completions (and submits throttled operations whose time has come); returns
    /// how many completions were reported.
    pub fn poll(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        let mut n = 0;
        self.batch_now = None;
        while let Some((tag, r)) = self.immediate.pop_front() {
            done(tag, r);
            n += 1;
        }
        let mut now: Option<Now> = None;
        let epoch = self.epoch;
        let BdevChannel {
            bdev,
            inner,
            slots,
            free,
            stats,
            to_flush,
            hist,
            ..
        } = self;
        n += inner.reap(&mut |idx, r| {
            let Some(slot) = slots.get_mut(idx as usize).and_then(Option::take) else {
                tracing::error!(bdev = bdev.name(), idx, "backend completed an unknown tag");
                return;
            };
            free.push(idx as usize);
            let t = *now.get_or_insert_with(|| {
                let at = Instant::now();
                Now {
                    at,
                    ns: at.saturating_duration_since(epoch).as_nanos() as u64,
                }
            });
            let lat = t.ns.saturating_sub(slot.start_ns);
            stats.add_queue_depth(-1);
            stats.record(slot.kind, slot.bytes, lat, r.is_ok());
            if r.is_ok() {
                hist.tally(slot.kind, lat);
            }
            if slot.then_flush && r.is_ok() {
                to_flush.push(slot.user_tag);
            } else {
                done(slot.user_tag, r);
            }
        });
        if !self.to_flush.is_empty() {
            // Reaped, but reported only after their flush.
            n -= self.to_flush.len();
            self.flush_after_writes();
        }
        if let Some(since) = self.busy_since {
            if self.free.len() == self.slots.len() {
                let t = now.map_or_else(Instant::now, |n| n.at);
                let busy = t.saturating_duration_since(since).as_nanos() as u64;
                self.stats.add_io_time(busy);
                self.busy_since = None;
            }
        }
        // Published before the caller reports the completions to its client, so whoever
        // sees a completion also sees it counted.
        self.flush_stats();
        if !self.throttled.is_empty() {
            self.release_throttled();
        }
        n
    }

    /// Follows the FUA writes that just completed with their flushes. A flush is not
    /// throttled (QoS limits data, and the write it completes was admitted already).
    fn flush_after_writes(&mut self) {
        let now = self.clock();
        let tags = std::mem::take(&mut self.to_flush);
        for &tag in &tags {
            // SAFETY: a flush carries no buffers.
            unsafe { self.dispatch(tag, IoOp::Flush, false, now) };
        }
        self.to_flush = tags;
        self.to_flush.clear();
        self.inner.kick();
    }

    /// Submits the throttled operations QoS now admits.
    fn release_throttled(&mut self) {
        let now = self.clock();
        if self.retry_at.is_some_and(|t| t > now.at) {
            return;
        }
        let mut sent = false;
        while let Some(&(tag, op, then_flush, since)) = self.throttled.front() {
            let bytes = op.range().map_or(0, |r| r.1);
            match self.bdev.qos.try_admit(op.kind(), bytes, now.at) {
                Ok(()) => {
                    self.throttled.pop_front();
                    let waited = now.at.saturating_duration_since(since).as_nanos() as u64;
                    let s = &self.bdev.stats;
                    s.qos_throttled_ops.fetch_add(1, Relaxed);
                    s.qos_throttled_ns.fetch_add(waited, Relaxed);
                    // SAFETY: the caller of `submit` promised the buffers stay valid until
                    // the completion is reported, which has not happened yet.
                    unsafe { self.dispatch(tag, op, then_flush, now) };
                    sent = true;
                }
                Err(at) => {
                    self.retry_at = Some(at);
                    break;
                }
            }
        }
        if self.throttled.is_empty() {
            self.retry_at = None;
        }
        if sent {
            self.inner.kick();
        }
    }

    /// See [`IoChannel::completion_fd`].
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    /// Before the reactor sleeps: true when completions are ready to reap, so it must not
    /// (see [`IoChannel::arm`]). A backend without a completion fd (malloc, null) finishes
    /// at submit time: whatever it holds is ready, and nothing would wake the reactor.
    pub fn arm(&mut self) -> bool {
        self.inner.arm() || (self.inner.completion_fd().is_none() && self.inner.in_flight() > 0)
    }

    /// When throttled I/O may be submitted again (`None` when nothing waits, or when a
    /// completion is already pending and the reactor should poll now).
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.immediate.is_empty() {
            return Some(Instant::now());
        }
        // Backends without a completion fd (malloc, null) finish at submit time: what they
        // hold is ready to be reaped, and nothing would wake a sleeping reactor for it.
        if self.inner.completion_fd().is_none() && self.inner.in_flight() > 0 {
            return Some(Instant::now());
        }
        if self.throttled.is_empty() {
            None
        } else {
            self.retry_at.or_else(|| Some(Instant::now()))
        }
    }

    /// Submitted, not yet reported.
    pub fn in_flight(&self) -> usize {
        self.immediate.len() + self.throttled.len() + self.inner.in_flight()
    }

    /// Requests are in the backend whose completions need its helper threads to run
    /// ([`IoChannel::completed_by_helper_threads`]).
    pub fn awaits_helper_threads(&self) -> bool {
        self.inner.in_flight() > 0 && self.inner.completed_by_helper_threads()
    }
}

/// A zero-copy access in progress ([`BdevChannel::zcopy_start`]), between SPDK's
/// `spdk_bdev_zcopy_start` and `spdk_bdev_zcopy_end`: the backend's memory for the range,
/// lent while this lives (it borrows the channel, whose backend keeps the memory alive).
/// Dropped without [`Zcopy::end`], it counts as a failed access and commits nothing.
pub struct Zcopy<'a> {
    ch: &'a mut BdevChannel,
    lent: Lent,
    kind: IoKind,
    start: Now,
    ended: bool,
}

impl Zcopy<'_> {
    /// The lent memory: valid for reads and writes of its `len()` bytes while `self`
    /// lives; raw, as other requests may access the same bytes (see [`Lent`]).
    pub fn lent(&self) -> Lent {
        self.lent
    }

    /// Ends the access (SPDK's `spdk_bdev_zcopy_end`), `commit` when the caller wrote
    /// the range; counts it in the statistics.
    pub fn end(mut self, commit: bool) -> IoResult {
        self.finish(commit, true)
    }

    fn finish(&mut self, commit: bool, ok: bool) -> IoResult {
        self.ended = true;
        let r = self.ch.inner.zcopy_end(self.lent, commit);
        let ok = ok && r.is_ok();
        let ch = &mut *self.ch;
        let now = ch.clock();
        let lat = now.ns.saturating_sub(self.start.ns);
        ch.stats.record(self.kind, self.lent.len() as u64, lat, ok);
        if ok {
            ch.hist.tally(self.kind, lat);
        }
        // Busy for as long as the access took, unless submitted I/O counts that time.
        if ch.busy_since.is_none() {
            ch.stats.add_io_time(lat);
        }
        if ok {
            r
        } else {
            r.and(Err(Errno(libc::EIO)))
        }
    }
}

impl Drop for Zcopy<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.finish(false, false);
        }
    }
}

impl Drop for BdevChannel {
    fn drop(&mut self) {
        self.flush_stats();
        self.bdev.stats.close_channel(&self.counters);
        self.bdev.stats.histograms.close_channel(&self.hist);
    }
}

/// Helpers for the backends' tests: real buffers, real channels, bounded waits.
#[cfg(test)]
pub(crate) mod test_support {
    use std::time::{Duration, Instant};

    use super::BdevChannel;
    use crate::bdev::{IoOp, IoResult};

    /// The error of `r` (for results whose `Ok` type is not `Debug`, such as `Arc<Bdev>`).
    pub fn err<T, E>(r: Result<T, E>) -> E {
        match r {
            Err(e) => e,
            Ok(_) => panic!("expected an error"),
        }
    }

    /// An iovec over `buf`.
    pub fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    /// Submits and kicks.
    ///
    /// # Safety
    /// As [`BdevChannel::submit`].
    pub unsafe fn submit(ch: &mut BdevChannel, tag: u64, op: IoOp) {
        // SAFETY: the caller upholds `BdevChannel::submit`'s contract (`# Safety`).
        unsafe { ch.submit(tag, op) };
        ch.kick();
    }

    /// Polls until `n` completions arrived (10 s at most, then panics), sleeping on the
    /// completion fd when the channel has one.
    pub fn reap_all(ch: &mut BdevChannel, n: usize) -> Vec<(u64, IoResult)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            ch.poll(&mut |t, r| out.push((t, r)));
            if out.len() >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out: {} of {n} completions",
                out.len()
            );
            if ch.arm() {
                continue;
            }
            if let Some(fd) = ch.completion_fd() {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 10) };
            } else {
                std::thread::yield_now();
            }
        }
        assert_eq!(ch.in_flight(), 0);
        out
    }
}
