//! virtio-scsi request parsing (virtio 1.2 §5.6.6), zero-copy.
//!
//! A request-queue chain is one device-readable byte stream followed by one device-writable
//! byte stream (§2.7.4.2); without VIRTIO_SCSI_F_INOUT a command has data in one direction
//! only (§5.6.6.1):
//!
//! ```text
//! readable: virtio_scsi_cmd_req {lun[8], le64 id, u8 task_attr, u8 prio, u8 crn, cdb[32]} | data-out
//! writable: virtio_scsi_cmd_resp {le32 sense_len, le32 resid, le16 status_qualifier,
//!           u8 status, u8 response, sense[96]} | data-in
//! ```
//!
//! The device must not assume a descriptor layout (§2.7.4): headers may be split over
//! descriptors or share one with data. Data buffers become host iovecs into guest memory
//! (split at region boundaries); the response header stays as guest ranges written at
//! completion. Everything is guest-controlled: lengths, addresses and counts are checked,
//! failures are typed [`ParseError`]s. Control-queue requests (TMF, AN, §5.6.6.2) and event
//! buffers (§5.6.6.3) are parsed here too.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, GuestMemoryBackend};

#[cfg(any(test, feature = "fuzzing"))]
use crate::vhost::guest_map::GuestMap;
pub use crate::vhost::guest_stream::{
    copy_from_iovecs, copy_to_iovecs, read_stream, Desc, MAX_IOVECS,
};
use crate::vhost::guest_stream::{push_iovecs, walk, GuestRanges, StreamError};
use crate::vhost::split_ring::ChainError;
#[cfg(any(test, feature = "fuzzing"))]
use crate::vhost::split_ring::RingView;
use crate::vhost::vring::Vring;

/// `cdb_size` blockd advertises and requires (the virtio default; QEMU refuses changes).
pub const CDB_SIZE: usize = 32;
/// `sense_size` blockd advertises and requires.
pub const SENSE_SIZE: usize = 96;
/// Bytes of `virtio_scsi_cmd_req` with a 32-byte CDB.
pub const REQ_HEADER_LEN: u64 = 8 + 8 + 3 + CDB_SIZE as u64;
/// Bytes of `virtio_scsi_cmd_resp` with 96 bytes of sense.
pub const RESP_LEN: u64 = 4 + 4 + 2 + 1 + 1 + SENSE_SIZE as u64;
/// Most descriptors in one chain we accept.
pub const MAX_DESCS: usize = 1024;

/// Why a chain is not a usable request.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The chain is empty, loops, or has an unreadable descriptor or indirect table.
    #[error("descriptor chain truncated or empty")]
    BadChain,
    /// More than [`MAX_DESCS`] descriptors.
    #[error("more than {MAX_DESCS} descriptors")]
    TooManyDescriptors,
    /// A device-readable descriptor after a device-writable one (§2.7.4.2).
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer device-writable bytes than the response (or event) needs.
    #[error("device-writable part is {0} bytes, too short for the response")]
    ResponseTooShort(u64),
    /// Fewer device-readable bytes than the request header needs.
    #[error("request header is {0} bytes, too short")]
    HeaderTooShort(u64),
    /// A buffer is not (fully) backed by guest memory.
    #[error("guest memory range {addr:#x}+{len:#x} is not mapped")]
    BadGuestAddress { addr: u64, len: u64 },
    /// Data in both directions (VIRTIO_SCSI_F_INOUT is not offered).
    #[error("data in both directions without VIRTIO_SCSI_F_INOUT")]
    Bidirectional,
    /// The data maps to more than [`MAX_IOVECS`] host buffers.
    #[error("data maps to more than {MAX_IOVECS} host buffers")]
    TooManyIovecs,
    /// Unknown control-queue request type.
    #[error("unknown control request type {0}")]
    UnknownControlType(u32),
}

impl From<StreamError> for ParseError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::BadGuestAddress { addr, len } => ParseError::BadGuestAddress { addr, len },
            StreamError::TooManyIovecs => ParseError::TooManyIovecs,
        }
    }
}

/// The descriptors of a chain (zero-length ones dropped), in order: a device-readable
/// stream, then a device-writable stream (§2.7.4.2).
#[derive(Default, Debug)]
pub struct Streams {
    descs: Vec<Desc>,
    /// `descs[..first_write]` are readable, `descs[first_write..end_write]` writable; a
    /// readable descriptor at `end_write` breaks the order (and ends the usable part).
    first_write: usize,
    end_write: usize,
    pub readable_len: u64,
    pub writable_len: u64,
}

impl Streams {
    /// The device-readable stream.
    pub fn readable(&self) -> &[Desc] {
        &self.descs[..self.first_write]
    }

    /// The device-writable stream (up to a misplaced readable descriptor).
    pub fn writable(&self) -> &[Desc] {
        &self.descs[self.first_write..self.end_write]
    }

    fn clear(&mut self) {
        self.descs.clear();
        self.first_write = 0;
        self.end_write = 0;
        self.readable_len = 0;
        self.writable_len = 0;
    }

    /// Collects the chain's descriptors through virtio-queue, enforcing the
    /// readable-then-writable order.
    pub fn collect<M>(&mut self, chain: &mut DescriptorChain<M>) -> Result<(), ParseError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        self.clear();
        let mut count = 0;
        let mut last_has_next = false;
        for d in chain.by_ref() {
            count += 1;
            if count > MAX_DESCS {
                return Err(ParseError::TooManyDescriptors);
            }
            last_has_next = d.has_next();
            if d.len() > 0 {
                self.descs.push(Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write: d.is_write_only(),
                });
            }
        }
        // virtio-queue stops early (without an error) on loops, bad `next` indexes and
        // unreadable descriptors: the chain then ends on a descriptor with NEXT set.
        if count == 0 || last_has_next {
            return Err(ParseError::BadChain);
        }
        self.split()
    }

    /// Collects chain `head` through a ring view (`read` is [`crate::vhost::split_ring::RingView::read_chain`] or
    /// [`Vring::read_chain`]), as [`Streams::collect`] does through virtio-queue.
    pub fn collect_ring(
        &mut self,
        read: impl FnOnce(usize, &mut Vec<Desc>) -> Result<(), ChainError>,
    ) -> Result<(), ParseError> {
        self.clear();
        read(MAX_DESCS, &mut self.descs).map_err(|e| match e {
            ChainError::Empty | ChainError::Truncated => ParseError::BadChain,
            ChainError::TooLong => ParseError::TooManyDescriptors,
        })?;
        self.split()
    }

    /// Finds the two streams in `descs`.
    fn split(&mut self) -> Result<(), ParseError> {
        let n = self.descs.len();
        let first_write = self.descs.iter().position(|d| d.write).unwrap_or(n);
        let end_write = self.descs[first_write..]
            .iter()
            .position(|d| !d.write)
            .map_or(n, |i| first_write + i);
        self.first_write = first_write;
        self.end_write = end_write;
        let sum = |d: &[Desc]| d.iter().map(|d| u64::from(d.len)).sum::<u64>();
        self.readable_len = sum(self.readable());
        self.writable_len = sum(self.writable());
        if end_write < n {
            return Err(ParseError::ReadableAfterWritable);
        }
        Ok(())
    }
}

/// Translates `[skip, skip + take)` of the stream into host iovecs.
fn map_data<M: GuestRanges + ?Sized>(
    mem: &M,
    descs: &[Desc],
    skip: u64,
    take: u64,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ParseError> {
    walk(descs, skip, take, |addr, len| {
        push_iovecs(mem, addr, len, out).map_err(ParseError::from)
    })?;
    Ok(())
}

/// Which target and LUN a virtio-scsi LUN field addresses (§5.6.6.1: `lun[0]` = 1,
/// `lun[1]` = target, `lun[2..4]` = LUN in SAM flat (0x40) or peripheral addressing,
/// `lun[4..8]` = 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LunAddr {
    pub target: u8,
    pub lun: u16,
}

impl LunAddr {
    /// Decodes `lun`; `None` when it is not in the virtio-scsi single-level format.
    pub fn decode(lun: &[u8; 8]) -> Option<Self> {
        if lun[0] != 1 {
            return None;
        }
        let l = u16::from_be_bytes([lun[2], lun[3]]);
        // Address method 00b (peripheral, LUN < 256) or 01b (flat).
        let lun_id = match l >> 14 {
            0 => l,
            1 => l & 0x3fff,
            _ => return None,
        };
        // A non-zero second level addresses something we do not have: treat it as an
        // unsupported LUN.
        let lun_id = if lun[4..8].iter().any(|&b| b != 0) {
            u16::MAX
        } else {
            lun_id
        };
        Some(LunAddr {
            target: lun[1],
            lun: lun_id,
        })
    }

    /// The LUN field for target `target`, LUN 0, as events carry it (§5.6.6.3).
    pub fn encode(target: u8, lun: u16) -> [u8; 8] {
        let l = 0x4000 | (lun & 0x3fff);
        let b = l.to_be_bytes();
        [1, target, b[0], b[1], 0, 0, 0, 0]
    }
}

/// A parsed request-queue command. Recycled through [`CmdRequest::parse_into`].
///
/// The iovecs point into guest memory: valid only while the memory the chain was parsed
/// against stays mapped (the queue holds its guard until completion).
#[derive(Default)]
pub struct CmdRequest {
    /// Head of the chain, for the used ring.
    pub head_index: u16,
    /// `lun` of the header.
    pub lun: [u8; 8],
    /// `id` (the command tag).
    pub tag: u64,
    /// `cdb`.
    pub cdb: [u8; CDB_SIZE],
    /// Data-out buffers (host pointers).
    pub data_out: Vec<libc::iovec>,
    pub data_out_len: u64,
    /// Data-in buffers (host pointers).
    pub data_in: Vec<libc::iovec>,
    pub data_in_len: u64,
    /// The descriptors, kept to write the response header.
    pub streams: Streams,
}

// SAFETY: the raw pointers point into guest memory shared with the guest anyway; they are
// only dereferenced in `unsafe` functions whose callers guarantee the mapping is alive.
unsafe impl Send for CmdRequest {}

impl std::fmt::Debug for CmdRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmdRequest")
            .field("head_index", &self.head_index)
            .field("lun", &self.lun)
            .field("tag", &self.tag)
            .field("opcode", &self.cdb[0])
            .field("data_out_len", &self.data_out_len)
            .field("data_in_len", &self.data_in_len)
            .finish()
    }
}

/// A rejected command chain.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("virtio-scsi request (descriptor head {head_index}): {error}")]
pub struct RequestError {
    pub head_index: u16,
    /// Whether a response header can be written (the chain has room for it): the request
    /// is then completed with `VIRTIO_SCSI_S_FAILURE`, else returned with used length 0.
    pub can_respond: bool,
    pub error: ParseError,
}

impl CmdRequest {
    fn reset(&mut self, head_index: u16) {
        self.head_index = head_index;
        self.data_out.clear();
        self.data_in.clear();
        self.data_out_len = 0;
        self.data_in_len = 0;
        self.lun = [0; 8];
        self.tag = 0;
        self.cdb = [0; CDB_SIZE];
    }

    /// Parses `chain`, read through virtio-queue, into `self`, reusing the vectors.
    pub fn parse_into<M>(&mut self, mut chain: DescriptorChain<M>) -> Result<(), RequestError>
    where
        M: Deref,
        M::Target: GuestMemoryBackend,
    {
        self.reset(chain.head_index());
        let r = self.streams.collect(&mut chain);
        self.parse_streams(r, chain.memory())
    }

    /// Parses chain `head` of `vring`, read through its pre-translated view
    /// ([`Vring::has_view`] must be true), as [`CmdRequest::parse_into`] does.
    pub fn parse_ring(&mut self, vring: &Vring, head: u16) -> Result<(), RequestError> {
        self.reset(head);
        let r = self
            .streams
            .collect_ring(|max, out| vring.read_chain(head, max, out));
        self.parse_streams(r, vring.map())
    }

    /// [`CmdRequest::parse_ring`] on a bare ring view.
    #[cfg(any(test, feature = "fuzzing"))]
    #[doc(hidden)]
    pub fn parse_view(
        &mut self,
        view: &RingView,
        map: &GuestMap,
        head: u16,
    ) -> Result<(), RequestError> {
        self.reset(head);
        let r = self
            .streams
            .collect_ring(|max, out| view.read_chain(map, head, max, out));
        self.parse_streams(r, map)
    }

    /// Validates the collected streams (`collected` is how collecting them went) as a
    /// command (§5.6.6.1).
    fn parse_streams<M: GuestRanges + ?Sized>(
        &mut self,
        collected: Result<(), ParseError>,
        mem: &M,
    ) -> Result<(), RequestError> {
        let head_index = self.head_index;
        let fail = |can_respond, error| RequestError {
            head_index,
            can_respond,
            error,
        };
        // A chain that could not be read entirely has no trustworthy place for an answer:
        // it goes back unused.
        if let Err(e @ (ParseError::BadChain | ParseError::TooManyDescriptors)) = collected {
            return Err(fail(false, e));
        }
        let streams = &self.streams;
        // The response header must be writable guest memory: checked now, so that a
        // request with `can_respond` cannot fail to be answered.
        let response = if streams.writable_len < RESP_LEN {
            Err(ParseError::ResponseTooShort(streams.writable_len))
        } else {
            walk(streams.writable(), 0, RESP_LEN, |addr, len| {
                if mem.check(addr, len) {
                    Ok(())
                } else {
                    Err(ParseError::BadGuestAddress { addr, len })
                }
            })
            .map(|_| ())
        };
        let can_respond = response.is_ok();
        collected.map_err(|e| fail(can_respond, e))?;
        response.map_err(|e| fail(false, e))?;
        if streams.readable_len < REQ_HEADER_LEN {
            return Err(fail(true, ParseError::HeaderTooShort(streams.readable_len)));
        }
        let mut hdr = [0u8; REQ_HEADER_LEN as usize];
        read_stream(mem, streams.readable(), 0, &mut hdr).map_err(|e| fail(true, e.into()))?;
        self.lun.copy_from_slice(&hdr[0..8]);
        self.tag = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        self.cdb.copy_from_slice(&hdr[19..19 + CDB_SIZE]);
        self.data_out_len = streams.readable_len - REQ_HEADER_LEN;
        self.data_in_len = streams.writable_len - RESP_LEN;
        if self.data_out_len > 0 && self.data_in_len > 0 {
            return Err(fail(true, ParseError::Bidirectional));
        }
        map_data(
            mem,
            streams.readable(),
            REQ_HEADER_LEN,
            self.data_out_len,
            &mut self.data_out,
        )
        .map_err(|e| fail(true, e))?;
        map_data(
            mem,
            streams.writable(),
            RESP_LEN,
            self.data_in_len,
            &mut self.data_in,
        )
        .map_err(|e| fail(true, e))?;
        Ok(())
    }
}

/// The response header of a command (§5.6.6.1), serialized.
#[derive(Debug, Clone, Copy, Default)]
pub struct CmdResponse {
    pub resid: u32,
    pub status: u8,
    pub response: u8,
    /// Fixed-format sense length (0 or 18).
    pub sense_len: u32,
    pub sense: [u8; crate::vhost::scsi::sense::FIXED_SENSE_LEN],
}

impl CmdResponse {
    /// The `RESP_LEN` bytes of `virtio_scsi_cmd_resp`, sense zero-padded.
    pub fn to_bytes(&self) -> [u8; RESP_LEN as usize] {
        let mut b = [0u8; RESP_LEN as usize];
        b[0..4].copy_from_slice(&self.sense_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.resid.to_le_bytes());
        // status_qualifier (8..10) stays 0.
        b[10] = self.status;
        b[11] = self.response;
        let n = (self.sense_len as usize).min(self.sense.len());
        b[12..12 + n].copy_from_slice(&self.sense[..n]);
        b
    }
}

/// A control-queue request (§5.6.6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    /// Task management function: `subtype`, `lun`, `id`. Response: 1 byte.
    Tmf {
        subtype: u32,
        lun: [u8; 8],
        tag: u64,
    },
    /// Asynchronous notification query (`AN_QUERY`) or subscription (`AN_SUBSCRIBE`).
    /// Response: `le32 event_actual`, `u8 response`.
    An {
        subscribe: bool,
        lun: [u8; 8],
        event_requested: u32,
    },
}

/// Length of the TMF request and response.
pub const TMF_REQ_LEN: u64 = 4 + 4 + 8 + 8;
pub const TMF_RESP_LEN: u64 = 1;
/// Length of the AN request and response.
pub const AN_REQ_LEN: u64 = 4 + 8 + 4;
pub const AN_RESP_LEN: u64 = 5;
/// `struct virtio_scsi_event` (§5.6.6.3).
pub const EVENT_LEN: u64 = 16;

/// Parses a control-queue chain (`streams` is scratch, left holding the descriptors for
/// the response).
pub fn parse_control<M>(
    chain: &mut DescriptorChain<M>,
    streams: &mut Streams,
) -> Result<ControlRequest, ParseError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemoryBackend,
{
    streams.collect(chain)?;
    parse_control_streams(chain.memory(), streams)
}

/// [`parse_control`] of chain `head` of `vring`, read through its ring view (packed rings,
/// which virtio-queue cannot read).
pub fn parse_control_ring(
    vring: &Vring,
    head: u16,
    streams: &mut Streams,
) -> Result<ControlRequest, ParseError> {
    streams.collect_ring(|max, out| vring.read_chain(head, max, out))?;
    parse_control_streams(vring.map(), streams)
}

/// The control request in the chain `streams` collected, read through `mem`.
fn parse_control_streams<M: GuestRanges + ?Sized>(
    mem: &M,
    streams: &Streams,
) -> Result<ControlRequest, ParseError> {
    let mut ty = [0u8; 4];
    if streams.readable_len < 4 {
        return Err(ParseError::HeaderTooShort(streams.readable_len));
    }
    read_stream(mem, streams.readable(), 0, &mut ty)?;
    match u32::from_le_bytes(ty) {
        virtio_bindings::virtio_scsi::VIRTIO_SCSI_T_TMF => {
            if streams.readable_len < TMF_REQ_LEN {
                return Err(ParseError::HeaderTooShort(streams.readable_len));
            }
            if streams.writable_len < TMF_RESP_LEN {
                return Err(ParseError::ResponseTooShort(streams.writable_len));
            }
            let mut b = [0u8; TMF_REQ_LEN as usize];
            read_stream(mem, streams.readable(), 0, &mut b)?;
            let mut lun = [0u8; 8];
            lun.copy_from_slice(&b[8..16]);
            Ok(ControlRequest::Tmf {
                subtype: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                lun,
                tag: u64::from_le_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            })
        }
        t @ (virtio_bindings::virtio_scsi::VIRTIO_SCSI_T_AN_QUERY
        | virtio_bindings::virtio_scsi::VIRTIO_SCSI_T_AN_SUBSCRIBE) => {
            if streams.readable_len < AN_REQ_LEN {
                return Err(ParseError::HeaderTooShort(streams.readable_len));
            }
            if streams.writable_len < AN_RESP_LEN {
                return Err(ParseError::ResponseTooShort(streams.writable_len));
            }
            let mut b = [0u8; AN_REQ_LEN as usize];
            read_stream(mem, streams.readable(), 0, &mut b)?;
            let mut lun = [0u8; 8];
            lun.copy_from_slice(&b[4..12]);
            Ok(ControlRequest::An {
                subscribe: t == virtio_bindings::virtio_scsi::VIRTIO_SCSI_T_AN_SUBSCRIBE,
                lun,
                event_requested: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            })
        }
        t => Err(ParseError::UnknownControlType(t)),
    }
}

/// A `struct virtio_scsi_event` (§5.6.6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub event: u32,
    pub lun: [u8; 8],
    pub reason: u32,
}

impl Event {
    /// Serialized, little-endian.
    pub fn to_bytes(&self) -> [u8; EVENT_LEN as usize] {
        let mut b = [0u8; EVENT_LEN as usize];
        b[0..4].copy_from_slice(&self.event.to_le_bytes());
        b[4..12].copy_from_slice(&self.lun);
        b[12..16].copy_from_slice(&self.reason.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests;
