//! The io_uring channel of the aio backend: one ring per reactor (created on its thread)
//! and an eventfd registered with it, which is the channel's completion fd. Reads and
//! writes are `READV`/`WRITEV` whose `user_data` is an index into the channel's slab of
//! operations; `submit` only fills SQEs, `kick` submits the batch with one
//! `io_uring_enter`. Flush is `fdatasync` (`IORING_OP_FSYNC` with `DATASYNC`), unmap and
//! write-zeroes are `IORING_OP_FALLOCATE`. An `O_DIRECT` operation whose iovecs are not
//! aligned goes through an aligned bounce buffer. A short transfer is resubmitted for the
//! remainder; one that makes no progress fails with `EIO`. `EAGAIN`/`EINTR` are retried.
//! When the ring is full, operations wait in a backlog.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use super::file::AioFile;
use crate::bdev::{Errno, IoChannel, IoOp, IoResult, IoVecs};

/// Ring size of a channel; also the most operations a channel has in the kernel at once.
const RING_ENTRIES: u32 = 256;

/// At most this many SQEs wait in the ring before `io_uring_enter` hands them to the kernel.
///
/// Bigger batches save system calls but reach the block layer as one plugged burst, which
/// the disk then serves as one: on the virtio disk of the development machine, 4K random
/// reads at QD32 spent 279 µs in the block layer (`/sys/block/vda/stat`) when each SQE was
/// submitted alone, 290 µs in pairs, 305 µs by fours and 400–440 µs in whole batches of up
/// to 32, and IOPS fell by 20% (fio's io_uring engine submits one at a time). Pairs keep
/// the device's speed and halve the system calls.
const MAX_SUBMIT_BATCH: u32 = 2;

/// Most iovecs one `READV`/`WRITEV` takes (`IOV_MAX`); more go through a bounce buffer.
const IOV_MAX: usize = 1024;

/// An aligned heap buffer for `O_DIRECT` bounces.
struct Bounce {
    ptr: *mut u8,
    layout: Layout,
}

impl Bounce {
    fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(1).next_power_of_two()).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        (!ptr.is_null()).then_some(Bounce { ptr, layout })
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated by `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Fsync,
    Fallocate { mode: i32, len: u64 },
}

/// One operation of a channel; slots are reused so their iovec vectors keep their capacity.
struct Op {
    active: bool,
    tag: u64,
    kind: Kind,
    offset: u64,
    /// The iovecs still to transfer (advanced after a short transfer).
    iovs: Vec<libc::iovec>,
    /// With a bounce buffer: the caller's iovecs, to copy read data back to.
    user: Option<IoVecs>,
    bounce: Option<Bounce>,
}

/// One io_uring per reactor.
pub(super) struct AioChannel {
    ring: IoUring,
    efd: OwnedFd,
    file: Arc<AioFile>,
    readonly: bool,
    ops: Vec<Op>,
    free: Vec<usize>,
    /// Operations waiting for room in the ring.
    backlog: VecDeque<usize>,
    /// Operations in the ring or in the kernel.
    in_kernel: usize,
    /// SQEs pushed since the last `io_uring_enter`.
    unsubmitted: u32,
    /// Operations that failed before reaching the kernel.
    failed: VecDeque<(u64, IoResult)>,
    /// The eventfd may hold a count for completions already reaped.
    efd_dirty: bool,
    cqes: Vec<(u64, i32)>,
    /// The ring was set up with COOP_TASKRUN and TASKRUN_FLAG.
    taskrun_flag: bool,
}

impl AioChannel {
    pub(super) fn new(file: Arc<AioFile>, readonly: bool) -> std::io::Result<Self> {
        // Completions of file I/O are posted by task work run in this thread. Without
        // COOP_TASKRUN the kernel interrupts the (busy-polling) reactor with an IPI for
        // each batch; with it and TASKRUN_FLAG, it only raises a flag in the ring that
        // `reap` checks before entering the kernel (Linux ≥ 5.19; older kernels get a
        // plain ring).
        let (ring, taskrun_flag) = match IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)
        {
            Ok(r) => (r, true),
            Err(_) => (IoUring::new(RING_ENTRIES)?, false),
        };
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(fd)?;
        Ok(AioChannel {
            ring,
            efd,
            file,
            readonly,
            ops: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            in_kernel: 0,
            unsubmitted: 0,
            taskrun_flag,
            failed: VecDeque::new(),
            efd_dirty: false,
            cqes: Vec::with_capacity(RING_ENTRIES as usize),
        })
    }

    fn alloc(&mut self, tag: u64, kind: Kind, offset: u64) -> usize {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.ops.push(Op {
                    active: false,
                    tag: 0,
                    kind: Kind::Fsync,
                    offset: 0,
                    iovs: Vec::new(),
                    user: None,
                    bounce: None,
                });
                self.ops.len() - 1
            }
        };
        let op = &mut self.ops[idx];
        op.active = true;
        op.tag = tag;
        op.kind = kind;
        op.offset = offset;
        op.iovs.clear();
        op.user = None;
        op.bounce = None;
        idx
    }

    /// Whether `iovs` can go to an `O_DIRECT` descriptor as they are.
    fn aligned(&self, iovs: &[libc::iovec]) -> bool {
        iovs.len() <= IOV_MAX
            && iovs.iter().all(|v| {
                (v.iov_base as usize).is_multiple_of(self.file.mem_align)
                    && v.iov_len.is_multiple_of(self.file.len_align)
            })
    }

    /// Prepares a read or write; false when no bounce buffer could be allocated.
    ///
    /// # Safety
    /// `iovs` must be valid (see [`IoChannel::submit`]).
    unsafe fn prepare_rw(&mut self, idx: usize, iovs: IoVecs) -> bool {
        // SAFETY: the caller keeps the iovecs valid until this op is reaped (`# Safety`).
        let user = unsafe { iovs.as_slice() };
        let bounce = (self.file.direct && !self.aligned(user)) || user.len() > IOV_MAX;
        let align = self.file.mem_align.max(self.file.len_align);
        let op = &mut self.ops[idx];
        if !bounce {
            op.iovs.extend_from_slice(user);
            return true;
        }
        let total = iovs.total_len() as usize;
        let Some(b) = Bounce::new(total, align) else {
            return false;
        };
        if op.kind == Kind::Write {
            let mut pos = 0;
            for v in user {
                // SAFETY: `v` is a valid guest buffer (caller's promise); the bounce buffer
                // holds `total` = the sum of all `iov_len` bytes, so `pos + iov_len <= total`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.iov_base as *const u8,
                        b.ptr.add(pos),
                        v.iov_len,
                    )
                };
                pos += v.iov_len;
            }
        }
        op.iovs.push(libc::iovec {
            iov_base: b.ptr.cast(),
            iov_len: total,
        });
        op.user = Some(iovs);
        op.bounce = Some(b);
        true
    }

    /// The SQE of operation `idx` in its current state.
    fn sqe(&self, idx: usize) -> io_uring::squeue::Entry {
        let op = &self.ops[idx];
        let fd = types::Fd(self.file.fd.as_raw_fd());
        let e = match op.kind {
            Kind::Read => opcode::Readv::new(fd, op.iovs.as_ptr(), op.iovs.len() as u32)
                .offset(op.offset)
                .build(),
            Kind::Write => opcode::Writev::new(fd, op.iovs.as_ptr(), op.iovs.len() as u32)
                .offset(op.offset)
                .build(),
            Kind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
                .offset(op.offset)
                .mode(mode)
                .build(),
        };
        e.user_data(idx as u64)
    }

    /// Puts operation `idx` in the ring, or at the end (`front` false) or head of the
    /// backlog when the ring is full.
    fn push(&mut self, idx: usize, front: bool) {
        if self.in_kernel < RING_ENTRIES as usize && (front || self.backlog.is_empty()) {
            let e = self.sqe(idx);
            // SAFETY: the SQE points at `self.ops[idx].iovs` (and its bounce buffer) or at
            // the caller's buffers, all of which live until the CQE is reaped; slots are
            // never freed or moved while active (only the Vec of slots may grow, which moves
            // the `Op` headers but not the iovec arrays they own).
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.in_kernel += 1;
                self.unsubmitted += 1;
                if self.unsubmitted >= MAX_SUBMIT_BATCH {
                    self.submit_ring();
                }
                return;
            }
        }
        if front {
            self.backlog.push_front(idx);
        } else {
            self.backlog.push_back(idx);
        }
    }

    fn submit_ring(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            // The SQEs stay in the ring: the next kick or reap submits them.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) => {}
            Err(e) => tracing::error!("io_uring submit failed: {e}"),
        }
    }

    /// Ends operation `idx` with `r`, copying bounced read data back.
    fn finish(&mut self, idx: usize, r: IoResult, done: &mut dyn FnMut(u64, IoResult)) {
        let op = &mut self.ops[idx];
        if r.is_ok() && op.kind == Kind::Read {
            if let (Some(user), Some(b)) = (op.user, &op.bounce) {
                let mut pos = 0;
                // SAFETY: the caller's iovecs are valid until this completion is reported;
                // the bounce buffer holds their total length.
                unsafe {
                    for v in user.as_slice() {
                        std::ptr::copy_nonoverlapping(b.ptr.add(pos), v.iov_base.cast(), v.iov_len);
                        pos += v.iov_len;
                    }
                }
            }
        }
        op.active = false;
        op.bounce = None;
        op.user = None;
        let tag = op.tag;
        self.free.push(idx);
        done(tag, r);
    }

    /// Handles the CQE of operation `idx`; true when the operation ended.
    fn complete(&mut self, idx: usize, res: i32, done: &mut dyn FnMut(u64, IoResult)) -> bool {
        self.in_kernel -= 1;
        let op = &mut self.ops[idx];
        if res == -libc::EAGAIN || res == -libc::EINTR {
            self.push(idx, true);
            return false;
        }
        match op.kind {
            Kind::Read | Kind::Write => {
                if res < 0 {
                    self.finish(idx, Err(Errno(-res)), done);
                    return true;
                }
                let remaining: usize = op.iovs.iter().map(|v| v.iov_len).sum();
                let n = res as usize;
                if n >= remaining {
                    self.finish(idx, Ok(()), done);
                    return true;
                }
                if n == 0 {
                    // No progress (end of file: the file shrank): never report success.
                    self.finish(idx, Err(Errno(libc::EIO)), done);
                    return true;
                }
                advance(&mut op.iovs, n);
                op.offset += n as u64;
                self.push(idx, true);
                false
            }
            Kind::Fallocate { mode, len } => {
                let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                if res == -libc::EOPNOTSUPP && mode == zero {
                    // No ZERO_RANGE here (tmpfs, some filesystems): a hole reads as zeroes.
                    op.kind = Kind::Fallocate {
                        mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        len,
                    };
                    self.push(idx, true);
                    return false;
                }
                let r = if res < 0 { Err(Errno(-res)) } else { Ok(()) };
                self.finish(idx, r, done);
                true
            }
            Kind::Fsync => {
                let r = if res < 0 { Err(Errno(-res)) } else { Ok(()) };
                self.finish(idx, r, done);
                true
            }
        }
    }

    /// Clears the eventfd.
    /// Whether task work (completions) waits for this thread to enter the kernel: the
    /// ring's TASKRUN flag when the kernel offers it, else always (one cheap syscall).
    fn taskrun_pending(&mut self) -> bool {
        !self.taskrun_flag || self.ring.submission().taskrun()
    }

    fn drain_efd(&mut self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from our non-blocking eventfd.
        unsafe { libc::read(self.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// Drops the first `n` bytes of `iovs`.
fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for v in iovs.iter_mut() {
        if n >= v.iov_len {
            n -= v.iov_len;
            whole += 1;
        } else {
            // SAFETY: stays inside the same buffer (n < iov_len).
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            break;
        }
    }
    iovs.drain(..whole);
}

impl IoChannel for AioChannel {
    unsafe fn submit(&mut self, tag: u64, op: IoOp) {
        let writes = !matches!(op, IoOp::Read { .. } | IoOp::Flush);
        if writes && self.readonly {
            self.failed.push_back((tag, Err(Errno(libc::EROFS))));
            return;
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let idx = match op {
            IoOp::Read { offset, iovs } | IoOp::Write { offset, iovs } => {
                let kind = if matches!(op, IoOp::Read { .. }) {
                    Kind::Read
                } else {
                    Kind::Write
                };
                let idx = self.alloc(tag, kind, offset);
                // SAFETY: `submit`'s caller keeps the buffers valid until `tag` is reaped.
                if !unsafe { self.prepare_rw(idx, iovs) } {
                    self.ops[idx].active = false;
                    self.free.push(idx);
                    self.failed.push_back((tag, Err(Errno(libc::ENOMEM))));
                    return;
                }
                idx
            }
            IoOp::Flush => self.alloc(tag, Kind::Fsync, 0),
            IoOp::Unmap { offset, len } => {
                self.alloc(tag, Kind::Fallocate { mode: punch, len }, offset)
            }
            IoOp::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => {
                let mode = if may_unmap {
                    punch
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                self.alloc(tag, Kind::Fallocate { mode, len }, offset)
            }
        };
        self.push(idx, false);
    }

    fn kick(&mut self) {
        self.submit_ring();
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        let mut n = 0;
        while let Some((t, r)) = self.failed.pop_front() {
            done(t, r);
            n += 1;
        }
        // Submissions the frontend did not kick yet must not wait for a completion.
        self.submit_ring();
        if self.in_kernel == 0 && !self.efd_dirty {
            return n;
        }
        let mut has = !self.ring.completion().is_empty();
        if !has && self.in_kernel > 0 && self.taskrun_pending() {
            // Completions of file I/O are posted by task work that runs when this thread
            // enters the kernel; a reactor busy-polling in user space would otherwise see
            // them only at its next interrupt or sleep. One cheap io_uring_enter runs it.
            // Best effort: on failure the task work runs at the reactor's next sleep.
            let _ = self.ring.submitter().submit();
            has = !self.ring.completion().is_empty();
        }
        if has || self.efd_dirty {
            self.drain_efd();
            self.efd_dirty = false;
        }
        if !has {
            return n;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(idx, res) in &cqes {
            let idx = idx as usize;
            if self.ops.get(idx).is_none_or(|o| !o.active) {
                tracing::error!(idx, "io_uring completed an unknown operation");
                continue;
            }
            if self.complete(idx, res, done) {
                n += 1;
            }
        }
        self.cqes = cqes;
        self.efd_dirty = true;
        while self.in_kernel < RING_ENTRIES as usize {
            let Some(idx) = self.backlog.pop_front() else {
                break;
            };
            self.push(idx, true);
            if self.backlog.front() == Some(&idx) {
                break;
            }
        }
        self.submit_ring();
        n
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.failed.len() + (self.ops.len() - self.free.len())
    }
}

impl Drop for AioChannel {
    /// Waits for the kernel to finish with every buffer before the slots are freed.
    fn drop(&mut self) {
        self.backlog.clear();
        let mut spins = 0;
        while self.in_kernel > 0 && spins < 10_000 {
            if self.ring.submit_and_wait(1).is_err() {
                spins += 1;
            }
            let k = self.ring.completion().count();
            self.in_kernel = self.in_kernel.saturating_sub(k);
        }
    }
}
