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
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend};

pub use crate::vhost::guest_stream::{
    copy_from_iovecs, copy_to_iovecs, read_stream, write_stream, Desc, MAX_IOVECS,
};
use crate::vhost::guest_stream::{push_iovecs, walk, StreamError};

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

/// The descriptors of a chain split into its readable and writable streams.
#[derive(Default, Debug)]
pub struct Streams {
    pub readable: Vec<Desc>,
    pub writable: Vec<Desc>,
    pub readable_len: u64,
    pub writable_len: u64,
}

impl Streams {
    /// Collects the chain's descriptors (zero-length ones dropped), enforcing the
    /// readable-then-writable order.
    pub fn collect<M>(&mut self, chain: &mut DescriptorChain<M>) -> Result<(), ParseError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
        let mut count = 0;
        let mut last_has_next = false;
        for d in chain.by_ref() {
            count += 1;
            if count > MAX_DESCS {
                return Err(ParseError::TooManyDescriptors);
            }
            last_has_next = d.has_next();
            if d.len() == 0 {
                continue;
            }
            let desc = Desc {
                addr: d.addr().0,
                len: d.len(),
                write: d.is_write_only(),
            };
            if d.is_write_only() {
                self.writable.push(desc);
                self.writable_len += u64::from(d.len());
            } else {
                if !self.writable.is_empty() {
                    return Err(ParseError::ReadableAfterWritable);
                }
                self.readable.push(desc);
                self.readable_len += u64::from(d.len());
            }
        }
        // virtio-queue stops early (without an error) on loops, bad `next` indexes and
        // unreadable descriptors: the chain then ends on a descriptor with NEXT set.
        if count == 0 || last_has_next {
            return Err(ParseError::BadChain);
        }
        Ok(())
    }
}

/// Translates `[skip, skip + take)` of the stream into host iovecs.
fn map_data<M: GuestMemoryBackend + ?Sized>(
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
    /// Parses `chain` into `self`, reusing the vectors.
    pub fn parse_into<M>(&mut self, mut chain: DescriptorChain<M>) -> Result<(), RequestError>
    where
        M: Deref,
        M::Target: GuestMemoryBackend,
    {
        self.head_index = chain.head_index();
        self.data_out.clear();
        self.data_in.clear();
        self.data_out_len = 0;
        self.data_in_len = 0;
        self.lun = [0; 8];
        self.tag = 0;
        self.cdb = [0; CDB_SIZE];
        let head_index = self.head_index;
        let r = self.streams.collect(&mut chain);
        let mem = chain.memory();
        let can_respond = self.streams.writable_len >= RESP_LEN;
        let fail = |error| RequestError {
            head_index,
            can_respond,
            error,
        };
        r.map_err(&fail)?;
        if !can_respond {
            return Err(fail(ParseError::ResponseTooShort(
                self.streams.writable_len,
            )));
        }
        if self.streams.readable_len < REQ_HEADER_LEN {
            return Err(fail(ParseError::HeaderTooShort(self.streams.readable_len)));
        }
        let mut hdr = [0u8; REQ_HEADER_LEN as usize];
        read_stream(mem, &self.streams.readable, 0, &mut hdr).map_err(|e| fail(e.into()))?;
        self.lun.copy_from_slice(&hdr[0..8]);
        self.tag = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        self.cdb.copy_from_slice(&hdr[19..19 + CDB_SIZE]);
        self.data_out_len = self.streams.readable_len - REQ_HEADER_LEN;
        self.data_in_len = self.streams.writable_len - RESP_LEN;
        if self.data_out_len > 0 && self.data_in_len > 0 {
            return Err(fail(ParseError::Bidirectional));
        }
        // The response header must be writable guest memory: check it now so completion
        // cannot fail on it.
        walk(&self.streams.writable, 0, RESP_LEN, |addr, len| {
            let ok = mem
                .get_slice(GuestAddress(addr), len as usize)
                .is_ok_and(|s| s.len() == len as usize);
            if ok {
                Ok(())
            } else {
                Err(ParseError::BadGuestAddress { addr, len })
            }
        })
        .map_err(|e| RequestError {
            head_index,
            can_respond: false,
            error: e,
        })?;
        map_data(
            mem,
            &self.streams.readable,
            REQ_HEADER_LEN,
            self.data_out_len,
            &mut self.data_out,
        )
        .map_err(&fail)?;
        map_data(
            mem,
            &self.streams.writable,
            RESP_LEN,
            self.data_in_len,
            &mut self.data_in,
        )
        .map_err(&fail)?;
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
    let mem = chain.memory();
    let mut ty = [0u8; 4];
    if streams.readable_len < 4 {
        return Err(ParseError::HeaderTooShort(streams.readable_len));
    }
    read_stream(mem, &streams.readable, 0, &mut ty)?;
    match u32::from_le_bytes(ty) {
        virtio_bindings::virtio_scsi::VIRTIO_SCSI_T_TMF => {
            if streams.readable_len < TMF_REQ_LEN {
                return Err(ParseError::HeaderTooShort(streams.readable_len));
            }
            if streams.writable_len < TMF_RESP_LEN {
                return Err(ParseError::ResponseTooShort(streams.writable_len));
            }
            let mut b = [0u8; TMF_REQ_LEN as usize];
            read_stream(mem, &streams.readable, 0, &mut b)?;
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
            read_stream(mem, &streams.readable, 0, &mut b)?;
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
