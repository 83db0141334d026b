//! The ring plumbing every virtqueue poller shares, whatever its device: the split
//! virtqueue (virtio 1.2 §2.7) with the guest memory it lives in, the kick and call
//! eventfds of vhost-user (vhost-user.rst "Ring states"), notification suppression around
//! the reactor's sleeps, and the answer to GET_VRING_BASE when the poller goes away.
//!
//! The request queues run on [`crate::vhost::engine::Engine`], which adds the slots, the
//! memory generations and the completion path; the scsi control and event queues use a
//! `Vring` directly.
//!
//! When the rings lie inside single memory regions (always, with QEMU and libblkio), the
//! hot-path accessors go through a [`RingView`] of pre-translated pointers; otherwise
//! through virtio-queue's `Queue`, which owns the ring state either way.
//!
//! A request queue with in-flight tracking ([`Vring::track_inflight`]) records every chain
//! it takes and returns in the shared region (vhost-user.rst "Inflight I/O tracking"):
//! here, where chains are taken and the used index is published, so that the order the
//! spec requires holds on every path.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::vhost::coalescing::{Coalescing, STATS_INTERVAL};
use crate::vhost::device::{GuestMem, QueueSetup};
use crate::vhost::guest_map::GuestMap;
use crate::vhost::guest_stream::Desc;
use crate::vhost::inflight::QueueInflight;
use crate::vhost::split_ring::{need_event, ChainError, RingView};

/// At most this many chains are popped per poll, so that one busy queue does not starve
/// the other pollers of its reactor.
pub const POP_BUDGET: usize = 128;

/// One virtqueue as a poller sees it. Dropping it sends the ring's next available index
/// on the `stopped` channel (the value GET_VRING_BASE returns to the frontend).
pub struct Vring {
    index: u16,
    queue: Queue,
    mem: GuestMem,
    kick: EventFd,
    call: Option<EventFd>,
    stopped: Sender<u16>,
    /// The frontend asked for the ring back (GET_VRING_BASE): the poller pops no more chains.
    stopping: bool,
    /// The memory table `map` and `view` were built from, held so that their pointers
    /// stay valid (and no other table can reuse its address) until the next one.
    map_of: Option<Arc<GuestMemoryMmap>>,
    map: GuestMap,
    view: Option<RingView>,
    /// Used entries added since the last [`Vring::notify_guest`] (for EVENT_IDX).
    added: u16,
    /// Used elements written through `view` whose index is not published yet: a poll pass
    /// publishes its completions once, in [`Vring::notify_guest`], so the cache line the
    /// driver polls (`used->idx`) moves between CPUs once per batch, not once per request.
    unpublished: bool,
    /// The last `avail->idx` read (and checked): chains up to it are taken without reading
    /// the index again, which the driver's CPU keeps writing (Linux's vhost does the same).
    avail_seen: u16,
    /// An invalid `avail->idx` was already logged.
    bad_avail_logged: bool,
    /// The controller's interrupt coalescing, and this queue's state of it.
    coalescing: Arc<Coalescing>,
    irq: IrqPacing,
    /// In-flight tracking, for request queues whose frontend shares the region.
    tracking: Option<Tracking>,
}

/// A request queue's in-flight tracking ([`crate::vhost::inflight`]).
struct Tracking {
    part: QueueInflight,
    /// The counter the next chain taken gets: the order of the chains in flight.
    counter: u64,
    /// Heads whose used elements are written and not yet committed to the region.
    batch: Vec<u16>,
    /// Heads a previous instance left in flight, taken again before the ring (last first).
    resubmit: Vec<u16>,
}

/// A queue's interrupt pacing under [`Coalescing`].
struct IrqPacing {
    /// Shortest time between two notifications, from the last interval's rate.
    delay: Duration,
    /// No notification before this.
    next: Option<Instant>,
    /// A wanted notification is being held back until `next`.
    deferred: bool,
    /// Start of the current rate interval and the chains returned in it.
    interval_start: Instant,
    interval_count: u32,
}

impl Vring {
    /// Takes over the ring the frontend has set up.
    pub fn new(setup: QueueSetup) -> Self {
        let setup_next_avail = setup.queue.next_avail();
        Vring {
            index: setup.index,
            queue: setup.queue,
            mem: setup.mem,
            kick: setup.kick,
            call: setup.call,
            stopped: setup.stopped,
            stopping: false,
            map_of: None,
            map: GuestMap::default(),
            view: None,
            added: 0,
            unpublished: false,
            avail_seen: setup_next_avail,
            bad_avail_logged: false,
            coalescing: setup.coalescing,
            irq: IrqPacing {
                delay: Duration::ZERO,
                next: None,
                deferred: false,
                interval_start: Instant::now(),
                interval_count: 0,
            },
            tracking: None,
        }
    }

    /// Records the chains this ring takes and returns in `part` (a request queue of a
    /// frontend with INFLIGHT_SHMFD). Before anything new is taken: completes the commit
    /// of a batch the previous instance had published, queues the heads it left in flight
    /// for resubmission (counter order, [`Vring::pop_head`] hands them out first), and
    /// resumes the ring after them: at the used index plus the chains in flight (every
    /// chain taken is either returned or in flight), which is where the previous instance
    /// was, whatever base the frontend restored (QEMU restores the used index after a
    /// disconnection).
    pub fn track_inflight(&mut self, part: QueueInflight) {
        let size = self.queue.size();
        if size > part.capacity() {
            tracing::warn!(
                queue = self.index,
                size,
                capacity = part.capacity(),
                "ring larger than its in-flight region: not tracked"
            );
            return;
        }
        let used = self.queue.next_used();
        let r = part.resume(size, used);
        if !r.fresh {
            let next = used.wrapping_add(r.resubmit.len() as u16);
            tracing::info!(
                queue = self.index,
                resubmit = r.resubmit.len(),
                fixed_up = r.fixed_up,
                used,
                base = self.queue.next_avail(),
                next_avail = next,
                "resuming the ring from its in-flight region"
            );
            self.queue.set_next_avail(next);
            self.avail_seen = next;
            // Completions the previous instance published may never have been signalled.
            self.signal();
        }
        let mut resubmit = r.resubmit;
        resubmit.reverse();
        self.tracking = Some(Tracking {
            part,
            counter: r.next_counter,
            batch: Vec::with_capacity(usize::from(size)),
            resubmit,
        });
    }

    /// Whether heads left in flight by a previous instance still wait to be taken again
    /// (a stopping ring takes them all the same: they are already off the ring).
    pub fn has_resubmits(&self) -> bool {
        self.tracking
            .as_ref()
            .is_some_and(|t| !t.resubmit.is_empty())
    }

    /// The same ring, never held back by the controller's interrupt coalescing (control
    /// and event queues).
    pub fn without_coalescing(mut self) -> Self {
        self.coalescing = Arc::default();
        self
    }

    /// Rebuilds the pre-translated memory table and ring view when `mem` is not the memory
    /// they were built from, and keeps `mem` mapped while they point into it.
    pub fn sync_mem(&mut self, mem: &Arc<GuestMemoryMmap>) {
        if self.map_of.as_ref().is_some_and(|m| Arc::ptr_eq(m, mem)) {
            return;
        }
        // Through the old view, while the memory it points into is still held.
        self.publish_used();
        // SAFETY: `map_of` below keeps `mem` mapped until the next `sync_mem` replaces `map`
        // and `view` with it, and through `drop` (which publishes via `view`).
        self.map = unsafe { GuestMap::new(mem) };
        self.view = RingView::new(&self.queue, &self.map);
        self.avail_seen = self.queue.next_avail();
        self.map_of = Some(mem.clone());
    }

    /// The memory table of the last [`Vring::sync_mem`].
    pub fn map(&self) -> &GuestMap {
        &self.map
    }

    /// Whether the pre-translated path ([`Vring::pop_head`], [`Vring::read_chain`]) is
    /// available for the memory of the last [`Vring::sync_mem`].
    pub fn has_view(&self) -> bool {
        self.view.is_some()
    }

    /// The head of the next chain to process: first the heads a previous instance left
    /// in flight ([`Vring::track_inflight`]), then the next available chain (§2.7.6),
    /// through the ring view, recorded in flight. None when the ring is empty or stopping,
    /// there is no view, or `avail->idx` is more than a ring ahead (a broken driver:
    /// nothing is taken until it fixes the index).
    #[inline]
    pub fn pop_head(&mut self) -> Option<u16> {
        if let Some(t) = &mut self.tracking {
            if let Some(h) = t.resubmit.pop() {
                return Some(h);
            }
        }
        if self.stopping {
            return None;
        }
        let size = self.view.as_ref()?.size();
        let next = self.queue.next_avail();
        let cached = self.avail_seen.wrapping_sub(next);
        if cached == 0 || cached > size {
            self.avail_seen = self.read_avail_idx(next)?;
        }
        let head = self.view.as_ref()?.avail_entry(next);
        self.queue.set_next_avail(next.wrapping_add(1));
        self.mark_inflight(head);
        Some(head)
    }

    /// Chain `head` was taken from the ring (vhost-user.rst: its counter, then inflight).
    #[inline]
    fn mark_inflight(&mut self, head: u16) {
        if let Some(t) = &mut self.tracking {
            t.part.mark(head, t.counter);
            t.counter = t.counter.wrapping_add(1);
        }
    }

    /// `avail->idx` when it is ahead of `next` by at most a ring; None when the ring is
    /// empty or the index is out of range (logged once).
    fn read_avail_idx(&mut self, next: u16) -> Option<u16> {
        let view = self.view.as_ref()?;
        let idx = view.avail_idx();
        if idx == next {
            return None;
        }
        if idx.wrapping_sub(next) > view.size() {
            if !self.bad_avail_logged {
                self.bad_avail_logged = true;
                tracing::warn!(
                    queue = self.index,
                    idx,
                    next,
                    "available index out of range"
                );
            }
            return None;
        }
        Some(idx)
    }

    /// Copies the descriptors of chain `head` into `out` through the ring view (see
    /// [`RingView::read_chain`]).
    pub fn read_chain(&self, head: u16, max: usize, out: &mut Vec<Desc>) -> Result<(), ChainError> {
        match &self.view {
            Some(v) => v.read_chain(&self.map, head, max, out),
            None => Err(ChainError::Empty),
        }
    }

    /// The queue's index within its device (for log context).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue size (how many requests can be in flight at most).
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Stops taking chains: the frontend wants the ring back (GET_VRING_BASE); the
    /// poller finishes what it took, then is dropped.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    /// True once [`Vring::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// The guest memory, swapped by the frontend when it adds or removes regions.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// The next available chain, read from `mem` (the memory the caller keeps mapped for
    /// as long as it uses the chain's buffers); None when the ring is stopping. Heads left
    /// in flight by a previous instance cannot be read this way (virtio-queue builds chains
    /// only from the available ring): they are logged and stay unanswered, so a frontend
    /// that places a request ring across memory regions loses them after a crash.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        if let Some(t) = &mut self.tracking {
            if !t.resubmit.is_empty() {
                tracing::error!(
                    queue = self.index,
                    heads = ?t.resubmit,
                    "cannot resubmit requests left in flight: the ring is not inside one memory region"
                );
                t.resubmit.clear();
            }
        }
        if self.stopping {
            return None;
        }
        let chain = self.queue.pop_descriptor_chain(mem)?;
        self.mark_inflight(chain.head_index());
        Some(chain)
    }

    /// Returns chain `head` to the driver with `len` bytes written (§2.7.8); a failure
    /// (the frontend broke the ring) is logged as "cannot return `what`". The driver sees
    /// it after the next [`Vring::notify_guest`], which every poll pass that adds used
    /// chains ends with (or when the poller is dropped).
    ///
    /// With in-flight tracking, the spec's order: the used element, then the head joins
    /// the region's last batch; the used index is published; then the batch's heads are
    /// cleared and the region records the index ([`Vring::publish_used`]).
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32, what: &str) {
        match &self.view {
            Some(view) if head < view.size() => {
                let next = self.queue.next_used();
                view.write_used(next, head, len);
                self.queue.set_next_used(next.wrapping_add(1));
                self.unpublished = true;
                if let Some(t) = &mut self.tracking {
                    t.part.batch_add(head);
                    t.batch.push(head);
                }
            }
            _ => {
                // virtio-queue publishes the index with the element: the head joins the
                // batch first, and the batch (with any element written before through the
                // view, which this index covers too) is committed at once.
                if let Some(t) = &mut self.tracking {
                    t.part.batch_add(head);
                    t.batch.push(head);
                }
                if let Err(e) = self.queue.add_used(mem, head, len) {
                    if let Some(t) = &mut self.tracking {
                        t.batch.pop();
                    }
                    tracing::warn!(queue = self.index, "cannot return {what}: {e}");
                    return;
                }
                self.commit_inflight();
            }
        }
        self.added = self.added.wrapping_add(1);
    }

    /// Makes the used elements written since the last call visible to the driver, then
    /// commits them to the in-flight region.
    fn publish_used(&mut self) {
        if std::mem::take(&mut self.unpublished) {
            if let Some(view) = &self.view {
                view.publish_used(self.queue.next_used());
            }
            self.commit_inflight();
        }
    }

    /// The used index covers the batch: its heads are no longer in flight.
    fn commit_inflight(&mut self) {
        if let Some(t) = &mut self.tracking {
            t.part.commit(&t.batch, self.queue.next_used());
            t.batch.clear();
        }
    }

    /// Raises the guest interrupt after a batch of used chains if the driver wants one
    /// (§2.7.10 with EVENT_IDX, §2.7.7 without); when unsure, it does. Under interrupt
    /// coalescing a wanted interrupt may be held back until [`Vring::irq_deadline`]; the
    /// poller then calls this again once [`Vring::irq_due`].
    pub fn notify_guest(&mut self, mem: &GuestMemoryMmap) {
        self.notify(mem, Instant::now);
    }

    /// [`Vring::notify_guest`] at a given time (tests).
    #[cfg(test)]
    fn notify_guest_at(&mut self, mem: &GuestMemoryMmap, now: Instant) {
        self.notify(mem, || now);
    }

    /// `now` is only asked for under coalescing.
    fn notify(&mut self, mem: &GuestMemoryMmap, now: impl FnOnce() -> Instant) {
        if self.added == 0 {
            return;
        }
        self.publish_used();
        // The used entries must be visible before used_event is read (§2.7.10).
        fence(Ordering::SeqCst);
        let added = self.added;
        let wanted = if self.queue.event_idx_enabled() {
            let new = self.queue.next_used();
            let used_event = match &self.view {
                Some(v) => Some(v.used_event()),
                None => {
                    let off = 4 + 2 * u64::from(self.queue.size());
                    self.queue
                        .avail_ring()
                        .checked_add(off)
                        .and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok())
                        .map(u16::from_le)
                }
            };
            used_event.is_none_or(|e| need_event(e, new, new.wrapping_sub(added)))
        } else {
            true
        };
        // At most a ring's worth of completions per interrupt: that also keeps `added`
        // far from wrapping, which would break the used_event test above.
        if wanted && self.coalescing.enabled() && added < self.queue.size() && self.hold_irq(now())
        {
            // `added` stays: the next attempt judges used_event over the whole range.
            return;
        }
        self.added = 0;
        self.irq.deferred = false;
        self.irq.interval_count = self.irq.interval_count.saturating_add(u32::from(added));
        if wanted {
            self.signal();
        }
    }

    /// Whether the interrupt must wait (coalescing on: [`Coalescing`]); re-evaluates the
    /// queue's rate once per [`STATS_INTERVAL`].
    fn hold_irq(&mut self, now: Instant) -> bool {
        let irq = &mut self.irq;
        let elapsed = now.duration_since(irq.interval_start);
        if elapsed >= STATS_INTERVAL {
            // Chains per interval, also after a long quiet time or with coalescing just on.
            let per_interval =
                u128::from(irq.interval_count) * STATS_INTERVAL.as_nanos() / elapsed.as_nanos();
            irq.delay = self
                .coalescing
                .delay(u32::try_from(per_interval).unwrap_or(u32::MAX));
            irq.interval_start = now;
            irq.interval_count = 0;
        }
        if irq.next.is_some_and(|t| now < t) {
            if !irq.deferred {
                self.coalescing.note_held();
            }
            irq.deferred = true;
            return true;
        }
        irq.next = (!irq.delay.is_zero()).then(|| now + irq.delay);
        false
    }

    /// When a held-back interrupt is due (None when none is held back): the poller must
    /// not sleep past it.
    pub fn irq_deadline(&self) -> Option<Instant> {
        self.irq.next.filter(|_| self.irq.deferred)
    }

    /// Whether a held-back interrupt is due now (reads the clock only when one is held).
    #[inline]
    pub fn irq_due(&self) -> bool {
        self.irq_deadline().is_some_and(|t| Instant::now() >= t)
    }

    #[cfg(test)]
    fn irq_due_at(&self, now: Instant) -> bool {
        self.irq_deadline().is_some_and(|t| now >= t)
    }

    /// Raises the guest interrupt (writes the call eventfd, when the frontend gave one).
    fn signal(&self) {
        if let Some(call) = &self.call {
            // The eventfd write fails only when the counter would overflow, i.e. it is already signalled.
            let _ = call.write(1);
        }
    }

    /// Asks the driver for kicks before the reactor sleeps; true when chains arrived since
    /// the last pop (with EVENT_IDX, avail_event is set to our position first, §2.7.10),
    /// so the poller must not sleep. A stopping ring is not armed: it takes no more chains.
    pub fn arm(&mut self) -> bool {
        if self.stopping {
            return false;
        }
        let mem = self.mem.memory();
        self.queue.enable_notification(&*mem).unwrap_or(true)
    }

    /// Stops the driver's kicks while the poller runs, and drains the kick eventfd.
    pub fn disarm(&mut self) {
        let mem = self.mem.memory();
        // Both best effort: a failed disable (a bad ring address, which the next pop meets
        // too) costs only extra kicks, and an empty kick eventfd reads EAGAIN.
        let _ = self.queue.disable_notification(&*mem);
        let _ = self.kick.read();
    }

    /// The kick eventfd, which wakes the reactor when the driver makes chains available.
    pub fn wake_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// The underlying queue (tests look at its indexes).
    #[cfg(test)]
    pub fn queue(&self) -> &Queue {
        &self.queue
    }
}

impl Drop for Vring {
    fn drop(&mut self) {
        self.publish_used();
        if self.irq.deferred {
            self.signal();
        }
        // Let go of guest memory before answering: the session unmaps the regions nobody
        // holds once the ring has answered (GET_VRING_BASE, disconnection), and forgets the
        // mappings a ring still holds then.
        self.view = None;
        self.map = GuestMap::default();
        self.map_of = None;
        // Nobody waits for the stop position when the receiver is gone.
        let _ = self.stopped.send(self.queue.next_avail());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use vm_memory::GuestMemoryAtomic;

    use super::*;

    const SIZE: u16 = 16;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// A ring of `SIZE` entries at 0 in 64 KiB of guest memory, with its `Vring`.
    fn ring() -> (Arc<GuestMemoryMmap>, Vring, mpsc::Receiver<u16>) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        ring_on(GuestMemoryAtomic::new(m), 0, 0)
    }

    /// A `Vring` over the ring in `mem`, started at `base` with used index `used` (as the
    /// session starts one: the used index read from the ring).
    fn ring_on(
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        base: u16,
        used: u16,
    ) -> (Arc<GuestMemoryMmap>, Vring, mpsc::Receiver<u16>) {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_next_avail(base);
        q.set_next_used(used);
        q.set_size(SIZE);
        q.try_set_desc_table_address(GuestAddress(0)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        let (tx, rx) = mpsc::channel();
        let mut vring = Vring::new(QueueSetup {
            index: 0,
            queue: q,
            mem: mem.clone(),
            kick: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
            call: None,
            stopped: tx,
            coalescing: Arc::default(),
            inflight: None,
            in_flight: Default::default(),
        });
        let m = mem.memory().into_inner();
        vring.sync_mem(&m);
        assert!(vring.has_view());
        (m, vring, rx)
    }

    /// The driver puts `head` in avail slot `pos` (§2.7.6), without moving the index.
    fn put_avail(m: &GuestMemoryMmap, pos: u16, head: u16) {
        let at = AVAIL + 4 + 2 * u64::from(pos % SIZE);
        m.write_obj(head.to_le(), GuestAddress(at)).unwrap();
    }

    fn set_avail_idx(m: &GuestMemoryMmap, idx: u16) {
        m.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_idx(m: &GuestMemoryMmap) -> u16 {
        u16::from_le(m.read_obj(GuestAddress(USED + 2)).unwrap())
    }

    #[test]
    fn pop_head_takes_what_the_last_index_read_covers_and_refuses_a_wild_index() {
        let (m, mut vring, _rx) = ring();
        assert_eq!(vring.pop_head(), None);
        put_avail(&m, 0, 3);
        put_avail(&m, 1, 5);
        set_avail_idx(&m, 2);
        assert_eq!(vring.pop_head(), Some(3));
        // Made available after the index was read: taken once the cached ones are gone.
        put_avail(&m, 2, 7);
        set_avail_idx(&m, 3);
        assert_eq!(vring.pop_head(), Some(5));
        assert_eq!(vring.pop_head(), Some(7));
        assert_eq!(vring.pop_head(), None);
        assert_eq!(vring.queue().next_avail(), 3);

        // An index more than a ring ahead: nothing is taken until the driver fixes it.
        set_avail_idx(&m, 3 + SIZE + 1);
        assert_eq!(vring.pop_head(), None);
        assert_eq!(vring.queue().next_avail(), 3);
        put_avail(&m, 3, 9);
        set_avail_idx(&m, 4);
        assert_eq!(vring.pop_head(), Some(9));
        assert_eq!(vring.pop_head(), None);
    }

    /// Interrupts written to the call eventfd since the last look.
    fn calls(vring: &Vring) -> u64 {
        vring.call.as_ref().and_then(|c| c.read().ok()).unwrap_or(0)
    }

    #[test]
    fn coalescing_holds_interrupts_back_past_the_rate_threshold() {
        let (m, mut vring, _rx) = ring();
        vring.call = Some(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        let t0 = vring.irq.interval_start;
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut head = 0u16;
        let mut complete = |vring: &mut Vring, n: u16| {
            for _ in 0..n {
                vring.add_used(&m, head % SIZE, 0, "a test chain");
                head = head.wrapping_add(1);
            }
        };

        // Off (the default): every batch is signalled at once.
        complete(&mut vring, 3);
        vring.notify_guest_at(&m, ms(1));
        assert_eq!(calls(&vring), 1);

        // On: 100 µs base past 100 IOPS (one chain per 10 ms interval).
        vring.coalescing.set(100, 100).unwrap();
        complete(&mut vring, 97);
        vring.notify_guest_at(&m, ms(5));
        assert_eq!(calls(&vring), 1, "no rate measured yet: no delay");
        // 100 chains in 11 ms = 90 per interval: 100 µs × (90 − 1) / 1 = 8.9 ms apart.
        complete(&mut vring, 1);
        vring.notify_guest_at(&m, ms(11));
        assert_eq!(calls(&vring), 1);
        assert_eq!(vring.irq.delay, Duration::from_micros(8_900));
        complete(&mut vring, 2);
        vring.notify_guest_at(&m, ms(15));
        assert_eq!(calls(&vring), 0, "held back");
        assert_eq!(used_idx(&m), 103, "the chains are published all the same");
        complete(&mut vring, 1);
        vring.notify_guest_at(&m, ms(16));
        assert_eq!(calls(&vring), 0, "still held back");
        assert_eq!(
            vring.coalescing.held(),
            1,
            "one interrupt held, however often asked"
        );
        assert_eq!(
            vring.irq_deadline(),
            Some(ms(11) + Duration::from_micros(8_900))
        );
        assert!(!vring.irq_due_at(ms(19)));
        assert!(vring.irq_due_at(ms(20)));
        vring.notify_guest_at(&m, ms(20));
        assert_eq!(calls(&vring), 1, "sent once due");
        assert_eq!(vring.irq_deadline(), None);

        // Held back again, until a whole ring's worth waits: then at once.
        complete(&mut vring, 1);
        vring.notify_guest_at(&m, ms(21));
        assert_eq!(calls(&vring), 0);
        complete(&mut vring, SIZE - 1);
        vring.notify_guest_at(&m, ms(22));
        assert_eq!(
            calls(&vring),
            1,
            "a ring's worth of completions is not held back"
        );
        assert_eq!(vring.coalescing.held(), 2);

        // Off again: at once.
        vring.coalescing.set(0, 100).unwrap();
        complete(&mut vring, 1);
        vring.notify_guest_at(&m, ms(23));
        assert_eq!(calls(&vring), 1);
    }

    #[test]
    fn used_chains_are_published_once_per_batch_and_when_the_ring_goes() {
        let (m, mut vring, rx) = ring();
        vring.add_used(&m, 3, 512, "a test chain");
        vring.add_used(&m, 5, 1, "a test chain");
        let elem = |i: u64| -> (u32, u32) {
            let at = USED + 4 + 8 * i;
            (
                m.read_obj(GuestAddress(at)).unwrap(),
                m.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        };
        assert_eq!(elem(0), (3, 512));
        assert_eq!(elem(1), (5, 1));
        assert_eq!(used_idx(&m), 0, "not published before notify_guest");
        vring.notify_guest(&m);
        assert_eq!(used_idx(&m), 2);

        vring.add_used(&m, 7, 0, "a test chain");
        assert_eq!(used_idx(&m), 2);
        drop(vring);
        assert_eq!(used_idx(&m), 3, "a dropped ring publishes what it returned");
        assert_eq!(
            rx.recv().unwrap(),
            0,
            "GET_VRING_BASE answer: next available index"
        );
    }

    /// A ring with in-flight tracking killed (no Drop: nothing published at exit) with
    /// requests in flight that completed out of order, and a new instance on the same
    /// memory and region: it resubmits the unfinished heads first, in the order they were
    /// taken, and resumes the ring after them, whatever base the frontend restored.
    #[test]
    fn a_new_instance_resubmits_what_a_killed_one_left_in_flight() {
        use crate::vhost::inflight::InflightRegion;
        let (region, _fd, _msg) = InflightRegion::create(1, SIZE).unwrap();
        let (m, mut vring, _rx) = ring();
        vring.track_inflight(region.queue(0).unwrap());
        for (pos, head) in [3u16, 9, 4, 12].into_iter().enumerate() {
            put_avail(&m, pos as u16, head);
        }
        set_avail_idx(&m, 4);
        let taken: Vec<u16> = std::iter::from_fn(|| vring.pop_head()).collect();
        assert_eq!(taken, [3, 9, 4, 12]);
        // 4 completes and is published; 12 completes but the process dies before the
        // batch is published.
        vring.add_used(&m, 4, 0, "a test chain");
        vring.notify_guest(&m);
        assert_eq!(used_idx(&m), 1);
        vring.add_used(&m, 12, 0, "a test chain");
        std::mem::forget(vring);

        // QEMU restores the ring at the used index (1) after the disconnection.
        let mem = GuestMemoryAtomic::new(Arc::unwrap_or_clone(m.clone()));
        let (m2, mut again, rx) = ring_on(mem, used_idx(&m), used_idx(&m));
        again.track_inflight(region.queue(0).unwrap());
        put_avail(&m2, 4, 7);
        set_avail_idx(&m2, 5);
        again.stop();
        assert!(again.has_resubmits());
        let resumed: Vec<u16> = std::iter::from_fn(|| again.pop_head()).collect();
        assert_eq!(
            resumed,
            [3, 9, 12],
            "in flight, in the order taken; a stopping ring takes nothing new"
        );
        for h in [9, 3, 12] {
            again.add_used(&m2, h, 0, "a test chain");
        }
        drop(again);
        assert_eq!(used_idx(&m2), 4);
        assert_eq!(
            rx.recv().unwrap(),
            4,
            "resumes after the chains in flight, not at the base"
        );

        // A third instance finds nothing in flight and takes the new chain.
        let mem = GuestMemoryAtomic::new(Arc::unwrap_or_clone(m2.clone()));
        let (_m3, mut third, _rx) = ring_on(mem, 4, 4);
        third.track_inflight(region.queue(0).unwrap());
        assert!(!third.has_resubmits());
        assert_eq!(third.pop_head(), Some(7));
    }
}
