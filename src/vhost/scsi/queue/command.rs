//! The virtio-scsi request queue's device part (virtio 1.2 §5.6.6.1) on the shared
//! [`Engine`]: commands are decoded ([`cdb`]) and sent to their target's bdev channel with
//! the guest's buffers (zero-copy), or answered at once (emulated commands, errors).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_scsi::*;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::super::cdb::{self, Action};
use super::super::request::{
    copy_from_iovecs, copy_to_iovecs, CmdRequest, CmdResponse, LunAddr, RequestError, RESP_LEN,
};
use super::super::sense::{self, Sense};
use super::super::{ScsiShared, ScsiTarget, MAX_TARGETS};
use crate::bdev::{BdevChannel, IoOp, IoResult, IoVecs};
use crate::vhost::device::QueueSetup;
use crate::vhost::engine::{Engine, GuestWriter, Parsed, QueueDevice};
use crate::vhost::vring::Vring;

/// No channel: the command completed without the bdev.
const NO_CHAN: usize = usize::MAX;

/// The poller of one request queue.
pub type RequestQueue = Engine<ScsiIo>;

impl RequestQueue {
    /// Builds the poller (on its reactor thread); channels open on the first poll.
    pub fn new(setup: QueueSetup, shared: Arc<ScsiShared>) -> Self {
        let queue = setup.index;
        let epoll = Epoll::new()
            .map_err(|e| tracing::warn!(queue, "no completion epoll: {e}"))
            .ok();
        let mut io = ScsiIo {
            queue,
            shared,
            generation: u64::MAX,
            luns: [None; MAX_TARGETS],
            chans: Vec::new(),
            has_retired: false,
            epoll,
        };
        io.resync();
        Engine::with_device(setup, io)
    }
}

/// A target's bdev channel on this queue.
struct LunChan {
    target: Arc<ScsiTarget>,
    chan: BdevChannel,
    /// Commands of this queue using the channel.
    users: usize,
    /// Something was submitted since the last kick.
    dirty: bool,
    /// The channel's completion fd could not be added to `ScsiIo::epoll`: nothing wakes a
    /// sleeping reactor for its completions, so `next_deadline` polls it while it has I/O.
    unwatched: bool,
}

/// One command in a slot.
pub struct ScsiCmd {
    req: CmdRequest,
    /// The channel the command uses ([`NO_CHAN`]: none).
    chan: usize,
    target: Option<Arc<ScsiTarget>>,
    /// Bdev operations submitted by [`QueueDevice::start`].
    pending: u32,
    resp: CmdResponse,
    /// Data-in bytes written on success.
    data_in_bytes: u64,
    /// Whether the data path reads (for the MEDIUM ERROR flavour).
    read: bool,
    /// UNMAP parameter list / WRITE SAME block.
    scratch: Vec<u8>,
    ranges: Vec<(u64, u64)>,
}

impl Default for ScsiCmd {
    fn default() -> Self {
        ScsiCmd {
            req: CmdRequest::default(),
            chan: NO_CHAN,
            target: None,
            pending: 0,
            resp: CmdResponse::default(),
            data_in_bytes: 0,
            read: false,
            scratch: Vec::new(),
            ranges: Vec::new(),
        }
    }
}

impl ScsiCmd {
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

/// A request queue's device part: the targets' bdev channels on this queue.
pub struct ScsiIo {
    /// The queue index (log context).
    queue: u16,
    shared: Arc<ScsiShared>,
    generation: u64,
    luns: [Option<usize>; MAX_TARGETS],
    chans: Vec<Option<LunChan>>,
    has_retired: bool,
    /// Gathers the channels' completion fds (channels come and go with targets, the
    /// reactor asks for wake fds only once).
    epoll: Option<Epoll>,
}

impl ScsiIo {
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
                    let unwatched = match (&self.epoll, chan.completion_fd()) {
                        (_, None) => false,
                        (None, Some(_)) => true,
                        (Some(ep), Some(fd)) => ep
                            .ctl(
                                ControlOperation::Add,
                                fd,
                                EpollEvent::new(EventSet::IN, idx as u64),
                            )
                            .map_err(|e| {
                                tracing::error!(
                                    queue = self.queue,
                                    target = i,
                                    bdev = t.bdev.name(),
                                    "cannot watch the channel's completions, polling them: {e}"
                                )
                            })
                            .is_err(),
                    };
                    self.chans[idx] = Some(LunChan {
                        target: t.clone(),
                        chan,
                        users: 0,
                        dirty: false,
                        unwatched,
                    });
                    self.luns[i] = Some(idx);
                }
                Err(e) => tracing::error!(
                    queue = self.queue,
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
                if let (Some(ep), Some(fd), false) =
                    (&self.epoll, lc.chan.completion_fd(), lc.unwatched)
                {
                    // Best effort: dropping the channel below closes the fd, which takes it
                    // out of the epoll set anyway.
                    let _ = ep.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                self.chans[idx] = None;
            } else {
                left = true;
            }
        }
        self.has_retired = left;
    }

    /// The verdict on a parse: a rejected command is answered with FAILURE when it has
    /// room for a response (§5.6.6.1), else returned unused.
    #[inline]
    fn parsed(&self, slot: &mut ScsiCmd, r: Result<(), RequestError>) -> Parsed {
        let Err(e) = r else {
            return Parsed::Valid;
        };
        tracing::debug!(queue = self.queue, "bad request: {e}");
        slot.resp = CmdResponse {
            response: VIRTIO_SCSI_S_FAILURE as u8,
            ..Default::default()
        };
        slot.data_in_bytes = 0;
        slot.chan = NO_CHAN;
        if e.can_respond {
            Parsed::Answer
        } else {
            Parsed::Unusable
        }
    }
}

impl QueueDevice for ScsiIo {
    type Request = ScsiCmd;

    fn refresh(&mut self) {
        self.resync();
        if self.has_retired {
            self.reap_retired();
        }
    }

    #[inline]
    fn parse_ring(&mut self, slot: &mut ScsiCmd, vring: &Vring, head: u16) -> Parsed {
        let r = slot.req.parse_ring(vring, head);
        self.parsed(slot, r)
    }

    fn parse_chain(
        &mut self,
        slot: &mut ScsiCmd,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Parsed {
        let r = slot.req.parse_into(chain);
        self.parsed(slot, r)
    }

    /// Starts a parsed command; returns its bdev operations (0: answered at once).
    fn start(&mut self, tag: u32, slot: &mut ScsiCmd) -> u32 {
        slot.resp = CmdResponse::default();
        slot.data_in_bytes = 0;
        slot.pending = 0;
        slot.read = false;
        slot.chan = NO_CHAN;
        let Some(addr) = LunAddr::decode(&slot.req.lun) else {
            slot.resp.response = VIRTIO_SCSI_S_BAD_TARGET as u8;
            return 0;
        };
        let ci = self.luns.get(addr.target as usize).copied().flatten();
        let Some(lc) = ci
            .and_then(|ci| self.chans.get_mut(ci))
            .and_then(Option::as_mut)
        else {
            // §5.6.6.1: no such target (as SPDK).
            slot.resp.response = VIRTIO_SCSI_S_BAD_TARGET as u8;
            return 0;
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
        // The submits below are sound because the iovecs live in `slot.req`, untouched until
        // the command completes, and point into guest memory the engine keeps mapped as long.
        match action {
            Action::Good => {}
            Action::Data(d) => {
                // SAFETY: the memory the chain was parsed against is mapped during the poll
                // pass.
                let n = unsafe { copy_to_iovecs(&req.data_in, &d) };
                slot.set_data_in(n as u64);
            }
            Action::Check(s) => slot.check(s),
            Action::Read { offset, len } => {
                if req.data_in_len < len {
                    slot.check(sense::INVALID_FIELD_IN_CDB);
                } else {
                    trim_iovecs(&mut req.data_in, len);
                    // SAFETY: `req.data_in` and its guest buffers outlive the I/O (see above).
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
                    // FUA (SBC-3 §5.31): durable before GOOD.
                    // SAFETY: `req.data_out` and its guest buffers outlive the I/O (see above).
                    unsafe {
                        let op = IoOp::Write {
                            offset,
                            iovs: IoVecs::from_slice(&req.data_out),
                        };
                        if fua {
                            lc.chan.submit_fua(tag as u64, op)
                        } else {
                            lc.chan.submit(tag as u64, op)
                        }
                    };
                    slot.pending = 1;
                }
            }
            Action::Flush => {
                // SAFETY: a flush carries no buffers.
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
                                // SAFETY: an unmap carries no buffers.
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
                        // SAFETY: unmap and write-zeroes carry no buffers.
                        unsafe { lc.chan.submit(tag as u64, op) };
                        slot.pending = 1;
                    }
                    Err(s) => slot.check(s),
                }
            }
        }
        if slot.pending == 0 {
            return 0;
        }
        lc.users += 1;
        lc.dirty = true;
        lc.target.in_flight.fetch_add(1, Ordering::AcqRel);
        slot.target = Some(lc.target.clone());
        slot.chan = ci;
        slot.pending
    }

    #[inline]
    fn on_io_done(slot: &mut ScsiCmd, res: IoResult) {
        if let Err(e) = res {
            if slot.resp.status == sense::GOOD {
                slot.check(cdb::io_error_sense(e.0, slot.read));
            }
        }
    }

    /// Writes the response header (§5.6.6.1) and releases the command's channel.
    fn finish(&mut self, slot: &mut ScsiCmd, out: GuestWriter<'_>) -> u32 {
        let bytes = slot.resp.to_bytes();
        // The response header was checked at parse time: a failure means the frontend
        // removed the memory meanwhile, and nothing can be reported.
        let used = match out.write_stream(slot.req.streams.writable(), &bytes) {
            Ok(()) => u32::try_from(RESP_LEN + slot.data_in_bytes).unwrap_or(0),
            Err(_) => 0,
        };
        if slot.chan != NO_CHAN {
            if let Some(Some(lc)) = self.chans.get_mut(slot.chan) {
                lc.users = lc.users.saturating_sub(1);
            }
            slot.chan = NO_CHAN;
        }
        if let Some(t) = slot.target.take() {
            t.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        used
    }

    #[inline]
    fn poll_io(&mut self, done: &mut dyn FnMut(u64, IoResult)) {
        for lc in self.chans.iter_mut().flatten() {
            lc.chan.poll(done);
        }
    }

    fn kick(&mut self) {
        for lc in self.chans.iter_mut().flatten() {
            if lc.dirty {
                lc.dirty = false;
                lc.chan.kick();
            }
        }
    }

    fn arm(&mut self) -> bool {
        let mut completions = false;
        for lc in self.chans.iter_mut().flatten() {
            completions |= lc.chan.arm();
        }
        completions
    }

    fn completion_fds(&self, out: &mut Vec<RawFd>) {
        if let Some(ep) = &self.epoll {
            out.push(ep.as_raw_fd());
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let d = self
            .chans
            .iter()
            .flatten()
            .filter_map(|lc| lc.chan.next_deadline())
            .min();
        // A channel whose completions cannot wake the reactor: poll it while it has I/O.
        let polled = self.chans.iter().flatten();
        if polled
            .filter(|lc| lc.unwatched)
            .any(|lc| lc.chan.in_flight() > 0)
        {
            let soon = Instant::now() + Duration::from_millis(1);
            return Some(d.map_or(soon, |d| d.min(soon)));
        }
        // A target added while the reactor sleeps: look at it soon.
        if self.shared.generation() != self.generation || self.has_retired {
            return Some(Instant::now() + Duration::from_millis(1));
        }
        d
    }

    fn awaits_helper_threads(&self) -> bool {
        self.chans
            .iter()
            .flatten()
            .any(|lc| lc.chan.awaits_helper_threads())
    }
}
