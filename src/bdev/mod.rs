//! The generic block-device layer, in the spirit of SPDK's `lib/bdev`.
//!
//! A [`Bdev`] is what frontends see: a name, a uuid, a size in blocks, claims, statistics and
//! QoS limits. What it stores data in is a [`BdevBackend`] (`malloc`, `null`, `aio`, `rbd`).
//! I/O is asynchronous and per reactor: each frontend queue opens a [`BdevChannel`] on the
//! reactor thread that serves it (SPDK's io channels), submits [`IoOp`]s tagged with its own
//! request ids, and reaps completions when it polls. Buffers are raw iovecs into guest
//! memory, handed to the backend without a copy.

pub mod aio;
pub mod channel;
pub mod crypto;
pub mod histogram;
pub mod localpool;
pub mod malloc;
pub mod null;
pub mod qos;
pub mod rbd;
pub mod registry;
pub mod rpc;
pub mod stats;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::sync::lock;

pub use channel::{BdevChannel, Zcopy};
pub use registry::BdevRegistry;

/// An errno value (positive, e.g. `libc::EIO`) carried by a failed I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

/// The outcome of one I/O.
pub type IoResult = Result<(), Errno>;

/// A scatter-gather list of buffers that the submitter keeps alive until the I/O completes.
///
/// It is a raw view (pointer and count) because the buffers are usually guest memory mapped
/// by the vhost-user frontend, and the iovec array lives in the frontend's in-flight request.
#[derive(Clone, Copy, Debug)]
pub struct IoVecs {
    ptr: *const libc::iovec,
    cnt: usize,
    /// Total bytes, summed once here: the bdev layer needs it several times per request.
    len: u64,
}

// SAFETY: `IoVecs` is only a view; whoever builds one promises (see `from_slice`) that the
// array and the memory it points to stay valid and unaliased until the I/O completes.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// A view of `iovs`.
    ///
    /// # Safety
    /// `iovs` and every buffer it points to must stay valid (and not be written by anyone
    /// else for a write, nor read for a read) until the I/O that carries them is reaped.
    pub unsafe fn from_slice(iovs: &[libc::iovec]) -> Self {
        IoVecs {
            ptr: iovs.as_ptr(),
            cnt: iovs.len(),
            len: iovs.iter().map(|v| v.iov_len as u64).sum(),
        }
    }

    /// The iovecs.
    ///
    /// # Safety
    /// Only while the promise made in [`IoVecs::from_slice`] holds.
    pub unsafe fn as_slice<'a>(&self) -> &'a [libc::iovec] {
        if self.cnt == 0 {
            &[]
        } else {
            // SAFETY: `ptr`/`cnt` came from a live slice in `from_slice`, whose caller keeps it
            // valid and unaliased for as long as this view is used (`# Safety`).
            unsafe { std::slice::from_raw_parts(self.ptr, self.cnt) }
        }
    }

    /// Number of iovecs.
    pub fn count(&self) -> usize {
        self.cnt
    }

    /// Total bytes described.
    pub fn total_len(&self) -> u64 {
        self.len
    }
}

/// One operation on a bdev. Offsets and lengths are in bytes and block-aligned.
#[derive(Clone, Copy, Debug)]
pub enum IoOp {
    Read {
        offset: u64,
        iovs: IoVecs,
    },
    Write {
        offset: u64,
        iovs: IoVecs,
    },
    /// Make every completed write durable (virtio-blk FLUSH, NBD_CMD_FLUSH, SYNCHRONIZE CACHE).
    Flush,
    /// Deallocate a range (virtio-blk DISCARD, NBD_CMD_TRIM, SCSI UNMAP); reads after it may
    /// return anything the backend chooses, in practice zeroes.
    Unmap {
        offset: u64,
        len: u64,
    },
    /// Zero a range; `may_unmap` allows deallocating it (virtio-blk WRITE_ZEROES with UNMAP).
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

impl IoOp {
    /// The kind of this operation.
    pub fn kind(&self) -> IoKind {
        match self {
            IoOp::Read { .. } => IoKind::Read,
            IoOp::Write { .. } => IoKind::Write,
            IoOp::Flush => IoKind::Flush,
            IoOp::Unmap { .. } => IoKind::Unmap,
            IoOp::WriteZeroes { .. } => IoKind::WriteZeroes,
        }
    }

    /// Byte range `(offset, len)` this operation touches; `None` for flush.
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            IoOp::Read { offset, iovs } | IoOp::Write { offset, iovs } => {
                Some((offset, iovs.total_len()))
            }
            IoOp::Unmap { offset, len } | IoOp::WriteZeroes { offset, len, .. } => {
                Some((offset, len))
            }
            IoOp::Flush => None,
        }
    }
}

/// The kinds of I/O, for `supported_io_types` and statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
}

/// Which [`IoKind`]s a backend implements natively.
#[derive(Clone, Copy, Debug)]
pub struct IoTypes {
    pub flush: bool,
    pub unmap: bool,
    pub write_zeroes: bool,
    /// Its channels lend their memory ([`IoChannel::zcopy_start`]; SPDK's `zcopy` I/O type).
    pub zcopy: bool,
}

/// What a range of a bdev holds, as far as its backend can tell (NBD `base:allocation`,
/// proto.md "Metadata querying"; `SEEK_DATA`/`SEEK_HOLE`; `rbd_diff_iterate2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocState {
    /// Allocated: reads return what was written (possibly zeroes).
    Data,
    /// Not allocated, reads return zeroes (a hole in a sparse file, an absent RBD object).
    Hole,
}

/// A run of bytes with one [`AllocState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub state: AllocState,
}

/// Most extents one [`BdevBackend::allocation`] call returns; the caller asks again for the
/// rest of its range.
pub const MAX_EXTENTS: usize = 1024;

/// Appends `len` bytes in `state` to `out`, merging with the previous extent when the
/// state is the same.
pub fn push_extent(out: &mut Vec<Extent>, len: u64, state: AllocState) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(e) if e.state == state => e.len += len,
        _ => out.push(Extent { len, state }),
    }
}

/// Memory a backend lends for one zero-copy access ([`IoChannel::zcopy_start`]): the
/// `len` bytes at `ptr` are the backend's own storage of the range asked for.
///
/// Raw on purpose: other requests (on this and other reactors) may access the same bytes
/// at the same time, as concurrent DMA to overlapping blocks would; whoever uses it forms
/// slices over it only for the duration of one call, and only over its own request's range.
#[derive(Clone, Copy, Debug)]
pub struct Lent {
    ptr: *mut u8,
    len: usize,
}

impl Lent {
    /// Lends `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes until the access is ended
    /// ([`IoChannel::zcopy_end`]) or the channel that lent it is dropped, whichever comes
    /// first, and the backend must hold no Rust reference over it (it touches its memory
    /// through raw pointers only): the borrower's slices, scoped to one call each, are the
    /// only references there are.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        Lent { ptr, len }
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Bytes lent.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is lent.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A backend's per-reactor I/O path (SPDK's io channel).
///
/// A channel is opened on, and only used from, one reactor thread. Submission never blocks;
/// completions are reaped by [`IoChannel::reap`], which the reactor calls whenever it polls
/// or when [`IoChannel::completion_fd`] becomes readable.
pub trait IoChannel {
    /// Starts `op`; its completion is later reported by `reap` with the same `tag`.
    /// A failure to start is also reported through `reap`, never returned here.
    ///
    /// # Safety
    /// The buffers of `op` must stay valid until the completion of `tag` is reaped.
    unsafe fn submit(&mut self, tag: u64, op: IoOp);

    /// Passes operations queued by `submit` to the device (one syscall for a batch).
    fn kick(&mut self) {}

    /// Reports finished operations; returns how many.
    fn reap(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize;

    /// A file descriptor that becomes readable when `reap` has something to report, for
    /// reactors that sleep; `None` when completions only come from `submit` itself.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// The reactor is about to sleep on [`IoChannel::completion_fd`]: clear it, and return
    /// true when completions are already waiting (then the reactor polls instead). Lets a
    /// backend signal its fd once per batch and leave it undrained while the reactor polls.
    fn arm(&mut self) -> bool {
        false
    }

    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// Whether [`IoChannel::zcopy_start`] lends memory: the backend's data is addressable
    /// memory of this process (malloc). Files, RBD, the local pool and null do not lend.
    fn zcopy_supported(&self) -> bool {
        false
    }

    /// Zero-copy access (SPDK's `spdk_bdev_zcopy_start`, which SPDK's malloc bdev also
    /// implements by pointing the I/O at its own buffer): lends the backend's memory
    /// holding `[offset, offset + len)`, contiguous; `populate` when the caller will read
    /// it, else it will write it. `None` when the backend does not lend (the caller then
    /// submits a read or write); a channel whose [`IoChannel::zcopy_supported`] is true
    /// always answers `Some`. Unlike SPDK's it answers at once: only backends whose data is
    /// memory at hand lend, and the caller is on the channel's reactor.
    fn zcopy_start(
        &mut self,
        offset: u64,
        len: u64,
        populate: bool,
    ) -> Option<Result<Lent, Errno>> {
        let _ = (offset, len, populate);
        None
    }

    /// Ends an access ([`IoChannel::zcopy_start`]; SPDK's `spdk_bdev_zcopy_end`); `commit`
    /// when the caller wrote the range and it is to be stored. For memory that is the
    /// storage itself (malloc) there is nothing to do: what was written is stored already,
    /// and an access ended without `commit` cannot take it back (nor can SPDK's malloc).
    fn zcopy_end(&mut self, lent: Lent, commit: bool) -> IoResult {
        let _ = (lent, commit);
        Ok(())
    }

    /// Whether completions come from threads of this process that the backend's library
    /// runs (librbd's) rather than from the kernel: a reactor polling for them takes the
    /// CPU those threads need whenever they share its core.
    fn completed_by_helper_threads(&self) -> bool {
        false
    }
}

/// What stores a bdev's data: implemented by each backend module.
pub trait BdevBackend: Send + Sync + 'static {
    /// `product_name` of `bdev_get_bdevs` ("Malloc disk", "AIO disk", ...).
    fn product_name(&self) -> &'static str;

    /// The operations implemented natively.
    fn io_types(&self) -> IoTypes;

    /// Opens an I/O channel for the calling reactor thread.
    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>>;

    /// `driver_specific` of `bdev_get_bdevs` (never key material).
    fn driver_specific(&self) -> Value {
        json!({})
    }

    /// The RPC call (method, params) that recreates this bdev, for `framework_get_config`.
    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)>;

    /// Required alignment of buffers and offsets (O_DIRECT files want 512 or 4096).
    fn buf_align(&self) -> usize {
        1
    }

    /// The allocation status of `[offset, offset + len)` (inside the bdev): extents in
    /// order, at least one and at most [`MAX_EXTENTS`], covering the start of the range
    /// (possibly less than all of it; never more). Backends that cannot tell report the
    /// whole range as data, which is always correct.
    ///
    /// Called from any thread; when [`BdevBackend::allocation_blocks`] says so, never from
    /// a reactor.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        let _ = offset;
        Ok(vec![Extent {
            len,
            state: AllocState::Data,
        }])
    }

    /// Whether [`BdevBackend::allocation`] may block (disk reads of file-system metadata,
    /// network round trips): reactors then run it on a helper thread.
    fn allocation_blocks(&self) -> bool {
        false
    }

    /// Whether the backend refuses writes (an image opened read-only): frontends then
    /// present a read-only device (virtio-blk `VIRTIO_BLK_F_RO`, NBD `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool {
        false
    }

    /// A frontend starts I/O on this bdev: a device's first ring starts (boot, reconnect,
    /// the end of an incoming live migration). A backend shared with another instance
    /// drops what it may have cached from before (rbd: `rbd_invalidate_cache`, as QEMU's
    /// rbd driver does on activation) or takes the write role it waited for (a local-pool
    /// image opened `incoming`). An error refuses the start: the frontend then serves
    /// nothing rather than stale data or a second writer.
    fn activate(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// The frontend stopped every ring (GET_VRING_BASE at the source of a migration, a
    /// disconnect) and finished every request: make every completed write durable and give
    /// up a write role another instance waits for, so that the destination of a migration
    /// reads all of it (vhost-user.rst "Migration": the back-end must have stopped and
    /// flushed before the source answers GET_VRING_BASE).
    fn deactivate(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// Releases the backend when the bdev is deleted; flushes what is volatile.
    fn close(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The domain error of a failed activation hook: an [`crate::error::Error`] the backend
/// wrapped in the `io::Error` (errno and message kept), else the io error's errno.
fn hook_error(bdev: &str, what: &str, e: std::io::Error) -> crate::error::Error {
    match e
        .get_ref()
        .and_then(|i| i.downcast_ref::<crate::error::Error>())
    {
        Some(inner) => inner.clone().context(format_args!("{what} bdev {bdev}")),
        None => crate::error::Error::io(format_args!("{what} bdev {bdev}"), &e),
    }
}

/// What a backend constructor needs besides its own parameters.
pub struct BdevParams {
    pub name: String,
    pub uuid: Option<Uuid>,
    pub block_size: u32,
    pub num_blocks: u64,
}

type ResizeListener = Box<dyn Fn(u64) + Send + Sync>;

/// A block device as every frontend sees it.
pub struct Bdev {
    name: String,
    uuid: Uuid,
    block_size: u32,
    num_blocks: AtomicU64,
    backend: Box<dyn BdevBackend>,
    /// Per-bdev I/O statistics (`bdev_get_iostat`).
    pub stats: stats::BdevStats,
    /// QoS limits and token buckets (`bdev_set_qos_limit`).
    pub qos: qos::Qos,
    claimed_by: Mutex<Option<String>>,
    resize_listeners: Mutex<Vec<(u64, ResizeListener)>>,
    next_listener: AtomicU64,
}

/// Why a block size was refused.
pub fn check_block_size(block_size: u32) -> Result<(), String> {
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(format!(
            "block_size {block_size} must be a power of two between 512 and 65536"
        ));
    }
    Ok(())
}

impl Bdev {
    /// A bdev over `backend`; a random uuid unless one is given.
    pub fn new(params: BdevParams, backend: Box<dyn BdevBackend>) -> Arc<Self> {
        Arc::new(Bdev {
            name: params.name,
            uuid: params.uuid.unwrap_or_else(Uuid::new_v4),
            block_size: params.block_size,
            num_blocks: AtomicU64::new(params.num_blocks),
            backend,
            stats: stats::BdevStats::default(),
            qos: qos::Qos::default(),
            claimed_by: Mutex::new(None),
            resize_listeners: Mutex::new(Vec::new()),
            next_listener: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks.load(Ordering::Acquire)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.num_blocks() * self.block_size as u64
    }

    pub fn backend(&self) -> &dyn BdevBackend {
        self.backend.as_ref()
    }

    /// Opens an I/O channel on the calling reactor thread.
    pub fn open_channel(self: &Arc<Self>) -> std::io::Result<BdevChannel> {
        let inner = self.backend.open_channel()?;
        Ok(BdevChannel::new(self.clone(), inner))
    }

    /// A frontend starts I/O on the bdev ([`BdevBackend::activate`]).
    pub fn activate(&self) -> crate::error::Result<()> {
        self.backend
            .activate()
            .map_err(|e| hook_error(&self.name, "activating", e))
    }

    /// The frontend stopped all I/O on the bdev ([`BdevBackend::deactivate`]).
    pub fn deactivate(&self) -> crate::error::Result<()> {
        self.backend
            .deactivate()
            .map_err(|e| hook_error(&self.name, "deactivating", e))
    }

    /// Claims the bdev for `owner` (a controller or export name): a claimed bdev cannot be
    /// deleted. Fails with the current owner's name when already claimed.
    pub fn claim(&self, owner: &str) -> Result<(), String> {
        let mut c = lock(&self.claimed_by);
        match &*c {
            Some(o) => Err(o.clone()),
            None => {
                *c = Some(owner.to_string());
                Ok(())
            }
        }
    }

    /// Releases a claim taken by `owner`.
    pub fn release(&self, owner: &str) {
        let mut c = lock(&self.claimed_by);
        if c.as_deref() == Some(owner) {
            *c = None;
        }
    }

    /// Who claimed the bdev, if anyone.
    pub fn claimed_by(&self) -> Option<String> {
        lock(&self.claimed_by).clone()
    }

    /// Changes the size (a backend resized) and tells every listener (controllers turn it
    /// into a virtio config-change notification).
    pub fn set_num_blocks(&self, num_blocks: u64) {
        self.num_blocks.store(num_blocks, Ordering::Release);
        for (_, l) in lock(&self.resize_listeners).iter() {
            l(num_blocks);
        }
    }

    /// Registers `f` to be called with the new block count on every resize; returns an id
    /// for [`Bdev::unsubscribe_resize`].
    pub fn subscribe_resize(&self, f: ResizeListener) -> u64 {
        let id = self.next_listener.fetch_add(1, Ordering::Relaxed);
        lock(&self.resize_listeners).push((id, f));
        id
    }

    /// Removes a resize listener.
    pub fn unsubscribe_resize(&self, id: u64) {
        lock(&self.resize_listeners).retain(|(i, _)| *i != id);
    }

    /// The object `bdev_get_bdevs` returns for this bdev (SPDK's shape).
    pub fn to_json(&self) -> Value {
        let t = self.backend.io_types();
        json!({
            "name": self.name,
            "aliases": [self.uuid.to_string()],
            "product_name": self.backend.product_name(),
            "block_size": self.block_size,
            "num_blocks": self.num_blocks(),
            "uuid": self.uuid.to_string(),
            "assigned_rate_limits": self.qos.limits().to_json(),
            "claimed": self.claimed_by().is_some(),
            "zoned": false,
            "supported_io_types": {
                "read": true, "write": true, "unmap": t.unmap, "write_zeroes": t.write_zeroes,
                "flush": t.flush, "reset": true, "compare": false, "compare_and_write": false,
                "abort": false, "nvme_admin": false, "nvme_io": false, "zcopy": t.zcopy
            },
            "driver_specific": self.backend.driver_specific(),
        })
    }
}
