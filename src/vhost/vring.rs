//! The ring plumbing every virtqueue poller shares, whatever its device: the split
//! virtqueue (virtio 1.2 §2.7), or the packed one (§2.8, [`crate::vhost::packed_ring`],
//! chosen once when the ring starts), with the guest memory it lives in, the kick and call
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
//! While the frontend logs dirty pages for a live migration ([`crate::vhost::dirty_log`]),
//! the ring marks them here, where every chain goes back to the driver: all the
//! device-writable buffers of a returned chain (whatever wrote them: a bdev into the
//! guest's pages, the device's status or response, and whatever the used length says),
//! the used element, the used index and the notification fields. A device cannot forget
//! a page, and logging costs a branch per chain when it is off.
//!
//! A queue with in-flight tracking ([`Vring::track_inflight`]: the request queues, and
//! the scsi control and event queues) records every chain it takes and returns in the
//! shared region (vhost-user.rst "Inflight I/O tracking"):
//! here, where chains are taken and the used index is published, so that the order the
//! spec requires holds on every path.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::vhost::coalescing::{Coalescing, STATS_INTERVAL};
use crate::vhost::device::{GuestMem, QueueSetup};
use crate::vhost::dirty_log::RingLog;
use crate::vhost::guest_map::GuestMap;
use crate::vhost::guest_stream::Desc;
use crate::vhost::inflight::QueueInflight;
use crate::vhost::packed_ring::{PackedRing, EVENT_DISABLE};
use crate::vhost::queue_stats::QueueStats;
use crate::vhost::split_ring::{need_event, read_chain_in, ChainError, RingView};

/// Offsets in the used ring (virtio 1.2 §2.7.8): `flags`, `idx`, then the elements.
const USED_FLAGS: u64 = 0;
const USED_IDX: u64 = 2;
const USED_RING: u64 = 4;

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
    /// The [`GuestMem::generation`] `map` is at least as new as.
    map_gen: u64,
    /// A chain became visible after the frontend swapped the memory table `map` was built
    /// from: nothing is taken until [`Vring::sync_mem`] brings the newer table (see
    /// [`Vring::mem_stale`]).
    mem_stale: bool,
    /// A packed ring (VIRTIO_F_RING_PACKED acked, [`crate::vhost::packed_ring`]): chosen
    /// once, when the ring starts; every accessor checks it first, so that the split path
    /// pays one predictable branch. `queue` then only holds the addresses and size.
    packed: Option<Box<PackedRing>>,
    /// Heads (tokens, for a packed ring) a previous instance left in flight, taken again
    /// before the ring (last first).
    resubmit: Vec<u16>,
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
    /// In-flight tracking, for queues whose frontend shares the region.
    tracking: Option<Tracking>,
    /// Dirty-page logging during a live migration, and the chain read back to log it.
    log: RingLog,
    log_chain: Vec<Desc>,
    /// The queue's counters, and this poller's running totals of them (published once
    /// per pass, see [`QueueStats`]).
    stats: Arc<QueueStats>,
    returned: u64,
    kicks: u64,
    interrupts: u64,
}

/// A queue's in-flight tracking ([`crate::vhost::inflight`]).
struct Tracking {
    part: QueueInflight,
    /// The counter the next chain taken gets: the order of the chains in flight.
    counter: u64,
    /// Heads whose used elements are written and not yet committed to the region.
    batch: Vec<u16>,
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
        let counts = setup.stats.snapshot();
        let packed = setup.packed.then(|| {
            let q = &setup.queue;
            Box::new(PackedRing::new(
                q.desc_table(),
                q.avail_ring(),
                q.used_ring(),
                q.size(),
                setup_next_avail,
            ))
        });
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
            map_gen: 0,
            mem_stale: false,
            packed,
            resubmit: Vec::new(),
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
            log: setup.log,
            log_chain: Vec::new(),
            stats: setup.stats,
            returned: counts.requests,
            kicks: counts.kicks,
            interrupts: counts.interrupts,
        }
    }

    /// Records the chains this ring takes and returns in `part` (any queue of a frontend
    /// with INFLIGHT_SHMFD). Before anything new is taken: completes the commit
    /// of a batch the previous instance had published, queues the heads it left in flight
    /// for resubmission (counter order, [`Vring::pop_head`] hands them out first), and
    /// resumes the ring after them: at the used index plus the chains in flight (every
    /// chain taken is either returned or in flight), which is where the previous instance
    /// was, whatever base the frontend restored (QEMU restores the used index of a split
    /// ring after a disconnection, and the base it last sent for a packed one).
    pub fn track_inflight(&mut self, part: QueueInflight) {
        if self.packed.is_some() {
            return self.track_inflight_packed(part);
        }
        let size = self.queue.size();
        if size > part.capacity() || part.is_packed() {
            tracing::warn!(
                queue = self.index,
                size,
                capacity = part.capacity(),
                packed_layout = part.is_packed(),
                "in-flight region not made for this ring: not tracked"
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
        self.resubmit = r.resubmit;
        self.resubmit.reverse();
        self.tracking = Some(Tracking {
            part,
            counter: r.next_counter,
            batch: Vec::with_capacity(usize::from(size)),
        });
    }

    /// [`Vring::track_inflight`] for a packed ring ([`PackedRing::track`]): its areas are
    /// mapped first, as resuming reads and repairs the descriptor ring.
    fn track_inflight_packed(&mut self, part: QueueInflight) {
        self.sync_current_mem();
        let Some(p) = &mut self.packed else {
            return;
        };
        let base = p.base();
        let capacity = part.capacity();
        let Some(r) = p.track(&self.map, part) else {
            tracing::warn!(
                queue = self.index,
                size = p.size(),
                capacity,
                "in-flight region not made for this packed ring: not tracked"
            );
            return;
        };
        if r.fresh {
            return;
        }
        tracing::info!(
            queue = self.index,
            resubmit = r.resubmit.len(),
            committed = r.committed,
            dropped = r.dropped,
            used = r.used,
            base,
            next_avail = p.base(),
            "resuming the ring from its in-flight region"
        );
        if r.dropped > 0 {
            tracing::error!(
                queue = self.index,
                dropped = r.dropped,
                "in-flight region entries that do not add up: those requests are lost"
            );
        }
        // The slots between the used and available positions may have been repaired.
        let (at, len) = p.desc_ring();
        self.log.mark_ring(at, len);
        self.resubmit = r.resubmit;
        self.resubmit.reverse();
        // Completions the previous instance published may never have been signalled.
        self.signal();
    }

    /// Whether heads left in flight by a previous instance still wait to be taken again
    /// (a stopping ring takes them all the same: they are already off the ring).
    pub fn has_resubmits(&self) -> bool {
        !self.resubmit.is_empty()
    }

    /// The same ring, never held back by the controller's interrupt coalescing (control
    /// and event queues).
    pub fn without_coalescing(mut self) -> Self {
        self.coalescing = Arc::default();
        self
    }

    /// Rebuilds the pre-translated memory table and ring view when `mem` is not the memory
    /// they were built from, and keeps `mem` mapped while they point into it. `generation`
    /// is the [`GuestMem::generation`] read before `mem` was loaded ([`GuestMem::load`]).
    /// Called at the start of every poll pass, and again when [`Vring::mem_stale`]; also
    /// follows the dirty-log settings.
    pub fn sync_mem(&mut self, mem: &Arc<GuestMemoryMmap>, generation: u64) {
        self.log.refresh();
        self.map_gen = generation;
        self.mem_stale = false;
        if self.map_of.as_ref().is_some_and(|m| Arc::ptr_eq(m, mem)) {
            return;
        }
        // Through the old view, while the memory it points into is still held.
        self.publish_used();
        // SAFETY: `map_of` below keeps `mem` mapped until the next `sync_mem` replaces `map`
        // and `view` with it, and through `drop` (which publishes via `view`).
        self.map = unsafe { GuestMap::new(mem) };
        if let Some(p) = &mut self.packed {
            if !p.remap(&self.map) {
                tracing::error!(
                    queue = self.index,
                    "packed ring not inside guest memory regions: it takes no chains"
                );
            }
        } else {
            self.view = RingView::new(&self.queue, &self.map);
        }
        self.avail_seen = self.queue.next_avail();
        self.map_of = Some(mem.clone());
    }

    /// [`Vring::sync_mem`] with the frontend's current table, which it returns: for callers
    /// that keep no generations of their own (the scsi control and event queues; the
    /// request engine keeps them in `MemGenerations`).
    pub fn sync_current_mem(&mut self) -> Arc<GuestMemoryMmap> {
        let (generation, mem) = self.mem.load();
        self.sync_mem(&mem, generation);
        mem
    }

    /// True when a pop returned None because the driver made a chain available after the
    /// frontend had swapped the memory table (ADD_MEM_REG, REM_MEM_REG, SET_MEM_TABLE)
    /// since the last [`Vring::sync_mem`]: the caller syncs the current table and pops
    /// again.
    ///
    /// A frontend that waits for the answer to the swap (REPLY_ACK) may then at once
    /// publish a request whose buffers lie in the new memory, while a poll pass that
    /// loaded the table before the swap is still running. So each pop reads the driver's
    /// index (or a packed descriptor's flags) first, with acquire ordering, and the
    /// generation after it: a table swapped before the chain was published shows there,
    /// and the chain is never translated with the older table (which would fail it with
    /// IOERR, or put its data into memory the frontend has replaced).
    #[inline]
    pub fn mem_stale(&self) -> bool {
        self.mem_stale
    }

    /// Whether the frontend swapped the memory table since the last
    /// [`Vring::sync_mem`]; sets [`Vring::mem_stale`] if so. Called after the read that
    /// shows a chain available.
    #[inline]
    fn mem_moved(&mut self) -> bool {
        if self.mem.generation() != self.map_gen {
            self.mem_stale = true;
        }
        self.mem_stale
    }

    /// The memory table of the last [`Vring::sync_mem`].
    pub fn map(&self) -> &GuestMap {
        &self.map
    }

    /// Whether the pre-translated path ([`Vring::pop_head`], [`Vring::read_chain`]) is
    /// available for the memory of the last [`Vring::sync_mem`].
    pub fn has_view(&self) -> bool {
        self.view.is_some() || self.packed.as_ref().is_some_and(|p| p.has_view())
    }

    /// Whether the ring is packed.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The head of the next chain to process: first the heads a previous instance left
    /// in flight ([`Vring::track_inflight`]), then the next available chain (§2.7.6),
    /// through the ring view, recorded in flight. None when the ring is empty or stopping,
    /// there is no view, or `avail->idx` is more than a ring ahead (a broken driver:
    /// nothing is taken until it fixes the index).
    #[inline]
    pub fn pop_head(&mut self) -> Option<u16> {
        if let Some(h) = self.resubmit.pop() {
            return Some(h);
        }
        if self.stopping {
            return None;
        }
        // A packed ring has no split view: its test stays off the split path.
        let Some(view) = &self.view else {
            return self.pop_head_packed();
        };
        let size = view.size();
        let next = self.queue.next_avail();
        let cached = self.avail_seen.wrapping_sub(next);
        if cached == 0 || cached > size {
            let seen = self.read_avail_idx(next)?;
            if self.mem_moved() {
                return None;
            }
            self.avail_seen = seen;
        }
        let head = self.view.as_ref()?.avail_entry(next);
        self.queue.set_next_avail(next.wrapping_add(1));
        self.mark_inflight(head);
        Some(head)
    }

    /// [`Vring::pop_head`] on a packed ring: the token of the chain it took.
    #[cold]
    fn pop_head_packed(&mut self) -> Option<u16> {
        // The flags that make the chain available, then the generation (see `mem_stale`).
        if !self.packed.as_ref()?.has_avail() {
            return None;
        }
        fence(Ordering::Acquire);
        if self.mem_moved() {
            return None;
        }
        self.packed.as_mut()?.pop(&self.map)
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
    #[inline]
    pub fn read_chain(&self, head: u16, max: usize, out: &mut Vec<Desc>) -> Result<(), ChainError> {
        match &self.view {
            Some(v) => v.read_chain(&self.map, head, max, out),
            None => self.read_chain_packed(head, max, out),
        }
    }

    /// [`Vring::read_chain`] without a split view: a packed ring's chain, or nothing.
    #[cold]
    fn read_chain_packed(
        &self,
        head: u16,
        max: usize,
        out: &mut Vec<Desc>,
    ) -> Result<(), ChainError> {
        match &self.packed {
            Some(p) => p.read_chain(head, max, out),
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
        if !self.resubmit.is_empty() {
            tracing::error!(
                queue = self.index,
                heads = ?self.resubmit,
                "cannot resubmit requests left in flight: the ring is not inside one memory region"
            );
            self.resubmit.clear();
        }
        if self.stopping {
            return None;
        }
        if self.packed.is_some() {
            // virtio-queue reads split rings only: a packed ring is read through its view.
            if !self.bad_avail_logged {
                self.bad_avail_logged = true;
                tracing::error!(
                    queue = self.index,
                    "packed ring without a view: no chains taken"
                );
            }
            return None;
        }
        // The index that makes the chain available, then the generation (see
        // `mem_stale`); a broken ring address is left to virtio-queue's pop to meet.
        if let Ok(idx) = self.queue.avail_idx(mem, Ordering::Acquire) {
            if idx.0 == self.queue.next_avail() || self.mem_moved() {
                return None;
            }
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
                if self.log.is_on() {
                    self.log_returned(head, next);
                }
                if let Some(t) = &mut self.tracking {
                    t.part.batch_add(head);
                    t.batch.push(head);
                }
            }
            None if self.packed.is_some() => return self.add_used_packed(head, len, what),
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
                if self.log.is_on() {
                    let next = self.queue.next_used().wrapping_sub(1);
                    self.log_returned(head, next);
                    self.log.mark_used(USED_IDX, 2);
                }
                self.commit_inflight();
            }
        }
        self.added = self.added.wrapping_add(1);
        self.returned += 1;
    }

    /// [`Vring::add_used`] on a packed ring: `head` is the token its pop gave. Logged (the
    /// chain's writable buffers as read when it was taken, and the used descriptor).
    #[cold]
    fn add_used_packed(&mut self, head: u16, len: u32, what: &str) {
        let Some(p) = &mut self.packed else {
            return;
        };
        if self.log.is_on() {
            if let Some(all) = self.log.all() {
                for d in p.writable(head) {
                    all.mark(d.addr, u64::from(d.len));
                }
            }
        }
        match p.add_used(head, len) {
            Some(at) => {
                self.log.mark_ring(at, 16);
                self.unpublished = true;
                self.added = self.added.wrapping_add(1);
                self.returned += 1;
            }
            None => tracing::warn!(queue = self.index, "cannot return {what}: not in flight"),
        }
    }

    /// Logs what returning chain `head` as used element `pos` wrote into guest memory
    /// (logging on): the chain's device-writable buffers, then the element. The chain is
    /// read again from the descriptor table, which the driver must not change while the
    /// chain is in flight (virtio 1.2 §2.7.13.1); a driver that does only loses its own
    /// pages.
    fn log_returned(&mut self, head: u16, pos: u16) {
        if let Some(all) = self.log.all() {
            self.log_chain.clear();
            // A broken chain is logged as far as it could be read.
            let _ = match &self.view {
                Some(v) => v.read_chain(&self.map, head, usize::MAX, &mut self.log_chain),
                None => read_chain_in(
                    &self.map,
                    self.queue.desc_table(),
                    self.queue.size(),
                    head,
                    usize::MAX,
                    &mut self.log_chain,
                ),
            };
            for d in self.log_chain.iter().filter(|d| d.write) {
                all.mark(d.addr, u64::from(d.len));
            }
        }
        let slot = u64::from(pos & self.queue.size().wrapping_sub(1));
        self.log.mark_used(USED_RING + 8 * slot, 8);
    }

    /// Makes the used elements written since the last call visible to the driver, then
    /// commits them to the in-flight region.
    fn publish_used(&mut self) {
        if std::mem::take(&mut self.unpublished) {
            if let Some(view) = &self.view {
                view.publish_used(self.queue.next_used());
                self.log.mark_used(USED_IDX, 2);
            } else if let Some(p) = &mut self.packed {
                p.publish();
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
        let packed = self
            .view
            .is_none()
            .then_some(())
            .and(self.packed.as_deref());
        let wanted = if let Some(p) = packed {
            p.wants_interrupt(self.queue.event_idx_enabled())
        } else if self.queue.event_idx_enabled() {
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
            // Without EVENT_IDX the driver's flags decide: with VRING_AVAIL_F_NO_INTERRUPT
            // the device should not send one (§2.7.7.2).
            let flags = match &self.view {
                Some(v) => Some(v.avail_flags()),
                None => mem
                    .read_obj::<u16>(GuestAddress(self.queue.avail_ring()))
                    .ok()
                    .map(u16::from_le),
            };
            flags.is_none_or(|f| u32::from(f) & VRING_AVAIL_F_NO_INTERRUPT == 0)
        };
        // At most a ring's worth of completions per interrupt: that also keeps `added`
        // far from wrapping, which would break the used_event test above.
        if wanted && self.coalescing.enabled() && added < self.queue.size() && self.hold_irq(now())
        {
            // `added` stays: the next attempt judges used_event over the whole range.
            return;
        }
        self.added = 0;
        if self.view.is_none() {
            if let Some(p) = &mut self.packed {
                p.mark_signalled();
            }
        }
        self.irq.deferred = false;
        self.irq.interval_count = self.irq.interval_count.saturating_add(u32::from(added));
        if wanted {
            self.signal();
        }
        self.publish_stats();
    }

    /// Makes this poller's totals visible to [`QueueStats`] readers.
    #[inline]
    fn publish_stats(&self) {
        self.stats
            .publish(self.returned, self.kicks, self.interrupts);
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

    /// Interrupts raised so far.
    #[inline]
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    /// Raises the guest interrupt (writes the call eventfd, when the frontend gave one).
    fn signal(&mut self) {
        if let Some(call) = &self.call {
            self.interrupts += 1;
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
        if let Some(p) = &self.packed {
            let (ready, at) = p.enable_kicks();
            if let Some(at) = at {
                self.log.mark_ring(at, 2);
            }
            return ready;
        }
        let mem = self.mem.memory();
        let r = self.queue.enable_notification(&*mem).unwrap_or(true);
        self.log_notification_fields();
        r
    }

    /// Logs the used ring's fields the ring writes to ask for kicks or not: `flags`, and
    /// `avail_event` with EVENT_IDX (§2.7.10).
    #[inline]
    fn log_notification_fields(&self) {
        if self.log.is_on() {
            self.log.mark_used(USED_FLAGS, 2);
            let avail_event = USED_RING + 8 * u64::from(self.queue.size());
            self.log.mark_used(avail_event, 2);
        }
    }

    /// Stops the driver's kicks while the poller runs, and drains the kick eventfd.
    pub fn disarm(&mut self) {
        if let Some(p) = &self.packed {
            if let Some(at) = p.set_device_event(EVENT_DISABLE) {
                self.log.mark_ring(at, 2);
            }
        } else {
            let mem = self.mem.memory();
            // Both best effort: a failed disable (a bad ring address, which the next pop
            // meets too) costs only extra kicks, and an empty kick eventfd reads EAGAIN.
            let _ = self.queue.disable_notification(&*mem);
            self.log_notification_fields();
        }
        if let Ok(n) = self.kick.read() {
            self.kicks += n;
            self.publish_stats();
        }
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
        if let Ok(n) = self.kick.read() {
            self.kicks += n;
        }
        self.publish_stats();
        // A packed ring's position carries its wrap counter in bit 15 (vhost-user.rst
        // "VHOST_USER_GET_VRING_BASE").
        let base = match &self.packed {
            Some(p) => p.base(),
            None => self.queue.next_avail(),
        };
        // Let go of guest memory before answering: the session unmaps the regions nobody
        // holds once the ring has answered (GET_VRING_BASE, disconnection), and forgets the
        // mappings a ring still holds then.
        self.view = None;
        self.packed = None;
        self.map = GuestMap::default();
        self.map_of = None;
        // Nobody waits for the stop position when the receiver is gone.
        let _ = self.stopped.send(base);
    }
}

#[cfg(test)]
mod tests;
