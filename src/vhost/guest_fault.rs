//! Guest memory the frontend shrinks after handing it over must not end the process.
//!
//! A region is checked against its fd when it arrives (`session::check_region_fd`), but
//! the frontend keeps the fd and may `ftruncate` it later: touching the mapping past the
//! new end then raises SIGBUS (mmap(2)) in whichever thread touches it, a reactor or the
//! control thread. Every guest mapping is therefore made here and registered in a
//! process-wide table that a SIGBUS handler consults: a fault inside a registered mapping
//! replaces the whole mapping with private anonymous zero pages (so the faulting access
//! and every later one complete), marks it broken and wakes the vhost control thread,
//! which closes the frontend's connection (its device serves nothing more). A SIGBUS
//! anywhere else gets the previous disposition (by default, the process dies).
//!
//! Why a process-wide table: a signal handler is process-wide and may run on any thread
//! at any moment, so it can reach only statics, and may use only async-signal-safe
//! operations (signal-safety(7)): no locks, no allocation. The table is a fixed array of
//! atomics; a mapping is unregistered before it is unmapped, so the handler never acts on
//! an address range that was handed to someone else.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Once;

/// Guest mappings registered at once, over all sessions (a frontend may use up to
/// `MAX_MEM_SLOTS` of them; QEMU uses a handful). A region beyond is refused.
const SLOTS: usize = 4096;

const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const ACTIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    broken: AtomicBool,
}

static TABLE: [Slot; SLOTS] = [const {
    Slot {
        state: AtomicU8::new(FREE),
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        broken: AtomicBool::new(false),
    }
}; SLOTS];

/// Eventfds the handler writes after repairing a mapping (-1: unused): one per vhost
/// control thread (one per daemon; tests may run several in one process).
static WAKE_FDS: [AtomicI32; 16] = [const { AtomicI32::new(-1) }; 16];

/// The disposition before ours, for faults that are not in guest memory.
static PREV_ACTION: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREV_SIGINFO: AtomicBool = AtomicBool::new(false);

static INSTALL: Once = Once::new();

/// Adds an eventfd for the handler to write when it repaired a mapping; it must stay open
/// for the life of the process. False when the table of them is full.
pub fn add_wake_fd(fd: RawFd) -> bool {
    WAKE_FDS.iter().any(|w| {
        w.compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

/// A shared mapping of guest memory, registered with the SIGBUS handler; unregistered,
/// then unmapped, when dropped.
#[derive(Debug)]
pub struct GuestMapping {
    addr: *mut u8,
    len: usize,
    slot: usize,
}

// SAFETY: the mapping is process memory any thread may access; the owner decides when it
// is dropped (after the last user).
unsafe impl Send for GuestMapping {}
// SAFETY: as above; `&GuestMapping` only reads the address and the slot's atomics.
unsafe impl Sync for GuestMapping {}

impl GuestMapping {
    /// Maps `len` bytes of `file` from `offset`, shared and read-write, and registers the
    /// mapping.
    pub fn map(file: &File, offset: u64, len: u64) -> io::Result<GuestMapping> {
        install_handler()?;
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let slot = claim_slot().ok_or_else(|| {
            io::Error::other(format!("more than {SLOTS} guest memory regions are mapped"))
        })?;
        // SAFETY: a new mapping at an address the kernel picks; nothing else is affected.
        let addr = unsafe {
            libc::mmap(
                null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            TABLE[slot].state.store(FREE, Ordering::Release);
            return Err(e);
        }
        let s = &TABLE[slot];
        s.start.store(addr as usize, Ordering::Relaxed);
        s.len.store(len, Ordering::Relaxed);
        s.broken.store(false, Ordering::Relaxed);
        s.state.store(ACTIVE, Ordering::Release);
        Ok(GuestMapping {
            addr: addr.cast(),
            len,
            slot,
        })
    }

    /// The mapping's address.
    pub fn addr(&self) -> *mut u8 {
        self.addr
    }

    /// Whether a SIGBUS hit this mapping (it now holds zeros, not guest memory).
    pub fn is_broken(&self) -> bool {
        TABLE[self.slot].broken.load(Ordering::Acquire)
    }
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        // Unregister first: once unmapped, the range may become someone else's.
        TABLE[self.slot].state.store(FREE, Ordering::Release);
        // SAFETY: our own mapping; the owner drops it after its last user.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Guest mappings registered now, over all sessions of the process (the fuzz target checks
/// that none outlives its session).
pub fn registered() -> usize {
    TABLE
        .iter()
        .filter(|s| s.state.load(Ordering::Acquire) != FREE)
        .count()
}

/// Whether a registered mapping starts at `addr` (tests).
#[cfg(test)]
pub(crate) fn is_registered(addr: *mut u8) -> bool {
    TABLE.iter().any(|s| {
        s.state.load(Ordering::Acquire) == ACTIVE
            && s.start.load(Ordering::Relaxed) == addr as usize
    })
}

fn claim_slot() -> Option<usize> {
    TABLE.iter().position(|s| {
        s.state
            .compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    })
}

fn install_handler() -> io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a zeroed, then filled struct; the handler only uses
        // async-signal-safe operations (atomics, mmap, write, sigaction, raise).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) != 0 {
                result = Err(io::Error::last_os_error());
                return;
            }
            PREV_ACTION.store(old.sa_sigaction, Ordering::Release);
            PREV_SIGINFO.store(old.sa_flags & libc::SA_SIGINFO != 0, Ordering::Release);
        }
    });
    result
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &TABLE {
        if s.state.load(Ordering::Acquire) != ACTIVE {
            continue;
        }
        let start = s.start.load(Ordering::Relaxed);
        let len = s.len.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: replaces exactly the registered guest mapping (still ours: it is
        // unregistered before it is unmapped) with private zero pages; the faulting access
        // then completes on them.
        let r = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            break;
        }
        s.broken.store(true, Ordering::Release);
        for w in &WAKE_FDS {
            let fd = w.load(Ordering::Acquire);
            if fd >= 0 {
                let one = 1u64;
                // SAFETY: write(2) of 8 bytes from a local to an eventfd that stays open;
                // async-signal-safe.
                unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
            }
        }
        return;
    }
    // Not guest memory: what would have happened without us.
    let prev = PREV_ACTION.load(Ordering::Acquire);
    if prev != libc::SIG_DFL && prev != libc::SIG_IGN {
        if PREV_SIGINFO.load(Ordering::Acquire) {
            // SAFETY: the previous SA_SIGINFO handler, called as the kernel would.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(prev) };
            f(sig, info, ctx);
        } else {
            // SAFETY: the previous plain handler, called as the kernel would.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev) };
            f(sig);
        }
        return;
    }
    // SAFETY: restore the default action and raise: the signal is delivered (and kills)
    // once this handler returns; a hardware fault would also recur on the instruction.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        libc::raise(libc::SIGBUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrunk_file_reads_zeros_and_marks_the_mapping_broken() {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is new and ours.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is new and owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(65536).unwrap();
        let m = GuestMapping::map(&f, 0, 65536).unwrap();
        // SAFETY: inside the mapping, backed by the file.
        unsafe { m.addr().add(40000).write_volatile(7) };
        assert!(!m.is_broken());
        f.set_len(4096).unwrap();
        // SAFETY: inside the mapping; past the file's end now, so it faults and is repaired.
        let v = unsafe { m.addr().add(40000).read_volatile() };
        assert_eq!(v, 0);
        assert!(m.is_broken());
        drop(m);
    }
}
