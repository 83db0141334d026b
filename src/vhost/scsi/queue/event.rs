//! The virtio-scsi event queue (virtio 1.2 §5.6.6.3): the driver posts buffers, the
//! device fills them with the controller's hot-plug events, on the ring directly.
//!
//! A buffer is taken from the ring only with an event to put in it, and returned at once;
//! the driver's other buffers wait on the ring. Tracked in the in-flight region like the
//! request queues when the frontend shares one (vhost-user.rst "Inflight I/O tracking"),
//! so that a new instance resumes at the ring position the previous one reached, also on
//! a packed ring, whose base QEMU cannot restore after a crash. A buffer the previous
//! instance had taken and not returned (it died in between) is held by the new one until
//! the next event, as if still on the ring; a clean stop returns it with NO_EVENT, which
//! the driver posts again, so that GET_VRING_BASE leaves none taken.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_scsi::*;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::super::request::{Event, Streams, EVENT_LEN};
use super::super::{lock, ScsiShared};
use crate::reactor::Poller;
use crate::vhost::device::QueueSetup;
use crate::vhost::engine::GuestWriter;
use crate::vhost::vring::Vring;

/// The event queue's poller (§5.6.6.3): fills the driver's event buffers with the
/// controller's pending events.
pub struct EventQueue {
    /// First field: dropped (answering GET_VRING_BASE) before the rest.
    vring: Vring,
    wake: EventFd,
    shared: Arc<ScsiShared>,
    streams: Streams,
}

impl EventQueue {
    /// Builds the poller; events queued before it (no driver listening) are forgotten:
    /// the driver scans the targets when it starts. With the frontend's in-flight region,
    /// resumes where a previous instance left the ring ([`Vring::track_inflight`]).
    pub fn new(mut setup: QueueSetup, shared: Arc<ScsiShared>) -> std::io::Result<Self> {
        let wake = shared.event_wake.try_clone()?;
        {
            let mut ev = lock(&shared.events);
            ev.running = true;
            ev.pending.clear();
            ev.missed = false;
        }
        let inflight = setup.inflight.take();
        // Control and event traffic is rare: never held back by coalescing.
        let mut vring = Vring::new(setup).without_coalescing();
        if let Some(part) = inflight {
            vring.track_inflight(part);
        }
        Ok(EventQueue {
            vring,
            wake,
            shared,
            streams: Streams::default(),
        })
    }

    fn has_events(&self) -> bool {
        let ev = lock(&self.shared.events);
        !ev.pending.is_empty() || ev.missed
    }

    /// Answers pending events with the driver's buffers; returns the buffers taken.
    fn fill_buffers(&mut self, mem: &Arc<GuestMemoryMmap>) -> usize {
        let mut work = 0;
        loop {
            // A running ring takes a buffer for an event (a held one first); a stopping one
            // returns the buffers it holds, with the pending events or NO_EVENT.
            let take = if self.vring.is_stopping() {
                self.vring.has_resubmits()
            } else {
                self.has_events()
            };
            if !take {
                break;
            }
            // Through the ring view when there is one (a packed ring always: virtio-queue
            // reads split rings only), which also hands out the held buffers.
            let (head, collected) = if self.vring.is_packed() || self.vring.has_view() {
                let Some(head) = self.vring.pop_head() else {
                    break;
                };
                let vring = &self.vring;
                let r = self
                    .streams
                    .collect_ring(|max, out| vring.read_chain(head, max, out));
                (head, r)
            } else {
                let Some(mut chain) = self.vring.pop(mem) else {
                    break;
                };
                (chain.head_index(), self.streams.collect(&mut chain))
            };
            work += 1;
            let ok = collected.is_ok()
                && self.streams.readable().is_empty()
                && self.streams.writable_len >= EVENT_LEN;
            let used = if ok {
                let event = {
                    let mut ev = lock(&self.shared.events);
                    let missed = std::mem::take(&mut ev.missed);
                    let mut e = ev.pending.pop_front().unwrap_or(Event {
                        event: VIRTIO_SCSI_T_NO_EVENT,
                        lun: [0; 8],
                        reason: 0,
                    });
                    if missed {
                        e.event |= VIRTIO_SCSI_T_EVENTS_MISSED;
                    }
                    e
                };
                let out = GuestWriter::new(self.vring.map());
                match out.write_stream(self.streams.writable(), &event.to_bytes()) {
                    Ok(()) => EVENT_LEN as u32,
                    Err(_) => 0,
                }
            } else {
                tracing::debug!(queue = self.vring.index(), "unusable event buffer");
                0
            };
            self.vring.add_used(mem, head, used, "an event buffer");
        }
        work
    }
}

impl Poller for EventQueue {
    fn poll(&mut self) -> usize {
        let mut mem = self.vring.sync_current_mem();
        let mut work = self.fill_buffers(&mem);
        if self.vring.mem_stale() {
            // A buffer made available after the frontend swapped the memory table
            // (`Vring::mem_stale`): take it with the new table.
            mem = self.vring.sync_current_mem();
            work += self.fill_buffers(&mem);
        }
        if work > 0 {
            self.vring.notify_guest(&mem);
        }
        work
    }

    fn arm(&mut self) -> bool {
        self.vring.arm() && self.has_events()
    }

    fn disarm(&mut self) {
        self.vring.disarm();
        // Drains the wake eventfd; EAGAIN just means it was not signalled.
        let _ = self.wake.read();
    }

    /// Control and event traffic is rare and never worth polling for.
    fn driver_waits(&self) -> bool {
        true
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        vec![self.vring.wake_fd(), self.wake.as_raw_fd()]
    }

    fn request_stop(&mut self) {
        self.vring.stop();
    }

    fn finished(&self) -> bool {
        self.vring.is_stopping() && !self.vring.has_resubmits()
    }
}

impl Drop for EventQueue {
    fn drop(&mut self) {
        {
            let mut ev = lock(&self.shared.events);
            ev.running = false;
            ev.pending.clear();
            ev.missed = false;
        }
    }
}
