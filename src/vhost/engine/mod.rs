//! The virtqueue engine every request queue runs on, whatever its device (virtio-blk,
//! the virtio-scsi request queues): one slot per ring entry, the free list and in-flight
//! count, guest memory kept mapped for in-flight requests ([`memory`]), popping chains
//! through the pre-translated ring view when there is one and through virtio-queue's
//! `DescriptorChain` otherwise, completion into the used ring and the guest notification
//! (through [`Vring`]: batching, EVENT_IDX, coalescing), draining on GET_VRING_BASE, and
//! the reactor's [`Poller`] interface.
//!
//! In-flight tracking (vhost-user.rst "Inflight I/O tracking") is done once, here, for
//! every device: when the frontend shares the region, the ring records each chain taken
//! and returned ([`Vring::track_inflight`]), and the heads a previous instance left in
//! flight come out of [`Vring::pop_head`] first, before anything new, into free slots like
//! any other chain.
//!
//! A device supplies only what is its own, through [`QueueDevice`]: parsing a chain into
//! its request type, starting the request on its bdev channel(s), applying a bdev
//! completion, and writing the answer (split as firecracker's virtio devices: request
//! parsing, device, I/O engine).

pub mod guest_writer;
pub mod memory;

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::bdev::IoResult;
use crate::reactor::{min_deadline, Poller};
use crate::vhost::device::QueueSetup;
use crate::vhost::queue_stats::QueueStats;
use crate::vhost::vring::{Vring, POP_BUDGET};
pub use guest_writer::GuestWriter;
use memory::MemGenerations;

/// What a device's parser made of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid request: [`QueueDevice::start`] it.
    Valid,
    /// A rejected request the device can answer (an error status or response, set in the
    /// request): [`QueueDevice::finish`] it at once.
    Answer,
    /// Nowhere to write an answer: the chain goes back to the driver with used length 0.
    Unusable,
}

/// A device model's part of a request queue; see the module documentation.
pub trait QueueDevice {
    /// One request's state, recycled from slot to slot (parsed request, device state).
    type Request: Default;

    /// Called at the start of every poll pass (follow configuration changes).
    fn refresh(&mut self) {}

    /// Parses chain `head`, read through `vring`'s ring view ([`Vring::read_chain`],
    /// translated with [`Vring::map`]), into `req`.
    fn parse_ring(&mut self, req: &mut Self::Request, vring: &Vring, head: u16) -> Parsed;

    /// Parses `chain`, read through virtio-queue (rings outside one memory region), into
    /// `req`. Must reach the same verdict as [`QueueDevice::parse_ring`] on the same chain.
    fn parse_chain(
        &mut self,
        req: &mut Self::Request,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Parsed;

    /// Starts a valid request under `tag` (the tag of its bdev operations); returns how
    /// many bdev operations it submitted, 0 when it is already complete (answered without
    /// the bdev). The engine keeps the guest memory mapped until they all completed.
    fn start(&mut self, tag: u32, req: &mut Self::Request) -> u32;

    /// Applies one bdev completion to its request.
    fn on_io_done(req: &mut Self::Request, res: IoResult);

    /// Writes the request's answer through `out` and returns the used length (virtio 1.2
    /// §2.7.8: the bytes written into the chain); 0 when nothing could be written. Also
    /// releases what the request holds.
    fn finish(&mut self, req: &mut Self::Request, out: GuestWriter<'_>) -> u32;

    /// Reaps the bdev channels' completions: `done(tag, result)` for each (the shape of
    /// [`crate::bdev::BdevChannel::poll`], so that a channel calls the engine directly).
    fn poll_io(&mut self, done: &mut dyn FnMut(u64, IoResult));

    /// Hands the operations submitted since the last kick to the backends.
    fn kick(&mut self);

    /// Arms the channels before the reactor sleeps; true when completions are ready.
    fn arm(&mut self) -> bool;

    /// The fds that signal completions.
    fn completion_fds(&self, out: &mut Vec<RawFd>);

    /// When the channels must be polled again without a wake-up (QoS, ready completions).
    fn next_deadline(&self) -> Option<Instant>;

    /// See [`Poller::awaits_helper_threads`].
    fn awaits_helper_threads(&self) -> bool;
}

/// A ring entry's request.
struct Slot<R> {
    req: R,
    /// Head of the chain, for the used ring.
    head: u16,
    /// Bdev operations still outstanding.
    pending: u32,
    /// The memory generation the request points into, while it has operations outstanding.
    mem_gen: Option<u32>,
}

/// The poller of one request queue of device `D`.
pub struct Engine<D: QueueDevice> {
    /// First field: dropped (answering GET_VRING_BASE) before the device's channels close.
    vring: Vring,
    dev: D,
    slots: Vec<Slot<D::Request>>,
    free: Vec<u32>,
    in_flight: usize,
    /// The last busy pass signalled the driver and left nothing in flight (or there was
    /// none yet): [`Poller::driver_waits`].
    driver_waits: bool,
    /// Requests answered since the driver last waited, and in its last turn
    /// ([`Poller::driver_batch`]).
    turn_requests: usize,
    last_batch: usize,
    mem: MemGenerations,
    /// Scratch list of the requests completed in a poll pass (no allocation on the hot path).
    done: Vec<u32>,
    /// The queue's counters; `in_flight` is published there once per pass.
    stats: Arc<QueueStats>,
}

impl<D: QueueDevice> Engine<D> {
    /// The engine of the ring the frontend has set up, with one slot per ring entry.
    pub fn with_device(mut setup: QueueSetup, dev: D) -> Self {
        let inflight = setup.inflight.take();
        let stats = setup.stats.clone();
        let mut vring = Vring::new(setup);
        if let Some(part) = inflight {
            vring.track_inflight(part);
        }
        let n = vring.size().max(1) as usize;
        let mem = MemGenerations::new(vring.mem());
        Engine {
            slots: (0..n)
                .map(|_| Slot {
                    req: D::Request::default(),
                    head: 0,
                    pending: 0,
                    mem_gen: None,
                })
                .collect(),
            free: (0..n as u32).rev().collect(),
            in_flight: 0,
            driver_waits: true,
            turn_requests: 0,
            last_batch: 1,
            mem,
            done: Vec::with_capacity(n),
            stats,
            vring,
            dev,
        }
    }

    /// The device part.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The ring (tests look at its indexes).
    #[cfg(test)]
    pub fn vring(&self) -> &Vring {
        &self.vring
    }

    /// Requests taken from the ring and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Pops and starts up to [`POP_BUDGET`] chains, at most one per free slot; returns how
    /// many were popped.
    fn pop_requests(&mut self, mem: &GuestMemoryMmap) -> usize {
        let fast = self.vring.has_view();
        let mut popped = 0;
        while popped < POP_BUDGET {
            let Some(&tag) = self.free.last() else {
                break;
            };
            let slot = &mut self.slots[tag as usize];
            let parsed = if fast {
                let Some(head) = self.vring.pop_head() else {
                    break;
                };
                slot.head = head;
                self.dev.parse_ring(&mut slot.req, &self.vring, head)
            } else {
                let Some(chain) = self.vring.pop(mem) else {
                    break;
                };
                slot.head = chain.head_index();
                self.dev.parse_chain(&mut slot.req, chain)
            };
            // The chain is off the ring (and, tracked, marked in flight by the ring).
            self.free.pop();
            self.in_flight += 1;
            popped += 1;
            match parsed {
                Parsed::Valid => match self.dev.start(tag, &mut slot.req) {
                    0 => self.complete(tag, mem),
                    n => {
                        slot.pending = n;
                        slot.mem_gen = Some(self.mem.hold());
                    }
                },
                Parsed::Answer => self.complete(tag, mem),
                Parsed::Unusable => {
                    let head = slot.head;
                    self.vring.add_used(mem, head, 0, "a chain");
                    self.release_slot(tag);
                }
            }
        }
        popped
    }

    /// Writes the answer of request `tag`, returns its chain to the driver, frees the slot.
    #[inline]
    fn complete(&mut self, tag: u32, mem: &GuestMemoryMmap) {
        let Some(slot) = self.slots.get_mut(tag as usize) else {
            return;
        };
        let used = self
            .dev
            .finish(&mut slot.req, GuestWriter::new(self.vring.map()));
        self.vring
            .add_used(mem, slot.head, used, "a request to the guest");
        if let Some(gen) = slot.mem_gen.take() {
            self.mem.release(gen);
        }
        self.release_slot(tag);
    }

    /// Slot `tag` is free again: its chain was returned (and, tracked, leaves the
    /// in-flight region once the ring publishes the used index).
    #[inline]
    fn release_slot(&mut self, tag: u32) {
        self.slots[tag as usize].pending = 0;
        self.free.push(tag);
        self.in_flight -= 1;
    }
}

impl<D: QueueDevice> Poller for Engine<D> {
    fn poll(&mut self) -> usize {
        self.dev.refresh();
        let mut mem = self.mem.begin_pass(self.vring.mem());
        self.vring.sync_mem(&mem, self.mem.loaded());

        // Completions first: they free slots for new requests.
        let mut done = std::mem::take(&mut self.done);
        {
            let slots = &mut self.slots;
            self.dev.poll_io(&mut |tag, res| {
                let Some(slot) = slots.get_mut(tag as usize) else {
                    return;
                };
                if slot.pending == 0 {
                    tracing::error!(tag, "completion of a request not in flight");
                    return;
                }
                D::on_io_done(&mut slot.req, res);
                slot.pending -= 1;
                if slot.pending == 0 {
                    done.push(tag as u32);
                }
            });
        }
        let mut work = done.len();
        self.turn_requests += done.len();
        for &tag in &done {
            self.complete(tag, &mem);
        }
        done.clear();
        self.done = done;

        if !self.vring.is_stopping() || self.vring.has_resubmits() {
            let mut popped = self.pop_requests(&mem);
            if self.vring.mem_stale() {
                // A chain published after the frontend swapped the memory table (see
                // `Vring::mem_stale`): pop again with the new table. Requests started
                // with the old one keep it mapped through their generation.
                self.mem.end_pass(mem);
                mem = self.mem.begin_pass(self.vring.mem());
                self.vring.sync_mem(&mem, self.mem.loaded());
                popped += self.pop_requests(&mem);
            }
            if popped > 0 {
                self.dev.kick();
            }
            work += popped;
        }

        let interrupts = self.vring.interrupts();
        if work > 0 || self.vring.irq_due() {
            self.vring.notify_guest(&mem);
        }
        if work > 0 {
            self.driver_waits = self.in_flight == 0 && self.vring.interrupts() != interrupts;
            if self.driver_waits {
                self.last_batch = std::mem::take(&mut self.turn_requests).max(1);
            }
            self.stats
                .in_flight
                .store(self.in_flight, Ordering::Relaxed);
        }
        self.mem.end_pass(mem);
        work
    }

    fn arm(&mut self) -> bool {
        let completions = self.dev.arm();
        (self.vring.arm() && !self.free.is_empty()) || completions
    }

    fn disarm(&mut self) {
        self.vring.disarm();
    }

    fn driver_waits(&self) -> bool {
        self.driver_waits
    }

    fn driver_batch(&self) -> usize {
        self.last_batch
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.vring.wake_fd()];
        self.dev.completion_fds(&mut v);
        v
    }

    fn next_deadline(&self) -> Option<Instant> {
        min_deadline(self.dev.next_deadline(), self.vring.irq_deadline())
    }

    fn request_stop(&mut self) {
        if self.in_flight > 0 && !self.vring.is_stopping() {
            tracing::info!(
                queue = self.vring.index(),
                in_flight = self.in_flight,
                "ring stopping: draining the requests in flight"
            );
        }
        self.vring.stop();
    }

    fn awaits_helper_threads(&self) -> bool {
        self.dev.awaits_helper_threads()
    }

    fn finished(&self) -> bool {
        self.vring.is_stopping() && self.in_flight == 0 && !self.vring.has_resubmits()
    }
}

impl<D: QueueDevice> Drop for Engine<D> {
    fn drop(&mut self) {
        self.stats.in_flight.store(0, Ordering::Relaxed);
        if self.in_flight > 0 {
            tracing::error!(
                queue = self.vring.index(),
                in_flight = self.in_flight,
                "queue dropped with requests in flight"
            );
        } else {
            // No request points into guest memory: let go of it before the ring (the
            // first field) answers its stop, after which the session unmaps what nobody
            // holds and forgets, for good, what a ring still holds.
            self.mem.release_all();
        }
    }
}

#[cfg(test)]
mod tests;
