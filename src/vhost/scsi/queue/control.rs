//! The virtio-scsi control queue (virtio 1.2 §5.6.6.2): task management functions and
//! asynchronous notification queries, answered on the ring directly (no slots: the
//! traffic is rare and a TMF may wait for its LUN's commands).
//!
//! Tracked in the in-flight region like the request queues when the frontend shares one
//! (vhost-user.rst "Inflight I/O tracking"): a request taken and not answered before a
//! crash is taken again, first, by the next instance, and answered once (a TMF is run
//! again against the LUN as it is then); the ring resumes after it, also on a packed ring,
//! whose base QEMU cannot restore.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_scsi::*;
use vm_memory::GuestMemoryMmap;

use super::super::request::{
    parse_control, parse_control_ring, ControlRequest, Desc, LunAddr, Streams, AN_RESP_LEN,
};
use super::super::{ScsiShared, ScsiTarget, MAX_TARGETS};
use crate::reactor::Poller;
use crate::vhost::device::QueueSetup;
use crate::vhost::engine::GuestWriter;
use crate::vhost::vring::{Vring, POP_BUDGET};

/// How long a task management function waits for the LUN's commands to finish.
const TMF_TIMEOUT: Duration = Duration::from_secs(10);
/// TMF response FUNCTION COMPLETE (§5.6.6.2.1; 0, the same value as `VIRTIO_SCSI_S_OK`).
const VIRTIO_SCSI_S_FUNCTION_COMPLETE: u32 = 0;

/// A TMF waiting for its LUN's commands to finish.
struct PendingTmf {
    head_index: u16,
    resp: Vec<Desc>,
    target: Arc<ScsiTarget>,
    /// Response once the LUN is idle.
    response: u8,
    deadline: Instant,
}

/// The control queue's poller (§5.6.6.2).
pub struct ControlQueue {
    /// First field: dropped (answering GET_VRING_BASE) before the rest.
    vring: Vring,
    shared: Arc<ScsiShared>,
    streams: Streams,
    waiting: Vec<PendingTmf>,
}

impl ControlQueue {
    /// Builds the poller; with the frontend's in-flight region, resumes where a previous
    /// instance left the ring ([`Vring::track_inflight`]).
    pub fn new(mut setup: QueueSetup, shared: Arc<ScsiShared>) -> Self {
        let inflight = setup.inflight.take();
        // Control and event traffic is rare: never held back by coalescing.
        let mut vring = Vring::new(setup).without_coalescing();
        if let Some(part) = inflight {
            vring.track_inflight(part);
        }
        ControlQueue {
            vring,
            shared,
            streams: Streams::default(),
            waiting: Vec::new(),
        }
    }

    /// Writes `bytes` as the answer of chain `head` and returns the chain.
    fn respond(&mut self, mem: &GuestMemoryMmap, head: u16, descs: &[Desc], bytes: &[u8]) {
        let used = match GuestWriter::new(self.vring.map()).write_stream(descs, bytes) {
            Ok(()) => bytes.len() as u32,
            Err(_) => 0,
        };
        self.vring.add_used(mem, head, used, "a control request");
    }

    /// The TMF response for `subtype` (§5.6.6.2.1), and whether it waits for the LUN's
    /// in-flight commands: blockd cannot abort a command the bdev has, so aborts and
    /// resets succeed once the LUN's commands have completed.
    fn tmf_response(subtype: u32, busy: bool) -> (u8, bool) {
        match subtype {
            VIRTIO_SCSI_T_TMF_ABORT_TASK
            | VIRTIO_SCSI_T_TMF_ABORT_TASK_SET
            | VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET => (VIRTIO_SCSI_S_FUNCTION_COMPLETE as u8, true),
            VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET | VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET => {
                (VIRTIO_SCSI_S_FUNCTION_SUCCEEDED as u8, true)
            }
            VIRTIO_SCSI_T_TMF_QUERY_TASK | VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => {
                if busy {
                    (VIRTIO_SCSI_S_FUNCTION_SUCCEEDED as u8, false)
                } else {
                    (VIRTIO_SCSI_S_FUNCTION_COMPLETE as u8, false)
                }
            }
            _ => (VIRTIO_SCSI_S_FUNCTION_REJECTED as u8, false),
        }
    }

    fn handle(&mut self, mem: &GuestMemoryMmap, head: u16, req: ControlRequest) {
        let descs = self.streams.writable().to_vec();
        match req {
            ControlRequest::Tmf { subtype, lun, .. } => {
                let addr = LunAddr::decode(&lun);
                let target = addr
                    .filter(|a| (a.target as usize) < MAX_TARGETS)
                    .and_then(|a| self.shared.target(a.target));
                let response = match (addr, target) {
                    (Some(a), Some(t)) if a.lun == 0 => {
                        let busy = t.in_flight.load(Ordering::Acquire) > 0;
                        let (response, wait) = Self::tmf_response(subtype, busy);
                        if wait && busy {
                            self.waiting.push(PendingTmf {
                                head_index: head,
                                resp: descs,
                                target: t,
                                response,
                                deadline: Instant::now() + TMF_TIMEOUT,
                            });
                            return;
                        }
                        response
                    }
                    (Some(_), Some(_)) => VIRTIO_SCSI_S_INCORRECT_LUN as u8,
                    _ => VIRTIO_SCSI_S_BAD_TARGET as u8,
                };
                self.respond(mem, head, &descs, &[response]);
            }
            ControlRequest::An { .. } => {
                // No asynchronous notifications are supported: event_actual = 0.
                let mut b = [0u8; AN_RESP_LEN as usize];
                b[4] = VIRTIO_SCSI_S_OK as u8;
                self.respond(mem, head, &descs, &b);
            }
        }
    }

    fn check_waiting(&mut self, mem: &GuestMemoryMmap) -> usize {
        if self.waiting.is_empty() {
            return 0;
        }
        let now = Instant::now();
        let mut n = 0;
        let mut i = 0;
        while i < self.waiting.len() {
            let w = &self.waiting[i];
            let idle = w.target.in_flight.load(Ordering::Acquire) == 0;
            if idle || now >= w.deadline {
                let w = self.waiting.swap_remove(i);
                let response = if idle {
                    w.response
                } else {
                    tracing::warn!(
                        queue = self.vring.index(),
                        target = w.target.id,
                        "task management timed out waiting for commands"
                    );
                    VIRTIO_SCSI_S_FAILURE as u8
                };
                self.respond(mem, w.head_index, &w.resp, &[response]);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }

    /// Takes and handles chains until the budget or the ring is exhausted; returns `work`
    /// plus the chains taken.
    fn take_requests(&mut self, mem: &Arc<GuestMemoryMmap>, mut work: usize) -> usize {
        while work < POP_BUDGET {
            // Through the ring view when there is one (a packed ring always: virtio-queue
            // reads split rings only), which also hands out the resubmitted heads.
            let (head, parsed) = if self.vring.is_packed() || self.vring.has_view() {
                let Some(head) = self.vring.pop_head() else {
                    break;
                };
                (
                    head,
                    parse_control_ring(&self.vring, head, &mut self.streams),
                )
            } else {
                let Some(mut chain) = self.vring.pop(mem) else {
                    break;
                };
                let head = chain.head_index();
                (head, parse_control(&mut chain, &mut self.streams))
            };
            work += 1;
            match parsed {
                Ok(req) => self.handle(mem, head, req),
                Err(e) => {
                    tracing::debug!(queue = self.vring.index(), "bad control request: {e}");
                    self.vring.add_used(mem, head, 0, "a chain");
                }
            }
        }
        work
    }
}

impl Poller for ControlQueue {
    fn poll(&mut self) -> usize {
        let mut mem = self.vring.sync_current_mem();
        let mut work = self.check_waiting(&mem);
        // A stopping ring still answers the requests a previous instance left in flight:
        // they are off the ring, and GET_VRING_BASE must find none unanswered.
        if !self.vring.is_stopping() || self.vring.has_resubmits() {
            work = self.take_requests(&mem, work);
            if self.vring.mem_stale() {
                // A chain published after the frontend swapped the memory table
                // (`Vring::mem_stale`): take it with the new table.
                mem = self.vring.sync_current_mem();
                work = self.take_requests(&mem, work);
            }
        }
        if work > 0 {
            self.vring.notify_guest(&mem);
        }
        work
    }

    fn arm(&mut self) -> bool {
        self.vring.arm()
    }

    fn disarm(&mut self) {
        self.vring.disarm();
    }

    /// Control and event traffic is rare and never worth polling for.
    fn driver_waits(&self) -> bool {
        true
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        vec![self.vring.wake_fd()]
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.waiting.is_empty() {
            None
        } else {
            Some(Instant::now() + Duration::from_millis(1))
        }
    }

    fn request_stop(&mut self) {
        self.vring.stop();
    }

    fn finished(&self) -> bool {
        self.vring.is_stopping() && self.waiting.is_empty() && !self.vring.has_resubmits()
    }
}
