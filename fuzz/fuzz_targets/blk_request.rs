//! virtio-blk request parsing (virtio 1.2 §5.2.6) on a hostile ring: the chain read through
//! virtio-queue (`BlkRequest::parse_into`) and through blockd's ring view (`parse_view`, the
//! hot path behind `parse_ring`) must reach the same verdict and the same request.
#![no_main]

use blockd::vhost::blk::request::{BlkRequest, RequestLimits};
use blockd::vhost::guest_map::GuestMap;
use blockd_fuzz::ring::Ring;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueOwnedT;

fn limits(knobs: u8) -> RequestLimits {
    let on = |bit: u8| knobs & (1 << bit) != 0;
    let segs = if on(1) { 4 } else { 0 };
    RequestLimits {
        capacity_sectors: if on(4) { 0x100 } else { 0x10_0000 },
        seg_max: if on(2) { 4 } else { 254 },
        size_max: if on(3) { 0x1000 } else { u32::MAX },
        max_sectors: 256,
        max_discard_seg: segs,
        max_discard_sectors: 0x1000,
        max_write_zeroes_seg: segs,
        max_write_zeroes_sectors: 0x1000,
        read_only: on(0),
    }
}

fn iovs(r: &BlkRequest) -> Vec<(usize, usize)> {
    r.data
        .iter()
        .map(|v| (v.iov_base as usize, v.iov_len))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some(mut ring) = Ring::from_bytes(data) else {
        return;
    };
    let lim = limits(ring.knobs);
    // SAFETY: `ring.mem` lives until the end of this closure, longer than `map` and the
    // view and requests built from it.
    let map = unsafe { GuestMap::new(&ring.mem) };
    let (view, head) = ring.view(&map);
    let mut fast = BlkRequest::new();
    let fast_r = fast.parse_view(&view, &map, head, &lim);

    let chain = ring
        .queue
        .iter(&ring.mem)
        .expect("valid queue")
        .next()
        .expect("one available chain");
    let mut slow = BlkRequest::new();
    let slow_r = slow.parse_into(chain, &lim);

    match (&slow_r, &fast_r) {
        (Ok(()), Ok(())) => {
            assert_eq!(slow.kind, fast.kind);
            assert_eq!(slow.sector, fast.sector);
            assert_eq!(slow.data_len, fast.data_len);
            assert_eq!(iovs(&slow), iovs(&fast));
            assert_eq!(slow.status_addr, fast.status_addr);
            assert_eq!(slow.head_index, fast.head_index);
            assert_eq!(slow.segments, fast.segments);
            // What was accepted is within the limits.
            assert_eq!(
                slow.data_len,
                slow.data.iter().map(|v| v.iov_len as u64).sum::<u64>()
            );
            assert!(slow.segments.len() <= 4);
            assert!(
                !lim.read_only
                    || !matches!(
                        slow.kind,
                        blockd::vhost::blk::request::RequestKind::Out
                            | blockd::vhost::blk::request::RequestKind::Discard
                            | blockd::vhost::blk::request::RequestKind::WriteZeroes
                    )
            );
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("virtio-queue path {a:?} ({slow:?}), ring view path {b:?} ({fast:?})"),
    }
});
