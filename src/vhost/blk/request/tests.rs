//! Hostile-chain tests of the virtio-blk request parser, driven through virtio-queue's mock
//! driver and a real mmap-backed guest memory with two adjacent regions and a hole.

use super::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};

use crate::vhost::test_chains::{mem, raw, with_ring_view, Mem, Rng, HOLE, IND, NEXT, R, W};

const HDR: u64 = 0x1000;
const STATUS: u64 = 0x1800;
const DATA: u64 = 0x2000;
const SEGS: u64 = 0x5000;
const TABLE: u64 = 0x6000;

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn limits() -> RequestLimits {
    RequestLimits {
        capacity_sectors: 0x10_0000,
        seg_max: 8,
        size_max: 0x10000,
        max_sectors: 256,
        max_discard_seg: 4,
        max_discard_sectors: 0x1000,
        max_write_zeroes_seg: 4,
        max_write_zeroes_sectors: 0x1000,
        read_only: false,
    }
}

fn hdr(mem: &Mem, addr: u64, req_type: u32, sector: u64) {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&req_type.to_le_bytes());
    b[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&b, GuestAddress(addr)).unwrap();
}

fn seg(mem: &Mem, addr: u64, sector: u64, num: u32, flags: u32) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&num.to_le_bytes());
    b[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&b, GuestAddress(addr)).unwrap();
}

fn host(mem: &Mem, addr: u64) -> *mut libc::c_void {
    mem.get_host_address(GuestAddress(addr)).unwrap().cast()
}

/// Parses the chain at the head of `q`'s available ring through the pre-translated ring
/// view (the hot path), for comparison with `parse_into` (virtio-queue's accessors).
fn parse_fast(
    mem: &Mem,
    q: &MockSplitQueue<Mem>,
    lim: &RequestLimits,
) -> Result<BlkRequest, RequestError> {
    with_ring_view(mem, q, |map, view, head| {
        let mut req = BlkRequest::new();
        req.parse_view(view, map, head, lim).map(|()| req)
    })
}

/// Both parsers reach the same verdict on the same chain.
fn assert_same(slow: &Result<BlkRequest, RequestError>, fast: &Result<BlkRequest, RequestError>) {
    match (slow, fast) {
        (Ok(a), Ok(b)) => assert_same_request(a, b),
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("virtio-queue path {a:?}, ring view path {b:?}"),
    }
}

fn assert_same_request(a: &BlkRequest, b: &BlkRequest) {
    {
        {
            assert_eq!(a.kind, b.kind);
            assert_eq!(a.sector, b.sector);
            assert_eq!(a.data_len, b.data_len);
            let iovs = |r: &BlkRequest| -> Vec<(usize, usize)> {
                r.data
                    .iter()
                    .map(|v| (v.iov_base as usize, v.iov_len))
                    .collect()
            };
            assert_eq!(iovs(a), iovs(b));
            assert_eq!(a.status_addr, b.status_addr);
            assert_eq!(a.head_index, b.head_index);
            assert_eq!(a.segments, b.segments);
        }
    }
}

/// Parses a linear chain (NEXT links are set by the mock) of `(addr, len, flags)`.
fn parse_with(
    mem: &Mem,
    descs: &[(u64, u32, u16)],
    lim: &RequestLimits,
) -> Result<BlkRequest, RequestError> {
    let q = MockSplitQueue::new(mem, 16);
    let raws: Vec<_> = descs.iter().map(|&(a, l, f)| raw(a, l, f, 0)).collect();
    let chain = q.build_desc_chain(&raws).unwrap();
    let mut req = BlkRequest::new();
    let slow = req.parse_into(chain, lim).map(|()| req);
    assert_same(&slow, &parse_fast(mem, &q, lim));
    if !descs.is_empty() && descs.iter().all(|d| d.2 & IND == 0) {
        assert_same(&slow, &parse_packed(mem, descs, lim));
    }
    slow
}

/// Parses the same linear chain laid out in a packed ring (virtio 1.2 §2.8) in region C,
/// which these tests leave free: the packed path must reach the split path's verdicts.
fn parse_packed(
    mem: &Mem,
    descs: &[(u64, u32, u16)],
    lim: &RequestLimits,
) -> Result<BlkRequest, RequestError> {
    use crate::vhost::packed_ring::PackedRing;
    use vm_memory::Bytes;
    const RING: u64 = 0x4F000;
    const AVAIL_WRAP_1: u16 = 1 << 7;
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let next = if i + 1 < descs.len() { NEXT } else { 0 };
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[14..16].copy_from_slice(&(flags | next | AVAIL_WRAP_1).to_le_bytes());
        mem.write_slice(&b, GuestAddress(RING + 16 * i as u64))
            .unwrap();
    }
    // SAFETY: `mem` is borrowed for this whole call, past every use of `map`.
    let map = unsafe { crate::vhost::guest_map::GuestMap::new(mem) };
    let mut ring = PackedRing::new(RING, RING + 0x800, RING + 0x804, 32, 0x8000);
    assert!(ring.remap(&map));
    let slot = ring.pop(&map).expect("the chain is available");
    let mut req = BlkRequest::new();
    req.parse_read(slot, |max, out| ring.read_chain(slot, max, out), &map, lim)
        .map(|()| req)
}

fn parse(mem: &Mem, descs: &[(u64, u32, u16)]) -> Result<BlkRequest, RequestError> {
    parse_with(mem, descs, &limits())
}

/// Parses a chain whose descriptors (including NEXT flags and links) are given verbatim.
fn parse_raw(mem: &Mem, descs: &[RawDescriptor]) -> Result<BlkRequest, RequestError> {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_multiple_desc_chains(descs).unwrap();
    let mut req = BlkRequest::new();
    let slow = req.parse_into(chain, &limits()).map(|()| req);
    assert_same(&slow, &parse_fast(mem, &q, &limits()));
    slow
}

fn err(r: Result<BlkRequest, RequestError>) -> RequestError {
    match r {
        Ok(req) => panic!("expected an error, parsed {req:?}"),
        Err(e) => e,
    }
}

fn assert_err(r: Result<BlkRequest, RequestError>, error: ParseError, status: Option<u64>) {
    let e = err(r);
    assert_eq!(e.error, error);
    assert_eq!(e.status_addr, status.map(GuestAddress));
    assert_eq!(e.used_len(), u32::from(status.is_some()));
}

#[test]
fn valid_in() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 8);
    let req = parse(&m, &[(HDR, 16, R), (DATA, 0x1000, W), (STATUS, 1, W)]).unwrap();
    assert_eq!(req.kind, RequestKind::In);
    assert_eq!(req.sector, 8);
    assert_eq!(req.data_len, 0x1000);
    assert_eq!(req.data.len(), 1);
    assert_eq!(req.data[0].iov_base, host(&m, DATA));
    assert_eq!(req.data[0].iov_len, 0x1000);
    assert_eq!(req.status_addr, GuestAddress(STATUS));
    assert_eq!(req.head_index, 0);
    assert_eq!(req.used_len(), 0x1001);
}

#[test]
fn valid_out_with_header_sharing_data_descriptor() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 3);
    let req = parse(
        &m,
        &[(HDR, 16 + 0x200, R), (DATA, 0x400, R), (STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(req.kind, RequestKind::Out);
    assert_eq!(req.sector, 3);
    assert_eq!(req.data_len, 0x600);
    assert_eq!(req.data.len(), 2);
    assert_eq!(req.data[0].iov_base, host(&m, HDR + 16));
    assert_eq!(req.data[0].iov_len, 0x200);
    assert_eq!(req.data[1].iov_base, host(&m, DATA));
    assert_eq!(req.used_len(), 1);
}

#[test]
fn header_split_across_descriptors() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0x1234);
    let req = parse(
        &m,
        &[
            (HDR, 4, R),
            (HDR + 4, 5, R),
            (HDR + 9, 7, R),
            (DATA, 0x200, W),
            (STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(req.kind, RequestKind::In);
    assert_eq!(req.sector, 0x1234);
    assert_eq!(req.data_len, 0x200);
}

#[test]
fn status_sharing_last_data_descriptor() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let req = parse(&m, &[(HDR, 16, R), (DATA, 0x201, W)]).unwrap();
    assert_eq!(req.data_len, 0x200);
    assert_eq!(req.data.len(), 1);
    assert_eq!(req.status_addr, GuestAddress(DATA + 0x200));
}

#[test]
fn valid_flush() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let req = parse(&m, &[(HDR, 16, R), (STATUS, 1, W)]).unwrap();
    assert_eq!(req.kind, RequestKind::Flush);
    assert_eq!(req.data_len, 0);
    assert!(req.data.is_empty());
    assert_eq!(req.status_addr, GuestAddress(STATUS));
    assert_eq!(req.used_len(), 1);
}

#[test]
fn valid_get_id() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
    m.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
    let req = parse(&m, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]).unwrap();
    assert_eq!(req.kind, RequestKind::GetId);
    assert_eq!(req.data_len, 20);
    // SAFETY: `m` is alive.
    let n = unsafe { req.copy_to_data(&id_bytes("malloc0")) };
    assert_eq!(n, 20);
    let mut got = [0u8; 20];
    m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got, b"malloc0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    assert_eq!(req.used_len(), 21);
    write_status(&m, req.status_addr, 0).unwrap();
}

#[test]
fn get_id_larger_buffer_is_capped_at_20() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let req = parse(&m, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]).unwrap();
    assert_eq!(req.data_len, 20);
    assert_eq!(req.used_len(), 21);
}

#[test]
fn valid_discard_and_write_zeroes() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    seg(&m, SEGS, 100, 8, 0);
    seg(&m, SEGS + 16, 200, 16, 0);
    let req = parse(&m, &[(HDR, 16, R), (SEGS, 32, R), (STATUS, 1, W)]).unwrap();
    assert_eq!(req.kind, RequestKind::Discard);
    assert_eq!(
        req.segments,
        vec![
            DiscardSegment {
                sector: 100,
                num_sectors: 8,
                unmap: false
            },
            DiscardSegment {
                sector: 200,
                num_sectors: 16,
                unmap: false
            }
        ]
    );
    assert!(req.data.is_empty());

    hdr(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    seg(&m, SEGS, 7, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    // Segment split over two descriptors.
    let req = parse(
        &m,
        &[
            (HDR, 16, R),
            (SEGS, 10, R),
            (SEGS + 10, 6, R),
            (STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(req.kind, RequestKind::WriteZeroes);
    assert_eq!(
        req.segments,
        vec![DiscardSegment {
            sector: 7,
            num_sectors: 1,
            unmap: true
        }]
    );
}

#[test]
fn discard_with_unmap_and_reserved_flags_are_unsupp() {
    let m = mem();
    let chain = [(HDR, 16, R), (SEGS, 16, R), (STATUS, 1, W)];
    hdr(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    seg(&m, SEGS, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let e = err(parse(&m, &chain));
    assert_eq!(e.error, ParseError::DiscardUnmap);
    assert_eq!(e.error.status(), UNSUPP);
    assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));

    hdr(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    seg(&m, SEGS, 0, 8, 0x3);
    let e = err(parse(&m, &chain));
    assert_eq!(e.error, ParseError::ReservedFlags(3));
    assert_eq!(e.error.status(), UNSUPP);
}

#[test]
fn discard_segment_limits() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    for i in 0..5 {
        seg(&m, SEGS + 16 * i, i * 10, 1, 0);
    }
    let e = err(parse(&m, &[(HDR, 16, R), (SEGS, 80, R), (STATUS, 1, W)]));
    assert_eq!(
        e.error,
        ParseError::TooManyDiscardSegments { count: 5, max: 4 }
    );
    assert_eq!(e.error.status(), IOERR);

    assert_err(
        parse(&m, &[(HDR, 16, R), (SEGS, 24, R), (STATUS, 1, W)]),
        ParseError::BadSegmentPayload(24),
        Some(STATUS),
    );
    assert_err(
        parse(&m, &[(HDR, 16, R), (STATUS, 1, W)]),
        ParseError::BadSegmentPayload(0),
        Some(STATUS),
    );
    seg(&m, SEGS, 0, 0x1001, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (SEGS, 16, R), (STATUS, 1, W)]),
        ParseError::BadSegmentLength {
            len: 0x1001,
            max: 0x1000,
        },
        Some(STATUS),
    );
    seg(&m, SEGS, u64::MAX - 1, 8, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (SEGS, 16, R), (STATUS, 1, W)]),
        ParseError::OutOfRange {
            sector: u64::MAX - 1,
            sectors: 8,
            capacity: 0x10_0000,
        },
        Some(STATUS),
    );
}

#[test]
fn discard_not_offered_and_unknown_types_are_unsupp() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    seg(&m, SEGS, 0, 8, 0);
    let mut lim = limits();
    lim.max_discard_seg = 0;
    let e = err(parse_with(
        &m,
        &[(HDR, 16, R), (SEGS, 16, R), (STATUS, 1, W)],
        &lim,
    ));
    assert_eq!(e.error, ParseError::UnsupportedType(VIRTIO_BLK_T_DISCARD));
    assert_eq!(e.error.status(), UNSUPP);

    for t in [2, 0x99, VIRTIO_BLK_T_OUT | 0x8000_0000] {
        hdr(&m, HDR, t, 0);
        let e = err(parse(&m, &[(HDR, 16, R), (STATUS, 1, W)]));
        assert_eq!(e.error, ParseError::UnsupportedType(t));
        assert_eq!(e.error.status(), UNSUPP);
        assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));
    }
}

#[test]
fn too_short_chains() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // Header only: no status.
    assert_err(parse(&m, &[(HDR, 16, R)]), ParseError::StatusMissing, None);
    // Status only: no header.
    assert_err(
        parse(&m, &[(STATUS, 1, W)]),
        ParseError::HeaderNotReadable,
        Some(STATUS),
    );
    // Header too small.
    assert_err(
        parse(&m, &[(HDR, 8, R), (STATUS, 1, W)]),
        ParseError::HeaderTooShort(8),
        Some(STATUS),
    );
}

#[test]
fn header_in_writable_descriptor() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    assert_err(
        parse(&m, &[(HDR, 16, W), (DATA, 0x200, W), (STATUS, 1, W)]),
        ParseError::HeaderNotReadable,
        Some(STATUS),
    );
}

#[test]
fn data_in_wrong_direction() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let e = err(parse(&m, &[(HDR, 16, R), (DATA, 0x200, R), (STATUS, 1, W)]));
    assert_eq!(
        e.error,
        ParseError::WrongDirection {
            kind: RequestKind::In,
            writable: false
        }
    );
    assert_eq!(e.error.status(), IOERR);
    assert_eq!(e.status_addr, Some(GuestAddress(STATUS)));

    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (DATA, 0x200, W), (STATUS, 1, W)]),
        ParseError::WrongDirection {
            kind: RequestKind::Out,
            writable: true,
        },
        Some(STATUS),
    );

    hdr(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (DATA, 16, W), (STATUS, 1, W)]),
        ParseError::WrongDirection {
            kind: RequestKind::Discard,
            writable: true,
        },
        Some(STATUS),
    );

    // Readable after writable (§2.7.4.2).
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    assert_err(
        parse(
            &m,
            &[
                (HDR, 16, R),
                (DATA, 0x200, W),
                (DATA + 0x200, 0x200, R),
                (STATUS, 1, W),
            ],
        ),
        ParseError::ReadableAfterWritable,
        Some(STATUS),
    );
}

#[test]
fn status_descriptor_readable() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (DATA, 0x200, R), (STATUS, 1, R)]),
        ParseError::StatusMissing,
        None,
    );
}

#[test]
fn status_length_zero() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (DATA, 0x200, R), (STATUS, 0, W)]),
        ParseError::StatusMissing,
        None,
    );
    // For IN the last data byte becomes the status: the data is then one byte short.
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (DATA, 0x200, W), (STATUS, 0, W)]),
        ParseError::Unaligned(0x1ff),
        Some(DATA + 0x1ff),
    );
}

#[test]
fn address_beyond_memory() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (HOLE, 0x200, W), (STATUS, 1, W)]),
        ParseError::BadGuestAddress {
            addr: HOLE,
            len: 0x200,
        },
        Some(STATUS),
    );
    // Runs off the end of region B into the hole.
    assert_err(
        parse(&m, &[(HDR, 16, R), (0x1FE00, 0x400, W), (STATUS, 1, W)]),
        ParseError::BadGuestAddress {
            addr: 0x1FE00,
            len: 0x400,
        },
        Some(STATUS),
    );
    // Wraps around the address space.
    assert_err(
        parse(
            &m,
            &[(HDR, 16, R), (u64::MAX - 0xff, 0x200, W), (STATUS, 1, W)],
        ),
        ParseError::BadGuestAddress {
            addr: u64::MAX - 0xff,
            len: 0x200,
        },
        Some(STATUS),
    );
    // Status outside memory, or its address overflowing.
    assert_err(
        parse(&m, &[(HDR, 16, R), (DATA, 0x200, W), (HOLE, 1, W)]),
        ParseError::StatusUnreachable(HOLE),
        None,
    );
    assert_err(
        parse(&m, &[(HDR, 16, R), (u64::MAX, 2, W)]),
        ParseError::StatusUnreachable(u64::MAX),
        None,
    );
    // Header outside memory.
    assert_err(
        parse(&m, &[(HOLE, 16, R), (STATUS, 1, W)]),
        ParseError::BadGuestAddress {
            addr: HOLE,
            len: 16,
        },
        Some(STATUS),
    );
}

#[test]
fn region_crossing_buffer_gives_two_iovecs() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let req = parse(&m, &[(HDR, 16, R), (0xF800, 0x1000, R), (STATUS, 1, W)]).unwrap();
    assert_eq!(req.data.len(), 2);
    assert_eq!(req.data[0].iov_base, host(&m, 0xF800));
    assert_eq!(req.data[0].iov_len, 0x800);
    assert_eq!(req.data[1].iov_base, host(&m, 0x10000));
    assert_eq!(req.data[1].iov_len, 0x800);
    assert_eq!(req.data_len, 0x1000);
}

#[test]
fn length_not_multiple_of_512() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (DATA, 0x201, R), (STATUS, 1, W)]),
        ParseError::Unaligned(0x201),
        Some(STATUS),
    );
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    assert_err(
        parse(&m, &[(HDR, 16, R), (STATUS, 1, W)]),
        ParseError::NoData(RequestKind::In),
        Some(STATUS),
    );
}

#[test]
fn sector_overflow_and_capacity() {
    let m = mem();
    let chain = [(HDR, 16, R), (DATA, 0x400, W), (STATUS, 1, W)];
    hdr(&m, HDR, VIRTIO_BLK_T_IN, u64::MAX - 1);
    assert_err(
        parse(&m, &chain),
        ParseError::OutOfRange {
            sector: u64::MAX - 1,
            sectors: 2,
            capacity: 0x10_0000,
        },
        Some(STATUS),
    );
    // Last two sectors fit; one further does not.
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0x10_0000 - 2);
    assert!(parse(&m, &chain).is_ok());
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0x10_0000 - 1);
    assert_eq!(err(parse(&m, &chain)).error.status(), IOERR);
    // sector * 512 overflowing although the capacity is "unlimited".
    let mut lim = limits();
    lim.capacity_sectors = u64::MAX;
    hdr(&m, HDR, VIRTIO_BLK_T_IN, u64::MAX / 512);
    assert!(matches!(
        err(parse_with(&m, &chain, &lim)).error,
        ParseError::OutOfRange { .. }
    ));
}

#[test]
fn too_many_segments_and_size_limits() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let mut chain = vec![(HDR, 16, R)];
    for i in 0..9 {
        chain.push((DATA + i * 0x200, 0x200, R));
    }
    chain.push((STATUS, 1, W));
    assert_err(
        parse(&m, &chain),
        ParseError::TooManySegments { count: 9, max: 8 },
        Some(STATUS),
    );
    chain.remove(1);
    assert_eq!(parse(&m, &chain).unwrap().data.len(), 8);

    let mut lim = limits();
    lim.size_max = 0x1000;
    assert_err(
        parse_with(&m, &[(HDR, 16, R), (DATA, 0x2000, R), (STATUS, 1, W)], &lim),
        ParseError::SegmentTooLarge {
            len: 0x2000,
            max: 0x1000,
        },
        Some(STATUS),
    );
    lim = limits();
    lim.max_sectors = 8;
    assert_err(
        parse_with(&m, &[(HDR, 16, R), (DATA, 0x2000, R), (STATUS, 1, W)], &lim),
        ParseError::TransferTooLarge {
            len: 0x2000,
            max: 0x1000,
        },
        Some(STATUS),
    );
}

#[test]
fn read_only_device_rejects_writes() {
    let m = mem();
    let mut lim = limits();
    lim.read_only = true;
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_err(
        parse_with(&m, &[(HDR, 16, R), (DATA, 0x200, R), (STATUS, 1, W)], &lim),
        ParseError::ReadOnly(RequestKind::Out),
        Some(STATUS),
    );
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    assert!(parse_with(&m, &[(HDR, 16, R), (DATA, 0x200, W), (STATUS, 1, W)], &lim).is_ok());
}

#[test]
fn indirect_descriptor_table() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 5);
    let table = [
        raw(HDR, 16, R | NEXT, 1),
        raw(DATA, 0x400, W | NEXT, 2),
        raw(STATUS, 1, W, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        m.write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    let req = parse_raw(&m, &[raw(TABLE, 48, IND, 0)]).unwrap();
    assert_eq!(req.kind, RequestKind::In);
    assert_eq!(req.sector, 5);
    assert_eq!(req.data_len, 0x400);
    assert_eq!(req.status_addr, GuestAddress(STATUS));
}

#[test]
fn hostile_indirect_tables() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // Nested indirect table: the chain stops at the nested descriptor.
    let table = [raw(HDR, 16, R | NEXT, 1), raw(TABLE, 32, IND, 0)];
    for (i, d) in table.iter().enumerate() {
        m.write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    assert_err(
        parse_raw(&m, &[raw(TABLE, 32, IND, 0)]),
        ParseError::ChainTruncated,
        None,
    );
    // Indirect table in unmapped memory: nothing can be read.
    assert_err(
        parse_raw(&m, &[raw(HOLE, 48, IND, 0)]),
        ParseError::EmptyChain,
        None,
    );
    // A long indirect chain is cut at seg_max + framing.
    for i in 0..64u16 {
        let d = raw(DATA + 0x200 * u64::from(i), 0x200, W | NEXT, i + 1);
        m.write_obj(d, GuestAddress(TABLE + 16 * u64::from(i)))
            .unwrap();
    }
    assert_err(
        parse_raw(&m, &[raw(TABLE, 64 * 16, IND, 0)]),
        ParseError::TooManyDescriptors { max: 8 + 17 },
        None,
    );
}

#[test]
fn descriptor_loop_and_bad_next() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...: virtio-queue stops after queue-size descriptors.
    assert_err(
        parse_raw(
            &m,
            &[raw(HDR, 16, R | NEXT, 1), raw(DATA, 0x200, W | NEXT, 0)],
        ),
        ParseError::ChainTruncated,
        None,
    );
    // Self loop.
    assert_err(
        parse_raw(&m, &[raw(HDR, 16, R | NEXT, 0)]),
        ParseError::ChainTruncated,
        None,
    );
    // Next index beyond the queue size.
    assert_err(
        parse_raw(&m, &[raw(HDR, 16, R | NEXT, 200)]),
        ParseError::ChainTruncated,
        None,
    );
}

#[test]
fn recycled_request_does_not_reallocate() {
    let m = mem();
    hdr(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let chain: Vec<_> = [
        (HDR, 16, R),
        (DATA, 0x200, R),
        (0xF800, 0x1000, R),
        (STATUS, 1, W),
    ]
    .iter()
    .map(|&(a, l, f)| raw(a, l, f, 0))
    .collect();
    let mut req = BlkRequest::new();
    let q = MockSplitQueue::new(&m, 16);
    req.parse_into(q.build_desc_chain(&chain).unwrap(), &limits())
        .unwrap();
    assert_eq!(req.data.len(), 3);
    let (data_ptr, descs_ptr) = (req.data.as_ptr(), req.descs.as_ptr());
    for _ in 0..10 {
        let q = MockSplitQueue::new(&m, 16);
        req.parse_into(q.build_desc_chain(&chain).unwrap(), &limits())
            .unwrap();
        assert_eq!(req.data.as_ptr(), data_ptr);
        assert_eq!(req.descs.as_ptr(), descs_ptr);
        assert_eq!(req.data_len, 0x1200);
    }
    // A failed parse leaves no stale data behind.
    hdr(&m, HDR, 0x99, 0);
    let q = MockSplitQueue::new(&m, 16);
    assert!(req
        .parse_into(q.build_desc_chain(&chain).unwrap(), &limits())
        .is_err());
    assert!(req.data.is_empty());
    assert_eq!(req.data_len, 0);
}

#[test]
fn id_bytes_truncates_and_pads() {
    assert_eq!(&id_bytes("ab"), b"ab\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    assert_eq!(
        &id_bytes("0123456789abcdefghijKLMN"),
        b"0123456789abcdefghij"
    );
}

#[test]
fn write_status_writes_the_byte_and_rejects_bad_addresses() {
    let m = mem();
    write_status(&m, GuestAddress(STATUS), UNSUPP).unwrap();
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), UNSUPP);
    assert!(write_status(&m, GuestAddress(HOLE), 0).is_err());
}

fn random_desc(rng: &mut Rng) -> RawDescriptor {
    let addr = match rng.below(8) {
        0 => HDR + 16 * rng.below(8),
        1 => DATA + 0x200 * rng.below(16),
        2 => 0xF000 + rng.below(0x1000),
        3 => 0x1F000 + rng.below(0x2000),
        4 => HOLE + rng.below(0x10000),
        5 => u64::MAX - rng.below(0x1000),
        6 => TABLE,
        _ => rng.next(),
    };
    let len = match rng.below(8) {
        0 => 16,
        1 => 1,
        2 => 0,
        3 => 0x200 * rng.below(9) as u32,
        4 => rng.below(64) as u32,
        5 => u32::MAX - rng.below(4) as u32,
        6 => 16 * rng.below(40) as u32,
        _ => rng.next() as u32,
    };
    let flags = (rng.next() as u16) & (NEXT | W | IND);
    let next = rng.below(20) as u16;
    raw(addr, len, flags, next)
}

/// Thousands of random descriptor tables, indirect tables and headers: parsing never panics,
/// and every accepted request satisfies the invariants the device relies on.
#[test]
fn fuzz_random_chains_never_panic() {
    let m = mem();
    let regions: Vec<(usize, usize)> =
        [(0u64, 0x10000usize), (0x10000, 0x10000), (0x40000, 0x10000)]
            .iter()
            .map(|&(a, l)| (host(&m, a) as usize, l))
            .collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let types = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ];
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut req = BlkRequest::new();
    for _ in 0..20_000 {
        // Random headers and segments.
        for i in 0..8 {
            let t = if rng.below(4) == 0 {
                rng.next() as u32
            } else {
                types[rng.below(types.len() as u64) as usize]
            };
            hdr(&m, HDR + 16 * i, t, rng.below(0x10_0100));
            seg(
                &m,
                SEGS + 16 * i,
                rng.below(0x10_0100),
                rng.below(0x1100) as u32,
                rng.below(3) as u32,
            );
        }
        for i in 0..40 {
            m.write_obj(random_desc(&mut rng), GuestAddress(TABLE + 16 * i))
                .unwrap();
        }
        let q = MockSplitQueue::new(&m, 16);
        let chain = if rng.below(3) == 0 {
            // A well-formed skeleton with random lengths and addresses.
            let n = 2 + rng.below(5) as usize;
            let descs: Vec<_> = (0..n)
                .map(|i| {
                    let mut d = SplitDescriptor::from(random_desc(&mut rng));
                    d.set_flags(if i == 0 {
                        R
                    } else if i + 1 == n || rng.below(2) == 0 {
                        W
                    } else {
                        R
                    });
                    if i == 0 {
                        d.set_addr(HDR + 16 * rng.below(8));
                        d.set_len(16);
                    }
                    RawDescriptor::from(d)
                })
                .collect();
            q.build_desc_chain(&descs).unwrap()
        } else {
            for i in 0..16 {
                q.desc_table().store(i, random_desc(&mut rng)).unwrap();
            }
            let avail = q.avail_addr();
            let head = rng.below(17) as u16;
            m.write_obj(head, avail.unchecked_add(4)).unwrap();
            m.write_obj(1u16, avail.unchecked_add(2)).unwrap();
            let mut queue: Queue = q.create_queue().unwrap();
            match queue.iter(&m).unwrap().next() {
                Some(c) => c,
                None => continue,
            }
        };
        let lim = limits();
        let verdict = req.parse_into(chain, &lim);
        let fast = parse_fast(&m, &q, &lim);
        match (&verdict, &fast) {
            (Ok(()), Ok(b)) => assert_same_request(&req, b),
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("virtio-queue path {a:?}, ring view path {b:?}"),
        }
        match verdict {
            Ok(()) => {
                ok += 1;
                let sum: u64 = req.data.iter().map(|v| v.iov_len as u64).sum();
                assert_eq!(sum, req.data_len);
                assert!(req.data.len() <= MAX_IOVECS);
                for v in &req.data {
                    let b = v.iov_base as usize;
                    assert!(
                        regions
                            .iter()
                            .any(|&(h, l)| b >= h && b + v.iov_len <= h + l),
                        "iovec outside guest memory"
                    );
                }
                assert!(GuestMemoryBackend::check_range(&m, req.status_addr, 1));
                match req.kind {
                    RequestKind::In | RequestKind::Out => {
                        assert!(req.data_len > 0 && req.data_len.is_multiple_of(512));
                        assert!(req.sector + req.data_len / 512 <= lim.capacity_sectors);
                    }
                    RequestKind::GetId => assert!(req.data_len > 0 && req.data_len <= 20),
                    RequestKind::Flush => assert_eq!(req.data_len, 0),
                    RequestKind::Discard | RequestKind::WriteZeroes => {
                        assert!(!req.segments.is_empty());
                        for s in &req.segments {
                            assert!(s.sector + u64::from(s.num_sectors) <= lim.capacity_sectors);
                            assert!(!(s.unmap && req.kind == RequestKind::Discard));
                        }
                    }
                }
            }
            Err(e) => {
                failed += 1;
                if let Some(a) = e.status_addr {
                    assert!(GuestMemoryBackend::check_range(&m, a, 1));
                }
            }
        }
    }
    // The generator must exercise both outcomes.
    assert!(ok > 100, "only {ok} requests accepted");
    assert!(failed > 1000, "only {failed} requests rejected");
}
