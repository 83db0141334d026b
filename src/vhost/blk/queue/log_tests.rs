//! Dirty-page logging through a request queue (issue: live migration): random mixes of
//! virtio-blk requests (reads, writes, flushes, GET_ID) on a malloc bdev, with the data and
//! status buffers scattered over guest pages, must mark exactly the pages the queue wrote
//! (device-writable buffers, the used ring) while logging is on, and nothing while it is
//! off; and every page whose content changed must be marked (vhost-user.rst "Migration").

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::driver::{malloc_device, Driver, MEM_SIZE, NEXT, USED, WRITE};
use crate::reactor::Poller;
use crate::vhost::dirty_log::{DirtyLog, LogRegion, LOG_PAGE};

const PAGES: usize = MEM_SIZE / LOG_PAGE as usize;
const HDRS: u64 = 0x10000;
/// Data and status buffers go anywhere in here.
const BUFS: u64 = 0x20000;
const REQUESTS: u16 = 40;
/// Descriptors per request (header, up to 4 data segments, status).
const DESCS: u16 = 6;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// xorshift64: reproducible without a crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pages_of(addr: u64, len: u64, out: &mut BTreeSet<usize>) {
    for p in addr / LOG_PAGE..=(addr + len - 1) / LOG_PAGE {
        out.insert(p as usize);
    }
}

fn marked(log: &File) -> BTreeSet<usize> {
    let mut b = vec![0u8; PAGES / 8];
    log.read_exact_at(&mut b, 0).unwrap();
    (0..PAGES)
        .filter(|p| b[p / 8] & (1 << (p % 8)) != 0)
        .collect()
}

/// Puts `REQUESTS` random requests on the ring, runs the queue until all are used, and
/// returns the pages their device-writable descriptors cover and the pages whose content
/// changed.
fn run_mix(
    d: &mut Driver,
    q: &mut dyn Poller,
    rng: &mut Rng,
) -> (BTreeSet<usize>, BTreeSet<usize>) {
    let mut writable = BTreeSet::new();
    for r in 0..REQUESTS {
        let head = r * DESCS;
        let kind = [T_IN, T_IN, T_OUT, T_FLUSH, T_GET_ID][rng.below(5) as usize];
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&rng.below(1500).to_le_bytes());
        d.write(HDRS + 16 * u64::from(r), &hdr);
        d.desc(head, HDRS + 16 * u64::from(r), 16, NEXT, head + 1);
        let mut i = head + 1;
        let device_writes = kind != T_OUT;
        let segments = match kind {
            T_IN | T_OUT => 1 + rng.below(4),
            T_GET_ID => 1,
            _ => 0,
        };
        for _ in 0..segments {
            let len = if kind == T_GET_ID {
                20
            } else {
                512 * (1 + rng.below(8))
            };
            let addr = BUFS + rng.below(MEM_SIZE as u64 - BUFS - len);
            let flags = NEXT | if device_writes { WRITE } else { 0 };
            d.desc(i, addr, len as u32, flags, i + 1);
            if device_writes {
                pages_of(addr, len, &mut writable);
            }
            // Fill with something reads will change (zeros where the bdev is unwritten).
            d.write(addr, &vec![0xa5; len as usize]);
            i += 1;
        }
        let status = BUFS + rng.below(MEM_SIZE as u64 - BUFS - 1);
        d.desc(i, status, 1, WRITE, 0);
        d.write(status, &[0xee]);
        pages_of(status, 1, &mut writable);
    }
    for r in 0..REQUESTS {
        d.make_available(r * DESCS);
    }
    // The driver's own writes are done; what changes from now on, the queue wrote.
    let before = d.read(0, MEM_SIZE);
    let mut used = 0;
    while used < REQUESTS {
        q.poll();
        while d.next_used().is_some() {
            used += 1;
        }
    }
    let after = d.read(0, MEM_SIZE);
    let page = LOG_PAGE as usize;
    let changed = (0..PAGES)
        .filter(|p| before[p * page..(p + 1) * page] != after[p * page..(p + 1) * page])
        .collect();
    (writable, changed)
}

#[test]
fn random_request_mixes_mark_exactly_the_pages_they_wrote() {
    let dev = malloc_device("log", 2048);
    let mut d = Driver::new();
    let log_file = tempfile::tempfile().unwrap();
    log_file.set_len(4096).unwrap();
    let log = Arc::new(DirtyLog::default());
    let (mut setup, _rx) = d.setup();
    setup.log = log.ring(setup.index);
    let index = setup.index;
    let mut q = super::BlkQueue::new(setup, dev.shared.clone()).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let used_page = USED / LOG_PAGE as usize;

    // Off: the queue writes plenty, marks nothing (the bitmap is set, LOG_ALL is not).
    log.set_region(Some(LogRegion::map(&log_file, 4096, 0).unwrap()));
    for _ in 0..3 {
        let (_, changed) = run_mix(&mut d, &mut q, &mut rng);
        assert!(!changed.is_empty());
        assert!(marked(&log_file).is_empty(), "marked with logging off");
    }

    // On (LOG_ALL, and the used ring logged at its address): exactly the writable
    // buffers and the used ring, which hold every change.
    log.set_log_all(true);
    log.set_used(index, Some(USED as u64));
    for round in 0..5 {
        log_file.write_all_at(&[0u8; 4096], 0).unwrap();
        let (mut expected, changed) = run_mix(&mut d, &mut q, &mut rng);
        expected.insert(used_page);
        let got = marked(&log_file);
        assert_eq!(got, expected, "round {round}: marked pages");
        let unlogged: Vec<_> = changed.difference(&got).collect();
        assert!(
            unlogged.is_empty(),
            "round {round}: changed, not marked: {unlogged:?}"
        );
    }

    // The used ring only (VHOST_VRING_F_LOG without LOG_ALL).
    log.set_log_all(false);
    log_file.write_all_at(&[0u8; 4096], 0).unwrap();
    run_mix(&mut d, &mut q, &mut rng);
    assert_eq!(marked(&log_file), BTreeSet::from([used_page]));

    q.request_stop();
    while !q.finished() {
        q.poll();
    }
}
