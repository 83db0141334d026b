//! Dirty-page logging for live migration (vhost-user.rst "Migration" and "Memory region
//! description" / `VHOST_USER_SET_LOG_BASE`; `VHOST_F_LOG_ALL`,
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While QEMU copies a running guest's memory to the destination, it must learn of every
//! page the back-end writes, or the destination runs with stale memory: a read's data, a
//! status byte or a used-ring entry missing there is a silent corruption. The frontend
//! shares a bitmap (one bit per 4 KiB page of guest-physical address, bit `page % 8` of
//! byte `page / 8`, vhost-user.rst "Dirty page logging"), which the back-end ORs
//! atomically while logging is on: all writes into guest memory when `VHOST_F_LOG_ALL` is
//! acked, and the used ring's writes at the ring's log address when the ring's
//! `VHOST_VRING_F_LOG` flag is set.
//!
//! One [`DirtyLog`] per session holds the frontend's settings; each ring's poller holds a
//! [`RingLog`] that follows them, re-reading them only when their generation changed (one
//! atomic load per poll pass when nothing changed; nothing more when logging is off). The
//! marking itself happens in one place, [`crate::vhost::vring::Vring`], which every chain
//! returned to the driver passes: see there. A bit is set after the write it records, so
//! that a frontend which reads and clears the bitmap sees the page again.
//!
//! The session changes the settings under a reactor barrier (every reactor running one of
//! its rings finishes its current poll pass, [`crate::reactor::Reactors::call`]) before it
//! answers the frontend, so that no completion the frontend considers logged can escape.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use crate::vhost::guest_fault::GuestMapping;

/// Bytes of guest-physical memory per bit of the log (vhost-user.rst: `VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;

/// Largest log accepted: 1 GiB of bitmap covers 32 TiB of guest memory.
const MAX_LOG_BYTES: u64 = 1 << 30;

/// The frontend's dirty bitmap, mapped shared (registered with the SIGBUS guard: a
/// frontend that shrinks the file afterwards loses only its own log).
pub struct LogRegion {
    map: GuestMapping,
    len: u64,
}

impl LogRegion {
    /// Maps `size` bytes of `file` from `offset` (both checked by the caller against the
    /// file's size, as for memory regions).
    pub fn map(file: &File, size: u64, offset: u64) -> std::io::Result<Self> {
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(LogRegion {
            map: GuestMapping::map(file, offset, size)?,
            len: size,
        })
    }

    /// Marks the pages of guest range `[gpa, gpa + len)` dirty. Pages past the end of the
    /// bitmap are not marked (the frontend sizes the log for its memory; a guest address
    /// beyond it was refused when the request was parsed).
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.len {
                return;
            }
            // SAFETY: `byte < len`, inside the mapping this region owns until it is
            // dropped; u8 atomics have no alignment requirement; the frontend reads and
            // clears the same bytes with atomics of its own (shared memory between
            // processes), and a shrunken file is caught by the SIGBUS guard.
            let cell = unsafe { AtomicU8::from_ptr(self.map.addr().add(byte as usize)) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }

    /// Whether the frontend shrank the log's file under the mapping.
    pub fn is_broken(&self) -> bool {
        self.map.is_broken()
    }
}

/// What the frontend asked for, per session.
#[derive(Default)]
struct Settings {
    region: Option<Arc<LogRegion>>,
    /// `VHOST_F_LOG_ALL` acked: log every write into guest memory.
    log_all: bool,
    /// Per ring: the guest address to log used-ring writes at (`VHOST_VRING_F_LOG` set in
    /// the ring's SET_VRING_ADDR, `log_guest_addr`).
    used: Vec<Option<u64>>,
}

/// A session's dirty-log settings, shared with its rings' pollers.
#[derive(Default)]
pub struct DirtyLog {
    generation: AtomicU64,
    settings: Mutex<Settings>,
}

impl DirtyLog {
    /// Replaces the bitmap (SET_LOG_BASE; an earlier one is unmapped once no poller uses
    /// it).
    pub fn set_region(&self, region: Option<LogRegion>) {
        self.update(|s| s.region = region.map(Arc::new));
    }

    /// `VHOST_F_LOG_ALL` turned on or off (SET_FEATURES).
    pub fn set_log_all(&self, on: bool) {
        self.update(|s| s.log_all = on);
    }

    /// Ring `index`'s used-ring log address, `None` without `VHOST_VRING_F_LOG`.
    pub fn set_used(&self, index: u16, addr: Option<u64>) {
        self.update(|s| {
            let i = usize::from(index);
            if s.used.len() <= i {
                s.used.resize(i + 1, None);
            }
            s.used[i] = addr;
        });
    }

    /// Forgets everything (RESET_OWNER, RESET_DEVICE).
    pub fn clear(&self) {
        self.update(|s| *s = Settings::default());
    }

    /// Whether any write into guest memory is being logged now.
    pub fn active(&self) -> bool {
        let s = lock(&self.settings);
        s.region.is_some() && (s.log_all || s.used.iter().any(Option::is_some))
    }

    /// Bytes of the current bitmap (0 without one).
    pub fn region_len(&self) -> u64 {
        lock(&self.settings).region.as_ref().map_or(0, |r| r.len)
    }

    fn update(&self, f: impl FnOnce(&mut Settings)) {
        let mut s = lock(&self.settings);
        f(&mut s);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A ring's view of these settings.
    pub fn ring(self: &Arc<Self>, index: u16) -> RingLog {
        let mut r = RingLog {
            shared: self.clone(),
            index,
            generation: u64::MAX,
            all: None,
            used: None,
        };
        r.refresh();
        r
    }
}

/// One ring's view of its session's [`DirtyLog`].
pub struct RingLog {
    shared: Arc<DirtyLog>,
    index: u16,
    generation: u64,
    all: Option<Arc<LogRegion>>,
    used: Option<(Arc<LogRegion>, u64)>,
}

impl Default for RingLog {
    /// A ring that never logs (tests, benchmarks).
    fn default() -> Self {
        Arc::new(DirtyLog::default()).ring(0)
    }
}

impl RingLog {
    /// Follows the session's settings if they changed since the last call (once per poll
    /// pass).
    #[inline]
    pub fn refresh(&mut self) {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.reload(g);
        }
    }

    #[cold]
    fn reload(&mut self, generation: u64) {
        let s = lock(&self.shared.settings);
        self.all = s.region.clone().filter(|_| s.log_all);
        self.used = match (&s.region, s.used.get(usize::from(self.index))) {
            (Some(r), Some(Some(addr))) => Some((r.clone(), *addr)),
            _ => None,
        };
        self.generation = generation;
    }

    /// The bitmap to log every write into guest memory in, while `VHOST_F_LOG_ALL` is on.
    #[inline]
    pub fn all(&self) -> Option<&LogRegion> {
        self.all.as_deref()
    }

    /// Marks `len` bytes at `offset` into the used ring (vhost-user.rst: at the ring's log
    /// address), when the ring's used-ring writes are logged.
    #[inline]
    pub fn mark_used(&self, offset: u64, len: u64) {
        if let Some((r, addr)) = &self.used {
            r.mark(addr.wrapping_add(offset), len);
        }
    }

    /// Marks `len` bytes at guest address `gpa` of a ring area the device wrote (a packed
    /// ring's used descriptors and event suppression, which lie outside the used-ring log
    /// address's range), when the ring logs anything.
    #[inline]
    pub fn mark_ring(&self, gpa: u64, len: u64) {
        if let Some(r) = self
            .all
            .as_deref()
            .or(self.used.as_ref().map(|(r, _)| &**r))
        {
            r.mark(gpa, len);
        }
    }

    /// Whether this ring logs anything now.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.all.is_some() || self.used.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn log_file(bytes: usize) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0u8; bytes]).unwrap();
        f
    }

    fn bits(r: &LogRegion) -> Vec<u64> {
        let mut v = Vec::new();
        for byte in 0..r.len {
            // SAFETY: inside the mapping (test).
            let b = unsafe { *r.map.addr().add(byte as usize) };
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    v.push(byte * 8 + bit);
                }
            }
        }
        v
    }

    #[test]
    fn marks_one_bit_per_page_touched_and_nothing_past_the_bitmap() {
        let f = log_file(4096);
        let r = LogRegion::map(&f, 2, 0).unwrap();
        r.mark(0, 1);
        r.mark(LOG_PAGE * 3 - 1, 2); // pages 2 and 3
        r.mark(LOG_PAGE * 9, 0); // nothing
        r.mark(LOG_PAGE * 15, LOG_PAGE * 4); // page 15, then beyond the 16 pages mapped
        r.mark(u64::MAX - 1, 10); // no overflow
        assert_eq!(bits(&r), vec![0, 2, 3, 15]);
    }

    #[test]
    fn rings_follow_the_settings_of_their_session() {
        let f = log_file(4096);
        let log = Arc::new(DirtyLog::default());
        let mut ring = log.ring(1);
        assert!(!ring.is_on() && !log.active());
        log.set_region(Some(LogRegion::map(&f, 4096, 0).unwrap()));
        ring.refresh();
        assert!(!ring.is_on(), "a bitmap alone logs nothing");
        log.set_used(1, Some(0x2000));
        log.set_used(0, Some(0x9000));
        ring.refresh();
        assert!(ring.is_on() && ring.all().is_none());
        ring.mark_used(4, 8);
        log.set_log_all(true);
        ring.refresh();
        ring.all().unwrap().mark(0x5000, 1);
        assert!(log.active());
        log.set_log_all(false);
        log.set_used(1, None);
        ring.refresh();
        assert!(!ring.is_on());
        log.clear();
        assert!(!log.active() && log.region_len() == 0);
    }
}
