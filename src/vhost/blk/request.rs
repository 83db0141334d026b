//! virtio-blk request parsing (virtio 1.2 §5.2.6), zero-copy.
//!
//! A request is a descriptor chain laid out as one device-readable byte stream followed by one
//! device-writable byte stream (§2.7.4.2: "The driver MUST place any device-writable descriptor
//! elements after any device-readable descriptor elements"):
//!
//! ```text
//! readable: le32 type | le32 reserved | le64 sector | data (OUT) / segments (DISCARD, WRITE_ZEROES)
//! writable: data (IN, GET_ID) | u8 status
//! ```
//!
//! The device must not assume a particular arrangement of descriptors (§2.7.4), so the header
//! may be split over several descriptors or share one with data, and the status byte is the
//! last byte of the writable stream (it may share the last descriptor with data, as legacy
//! drivers do). Data buffers are translated to host `iovec`s pointing straight into guest
//! memory (split at memory-region boundaries); nothing is copied and, once the [`BlkRequest`]
//! has been used a few times, nothing is allocated either ([`BlkRequest::parse_into`] reuses
//! its vectors).
//!
//! Everything in the chain is guest-controlled: every length, address and count is checked
//! and every failure is a typed [`ParseError`] that maps to a virtio status
//! ([`ParseError::status`]). A [`RequestError`] without a status address means no status byte
//! can be written: the device returns the chain in the used ring with length 0.

use std::ops::Deref;

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError};

use crate::vhost::guest_map::GuestMap;
pub use crate::vhost::guest_stream::MAX_IOVECS;
use crate::vhost::guest_stream::{
    copy_to_iovecs, push_iovecs, read_stream, walk, Desc, GuestRanges, StreamError,
};
use crate::vhost::split_ring::ChainError;
#[cfg(any(test, feature = "fuzzing"))]
use crate::vhost::split_ring::RingView;
use crate::vhost::vring::Vring;

/// virtio-blk sector size: request offsets and lengths are in 512-byte units (§5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header `{le32 type, le32 reserved, le64 sector}` (§5.2.6).
pub const HEADER_LEN: u64 = 16;
/// Size of one `virtio_blk_discard_write_zeroes` segment (§5.2.6).
pub const SEGMENT_LEN: u64 = 16;
/// Size of the GET_ID answer (§5.2.6: 20 bytes, not NUL-terminated if the id is 20 bytes long).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Descriptors allowed on top of `seg_max` data descriptors: a header split byte by byte,
/// plus the status descriptor.
const FRAMING_DESCS: usize = HEADER_LEN as usize + 1;

/// The operation of a parsed request (§5.2.6 `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read `data_len` bytes at `sector` into guest memory.
    In,
    /// `VIRTIO_BLK_T_OUT`: write `data_len` bytes from guest memory at `sector`.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable; no data.
    #[default]
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: write the device id string (up to 20 bytes) into `data`.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: deallocate the ranges in `segments`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: zero the ranges in `segments` (may unmap if flagged).
    WriteZeroes,
}

/// One `struct virtio_blk_discard_write_zeroes` range (§5.2.6), validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardSegment {
    /// First sector of the range.
    pub sector: u64,
    /// Number of sectors (non-zero, at most the configured max).
    pub num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`: for WRITE_ZEROES the device may deallocate
    /// instead of writing zeroes. Always false for DISCARD (rejected with UNSUPP).
    pub unmap: bool,
}

/// Device limits the driver must respect: the values advertised in `virtio_blk_config`
/// (§5.2.4) plus the capacity and the read-only flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Capacity in 512-byte sectors; requests reaching past it fail with IOERR.
    pub capacity_sectors: u64,
    /// `seg_max`: most data descriptors per request.
    pub seg_max: u32,
    /// `size_max`: largest data descriptor in bytes.
    pub size_max: u32,
    /// Largest IN/OUT transfer, in sectors.
    pub max_sectors: u64,
    /// `max_discard_seg`; 0 means DISCARD is not offered (answered UNSUPP).
    pub max_discard_seg: u32,
    /// `max_discard_sectors`: most sectors per discard segment.
    pub max_discard_sectors: u32,
    /// `max_write_zeroes_seg`; 0 means WRITE_ZEROES is not offered (answered UNSUPP).
    pub max_write_zeroes_seg: u32,
    /// `max_write_zeroes_sectors`: most sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// `VIRTIO_BLK_F_RO` offered: writes fail with IOERR (§5.2.6.2).
    pub read_only: bool,
}

impl RequestLimits {
    /// Limits for a device of `capacity_sectors` with a queue of 256 descriptors
    /// (`seg_max` = 254, no `size_max`, 128 MiB transfers), DISCARD and WRITE_ZEROES off.
    pub fn new(capacity_sectors: u64) -> Self {
        RequestLimits {
            capacity_sectors,
            seg_max: 254,
            size_max: u32::MAX,
            max_sectors: 1 << 18,
            max_discard_seg: 0,
            max_discard_sectors: 0,
            max_write_zeroes_seg: 0,
            max_write_zeroes_sectors: 0,
            read_only: false,
        }
    }
}

/// Why a chain is not a valid request. [`ParseError::status`] gives the virtio status.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// No descriptor could be read (bad head, unreadable descriptor or indirect table).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain ended on a descriptor with NEXT set: a loop (the chain is capped at the
    /// queue size, §2.7.5.3.1), a `next` out of range, an unreadable descriptor, nested
    /// indirect tables or more than 4 GiB in total.
    #[error("descriptor chain truncated (loop, bad next index or unreadable descriptor)")]
    ChainTruncated,
    /// More descriptors than `seg_max` data descriptors plus framing.
    #[error("more than {max} descriptors in chain")]
    TooManyDescriptors {
        /// The cap.
        max: usize,
    },
    /// The last descriptor is device-readable or all writable descriptors are empty.
    #[error("no device-writable status byte")]
    StatusMissing,
    /// The status byte is not in guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusUnreachable(u64),
    /// A device-readable descriptor follows a device-writable one (§2.7.4.2).
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The first bytes of the chain are device-writable, so there is no header.
    #[error("request header is not device-readable")]
    HeaderNotReadable,
    /// Fewer than 16 device-readable bytes.
    #[error("request header is {0} bytes, need 16")]
    HeaderTooShort(u64),
    /// A buffer is not (fully) backed by guest memory.
    #[error("guest memory range {addr:#x}+{len:#x} is not mapped")]
    BadGuestAddress {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Unknown or not-offered request type (§5.2.6.2: UNSUPP).
    #[error("unsupported request type {0:#x}")]
    UnsupportedType(u32),
    /// The data buffer has the wrong direction for the request type.
    #[error("{kind:?} request with a device-{} data buffer", if *.writable { "writable" } else { "readable" })]
    WrongDirection {
        /// Request type.
        kind: RequestKind,
        /// Direction of the offending bytes.
        writable: bool,
    },
    /// IN/OUT/GET_ID without any data.
    #[error("{0:?} request without data")]
    NoData(RequestKind),
    /// IN/OUT data length is not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// More data descriptors than `seg_max`.
    #[error("{count} data descriptors exceed seg_max {max}")]
    TooManySegments {
        /// Data descriptors in the request.
        count: usize,
        /// `seg_max`.
        max: u32,
    },
    /// A data descriptor larger than `size_max`.
    #[error("data descriptor of {len} bytes exceeds size_max {max}")]
    SegmentTooLarge {
        /// Descriptor data length.
        len: u64,
        /// `size_max`.
        max: u32,
    },
    /// Transfer larger than `max_sectors`.
    #[error("transfer of {len} bytes exceeds the {max} byte maximum")]
    TransferTooLarge {
        /// Transfer length.
        len: u64,
        /// Maximum in bytes.
        max: u64,
    },
    /// The data maps to more than [`MAX_IOVECS`] host buffers.
    #[error("data maps to more than {MAX_IOVECS} host buffers")]
    TooManyIovecs,
    /// `sector + sectors` overflows or passes the capacity.
    #[error("sectors {sector}+{sectors} overflow or exceed capacity {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Device capacity in sectors.
        capacity: u64,
    },
    /// Write-type request to a read-only device (§5.2.6.2: IOERR).
    #[error("{0:?} request to a read-only device")]
    ReadOnly(RequestKind),
    /// DISCARD/WRITE_ZEROES payload is not a non-zero multiple of 16 bytes.
    #[error("discard/write-zeroes payload of {0} bytes is not a non-zero multiple of 16")]
    BadSegmentPayload(u64),
    /// More segments than `max_discard_seg`/`max_write_zeroes_seg`.
    #[error("{count} segments exceed the maximum of {max}")]
    TooManyDiscardSegments {
        /// Segments in the request.
        count: u64,
        /// Advertised maximum.
        max: u32,
    },
    /// A segment with reserved flag bits set (§5.2.6.2: UNSUPP).
    #[error("segment flags {0:#x} have reserved bits set")]
    ReservedFlags(u32),
    /// DISCARD with the UNMAP flag (§5.2.6.2: UNSUPP).
    #[error("discard segment with the UNMAP flag")]
    DiscardUnmap,
    /// A segment of 0 sectors or more than the advertised maximum.
    #[error("segment of {len} sectors is empty or exceeds the maximum of {max}")]
    BadSegmentLength {
        /// Sectors in the segment.
        len: u32,
        /// Advertised maximum.
        max: u32,
    },
}

impl ParseError {
    /// The status byte to complete the request with (§5.2.6.2): UNSUPP for unknown types and
    /// for reserved or (for DISCARD) UNMAP segment flags, IOERR for everything else.
    pub fn status(&self) -> u8 {
        match self {
            ParseError::UnsupportedType(_)
            | ParseError::ReservedFlags(_)
            | ParseError::DiscardUnmap => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A rejected request: which chain, where its status byte is, and why.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("virtio-blk request (descriptor head {head_index}): {error}")]
pub struct RequestError {
    /// Head index of the chain, to put in the used ring.
    pub head_index: u16,
    /// Where to write [`ParseError::status`]; `None`: no status byte can be written, return the
    /// chain with used length 0.
    pub status_addr: Option<GuestAddress>,
    /// The reason.
    pub error: ParseError,
}

impl RequestError {
    /// Bytes the device writes when completing this request with an error: 1 (the status)
    /// or 0 if there is no status byte (§2.7.8: used length is what was written).
    pub fn used_len(&self) -> u32 {
        u32::from(self.status_addr.is_some())
    }
}

impl From<StreamError> for ParseError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::BadGuestAddress { addr, len } => ParseError::BadGuestAddress { addr, len },
            StreamError::TooManyIovecs => ParseError::TooManyIovecs,
        }
    }
}

/// A parsed, validated virtio-blk request. Recycle it: [`BlkRequest::parse_into`] reuses the
/// vectors, so the hot path does not allocate once they have grown.
///
/// `data` holds host pointers into guest memory: they stay valid only while the guest memory
/// the chain was parsed against stays mapped, i.e. the device must hold its guest-memory guard
/// until the request completes. Writes through them bypass vm-memory's dirty bitmap.
pub struct BlkRequest {
    /// The operation.
    pub kind: RequestKind,
    /// First sector (IN/OUT; 0 for the others).
    pub sector: u64,
    /// Host buffers of the data: destination for IN and GET_ID, source for OUT; empty for the
    /// other kinds.
    pub data: Vec<libc::iovec>,
    /// Sum of the `data` lengths (GET_ID: at most 20).
    pub data_len: u64,
    /// Guest address of the status byte, see [`write_status`].
    pub status_addr: GuestAddress,
    /// Head index of the chain, to put in the used ring.
    pub head_index: u16,
    /// DISCARD/WRITE_ZEROES ranges.
    pub segments: Vec<DiscardSegment>,
    /// Scratch: the chain's descriptors.
    descs: Vec<Desc>,
}

// SAFETY: the raw pointers in `data` point into guest memory, which is shared with the guest
// and other threads anyway; `BlkRequest` never dereferences them except in the `unsafe`
// `copy_to_data`, whose caller guarantees the mapping is alive.
unsafe impl Send for BlkRequest {}

impl std::fmt::Debug for BlkRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkRequest")
            .field("kind", &self.kind)
            .field("sector", &self.sector)
            .field("iovecs", &self.data.len())
            .field("data_len", &self.data_len)
            .field("status_addr", &self.status_addr)
            .field("head_index", &self.head_index)
            .field("segments", &self.segments)
            .finish()
    }
}

impl Default for BlkRequest {
    fn default() -> Self {
        Self::new()
    }
}

impl BlkRequest {
    /// An empty request, to be filled by [`BlkRequest::parse_into`].
    pub fn new() -> Self {
        BlkRequest {
            kind: RequestKind::default(),
            sector: 0,
            data: Vec::new(),
            data_len: 0,
            status_addr: GuestAddress(0),
            head_index: 0,
            segments: Vec::new(),
            descs: Vec::new(),
        }
    }

    /// Parses and validates `chain` into `self`, replacing its previous contents but keeping
    /// the vector capacities. On error `self` holds no usable request.
    pub fn parse_into<M>(
        &mut self,
        mut chain: DescriptorChain<M>,
        limits: &RequestLimits,
    ) -> Result<(), RequestError>
    where
        M: Deref,
        M::Target: GuestMemoryBackend,
    {
        self.reset(chain.head_index());
        let head_index = self.head_index;
        let fail = |error: ParseError| RequestError {
            head_index,
            status_addr: None,
            error,
        };

        // Copy the chain out. virtio-queue stops at the queue size (or indirect table size)
        // and on unreadable descriptors; a chain whose last descriptor still has NEXT set was
        // cut short by one of those.
        let max_descs = (limits.seg_max as usize).saturating_add(FRAMING_DESCS);
        let mut yielded = 0usize;
        let mut last_has_next = false;
        for d in chain.by_ref() {
            yielded += 1;
            if yielded > max_descs {
                return Err(fail(ParseError::TooManyDescriptors { max: max_descs }));
            }
            last_has_next = d.has_next();
            if d.len() > 0 {
                self.descs.push(Desc {
                    addr: d.addr().raw_value(),
                    len: d.len(),
                    write: d.is_write_only(),
                });
            }
        }
        if yielded == 0 {
            return Err(fail(ParseError::EmptyChain));
        }
        if last_has_next {
            return Err(fail(ParseError::ChainTruncated));
        }
        self.parse_descs(chain.memory(), limits)
    }

    /// Parses and validates chain `head` of `vring`, read through its pre-translated view
    /// ([`Vring::has_view`] must be true), into `self`, as [`BlkRequest::parse_into`] does.
    pub fn parse_ring(
        &mut self,
        vring: &Vring,
        head: u16,
        limits: &RequestLimits,
    ) -> Result<(), RequestError> {
        self.parse_read(
            head,
            |max, out| vring.read_chain(head, max, out),
            vring.map(),
            limits,
        )
    }

    /// [`BlkRequest::parse_ring`] on a bare ring view.
    #[cfg(any(test, feature = "fuzzing"))]
    #[doc(hidden)]
    pub fn parse_view(
        &mut self,
        view: &RingView,
        map: &GuestMap,
        head: u16,
        limits: &RequestLimits,
    ) -> Result<(), RequestError> {
        self.parse_read(
            head,
            |max, out| view.read_chain(map, head, max, out),
            map,
            limits,
        )
    }

    fn parse_read(
        &mut self,
        head: u16,
        read: impl FnOnce(usize, &mut Vec<Desc>) -> Result<(), ChainError>,
        map: &GuestMap,
        limits: &RequestLimits,
    ) -> Result<(), RequestError> {
        self.reset(head);
        let max_descs = (limits.seg_max as usize).saturating_add(FRAMING_DESCS);
        if let Err(e) = read(max_descs, &mut self.descs) {
            let error = match e {
                ChainError::Empty => ParseError::EmptyChain,
                ChainError::Truncated => ParseError::ChainTruncated,
                ChainError::TooLong => ParseError::TooManyDescriptors { max: max_descs },
            };
            return Err(RequestError {
                head_index: head,
                status_addr: None,
                error,
            });
        }
        if self.parse_common_rw(map, limits) {
            return Ok(());
        }
        self.parse_descs(map, limits)
    }

    /// The layout nearly every driver uses for reads and writes, accepted without the
    /// general stream bookkeeping: header (16 readable bytes), one data descriptor, status
    /// (1 writable byte). True when the request is such a valid IN or OUT and `self` holds
    /// it; false (with `self` as [`BlkRequest::reset`] left it, apart from scratch) for
    /// anything else, valid or not, which [`BlkRequest::parse_descs`] then judges. The unit
    /// tests check both give the same verdict on random chains.
    fn parse_common_rw(&mut self, map: &GuestMap, limits: &RequestLimits) -> bool {
        let [h, d, s] = self.descs[..] else {
            return false;
        };
        if h.write || u64::from(h.len) != HEADER_LEN || !s.write || s.len != 1 {
            return false;
        }
        let (Some(hdr_at), Some(_)) = (
            map.host_range(h.addr, HEADER_LEN),
            map.host_range(s.addr, 1),
        ) else {
            return false;
        };
        let mut hdr = [0u8; HEADER_LEN as usize];
        // SAFETY: 16 mapped bytes of guest memory, copied out once (the guest may change
        // them at any time: only the copy is looked at).
        unsafe { std::ptr::copy_nonoverlapping(hdr_at, hdr.as_mut_ptr(), hdr.len()) };
        let (req_type, sector) = decode_header(&hdr);
        let kind = match req_type {
            VIRTIO_BLK_T_IN if d.write => RequestKind::In,
            VIRTIO_BLK_T_OUT if !d.write && !limits.read_only => RequestKind::Out,
            _ => return false,
        };
        let len = u64::from(d.len);
        if limits.seg_max == 0
            || len > u64::from(limits.size_max)
            || check_rw(sector, len, limits).is_err()
        {
            return false;
        }
        if map.push_iovecs(d.addr, len, &mut self.data).is_err() {
            self.data.clear();
            return false;
        }
        self.kind = kind;
        self.sector = sector;
        self.status_addr = GuestAddress(s.addr);
        self.data_len = len;
        true
    }

    fn reset(&mut self, head_index: u16) {
        self.head_index = head_index;
        self.kind = RequestKind::default();
        self.sector = 0;
        self.data.clear();
        self.data_len = 0;
        self.status_addr = GuestAddress(0);
        self.segments.clear();
        self.descs.clear();
    }

    /// Validates the copied-out descriptors `self.descs` as a request.
    fn parse_descs<M: GuestRanges + ?Sized>(
        &mut self,
        mem: &M,
        limits: &RequestLimits,
    ) -> Result<(), RequestError> {
        let head_index = self.head_index;
        let fail = |status_addr: Option<GuestAddress>, error: ParseError| RequestError {
            head_index,
            status_addr,
            error,
        };

        // The status byte: last byte of the last descriptor, which must be writable.
        let last = match self.descs.last() {
            Some(d) if d.write => *d,
            _ => return Err(fail(None, ParseError::StatusMissing)),
        };
        let status = last
            .addr
            .checked_add(u64::from(last.len) - 1)
            .ok_or_else(|| fail(None, ParseError::StatusUnreachable(last.addr)))?;
        if !mem.check(status, 1) {
            return Err(fail(None, ParseError::StatusUnreachable(status)));
        }
        self.status_addr = GuestAddress(status);
        let st = Some(self.status_addr);

        // Readable stream, then writable stream.
        let first_w = self
            .descs
            .iter()
            .position(|d| d.write)
            .unwrap_or(self.descs.len());
        if self.descs[first_w..].iter().any(|d| !d.write) {
            return Err(fail(st, ParseError::ReadableAfterWritable));
        }
        let (readable, writable) = self.descs.split_at(first_w);
        let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
        let writable_len: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
        if readable_len == 0 {
            return Err(fail(st, ParseError::HeaderNotReadable));
        }
        if readable_len < HEADER_LEN {
            return Err(fail(st, ParseError::HeaderTooShort(readable_len)));
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        read_stream(mem, readable, 0, &mut hdr).map_err(|e| fail(st, e.into()))?;
        let (req_type, sector) = decode_header(&hdr);
        // Bytes after the header / before the status.
        let readable_data = readable_len - HEADER_LEN;
        let writable_data = writable_len - 1;

        let kind = match req_type {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD if limits.max_discard_seg > 0 => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES if limits.max_write_zeroes_seg > 0 => {
                RequestKind::WriteZeroes
            }
            t => return Err(fail(st, ParseError::UnsupportedType(t))),
        };
        self.kind = kind;
        let (readable, writable) = self.descs.split_at(first_w);

        let r = match kind {
            RequestKind::In | RequestKind::GetId => {
                if readable_data > 0 {
                    Err(ParseError::WrongDirection {
                        kind,
                        writable: false,
                    })
                } else if writable_data == 0 {
                    Err(ParseError::NoData(kind))
                } else if kind == RequestKind::In {
                    check_rw(sector, writable_data, limits).and_then(|()| {
                        self.sector = sector;
                        map_data(mem, writable, 0, writable_data, limits, &mut self.data)
                    })
                } else {
                    let len = writable_data.min(ID_BYTES as u64);
                    map_data(mem, writable, 0, len, limits, &mut self.data)
                }
            }
            RequestKind::Out => {
                if writable_data > 0 {
                    Err(ParseError::WrongDirection {
                        kind,
                        writable: true,
                    })
                } else if limits.read_only {
                    Err(ParseError::ReadOnly(kind))
                } else if readable_data == 0 {
                    Err(ParseError::NoData(kind))
                } else {
                    check_rw(sector, readable_data, limits).and_then(|()| {
                        self.sector = sector;
                        map_data(
                            mem,
                            readable,
                            HEADER_LEN,
                            readable_data,
                            limits,
                            &mut self.data,
                        )
                    })
                }
            }
            // §5.2.6: FLUSH carries no data; extra buffers are ignored, the sector is unused.
            RequestKind::Flush => Ok(()),
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if writable_data > 0 {
                    Err(ParseError::WrongDirection {
                        kind,
                        writable: true,
                    })
                } else if limits.read_only {
                    Err(ParseError::ReadOnly(kind))
                } else {
                    parse_segments(
                        mem,
                        readable,
                        readable_data,
                        kind,
                        limits,
                        &mut self.segments,
                    )
                }
            }
        };
        r.map_err(|e| fail(st, e))?;
        self.data_len = self.data.iter().map(|v| v.iov_len as u64).sum();
        Ok(())
    }

    /// Bytes the device writes into the chain when completing successfully (§2.7.8): the data
    /// for IN and GET_ID, plus the status byte.
    pub fn used_len(&self) -> u32 {
        match self.kind {
            // data_len <= 4 GiB (virtio-queue caps a chain at 2^32 bytes) and the status
            // byte is part of the same chain, so this cannot overflow.
            RequestKind::In | RequestKind::GetId => (self.data_len as u32).saturating_add(1),
            _ => 1,
        }
    }

    /// Copies `src` into the data buffers (for GET_ID); returns the bytes copied
    /// (at most `data_len`).
    ///
    /// # Safety
    /// The guest memory the request was parsed against must still be mapped.
    pub unsafe fn copy_to_data(&self, src: &[u8]) -> usize {
        // SAFETY: `data` was translated from guest memory by `parse_into`; the caller
        // guarantees the mapping is alive.
        unsafe { copy_to_iovecs(&self.data, src) }
    }
}

/// IN/OUT length and range checks: multiple of 512, within `max_sectors`, and
/// `sector + len/512` neither overflowing (also as a byte offset) nor passing the capacity.
/// `type` and `sector` of a request header `{le32 type, le32 reserved, le64 sector}`
/// (§5.2.6).
fn decode_header(hdr: &[u8; HEADER_LEN as usize]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = *hdr;
    (u32::from_le_bytes([t0, t1, t2, t3]), u64::from_le_bytes(s))
}

fn check_rw(sector: u64, len: u64, limits: &RequestLimits) -> Result<(), ParseError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ParseError::Unaligned(len));
    }
    let max = limits.max_sectors.saturating_mul(SECTOR_SIZE);
    if len > max {
        return Err(ParseError::TransferTooLarge { len, max });
    }
    check_range(sector, len / SECTOR_SIZE, limits.capacity_sectors)
}

fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), ParseError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity && end.checked_mul(SECTOR_SIZE).is_some() => Ok(()),
        _ => Err(ParseError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Translates `[skip, skip + take)` of `descs`' byte stream into host iovecs, checking
/// `seg_max`, `size_max` and [`MAX_IOVECS`].
fn map_data<M: GuestRanges + ?Sized>(
    mem: &M,
    descs: &[Desc],
    skip: u64,
    take: u64,
    limits: &RequestLimits,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ParseError> {
    let pieces = walk(descs, skip, take, |addr, len| {
        if len > u64::from(limits.size_max) {
            return Err(ParseError::SegmentTooLarge {
                len,
                max: limits.size_max,
            });
        }
        push_iovecs(mem, addr, len, out).map_err(ParseError::from)
    })?;
    if pieces > limits.seg_max as usize {
        return Err(ParseError::TooManySegments {
            count: pieces,
            max: limits.seg_max,
        });
    }
    Ok(())
}

/// Reads and validates the DISCARD/WRITE_ZEROES segments that follow the header (§5.2.6).
fn parse_segments<M: GuestRanges + ?Sized>(
    mem: &M,
    readable: &[Desc],
    payload: u64,
    kind: RequestKind,
    limits: &RequestLimits,
    out: &mut Vec<DiscardSegment>,
) -> Result<(), ParseError> {
    if payload == 0 || !payload.is_multiple_of(SEGMENT_LEN) {
        return Err(ParseError::BadSegmentPayload(payload));
    }
    let (max_seg, max_sectors) = if kind == RequestKind::Discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    let count = payload / SEGMENT_LEN;
    if count > u64::from(max_seg) {
        return Err(ParseError::TooManyDiscardSegments {
            count,
            max: max_seg,
        });
    }
    for i in 0..count {
        let mut raw = [0u8; SEGMENT_LEN as usize];
        read_stream(mem, readable, HEADER_LEN + i * SEGMENT_LEN, &mut raw)?;
        let sector = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(ParseError::ReservedFlags(flags));
        }
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if unmap && kind == RequestKind::Discard {
            return Err(ParseError::DiscardUnmap);
        }
        if num_sectors == 0 || num_sectors > max_sectors {
            return Err(ParseError::BadSegmentLength {
                len: num_sectors,
                max: max_sectors,
            });
        }
        check_range(sector, u64::from(num_sectors), limits.capacity_sectors)?;
        out.push(DiscardSegment {
            sector,
            num_sectors,
            unmap,
        });
    }
    Ok(())
}

/// Writes the status byte of a request (§5.2.6: `VIRTIO_BLK_S_OK`/`IOERR`/`UNSUPP`).
pub fn write_status<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    status: u8,
) -> Result<(), GuestMemoryError> {
    mem.write_obj(status, addr)
}

/// The GET_ID answer for `name` (§5.2.6): the first 20 bytes, NUL padded; a 20-byte id has no
/// terminator.
pub fn id_bytes(name: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = name.len().min(ID_BYTES);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests;
