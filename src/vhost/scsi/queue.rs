//! The virtio-scsi queues on the reactors (virtio 1.2 §5.6.6): the request queues (SCSI
//! commands to the bdevs, zero-copy), the control queue (task management, asynchronous
//! notification) and the event queue (hot-plug events).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_scsi::*;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::cdb::{self, Action};
use super::request::{
    copy_from_iovecs, copy_to_iovecs, parse_control, write_stream, CmdRequest, CmdResponse,
    ControlRequest, Desc, Event, LunAddr, Streams, AN_RESP_LEN, EVENT_LEN, RESP_LEN, TMF_RESP_LEN,
};
use super::sense::{self, Sense};
use super::{lock, ScsiShared, ScsiTarget, MAX_TARGETS};
use crate::bdev::{BdevChannel, IoOp, IoResult, IoVecs};
use crate::reactor::{min_deadline, Poller};
use crate::vhost::device::QueueSetup;
use crate::vhost::vring::{Vring, POP_BUDGET};

/// How long a task management function waits for the LUN's commands to finish.
const TMF_TIMEOUT: Duration = Duration::from_secs(10);
/// TMF response FUNCTION COMPLETE (§5.6.6.2.1; 0, the same value as `VIRTIO_SCSI_S_OK`).
const VIRTIO_SCSI_S_FUNCTION_COMPLETE: u32 = 0;
/// No channel: the command completed without the bdev.
const NO_CHAN: usize = usize::MAX;

/// A target's bdev channel on this queue.
struct LunChan {
    target: Arc<ScsiTarget>,
    chan: BdevChannel,
    /// Commands of this queue using the channel.
    users: usize,
    /// Something was submitted since the last kick.
    dirty: bool,
}

/// An in-flight command.
#[derive(Default)]
struct Slot {
    req: CmdRequest,
    /// Keeps the guest memory the iovecs point into mapped until completion.
    mem: Option<Arc<GuestMemoryMmap>>,
    chan: usize,
    target: Option<Arc<ScsiTarget>>,
    pending: u32,
    resp: CmdResponse,
    /// Data-in bytes written on success.
    data_in_bytes: u64,
    /// Whether the data path reads (for the MEDIUM ERROR flavour).
    read: bool,
    /// FUA write: flush before GOOD.
    flush_after: bool,
    /// UNMAP parameter list / WRITE SAME block.
    scratch: Vec<u8>,
    ranges: Vec<(u64, u64)>,
}

impl Slot {
    fn check(&mut self, s: Sense) {
        self.resp.status = sense::CHECK_CONDITION;
        self.resp.sense = s.fixed();
        self.resp.sense_len = sense::FIXED_SENSE_LEN as u32;
        self.data_in_bytes = 0;
        let expected = self.req.data_in_len.max(self.req.data_out_len);
        self.resp.resid = u32::try_from(expected).unwrap_or(u32::MAX);
    }

    fn set_data_in(&mut self, n: u64) {
        self.data_in_bytes = n;
        let resid = self.req.data_in_len.saturating_sub(n);
        self.resp.resid = u32::try_from(resid).unwrap_or(u32::MAX);
    }
}

/// Cuts `iovs` to their first `len` bytes (`len` ≤ their total).
fn trim_iovecs(iovs: &mut Vec<libc::iovec>, len: u64) {
    let mut left = len as usize;
    let mut keep = 0;
    for v in iovs.iter_mut() {
        if left == 0 {
            break;
        }
        if v.iov_len > left {
            v.iov_len = left;
        }
        left -= v.iov_len;
        keep += 1;
    }
    iovs.truncate(keep);
}

/// Standard INQUIRY data for a LUN that does not exist (SPC-4 §6.6.2: peripheral
/// qualifier 011b, device type 1Fh), truncated to the allocation length.
fn null_lun_inquiry(cdb: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 36];
    d[0] = 0x7f;
    d[2] = 0x06;
    d[3] = 0x12;
    d[4] = 31;
    d[8..16].copy_from_slice(cdb::VENDOR_ID);
    let alloc = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
    d.truncate(alloc);
    d
}

/// The poller of one request queue.
pub struct RequestQueue {
    /// First field: dropped (answering GET_VRING_BASE) before the rest.
    vring: Vring,
    shared: Arc<ScsiShared>,
    generation: u64,
    luns: [Option<usize>; MAX_TARGETS],
    chans: Vec<Option<LunChan>>,
    has_retired: bool,
    /// Gathers the channels' completion fds (channels come and go with targets, the
    /// reactor asks for wake fds only once).
    epoll: Option<Epoll>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    done: Vec<u32>,
    reflush: Vec<u32>,
}

impl RequestQueue {
    /// Builds the poller (on its reactor thread); channels open on the first poll.
    pub fn new(setup: QueueSetup, shared: Arc<ScsiShared>) -> Self {
        let vring = Vring::new(setup);
        let n = vring.size().max(1) as usize;
        let epoll = Epoll::new()
            .map_err(|e| tracing::warn!(queue = vring.index(), "no completion epoll: {e}"))
            .ok();
        let mut q = RequestQueue {
            vring,
            shared,
            generation: u64::MAX,
            luns: [None; MAX_TARGETS],
            chans: Vec::new(),
            has_retired: false,
            epoll,
            slots: (0..n).map(|_| Slot::default()).collect(),
            free: (0..n as u32).rev().collect(),
            in_flight: 0,
            done: Vec::with_capacity(n),
            reflush: Vec::new(),
        };
        q.resync();
        q
    }

    /// Follows the target table: opens channels for new targets, retires removed ones.
    fn resync(&mut self) {
        let gen = self.shared.generation();
        if gen == self.generation {
            return;
        }
        self.generation = gen;
        let targets = self.shared.targets();
        for (i, t) in targets.iter().enumerate() {
            let cur = self.luns[i]
                .and_then(|ci| self.chans.get(ci))
                .and_then(Option::as_ref)
                .map(|lc| &lc.target);
            let same = match (cur, t) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            if self.luns[i].take().is_some() {
                self.has_retired = true;
            }
            let Some(t) = t else { continue };
            match t.bdev.open_channel() {
                Ok(chan) => {
                    let idx = match self.chans.iter().position(Option::is_none) {
                        Some(i) => i,
                        None => {
                            self.chans.push(None);
                            self.chans.len() - 1
                        }
                    };
                    if let (Some(ep), Some(fd)) = (&self.epoll, chan.completion_fd()) {
                        let _ = ep.ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, idx as u64),
                        );
                    }
                    self.chans[idx] = Some(LunChan {
                        target: t.clone(),
                        chan,
                        users: 0,
                        dirty: false,
                    });
                    self.luns[i] = Some(idx);
                }
                Err(e) => tracing::error!(
                    queue = self.vring.index(),
                    target = i,
                    bdev = t.bdev.name(),
                    "cannot open a bdev channel: {e}"
                ),
            }
        }
    }

    /// Drops the channels of removed targets once nothing uses them.
    fn reap_retired(&mut self) {
        let mut left = false;
        for idx in 0..self.chans.len() {
            if self.luns.contains(&Some(idx)) {
                continue;
            }
            let Some(lc) = &self.chans[idx] else { continue };
            if lc.users == 0 && lc.chan.in_flight() == 0 {
                if let (Some(ep), Some(fd)) = (&self.epoll, lc.chan.completion_fd()) {
                    let _ = ep.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                self.chans[idx] = None;
            } else {
                left = true;
            }
        }
        self.has_retired = left;
    }

    /// Starts a parsed command; false when it completed at once.
    fn start(&mut self, tag: u32, mem: &Arc<GuestMemoryMmap>) -> bool {
        let slot = &mut self.slots[tag as usize];
        slot.resp = CmdResponse::default();
        slot.data_in_bytes = 0;
        slot.pending = 0;
        slot.flush_after = false;
        slot.read = false;
        slot.chan = NO_CHAN;
        let Some(addr) = LunAddr::decode(&slot.req.lun) else {
            slot.resp.response = VIRTIO_SCSI_S_BAD_TARGET as u8;
            return false;
        };
        let ci = self.luns.get(addr.target as usize).copied().flatten();
        let Some(lc) = ci
            .and_then(|ci| self.chans.get_mut(ci))
            .and_then(Option::as_mut)
        else {
            // §5.6.6.1: no such target (as SPDK).
            slot.resp.response = VIRTIO_SCSI_S_BAD_TARGET as u8;
            return false;
        };
        let ci = ci.unwrap_or(NO_CHAN);
        let bdev = lc.target.bdev.clone();
        let opcode = slot.req.cdb[0];
        let action = if addr.lun != 0 && opcode != cdb::op::REPORT_LUNS {
            match opcode {
                cdb::op::INQUIRY if slot.req.cdb[1] & 0x01 == 0 => {
                    Action::Data(null_lun_inquiry(&slot.req.cdb))
                }
                cdb::op::REQUEST_SENSE => cdb::decode(&slot.req.cdb, &bdev),
                _ => Action::Check(sense::LUN_NOT_SUPPORTED),
            }
        } else {
            cdb::decode(&slot.req.cdb, &bdev)
        };
        let req = &mut slot.req;
        // SAFETY (submits below): the iovecs live in `slot.req`, untouched until the
        // command completes, and point into guest memory kept mapped by `slot.mem`.
        match action {
            Action::Good => {}
            Action::Data(d) => {
                // SAFETY: `mem` (the memory the chain was parsed against) is alive.
                let n = unsafe { copy_to_iovecs(&req.data_in, &d) };
                slot.set_data_in(n as u64);
            }
            Action::Check(s) => slot.check(s),
            Action::Read { offset, len } => {
                if req.data_in_len < len {
                    slot.check(sense::INVALID_FIELD_IN_CDB);
                } else {
                    trim_iovecs(&mut req.data_in, len);
                    unsafe {
                        lc.chan.submit(
                            tag as u64,
                            IoOp::Read {
                                offset,
                                iovs: IoVecs::from_slice(&req.data_in),
                            },
                        )
                    };
                    slot.pending = 1;
                    slot.read = true;
                    slot.set_data_in(len);
                }
            }
            Action::Write { offset, len, fua } => {
                if req.data_out_len < len {
                    slot.check(sense::INVALID_FIELD_IN_CDB);
                } else {
                    trim_iovecs(&mut req.data_out, len);
                    unsafe {
                        lc.chan.submit(
                            tag as u64,
                            IoOp::Write {
                                offset,
                                iovs: IoVecs::from_slice(&req.data_out),
                            },
                        )
                    };
                    slot.pending = 1;
                    slot.flush_after = fua;
                }
            }
            Action::Flush => {
                unsafe { lc.chan.submit(tag as u64, IoOp::Flush) };
                slot.pending = 1;
            }
            Action::Unmap { param_len } => {
                if req.data_out_len < param_len as u64 {
                    slot.check(sense::PARAM_LIST_LENGTH_ERROR);
                } else {
                    slot.scratch.resize(param_len, 0);
                    // SAFETY: the data-out iovecs point into live guest memory.
                    unsafe { copy_from_iovecs(&req.data_out, &mut slot.scratch) };
                    match cdb::parse_unmap(&slot.scratch, &bdev, &mut slot.ranges) {
                        Ok(()) => {
                            for &(offset, len) in &slot.ranges {
                                unsafe { lc.chan.submit(tag as u64, IoOp::Unmap { offset, len }) };
                                slot.pending += 1;
                            }
                        }
                        Err(s) => slot.check(s),
                    }
                }
            }
            Action::WriteSame {
                offset,
                len,
                unmap,
                ndob,
            } => {
                let bs = u64::from(bdev.block_size());
                let pattern_ok = if ndob {
                    Ok(())
                } else if req.data_out_len < bs {
                    Err(sense::PARAM_LIST_LENGTH_ERROR)
                } else {
                    slot.scratch.resize(bs as usize, 0);
                    // SAFETY: as above.
                    unsafe { copy_from_iovecs(&req.data_out, &mut slot.scratch) };
                    cdb::check_write_same_block(&slot.scratch)
                };
                match pattern_ok {
                    Ok(()) => {
                        let op = if unmap {
                            IoOp::Unmap { offset, len }
                        } else {
                            IoOp::WriteZeroes {
                                offset,
                                len,
                                may_unmap: false,
                            }
                        };
                        unsafe { lc.chan.submit(tag as u64, op) };
                        slot.pending = 1;
                    }
                    Err(s) => slot.check(s),
                }
            }
        }
        if slot.pending == 0 {
            return false;
        }
        lc.users += 1;
        lc.dirty = true;
        lc.target.in_flight.fetch_add(1, Ordering::AcqRel);
        slot.target = Some(lc.target.clone());
        slot.chan = ci;
        slot.mem = Some(mem.clone());
        true
    }

    /// Applies a bdev completion; true when the command is complete.
    fn on_bdev_done(slot: &mut Slot, res: IoResult) -> bool {
        if let Err(e) = res {
            if slot.resp.status == sense::GOOD {
                slot.check(cdb::io_error_sense(e.0, slot.read));
            }
        }
        slot.pending = slot.pending.saturating_sub(1);
        slot.pending == 0
    }

    /// Writes the response, returns the chain to the driver, frees the slot.
    fn complete(&mut self, tag: u32, mem: &GuestMemoryMmap) {
        let Some(slot) = self.slots.get_mut(tag as usize) else {
            return;
        };
        let bytes = slot.resp.to_bytes();
        let used = match write_stream(mem, &slot.req.streams.writable, 0, &bytes) {
            // No room for a response (a rejected chain): nothing written.
            Ok(()) if slot.req.streams.writable.is_empty() => 0,
            Ok(()) => RESP_LEN + slot.data_in_bytes,
            // The frontend removed the memory meanwhile: nothing can be reported.
            Err(_) => 0,
        };
        let used = u32::try_from(used).unwrap_or(0);
        self.vring
            .add_used(mem, slot.req.head_index, used, "a command");
        if slot.chan != NO_CHAN {
            if let Some(Some(lc)) = self.chans.get_mut(slot.chan) {
                lc.users = lc.users.saturating_sub(1);
            }
            slot.chan = NO_CHAN;
        }
        if let Some(t) = slot.target.take() {
            t.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        slot.mem = None;
        self.free.push(tag);
        self.in_flight -= 1;
    }

    fn kick_channels(&mut self) {
        for lc in self.chans.iter_mut().flatten() {
            if lc.dirty {
                lc.dirty = false;
                lc.chan.kick();
            }
        }
    }
}

impl Poller for RequestQueue {
    fn poll(&mut self) -> usize {
        let mem: Arc<GuestMemoryMmap> = self.vring.mem().memory().into_inner();
        self.resync();
        if self.has_retired {
            self.reap_retired();
        }
        let mut work = 0;

        let mut done = std::mem::take(&mut self.done);
        let mut reflush = std::mem::take(&mut self.reflush);
        {
            let slots = &mut self.slots;
            for lc in self.chans.iter_mut().flatten() {
                lc.chan.poll(&mut |tag, res| {
                    let Some(slot) = slots.get_mut(tag as usize) else {
                        return;
                    };
                    if RequestQueue::on_bdev_done(slot, res) {
                        if slot.flush_after && slot.resp.status == sense::GOOD {
                            slot.flush_after = false;
                            reflush.push(tag as u32);
                        } else {
                            done.push(tag as u32);
                        }
                    }
                });
            }
        }
        for &tag in &reflush {
            let slot = &mut self.slots[tag as usize];
            if let Some(Some(lc)) = self.chans.get_mut(slot.chan) {
                slot.pending = 1;
                // SAFETY: a flush carries no buffers.
                unsafe { lc.chan.submit(tag as u64, IoOp::Flush) };
                lc.dirty = true;
            } else {
                done.push(tag);
            }
        }
        let completed = done.len();
        for &tag in &done {
            self.complete(tag, &mem);
        }
        done.clear();
        reflush.clear();
        self.done = done;
        self.reflush = reflush;
        work += completed;

        if !self.vring.is_stopping() {
            let mut popped = 0;
            while popped < POP_BUDGET {
                let Some((tag, chain)) = self.vring.pop_for_slot(&mem, &mut self.free) else {
                    break;
                };
                self.in_flight += 1;
                popped += 1;
                let slot = &mut self.slots[tag as usize];
                match slot.req.parse_into(chain) {
                    Ok(()) => {
                        if !self.start(tag, &mem) {
                            self.complete(tag, &mem);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(queue = self.vring.index(), "bad request: {e}");
                        slot.req.head_index = e.head_index;
                        slot.resp = CmdResponse {
                            response: VIRTIO_SCSI_S_FAILURE as u8,
                            ..Default::default()
                        };
                        slot.data_in_bytes = 0;
                        slot.chan = NO_CHAN;
                        if !e.can_respond {
                            slot.req.streams.writable.clear();
                        }
                        // With no room for a response, `complete` writes nothing and
                        // returns the chain with used length 0.
                        self.complete(tag, &mem);
                    }
                }
            }
            work += popped;
        }
        self.kick_channels();

        if work > 0 || self.vring.irq_due() {
            self.vring.notify_guest(&mem);
        }
        work
    }

    fn arm(&mut self) -> bool {
        let mut completions = false;
        for lc in self.chans.iter_mut().flatten() {
            completions |= lc.chan.arm();
        }
        (self.vring.arm() && !self.free.is_empty()) || completions
    }

    fn disarm(&mut self) {
        self.vring.disarm();
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.vring.wake_fd()];
        if let Some(ep) = &self.epoll {
            v.push(ep.as_raw_fd());
        }
        v
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut d = self
            .chans
            .iter()
            .flatten()
            .filter_map(|lc| lc.chan.next_deadline())
            .min();
        // A target added while the reactor sleeps: look at it soon.
        if self.shared.generation() != self.generation || self.has_retired {
            d = Some(Instant::now() + Duration::from_millis(1));
        }
        min_deadline(d, self.vring.irq_deadline())
    }

    fn request_stop(&mut self) {
        self.vring.stop();
    }

    fn finished(&self) -> bool {
        self.vring.is_stopping() && self.in_flight == 0
    }

    fn awaits_helper_threads(&self) -> bool {
        self.chans
            .iter()
            .flatten()
            .any(|lc| lc.chan.awaits_helper_threads())
    }
}

impl Drop for RequestQueue {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            tracing::error!(
                queue = self.vring.index(),
                in_flight = self.in_flight,
                "queue dropped with commands in flight"
            );
        }
    }
}

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
    /// Builds the poller.
    pub fn new(setup: QueueSetup, shared: Arc<ScsiShared>) -> Self {
        ControlQueue {
            // Control and event traffic is rare: never held back by coalescing.
            vring: Vring::new(setup).without_coalescing(),
            shared,
            streams: Streams::default(),
            waiting: Vec::new(),
        }
    }

    fn respond(&mut self, mem: &GuestMemoryMmap, head: u16, descs: &[Desc], bytes: &[u8]) {
        let used = match write_stream(mem, descs, 0, bytes) {
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
        let descs = std::mem::take(&mut self.streams.writable);
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
        let _ = TMF_RESP_LEN;
        self.streams.writable = descs;
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
}

impl Poller for ControlQueue {
    fn poll(&mut self) -> usize {
        let mem: Arc<GuestMemoryMmap> = self.vring.mem().memory().into_inner();
        let mut work = self.check_waiting(&mem);
        if !self.vring.is_stopping() {
            while work < POP_BUDGET {
                let Some(mut chain) = self.vring.pop(&mem) else {
                    break;
                };
                let head = chain.head_index();
                work += 1;
                match parse_control(&mut chain, &mut self.streams) {
                    Ok(req) => self.handle(&mem, head, req),
                    Err(e) => {
                        tracing::debug!(queue = self.vring.index(), "bad control request: {e}");
                        self.vring.add_used(&mem, head, 0, "a chain");
                    }
                }
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
        self.vring.is_stopping() && self.waiting.is_empty()
    }
}

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
    /// the driver scans the targets when it starts.
    pub fn new(setup: QueueSetup, shared: Arc<ScsiShared>) -> std::io::Result<Self> {
        {
            let mut ev = lock(&shared.events);
            ev.running = true;
            ev.pending.clear();
            ev.missed = false;
        }
        Ok(EventQueue {
            // Control and event traffic is rare: never held back by coalescing.
            vring: Vring::new(setup).without_coalescing(),
            wake: shared.event_wake.try_clone()?,
            shared,
            streams: Streams::default(),
        })
    }

    fn has_events(&self) -> bool {
        let ev = lock(&self.shared.events);
        !ev.pending.is_empty() || ev.missed
    }
}

impl Poller for EventQueue {
    fn poll(&mut self) -> usize {
        let mem: Arc<GuestMemoryMmap> = self.vring.mem().memory().into_inner();
        let mut work = 0;
        while !self.vring.is_stopping() && self.has_events() {
            let Some(mut chain) = self.vring.pop(&mem) else {
                break;
            };
            let head = chain.head_index();
            work += 1;
            let ok = self.streams.collect(&mut chain).is_ok()
                && self.streams.readable.is_empty()
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
                match write_stream(&*mem, &self.streams.writable, 0, &event.to_bytes()) {
                    Ok(()) => EVENT_LEN as u32,
                    Err(_) => 0,
                }
            } else {
                tracing::debug!(queue = self.vring.index(), "unusable event buffer");
                0
            };
            self.vring.add_used(&mem, head, used, "an event buffer");
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
        let _ = self.wake.read();
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        vec![self.vring.wake_fd(), self.wake.as_raw_fd()]
    }

    fn request_stop(&mut self) {
        self.vring.stop();
    }

    fn finished(&self) -> bool {
        self.vring.is_stopping()
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

#[cfg(test)]
mod tests;
