//! In-flight I/O tracking (vhost-user.rst "Inflight I/O tracking",
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a shared memory region, created by the
//! back-end on GET_INFLIGHT_FD and handed back by the front-end on SET_INFLIGHT_FD after
//! every (re)connection, in which each queue records which chains it took from the
//! ring and has not returned. A new back-end instance (after a crash or a restart) resubmits
//! them, in the order they were taken, and resumes taking chains after them; without the
//! region the front-end restarts the ring at the used index, which is right only when every
//! chain taken had completed in order.
//!
//! A packed ring's part has the spec's packed layout instead ([`packed`]: `QueueRegionPacked`,
//! `DescStatePacked`); the front-end sets the features (VIRTIO_F_RING_PACKED) before it asks
//! for the region (QEMU's `vhost_dev_prepare_inflight`), so the back-end sizes the region
//! for the layout its rings use.
//!
//! Split layout, per queue (the spec's `QueueRegionSplit` followed by `desc_num` entries of
//! `DescStateSplit`), little-endian, queue regions back to back at [`queue_region_len`]
//! strides:
//! ```text
//! 0   u64 features          (0)
//! 8   u16 version           (1; 0 = not initialised yet)
//! 10  u16 desc_num          (ring size)
//! 12  u16 last_batch_head   (head of the list of the last batch of used chains)
//! 14  u16 used_idx          (the used index once that batch is committed here)
//! 16  desc[desc_num], 16 bytes each: u8 inflight, u8 padding[5], u16 next, u64 counter
//! ```
//! The rust-vmm `QueueRegionSplit` struct does not match this layout (vhost#356), so the
//! offsets are defined here, from [`QueueRegionHeader`] and [`DescStateSplit`].
//!
//! Everything read from the region is untrusted (the front-end can write it): indexes are
//! bounds-checked against the ring size and the region's real length, the file is checked
//! with fstat, and must be sealed against shrinking (a truncated mapping would fault).

use std::fs::File;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;

/// The spec's per-queue header (`QueueRegionSplit` without its `desc[]`).
#[repr(C)]
pub struct QueueRegionHeader {
    pub features: u64,
    pub version: u16,
    pub desc_num: u16,
    pub last_batch_head: u16,
    pub used_idx: u16,
}

/// The spec's `DescStateSplit`: the state of one head descriptor.
#[repr(C)]
pub struct DescStateSplit {
    pub inflight: u8,
    pub padding: [u8; 5],
    pub next: u16,
    pub counter: u64,
}

const VERSION: usize = offset_of!(QueueRegionHeader, version);
const DESC_NUM: usize = offset_of!(QueueRegionHeader, desc_num);
const LAST_BATCH_HEAD: usize = offset_of!(QueueRegionHeader, last_batch_head);
const USED_IDX: usize = offset_of!(QueueRegionHeader, used_idx);
const HEADER_LEN: usize = size_of::<QueueRegionHeader>();
const DESC_LEN: usize = size_of::<DescStateSplit>();
const DESC_INFLIGHT: usize = offset_of!(DescStateSplit, inflight);
const DESC_NEXT: usize = offset_of!(DescStateSplit, next);
const DESC_COUNTER: usize = offset_of!(DescStateSplit, counter);

/// The region version this back-end writes.
const REGION_VERSION: u16 = 1;

/// Queue regions start at multiples of this (a cache line each, as libvhost-user).
const QUEUE_ALIGN: u64 = 64;

/// Largest split ring (virtio 1.2 §2.7: queue size at most 32768).
const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes one queue's part of the region takes for split rings of up to `queue_size` entries.
pub fn queue_region_len(queue_size: u16) -> u64 {
    let raw = (HEADER_LEN + DESC_LEN * usize::from(queue_size)) as u64;
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// Bytes one queue's part takes for rings of up to `queue_size` entries, split or packed
/// (`QueueRegionPacked`: 32 bytes of header and 32 per entry).
pub fn part_len(queue_size: u16, packed: bool) -> u64 {
    if packed {
        packed::queue_region_len(queue_size)
    } else {
        queue_region_len(queue_size)
    }
}

/// A mapped in-flight region (every queue's part); unmapped when the last queue and the
/// session let go of it.
pub struct InflightRegion {
    base: *mut u8,
    /// Length of the mapping at `base` (from the start of the page that holds the region).
    map_len: usize,
    /// Where the queue regions start within the mapping (the message's `mmap_offset` minus
    /// the page-aligned start).
    start: usize,
    num_queues: u16,
    queue_size: u16,
    /// The parts have the packed layout (the rings are packed).
    packed: bool,
}

// SAFETY: the mapping is shared memory owned by this value; every access goes through
// volatile reads and writes of plain integers, and each queue's part is written by one
// poller at a time (the session hands a queue's part to the ring it starts).
unsafe impl Send for InflightRegion {}
// SAFETY: see Send; `&InflightRegion` only gives out bounds-checked volatile accesses.
unsafe impl Sync for InflightRegion {}

fn einval(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a new zeroed region for `num_queues` queues of up to `queue_size`
    /// entries, split or `packed` layout, in a memfd sealed against shrinking and growing
    /// (so that no one can make the mapping fault later); returns the region, the fd to
    /// send and the message.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        packed: bool,
    ) -> io::Result<(Arc<Self>, File, VhostUserInflight)> {
        check_geometry(num_queues, queue_size)?;
        let len = u64::from(num_queues) * part_len(queue_size, packed);
        // SAFETY: a NUL-terminated name and flags; returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(
                c"blockd-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let region = Self::map_file(&file, 0, len, num_queues, queue_size, packed)?;
        let msg = VhostUserInflight {
            mmap_size: len,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        Ok((Arc::new(region), file, msg))
    }

    /// SET_INFLIGHT_FD: maps the region the front-end hands back, for split or `packed`
    /// rings. Refused unless the geometry is sane, the region holds every queue's part,
    /// lies inside the file (fstat) and the file is sealed against shrinking.
    pub fn open(file: &File, msg: &VhostUserInflight, packed: bool) -> io::Result<Arc<Self>> {
        check_geometry(msg.num_queues, msg.queue_size)?;
        let need = u64::from(msg.num_queues) * part_len(msg.queue_size, packed);
        if msg.mmap_size < need {
            return Err(einval(format!(
                "inflight region of {} bytes is too small for {} queues of {} entries ({need} bytes)",
                msg.mmap_size, msg.num_queues, msg.queue_size
            )));
        }
        let end = msg
            .mmap_offset
            .checked_add(need)
            .ok_or_else(|| einval("inflight region offset overflows".into()))?;
        let size = file.metadata()?.len();
        if end > size {
            return Err(einval(format!(
                "inflight region ends at {end} bytes but its file has {size}"
            )));
        }
        // SAFETY: fcntl on a descriptor the caller owns.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(einval(
                "inflight region file is not sealed against shrinking".into(),
            ));
        }
        Ok(Arc::new(Self::map_file(
            file,
            msg.mmap_offset,
            need,
            msg.num_queues,
            msg.queue_size,
            packed,
        )?))
    }

    fn map_file(
        file: &File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
        packed: bool,
    ) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let map_off = offset / page * page;
        let start = (offset - map_off) as usize;
        let map_len = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(start))
            .ok_or_else(|| einval("inflight region too large".into()))?;
        let file_off = libc::off_t::try_from(map_off)
            .map_err(|_| einval("inflight region offset too large".into()))?;
        // SAFETY: a new shared mapping of a file the caller keeps open for the call; the
        // kernel picks the address. The range lies inside the file (checked by callers).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(InflightRegion {
            base: p.cast(),
            map_len,
            start,
            num_queues,
            queue_size,
            packed,
        })
    }

    /// The number of queues the region has a part for.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue `index`'s part, for rings of up to the region's queue size; None when the
    /// region has no part for that queue.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        if index >= self.num_queues {
            return None;
        }
        let off = self.start + usize::from(index) * part_len(self.queue_size, self.packed) as usize;
        Some(QueueInflight {
            // SAFETY: `off` + the queue's part lies inside the mapping (map_len covers
            // num_queues parts after `start`).
            base: unsafe { self.base.add(off) },
            capacity: self.queue_size,
            packed: self.packed,
            _region: self.clone(),
        })
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in map_file, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> io::Result<()> {
    if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(einval(format!(
            "inflight region for {num_queues} queues of {queue_size} entries"
        )));
    }
    Ok(())
}

/// What a ring restarts with, from its part of the region ([`QueueInflight::resume`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Resume {
    /// The part was not initialised (a new region, or one the back-end could not trust):
    /// nothing to resubmit, the ring starts at the front-end's base.
    pub fresh: bool,
    /// Heads still in flight, in the order they were taken from the ring (counter order).
    pub resubmit: Vec<u16>,
    /// The counter the next chain taken gets (after every resubmitted one).
    pub next_counter: u64,
    /// Chains of a batch that had been published to the driver but not committed here,
    /// which the fix-up cleared.
    pub fixed_up: u16,
}

/// One queue's part of the region: marks heads in flight and clears them in the spec's
/// order. All accesses are bounds-checked volatile accesses (the front-end shares the
/// memory); heads outside the ring are ignored.
pub struct QueueInflight {
    base: *mut u8,
    /// Entries the part has room for.
    capacity: u16,
    /// The part has the packed layout ([`packed`]).
    packed: bool,
    _region: Arc<InflightRegion>,
}

// SAFETY: points into `_region`'s mapping, which it keeps alive; used by one poller.
unsafe impl Send for QueueInflight {}

impl QueueInflight {
    fn rd16(&self, off: usize) -> u16 {
        // SAFETY: callers pass offsets inside the part (header fields, or a checked
        // descriptor entry); 2-byte aligned (parts are 64-byte aligned from a page).
        u16::from_le(unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u16>()) })
    }

    fn wr16(&self, off: usize, v: u16) {
        // SAFETY: as rd16.
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u16>(), v.to_le()) }
    }

    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.capacity).then(|| HEADER_LEN + usize::from(head) * DESC_LEN)
    }

    fn inflight(&self, head: u16) -> bool {
        self.desc(head).is_some_and(|d| {
            // SAFETY: `d` is a checked entry inside the part.
            unsafe { std::ptr::read_volatile(self.base.add(d + DESC_INFLIGHT)) != 0 }
        })
    }

    fn set_inflight(&self, head: u16, v: bool) {
        if let Some(d) = self.desc(head) {
            // SAFETY: `d` is a checked entry inside the part.
            unsafe { std::ptr::write_volatile(self.base.add(d + DESC_INFLIGHT), u8::from(v)) }
        }
    }

    fn counter(&self, head: u16) -> u64 {
        self.desc(head).map_or(0, |d| {
            // SAFETY: a checked entry; the counter is 8-byte aligned (entries are 16 bytes
            // from a 16-byte header at a 64-byte aligned part).
            u64::from_le(unsafe {
                std::ptr::read_volatile(self.base.add(d + DESC_COUNTER).cast::<u64>())
            })
        })
    }

    /// A chain was taken from the ring (spec: set `counter`, then `inflight`).
    #[inline]
    pub fn mark(&self, head: u16, counter: u64) {
        if let Some(d) = self.desc(head) {
            // SAFETY: a checked entry; aligned as in `counter`.
            unsafe {
                std::ptr::write_volatile(
                    self.base.add(d + DESC_COUNTER).cast::<u64>(),
                    counter.to_le(),
                );
            }
            self.set_inflight(head, true);
        }
    }

    /// A chain's used element was written (not yet published): it joins the current batch
    /// (spec: `desc[head].next = last_batch_head; last_batch_head = head`).
    #[inline]
    pub fn batch_add(&self, head: u16) {
        if let Some(d) = self.desc(head) {
            self.wr16(d + DESC_NEXT, self.rd16(LAST_BATCH_HEAD));
            self.wr16(LAST_BATCH_HEAD, head);
        }
    }

    /// The used index `used_idx` was published, covering the chains of `batch`: they are
    /// no longer in flight, then the region records the index (spec order: a crash before
    /// this leaves `used_idx` behind the ring's, and the next instance clears the batch).
    #[inline]
    pub fn commit(&self, batch: &[u16], used_idx: u16) {
        for &h in batch {
            self.set_inflight(h, false);
        }
        fence(Ordering::Release);
        self.wr16(USED_IDX, used_idx);
    }

    /// Takes the part over for a ring of `ring_size` entries whose used index is
    /// `ring_used` (read from guest memory): completes the commit of a batch the previous
    /// instance published but did not record, and lists the heads still in flight. A part
    /// never initialised, or one that does not describe this ring, starts fresh.
    pub fn resume(&self, ring_size: u16, ring_used: u16) -> Resume {
        let version = self.rd16(VERSION);
        let desc_num = self.rd16(DESC_NUM);
        if version != REGION_VERSION || desc_num != ring_size || ring_size > self.capacity {
            if version != 0 {
                tracing::warn!(
                    version,
                    desc_num,
                    ring_size,
                    "inflight region does not describe this ring: starting it afresh"
                );
            }
            self.init(ring_size, ring_used);
            return Resume {
                fresh: true,
                resubmit: Vec::new(),
                next_counter: 0,
                fixed_up: 0,
            };
        }
        let mut fixed_up = 0;
        let recorded = self.rd16(USED_IDX);
        if recorded != ring_used {
            // The last batch reached the driver: clear its chains (at most a ring's worth,
            // following `next` while it stays inside the ring).
            let batch = ring_used.wrapping_sub(recorded).min(ring_size);
            let mut h = self.rd16(LAST_BATCH_HEAD);
            for _ in 0..batch {
                if h >= ring_size {
                    break;
                }
                self.set_inflight(h, false);
                fixed_up += 1;
                h = self.desc(h).map_or(u16::MAX, |d| self.rd16(d + DESC_NEXT));
            }
            fence(Ordering::Release);
            self.wr16(USED_IDX, ring_used);
        }
        let mut pending: Vec<(u64, u16)> = (0..ring_size)
            .filter(|&h| self.inflight(h))
            .map(|h| (self.counter(h), h))
            .collect();
        pending.sort_unstable();
        let next_counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Resume {
            fresh: false,
            resubmit: pending.into_iter().map(|(_, h)| h).collect(),
            next_counter,
            fixed_up,
        }
    }

    /// Initialises the part for a ring of `ring_size` entries (nothing in flight), the
    /// version last.
    fn init(&self, ring_size: u16, ring_used: u16) {
        let n = ring_size.min(self.capacity);
        for h in 0..self.capacity {
            self.set_inflight(h, false);
        }
        self.wr16(DESC_NUM, n);
        self.wr16(LAST_BATCH_HEAD, 0);
        self.wr16(USED_IDX, ring_used);
        fence(Ordering::Release);
        self.wr16(VERSION, REGION_VERSION);
    }

    /// Entries the part has room for (the region's queue size).
    pub fn capacity(&self) -> u16 {
        self.capacity
    }

    /// Whether the part has the packed layout.
    pub fn is_packed(&self) -> bool {
        self.packed
    }
}

#[path = "inflight_packed.rs"]
pub mod packed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_the_specs() {
        // vhost-user.rst "Inflight I/O tracking", QueueRegionSplit and DescStateSplit.
        assert_eq!(offset_of!(QueueRegionHeader, features), 0);
        assert_eq!(VERSION, 8);
        assert_eq!(DESC_NUM, 10);
        assert_eq!(LAST_BATCH_HEAD, 12);
        assert_eq!(USED_IDX, 14);
        assert_eq!(HEADER_LEN, 16);
        assert_eq!(DESC_INFLIGHT, 0);
        assert_eq!(offset_of!(DescStateSplit, padding), 1);
        assert_eq!(DESC_NEXT, 6);
        assert_eq!(DESC_COUNTER, 8);
        assert_eq!(DESC_LEN, 16);
        assert_eq!(queue_region_len(128), 16 + 128 * 16 + 48);
        assert_eq!(queue_region_len(1), 64);
        assert_eq!(queue_region_len(4) % QUEUE_ALIGN, 0);
    }

    fn region(num_queues: u16, queue_size: u16) -> (Arc<InflightRegion>, File, VhostUserInflight) {
        InflightRegion::create(num_queues, queue_size, false).unwrap()
    }

    /// Raw little-endian read of the shared file (what a new instance would map).
    fn file_u16(file: &File, at: u64) -> u16 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 2];
        file.read_exact_at(&mut b, at).unwrap();
        u16::from_le_bytes(b)
    }

    #[test]
    fn marks_and_commits_in_the_shared_file_and_a_new_mapping_resubmits_in_counter_order() {
        let (r, file, msg) = region(2, 8);
        assert_eq!(msg.mmap_size, 2 * queue_region_len(8));
        let q = r.queue(1).unwrap();
        assert!(r.queue(2).is_none());
        assert_eq!(
            q.resume(8, 100),
            Resume {
                fresh: true,
                resubmit: vec![],
                next_counter: 0,
                fixed_up: 0
            }
        );
        let part = queue_region_len(8);
        assert_eq!(file_u16(&file, part + VERSION as u64), 1);
        assert_eq!(file_u16(&file, part + DESC_NUM as u64), 8);
        // Taken: 6, 1, 4, 3; 1 and 3 complete in one batch, published as used idx 102.
        for (c, h) in [6u16, 1, 4, 3].into_iter().enumerate() {
            q.mark(h, c as u64 + 7);
        }
        q.batch_add(1);
        q.batch_add(3);
        q.commit(&[1, 3], 102);
        assert_eq!(file_u16(&file, part + USED_IDX as u64), 102);
        assert_eq!(file_u16(&file, part + LAST_BATCH_HEAD as u64), 3);
        // A head out of the ring is ignored, never written past the part.
        q.mark(8, 99);
        q.mark(u16::MAX, 99);
        drop(q);

        // The next instance maps the same fd.
        let r2 = InflightRegion::open(&file, &msg, false).unwrap();
        let q2 = r2.queue(1).unwrap();
        let res = q2.resume(8, 102);
        assert!(!res.fresh);
        assert_eq!(res.resubmit, vec![6, 4], "in the order they were taken");
        assert_eq!(res.next_counter, 10);
        assert_eq!(res.fixed_up, 0);
        // Queue 0 was never started: fresh.
        assert!(r2.queue(0).unwrap().resume(8, 0).fresh);
    }

    #[test]
    fn a_batch_published_but_not_committed_is_cleared_on_resume() {
        let (r, _file, _msg) = region(1, 8);
        let q = r.queue(0).unwrap();
        q.resume(8, 10);
        for h in [2u16, 5, 7] {
            q.mark(h, u64::from(h));
        }
        // 5 and 7 returned in one batch, used idx published as 12, then a crash before
        // the commit.
        q.batch_add(5);
        q.batch_add(7);
        let res = q.resume(8, 12);
        assert_eq!(res.fixed_up, 2);
        assert_eq!(res.resubmit, vec![2]);
        // Crash before publishing: the used index did not move, both stay in flight.
        q.batch_add(2);
        let res = q.resume(8, 12);
        assert_eq!(res.fixed_up, 0);
        assert_eq!(res.resubmit, vec![2]);
    }

    #[test]
    fn hostile_regions_are_refused_or_bounded() {
        let (r, file, msg) = region(1, 8);
        // Too small, past the end of the file, absurd geometry.
        let small = VhostUserInflight {
            mmap_size: 16,
            ..msg
        };
        assert!(InflightRegion::open(&file, &small, false).is_err());
        let past = VhostUserInflight {
            mmap_offset: 4096,
            ..msg
        };
        assert!(InflightRegion::open(&file, &past, false).is_err());
        let wrap = VhostUserInflight {
            mmap_offset: u64::MAX - 8,
            ..msg
        };
        assert!(InflightRegion::open(&file, &wrap, false).is_err());
        let none = VhostUserInflight {
            num_queues: 0,
            ..msg
        };
        assert!(InflightRegion::open(&file, &none, false).is_err());
        let huge = VhostUserInflight {
            queue_size: 65535,
            ..msg
        };
        assert!(InflightRegion::open(&file, &huge, false).is_err());
        // An unsealed file (could be truncated under the mapping) is refused.
        let plain = tempfile::tempfile().unwrap();
        plain.set_len(4096).unwrap();
        assert!(InflightRegion::open(&plain, &msg, false).is_err());
        // The memfd cannot be shrunk.
        assert!(file.set_len(0).is_err());

        // Garbage in the part: a batch list that leaves the ring, a wild used index.
        let q = r.queue(0).unwrap();
        q.resume(8, 0);
        q.wr16(LAST_BATCH_HEAD, 7);
        q.wr16(HEADER_LEN + 7 * DESC_LEN + DESC_NEXT, 5000);
        q.mark(7, 1);
        let res = q.resume(8, 40000);
        assert_eq!(res.fixed_up, 1);
        assert!(res.resubmit.is_empty());
        // A descriptor count that does not match the ring: afresh.
        q.mark(3, 1);
        assert!(q.resume(4, 0).fresh);
        assert!(q.resume(4, 0).resubmit.is_empty());
        // A ring larger than the part has room for: afresh, and never marked past it.
        assert!(q.resume(16, 0).fresh);
    }
}
