//! The virtio-scsi command parser on valid and hostile chains, through both ways of reading
//! a chain: virtio-queue's `DescriptorChain` (`parse_into`) and the pre-translated ring view
//! (`parse_view`, the hot path). Every test checks that both reach the same verdict.

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::vhost::test_chains::{mem, raw, with_ring_view, Mem, Rng, HOLE, IND, NEXT, R, W};

const HDR: u64 = 0x1000;
const RESP: u64 = 0x1800;
const DATA: u64 = 0x2000;
const TABLE: u64 = 0x6000;
const H: u32 = REQ_HEADER_LEN as u32;
const RL: u32 = RESP_LEN as u32;

/// A READ(10) header for target 0, LUN 0.
fn hdr(mem: &Mem, addr: u64) {
    let mut h = [0u8; REQ_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&LunAddr::encode(0, 0));
    h[8..16].copy_from_slice(&0x77u64.to_le_bytes());
    h[19..29].copy_from_slice(&[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0]);
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// Parses the chain at the head of `q`'s available ring through the ring view.
fn parse_fast(mem: &Mem, q: &MockSplitQueue<Mem>) -> Result<CmdRequest, RequestError> {
    with_ring_view(mem, q, |map, view, head| {
        let mut req = CmdRequest::default();
        req.parse_view(view, map, head).map(|()| req)
    })
}

fn same_request(a: &CmdRequest, b: &CmdRequest) {
    let iovs = |v: &[libc::iovec]| -> Vec<(usize, usize)> {
        v.iter().map(|v| (v.iov_base as usize, v.iov_len)).collect()
    };
    let descs = |d: &[Desc]| -> Vec<(u64, u32, bool)> {
        d.iter().map(|d| (d.addr, d.len, d.write)).collect()
    };
    assert_eq!(a.head_index, b.head_index);
    assert_eq!((a.lun, a.tag, a.cdb), (b.lun, b.tag, b.cdb));
    assert_eq!(
        (a.data_out_len, a.data_in_len),
        (b.data_out_len, b.data_in_len)
    );
    assert_eq!(iovs(&a.data_out), iovs(&b.data_out));
    assert_eq!(iovs(&a.data_in), iovs(&b.data_in));
    assert_eq!(
        descs(a.streams.writable()),
        descs(b.streams.writable()),
        "response descriptors"
    );
}

fn assert_same(slow: &Result<CmdRequest, RequestError>, fast: &Result<CmdRequest, RequestError>) {
    match (slow, fast) {
        (Ok(a), Ok(b)) => same_request(a, b),
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("virtio-queue path {a:?}, ring view path {b:?}"),
    }
}

/// Parses a linear chain of `(addr, len, flags)` (the mock links them) both ways.
fn parse(mem: &Mem, descs: &[(u64, u32, u16)]) -> Result<CmdRequest, RequestError> {
    // Room for a header split byte by byte; the rings end below `HDR`.
    let q = MockSplitQueue::new(mem, 64);
    let raws: Vec<_> = descs.iter().map(|&(a, l, f)| raw(a, l, f, 0)).collect();
    let chain = q.build_desc_chain(&raws).unwrap();
    let mut req = CmdRequest::default();
    let slow = req.parse_into(chain).map(|()| req);
    assert_same(&slow, &parse_fast(mem, &q));
    slow
}

/// Parses a chain given verbatim (NEXT flags and links included) both ways.
fn parse_raw(mem: &Mem, descs: &[RawDescriptor]) -> Result<CmdRequest, RequestError> {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_multiple_desc_chains(descs).unwrap();
    let mut req = CmdRequest::default();
    let slow = req.parse_into(chain).map(|()| req);
    assert_same(&slow, &parse_fast(mem, &q));
    slow
}

fn assert_err(r: Result<CmdRequest, RequestError>, error: ParseError, can_respond: bool) {
    match r {
        Ok(req) => panic!("expected {error:?}, parsed {req:?}"),
        Err(e) => assert_eq!((e.error, e.can_respond), (error, can_respond)),
    }
}

#[test]
fn valid_commands() {
    let m = mem();
    hdr(&m, HDR);
    // Data-in: header, response, buffer across two regions.
    let req = parse(&m, &[(HDR, H, R), (RESP, RL, W), (0xF800, 0x1000, W)]).unwrap();
    assert_eq!(
        (req.tag, req.cdb[0], req.lun),
        (0x77, 0x28, LunAddr::encode(0, 0))
    );
    assert_eq!((req.data_in_len, req.data_out_len), (0x1000, 0));
    assert_eq!(req.data_in.len(), 2, "split at the region boundary");
    // Data-out sharing the header's descriptor; response split in two.
    let req = parse(
        &m,
        &[(HDR, H + 0x200, R), (RESP, 10, W), (RESP + 10, RL - 10, W)],
    )
    .unwrap();
    assert_eq!((req.data_out_len, req.data_in_len), (0x200, 0));
    assert_eq!(req.data_out[0].iov_len, 0x200);
    assert_eq!(req.streams.writable().len(), 2);
    // Header split byte by byte, a zero-length descriptor, no data.
    let mut d: Vec<_> = (0..u64::from(H)).map(|i| (HDR + i, 1, R)).collect();
    d.push((DATA, 0, R));
    d.push((RESP, RL, W));
    let req = parse(&m, &d).unwrap();
    assert_eq!((req.tag, req.cdb[0]), (0x77, 0x28));
}

#[test]
fn malformed_commands() {
    let m = mem();
    hdr(&m, HDR);
    // Header too short, with room for a response: answered with FAILURE.
    assert_err(
        parse(&m, &[(HDR, 10, R), (RESP, RL, W)]),
        ParseError::HeaderTooShort(10),
        true,
    );
    // No room for a response: returned unused.
    assert_err(
        parse(&m, &[(HDR, H, R), (RESP, 50, W)]),
        ParseError::ResponseTooShort(50),
        false,
    );
    // A readable descriptor after the writable ones.
    assert_err(
        parse(&m, &[(HDR, H, R), (RESP, RL, W), (DATA, 0x200, R)]),
        ParseError::ReadableAfterWritable,
        true,
    );
    // Data in both directions (no VIRTIO_SCSI_F_INOUT).
    assert_err(
        parse(
            &m,
            &[
                (HDR, H, R),
                (DATA, 0x200, R),
                (RESP, RL, W),
                (DATA, 0x200, W),
            ],
        ),
        ParseError::Bidirectional,
        true,
    );
    // Data outside guest memory.
    assert_err(
        parse(&m, &[(HDR, H, R), (RESP, RL, W), (HOLE, 0x200, W)]),
        ParseError::BadGuestAddress {
            addr: HOLE,
            len: 0x200,
        },
        true,
    );
    // Header outside guest memory.
    assert_err(
        parse(&m, &[(HOLE, H, R), (RESP, RL, W)]),
        ParseError::BadGuestAddress {
            addr: HOLE,
            len: u64::from(H),
        },
        true,
    );
    // Response in the hole or running into it: nowhere to answer.
    assert_err(
        parse(&m, &[(HDR, H, R), (HOLE, RL, W)]),
        ParseError::BadGuestAddress {
            addr: HOLE,
            len: RESP_LEN,
        },
        false,
    );
    assert_err(
        parse(&m, &[(HDR, H, R), (0x1FFF0, RL, W)]),
        ParseError::BadGuestAddress {
            addr: 0x1FFF0,
            len: RESP_LEN,
        },
        false,
    );
    // Response at the very top of the address space.
    assert_err(
        parse(&m, &[(HDR, H, R), (u64::MAX - 10, RL, W)]),
        ParseError::BadGuestAddress {
            addr: u64::MAX - 10,
            len: RESP_LEN,
        },
        false,
    );
}

#[test]
fn broken_chains_are_returned_unused() {
    let m = mem();
    hdr(&m, HDR);
    // 0 -> 1 -> 0: a loop.
    assert_err(
        parse_raw(&m, &[raw(HDR, H, R | NEXT, 1), raw(RESP, RL, W | NEXT, 0)]),
        ParseError::BadChain,
        false,
    );
    // Next index beyond the queue size.
    assert_err(
        parse_raw(&m, &[raw(HDR, H, R | NEXT, 200)]),
        ParseError::BadChain,
        false,
    );
    // Indirect table: valid, nested, unmapped, and longer than MAX_DESCS.
    let table = [
        raw(HDR, H, R | NEXT, 1),
        raw(RESP, RL, W | NEXT, 2),
        raw(DATA, 0x200, W, 0),
    ];
    for (i, d) in table.iter().enumerate() {
        m.write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    let req = parse_raw(&m, &[raw(TABLE, 48, IND, 0)]).unwrap();
    assert_eq!(req.data_in_len, 0x200);
    m.write_obj(raw(TABLE, 32, IND, 0), GuestAddress(TABLE + 16))
        .unwrap();
    assert_err(
        parse_raw(&m, &[raw(TABLE, 32, IND, 0)]),
        ParseError::BadChain,
        false,
    );
    assert_err(
        parse_raw(&m, &[raw(HOLE, 48, IND, 0)]),
        ParseError::BadChain,
        false,
    );
    let n = MAX_DESCS as u64 + 8;
    for i in 0..n {
        let d = raw(RESP, RL, W | NEXT, i as u16 + 1);
        m.write_obj(d, GuestAddress(0x20000 - 16 * n + 16 * i))
            .unwrap();
    }
    let big = raw(0x20000 - 16 * n, 16 * n as u32, IND, 0);
    assert_err(parse_raw(&m, &[big]), ParseError::TooManyDescriptors, false);
}

fn random_desc(rng: &mut Rng) -> RawDescriptor {
    let addr = match rng.below(8) {
        0 => HDR + rng.below(4),
        1 => DATA + 0x200 * rng.below(16),
        2 => RESP + rng.below(4),
        3 => 0x1FF00 + rng.below(0x200),
        4 => HOLE + rng.below(0x10000),
        5 => u64::MAX - rng.below(0x1000),
        6 => TABLE,
        _ => rng.next(),
    };
    let len = match rng.below(8) {
        0 => H,
        1 => RL,
        2 => 0,
        3 => 0x200 * rng.below(9) as u32,
        4 => rng.below(128) as u32,
        5 => u32::MAX - rng.below(4) as u32,
        6 => 16 * rng.below(40) as u32,
        _ => rng.next() as u32,
    };
    let flags = (rng.next() as u16) & (NEXT | W | IND);
    raw(addr, len, flags, rng.below(20) as u16)
}

/// Random descriptor tables, indirect tables and chains: both paths agree, nothing panics,
/// and every accepted command only points into guest memory.
#[test]
fn random_chains_agree() {
    let m = mem();
    hdr(&m, HDR);
    let regions: Vec<(usize, usize)> =
        [(0u64, 0x10000usize), (0x10000, 0x10000), (0x40000, 0x10000)]
            .iter()
            .map(|&(a, l)| (m.get_host_address(GuestAddress(a)).unwrap() as usize, l))
            .collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut answered, mut unusable) = (0u32, 0u32, 0u32);
    let mut req = CmdRequest::default();
    for _ in 0..20_000 {
        for i in 0..40 {
            m.write_obj(random_desc(&mut rng), GuestAddress(TABLE + 16 * i))
                .unwrap();
        }
        let q = MockSplitQueue::new(&m, 16);
        let chain = if rng.below(3) == 0 {
            // A well-formed skeleton: readable part, then writable part.
            let n = 2 + rng.below(5) as usize;
            let first_w = 1 + rng.below(n as u64 - 1) as usize;
            let descs: Vec<_> = (0..n)
                .map(|i| {
                    let mut d = SplitDescriptor::from(random_desc(&mut rng));
                    d.set_flags(if i < first_w { R } else { W });
                    if i == 0 {
                        d.set_addr(HDR);
                        d.set_len(H + 0x200 * rng.below(2) as u32);
                    }
                    if i == first_w && rng.below(2) == 0 {
                        d.set_addr(RESP);
                        d.set_len(RL);
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
            m.write_obj(rng.below(17) as u16, avail.unchecked_add(4))
                .unwrap();
            m.write_obj(1u16, avail.unchecked_add(2)).unwrap();
            let mut queue: Queue = q.create_queue().unwrap();
            match queue.iter(&m).unwrap().next() {
                Some(c) => c,
                None => continue,
            }
        };
        let verdict = req.parse_into(chain);
        match (&verdict, &parse_fast(&m, &q)) {
            (Ok(()), Ok(b)) => same_request(&req, b),
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("virtio-queue path {a:?}, ring view path {b:?}"),
        }
        match verdict {
            Ok(()) => {
                ok += 1;
                assert!(req.data_in.is_empty() || req.data_out.is_empty());
                for v in req.data_in.iter().chain(&req.data_out) {
                    let b = v.iov_base as usize;
                    assert!(
                        regions
                            .iter()
                            .any(|&(h, l)| b >= h && b + v.iov_len <= h + l),
                        "iovec outside guest memory"
                    );
                }
                let iov_sum = |v: &[libc::iovec]| v.iter().map(|v| v.iov_len as u64).sum::<u64>();
                assert_eq!(iov_sum(&req.data_in), req.data_in_len);
                assert_eq!(iov_sum(&req.data_out), req.data_out_len);
            }
            Err(ref e) if e.can_respond => answered += 1,
            Err(_) => unusable += 1,
        }
        if verdict.is_ok() || verdict.as_ref().is_err_and(|e| e.can_respond) {
            // The response header is writable guest memory.
            walk(req.streams.writable(), 0, RESP_LEN, |a, l| {
                assert!(GuestMemoryBackend::check_range(
                    &m,
                    GuestAddress(a),
                    l as usize
                ));
                Ok::<(), StreamError>(())
            })
            .unwrap();
        }
    }
    assert!(ok > 100, "only {ok} commands accepted");
    assert!(
        answered > 100,
        "only {answered} commands answered with FAILURE"
    );
    assert!(unusable > 1000, "only {unusable} chains returned unused");
}
