//! virtio-scsi command parsing (virtio 1.2 §5.6.6.1) on a hostile ring: virtio-queue's
//! chain (`CmdRequest::parse_into`) and blockd's ring view (`parse_view`) must agree.
#![no_main]

use blockd::vhost::guest_map::GuestMap;
use blockd::vhost::scsi::request::{CmdRequest, Desc};
use blockd_fuzz::ring::Ring;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueOwnedT;

fn iovs(v: &[libc::iovec]) -> Vec<(usize, usize)> {
    v.iter().map(|v| (v.iov_base as usize, v.iov_len)).collect()
}

fn descs(d: &[Desc]) -> Vec<(u64, u32, bool)> {
    d.iter().map(|d| (d.addr, d.len, d.write)).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some(mut ring) = Ring::from_bytes(data) else {
        return;
    };
    // SAFETY: `ring.mem` lives until the end of this closure, longer than `map` and the
    // view and requests built from it.
    let map = unsafe { GuestMap::new(&ring.mem) };
    let (view, head) = ring.view(&map);
    let mut fast = CmdRequest::default();
    let fast_r = fast.parse_view(&view, &map, head);

    let chain = ring
        .queue
        .iter(&ring.mem)
        .expect("valid queue")
        .next()
        .expect("one available chain");
    let mut slow = CmdRequest::default();
    let slow_r = slow.parse_into(chain);

    match (&slow_r, &fast_r) {
        (Ok(()), Ok(())) => {
            let (a, b) = (&slow, &fast);
            assert_eq!(a.head_index, b.head_index);
            assert_eq!((a.lun, a.tag, a.cdb), (b.lun, b.tag, b.cdb));
            assert_eq!(
                (a.data_out_len, a.data_in_len),
                (b.data_out_len, b.data_in_len)
            );
            assert_eq!(iovs(&a.data_out), iovs(&b.data_out));
            assert_eq!(iovs(&a.data_in), iovs(&b.data_in));
            assert_eq!(descs(a.streams.writable()), descs(b.streams.writable()));
            assert_eq!(descs(a.streams.readable()), descs(b.streams.readable()));
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("virtio-queue path {a:?} ({slow:?}), ring view path {b:?} ({fast:?})"),
    }
});
