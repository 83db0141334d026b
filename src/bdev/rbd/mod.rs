//! The `rbd` backend: a Ceph RBD image through librbd (SPDK's `bdev_rbd`).
//!
//! I/O goes through `rbd_aio_readv`/`writev`/`flush`/`discard`/`write_zeroes` with the
//! frontend's iovecs (guest memory) directly, without a copy. librbd calls the completion
//! callback on one of its own threads: it pushes `(tag, result)` onto the channel's queue
//! and signals the channel's eventfd ([`IoChannel::completion_fd`]); the reactor then reaps
//! on its own thread. Blocking librbd calls (open, stat, resize, close) only happen on the
//! control (RPC) thread or on the bdev's watcher thread, never in the I/O path.
//!
//! Size changes made elsewhere (`rbd resize`, another client) arrive through
//! `rbd_update_watch`: the callback wakes the bdev's watcher thread, which re-stats the
//! image and calls [`Bdev::set_num_blocks`], which notifies the frontends.
//!
//! A read-only bdev (`read_only`, SPDK's `rbd_open_read_only`) takes no exclusive lock
//! and registers no header watch with the OSDs; it reports itself read-only
//! ([`BdevBackend::read_only`]) and its channels fail writes, unmaps and write-zeroes
//! with EROFS.
//!
//! Two instances on one image (a live migration's source and destination): blockd never
//! acquires librbd's exclusive lock itself. `rbd_lock_acquire(RBD_LOCK_MODE_EXCLUSIVE)`
//! would turn lock transitions off, and the other instance's writes would fail with
//! EROFS; instead librbd takes the lock on the first write and hands it over
//! cooperatively when another client's write asks for it. The only lock blockd breaks is
//! one owned by its dead predecessor ([`takeover`]). The activation hooks complete the
//! hand-over: the source flushes when its device stops ([`BdevBackend::deactivate`]), the
//! destination drops librbd's cache when its device starts ([`BdevBackend::activate`]).
//!
//! The registered clusters and the rbd bdevs are an [`RbdState`] the application owns. At
//! daemon shutdown (the end of `App::shutdown`) [`RbdState::shutdown`] closes every image (`rbd_close`: header unwatched,
//! exclusive lock released) and every cluster connection (`rados_shutdown`), so the next
//! opener does not wait for the OSDs to time a dead watcher out.

pub mod cluster;
pub mod rpc;
mod shutdown;
pub mod takeover;

pub use shutdown::SHUTDOWN_TIMEOUT;

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    check_block_size, push_extent, AllocState, Bdev, BdevBackend, BdevParams, Errno, Extent,
    IoChannel, IoOp, IoResult, IoTypes, MAX_EXTENTS,
};
use crate::error::Error;
use crate::keyring::Key;
use crate::rbd::aio::AioOp;
use crate::rbd::ffi::{rbd_completion_t, Api};
use crate::rbd::{ConnectOptions, EncryptionFormat, Image, Rados, RbdError, RbdResult};
use crate::reactor::sched::adaptive;
use crate::sync::lock;

/// `product_name` of rbd bdevs (SPDK's).
pub const PRODUCT_NAME: &str = "Ceph Rbd Disk";

/// What `bdev_rbd_create` asks for.
#[derive(Clone, Debug, Default)]
pub struct RbdBdevConfig {
    pub name: String,
    pub user_id: Option<String>,
    pub pool_name: String,
    pub rbd_name: String,
    pub block_size: u32,
    /// librados options for a connection of this bdev's own (ignored with a cluster).
    pub config: Option<BTreeMap<String, String>>,
    pub cluster_name: Option<String>,
    pub uuid: Option<Uuid>,
    /// Open the image read-only (`rbd_open_read_only`).
    pub read_only: bool,
    /// LUKS encryption to load before serving (blockd extension).
    pub encryption: Option<RbdEncryption>,
}

/// A LUKS image's format and the keyring key holding its passphrase: loaded with
/// `rbd_encryption_load` right after the image is opened, so that every frontend sees the
/// plaintext (the format `rbd encryption format` and QEMU's `encrypt.format` use).
#[derive(Clone, Debug)]
pub struct RbdEncryption {
    pub format: EncryptionFormat,
    pub key: Arc<Key>,
}

/// How long deleting an rbd bdev waits for its image to flush and release its lock
/// before giving up (an unreachable cluster would block forever).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a device start or stop waits for the cluster (cache drop, flush).
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// The backend's state shared by the bdev, its channels and its watcher thread.
struct Shared {
    cfg: RbdBdevConfig,
    /// The open image; `None` once [`RbdState::shutdown`] closed it.
    image: Mutex<Option<Arc<Image>>>,
    config_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    watch: Mutex<Option<Watch>>,
}

/// A registered `rbd_update_watch` and the thread it wakes.
struct Watch {
    handle: u64,
    ctx: *mut WatchCtx,
    thread: JoinHandle<()>,
}

// SAFETY: `ctx` is only dereferenced by librbd's callback and freed after unwatch.
unsafe impl Send for Watch {}

struct WatchCtx {
    tx: Mutex<mpsc::Sender<()>>,
}

unsafe extern "C" fn watch_cb(arg: *mut c_void) {
    // SAFETY: `arg` is the WatchCtx registered with the watch, alive until unwatch returns.
    let ctx = unsafe { &*(arg as *const WatchCtx) };
    // The watch thread is gone only when the bdev is; a lost resize event is moot then.
    let _ = lock(&ctx.tx).send(());
}

impl Shared {
    /// The open image; ESHUTDOWN once closed at daemon shutdown.
    fn image(&self) -> RbdResult<Arc<Image>> {
        lock(&self.image).clone().ok_or_else(|| {
            RbdError::new(
                libc::ESHUTDOWN,
                format!("rbd bdev {}: image closed", self.cfg.name),
            )
        })
    }

    /// Starts watching the image header for size changes made elsewhere.
    fn start_watch(&self, bdev: Weak<Bdev>) -> RbdResult<()> {
        let (tx, rx) = mpsc::channel::<()>();
        let image = self.image()?;
        let watched = image.clone();
        let block_size = self.cfg.block_size as u64;
        let thread = std::thread::Builder::new()
            .name(format!("rbd-watch-{}", self.cfg.name))
            .spawn(move || {
                while rx.recv().is_ok() {
                    let Some(bdev) = bdev.upgrade() else { break };
                    match watched.size() {
                        Ok(size) => {
                            let blocks = size / block_size;
                            if blocks != bdev.num_blocks() {
                                tracing::info!(
                                    "{}: {} resized to {size} bytes ({blocks} blocks)",
                                    bdev.name(),
                                    watched.what()
                                );
                                bdev.set_num_blocks(blocks);
                            }
                        }
                        Err(e) => tracing::warn!("{}: {e}", bdev.name()),
                    }
                }
            })
            .map_err(|e| RbdError::new(libc::EAGAIN, format!("spawning watcher: {e}")))?;
        let ctx = Box::into_raw(Box::new(WatchCtx { tx: Mutex::new(tx) }));
        // SAFETY: ctx stays alive until stop_watch frees it after update_unwatch.
        match unsafe { image.update_watch(watch_cb, ctx as *mut c_void) } {
            Ok(handle) => {
                *lock(&self.watch) = Some(Watch {
                    handle,
                    ctx,
                    thread,
                });
                Ok(())
            }
            Err(e) => {
                // SAFETY: not registered: we still own ctx. Dropping it ends the thread.
                drop(unsafe { Box::from_raw(ctx) });
                if thread.join().is_err() {
                    tracing::error!("{}: the resize watch thread panicked", self.cfg.name);
                }
                Err(e)
            }
        }
    }

    fn stop_watch(&self) {
        let Some(w) = lock(&self.watch).take() else {
            return;
        };
        let unwatched = self.image().and_then(|i| i.update_unwatch(w.handle));
        if let Err(e) = unwatched {
            // The callback may still run: leak the context rather than free it under it.
            tracing::warn!("{}: {e}", self.cfg.name);
            return;
        }
        // SAFETY: unwatched, so librbd no longer uses ctx; dropping the sender stops the
        // thread.
        drop(unsafe { Box::from_raw(w.ctx) });
        if w.thread.join().is_err() {
            tracing::error!("{}: the resize watch thread panicked", self.cfg.name);
        }
    }

    /// Quiesces the image for a delete: stops the watch, flushes, and hands the exclusive
    /// lock back so that the next opener's writes (a restarted blockd, a migrated VM) need
    /// not wait; the handle itself closes when its last user drops it.
    fn quiesce(&self) -> RbdResult<()> {
        self.stop_watch();
        let image = self.image()?;
        if self.cfg.read_only {
            // Nothing written, no lock taken.
            return Ok(());
        }
        let r = image.flush();
        if image.lock_release() {
            tracing::debug!("{}: released the exclusive lock", self.cfg.name);
        }
        r
    }

    /// Closes the image at daemon shutdown (`rbd_close`: flushes, unwatches the header,
    /// releases the exclusive lock; the bdev's own connection then shuts down). By then
    /// the reactors have stopped and dropped their channels, so this is the last user;
    /// should one remain (a channel, a flush stuck on an unreachable cluster), the image
    /// is left to it and the fact logged.
    fn close_image(&self) {
        self.stop_watch();
        let Some(image) = lock(&self.image).take() else {
            return;
        };
        match Arc::try_unwrap(image) {
            Ok(image) => {
                let what = image.what().to_string();
                drop(image);
                tracing::debug!("{}: closed {what}", self.cfg.name);
            }
            Err(image) => tracing::warn!(
                "{}: {} is still in use ({} other reference(s)): not closed",
                self.cfg.name,
                image.what(),
                Arc::strong_count(&image) - 1
            ),
        }
    }
}

/// The rbd backend of one bdev.
pub struct RbdBackend {
    shared: Arc<Shared>,
}

impl BdevBackend for RbdBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }

    fn io_types(&self) -> IoTypes {
        let rw = !self.shared.cfg.read_only;
        IoTypes {
            flush: true,
            unmap: rw,
            write_zeroes: rw,
            zcopy: false,
        }
    }

    fn read_only(&self) -> bool {
        self.shared.cfg.read_only
    }

    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
        let image = self
            .shared
            .image()
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno))?;
        Ok(Box::new(RbdChannel {
            api: image.api(),
            image,
            read_only: self.shared.cfg.read_only,
            queue: Arc::new(CompletionQueue {
                done: Mutex::new(Vec::new()),
                pending: AtomicUsize::new(0),
                efd: EventFd::new(EFD_NONBLOCK)?,
            }),
            in_flight: 0,
            batch: Vec::new(),
        }))
    }

    fn driver_specific(&self) -> Value {
        let c = &self.shared.cfg;
        let mut rbd = json!({ "pool_name": c.pool_name, "rbd_name": c.rbd_name,
                              "read_only": c.read_only });
        if let Some(f) = &self.shared.config_file {
            rbd["config_file"] = json!(f);
        }
        if let Some(f) = &self.shared.key_file {
            rbd["key_file"] = json!(f);
        }
        if let Some(n) = &c.cluster_name {
            rbd["cluster_name"] = json!(n);
        }
        if let Some(e) = &c.encryption {
            rbd["encryption_format"] = json!(e.format.as_str());
            rbd["key_name"] = json!(e.key.name());
        }
        json!({ "rbd": rbd })
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        let c = &self.shared.cfg;
        let mut p = json!({
            "name": bdev.name(),
            "pool_name": c.pool_name,
            "rbd_name": c.rbd_name,
            "block_size": c.block_size,
            "uuid": bdev.uuid().to_string(),
        });
        if let Some(u) = &c.user_id {
            p["user_id"] = json!(u);
        }
        if let Some(cfg) = &c.config {
            p["config"] = json!(cfg);
        }
        if let Some(n) = &c.cluster_name {
            p["cluster_name"] = json!(n);
        }
        if c.read_only {
            p["read_only"] = json!(true);
        }
        if let Some(e) = &c.encryption {
            // The key by name: the keyring subsystem is saved (and replayed) first.
            p["encryption_format"] = json!(e.format.as_str());
            p["key_name"] = json!(e.key.name());
        }
        Some(("bdev_rbd_create", p))
    }

    /// Objects that exist are data, absent ones holes (`rbd_diff_iterate2`, whole objects:
    /// the granularity a thin image allocates in). A clone's parent data counts as data.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        if self.shared.cfg.encryption.is_some() {
            // `rbd_diff_iterate2` speaks of the raw image (LUKS header included), not of
            // the payload this bdev presents: everything is data, which is always correct.
            return Ok(vec![Extent {
                len,
                state: AllocState::Data,
            }]);
        }
        let runs = self
            .shared
            .image()
            .and_then(|i| i.allocated_extents(offset, len))
            .map_err(|e| {
                tracing::warn!("{}: {e}", self.shared.cfg.name);
                Errno(e.errno.abs())
            })?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        for (o, l) in runs {
            if out.len() + 2 > MAX_EXTENTS {
                break;
            }
            let (o, e) = (o.max(pos), (o + l).min(end));
            if o >= e {
                continue;
            }
            push_extent(&mut out, o - pos, AllocState::Hole);
            push_extent(&mut out, e - o, AllocState::Data);
            pos = e;
        }
        if out.len() < MAX_EXTENTS {
            push_extent(&mut out, end - pos, AllocState::Hole);
        }
        Ok(out)
    }

    /// `rbd_diff_iterate2` waits for the cluster.
    fn allocation_blocks(&self) -> bool {
        true
    }

    /// Drops librbd's cache (`rbd_invalidate_cache`) before a frontend starts: after an
    /// incoming migration the cache may hold what this instance read before the source's
    /// last writes (QEMU's rbd driver does the same in its `bdrv_activate`). A no-op
    /// without a cache, blockd's default.
    fn activate(&self) -> std::io::Result<()> {
        self.hook("invalidating the cache", |i| i.invalidate_cache())
    }

    /// `rbd_flush`: every completed write is in the cluster before the frontend's stop is
    /// answered. The exclusive lock stays: librbd hands it over when the other instance
    /// (a migration's destination) writes and asks for it.
    fn deactivate(&self) -> std::io::Result<()> {
        if self.shared.cfg.read_only {
            return Ok(());
        }
        self.hook("flushing", |i| i.flush())
    }

    /// Flushes and hands the exclusive lock back (bounded by `CLOSE_TIMEOUT`). The
    /// handle stays open for channels still draining; the image is closed when the last
    /// of them goes (delete) or by [`RbdState::shutdown`] (daemon exit).
    fn close(&self) -> std::io::Result<()> {
        let shared = self.shared.clone();
        let what = format!("rbd bdev {}: flushing", self.shared.cfg.name);
        match shutdown::bounded(&what, CLOSE_TIMEOUT, move || shared.quiesce()) {
            Some(r) => r.map_err(|e| std::io::Error::from_raw_os_error(e.errno)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{what}: no answer from the cluster within {CLOSE_TIMEOUT:?}"),
            )),
        }
    }
}

impl RbdBackend {
    /// Runs `f` on the image, bounded by [`HOOK_TIMEOUT`] (an unreachable cluster must not
    /// hang the vhost session that waits for it).
    fn hook(&self, what: &str, f: fn(&Image) -> RbdResult<()>) -> std::io::Result<()> {
        let image = self
            .shared
            .image()
            .map_err(|e| std::io::Error::other(Error::from(e)))?;
        let what = format!("rbd bdev {}: {what}", self.shared.cfg.name);
        match shutdown::bounded(&what, HOOK_TIMEOUT, move || f(&image)) {
            Some(r) => r.map_err(|e| std::io::Error::other(Error::from(e))),
            None => Err(std::io::Error::other(Error::new(
                libc::ETIMEDOUT,
                format!("{what}: no answer from the cluster within {HOOK_TIMEOUT:?}"),
            ))),
        }
    }
}

/// Completions pushed by librbd threads, reaped by the channel's reactor.
///
/// The eventfd is written only when a completion lands in an empty queue: the reactor
/// takes the whole queue at once, so one wake-up per batch is enough, and a batch of 32
/// completions costs one `write` instead of 32. The reactor drains the eventfd only
/// before it sleeps ([`IoChannel::arm`]), never while polling.
struct CompletionQueue {
    done: Mutex<Vec<(u64, IoResult)>>,
    /// The length of `done`, changed only under its lock: lets a polling reactor find out
    /// that there is nothing to reap without a syscall or the lock.
    pending: AtomicUsize,
    efd: EventFd,
}

impl CompletionQueue {
    fn push(&self, tag: u64, r: IoResult) {
        let first = {
            let mut done = lock(&self.done);
            done.push((tag, r));
            self.pending.fetch_add(1, Ordering::Release) == 0
        };
        if first {
            // The eventfd write fails only when the counter would overflow, i.e. it is already signalled.
            let _ = self.efd.write(1);
        }
    }

    /// Moves every pushed completion into `batch` (empty on entry).
    fn take(&self, batch: &mut Vec<(u64, IoResult)>) {
        let mut done = lock(&self.done);
        std::mem::swap(&mut *done, batch);
        self.pending.store(0, Ordering::Release);
    }

    /// Before the reactor sleeps: clears the eventfd, then says whether completions are
    /// already waiting. A push after the check finds the queue empty and signals again,
    /// so no wake-up is lost; a stale signal costs one spurious wake-up, never a spin.
    fn arm(&self) -> bool {
        // Clears the eventfd; EAGAIN just means it was not signalled.
        let _ = self.efd.read();
        self.pending.load(Ordering::Acquire) > 0
    }
}

/// What a completion callback needs: owned by the aio until its callback runs.
struct AioCtx {
    tag: u64,
    /// For reads: the byte count librbd must report.
    expect: Option<u64>,
    api: &'static Api,
    queue: Arc<CompletionQueue>,
}

unsafe extern "C" fn aio_done(c: rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the AioCtx leaked by `submit` for exactly this completion.
    let ctx = unsafe { Box::from_raw(arg as *mut AioCtx) };
    // SAFETY: `c` is this callback's live completion; we release it exactly once.
    let rv = unsafe { (ctx.api.rbd_aio_get_return_value)(c) };
    // SAFETY: as above; `c` is not used after this release (the contract of
    // `Image::aio_completion`).
    unsafe { (ctx.api.rbd_aio_release)(c) };
    let r = if rv < 0 {
        Err(Errno(i32::try_from(-rv).unwrap_or(libc::EIO)))
    } else if ctx.expect.is_some_and(|n| rv as u64 != n) {
        Err(Errno(libc::EIO))
    } else {
        Ok(())
    };
    ctx.queue.push(ctx.tag, r);
}

/// A reactor's channel to an rbd image.
struct RbdChannel {
    image: Arc<Image>,
    api: &'static Api,
    /// The image was opened read-only: writes fail here with EROFS, flushes succeed.
    read_only: bool,
    queue: Arc<CompletionQueue>,
    in_flight: usize,
    batch: Vec<(u64, IoResult)>,
}

impl IoChannel for RbdChannel {
    unsafe fn submit(&mut self, tag: u64, op: IoOp) {
        self.in_flight += 1;
        adaptive::io_started();
        if self.read_only {
            match op {
                IoOp::Read { .. } => {}
                // Nothing was written through this handle: nothing to flush.
                IoOp::Flush => return self.queue.push(tag, Ok(())),
                IoOp::Write { .. } | IoOp::Unmap { .. } | IoOp::WriteZeroes { .. } => {
                    return self.queue.push(tag, Err(Errno(libc::EROFS)))
                }
            }
        }
        let iov_op = |iovs: super::IoVecs| match i32::try_from(iovs.count()) {
            // SAFETY: `submit`'s caller keeps the iovecs valid until `tag` is reaped, which is
            // after librbd's completion (the pointer is only handed to librbd).
            Ok(n) => Ok((unsafe { iovs.as_slice() }.as_ptr(), n)),
            Err(_) => Err(libc::EINVAL),
        };
        let (aio, expect) = match op {
            IoOp::Read { offset, iovs } => match iov_op(iovs) {
                Ok((iov, cnt)) => (
                    AioOp::Readv {
                        iov,
                        cnt,
                        off: offset,
                    },
                    Some(iovs.total_len()),
                ),
                Err(e) => return self.queue.push(tag, Err(Errno(e))),
            },
            IoOp::Write { offset, iovs } => match iov_op(iovs) {
                Ok((iov, cnt)) => (
                    AioOp::Writev {
                        iov,
                        cnt,
                        off: offset,
                    },
                    None,
                ),
                Err(e) => return self.queue.push(tag, Err(Errno(e))),
            },
            IoOp::Flush => (AioOp::Flush, None),
            IoOp::Unmap { offset, len } => (AioOp::Discard { off: offset, len }, None),
            IoOp::WriteZeroes { offset, len, .. } => {
                (AioOp::WriteZeroes { off: offset, len }, None)
            }
        };
        let ctx = Box::into_raw(Box::new(AioCtx {
            tag,
            expect,
            api: self.api,
            queue: self.queue.clone(),
        }));
        // SAFETY: `ctx` is leaked above and stays valid until `aio_done` reclaims it;
        // `aio_done` releases the completion.
        let c = match unsafe { self.image.aio_completion(ctx as *mut c_void, aio_done) } {
            Ok(c) => c,
            Err(e) => {
                // SAFETY: no completion was created, so no callback owns `ctx`: reclaim it.
                drop(unsafe { Box::from_raw(ctx) });
                return self.queue.push(tag, Err(Errno(e)));
            }
        };
        // SAFETY: `submit`'s caller keeps the buffers of `op` valid until `tag` is reaped,
        // which `aio_done` makes possible only after the completion fired.
        if let Err(e) = unsafe { self.image.aio_start(aio, c) } {
            // Not started: the callback will never run; undo both allocations.
            // SAFETY: librbd did not consume `c` and will never call `aio_done` for it, so
            // this is its only release and `ctx` has no other owner.
            unsafe {
                (self.api.rbd_aio_release)(c);
                drop(Box::from_raw(ctx));
            }
            self.queue.push(tag, Err(Errno(e)));
        }
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        if self.queue.pending.load(Ordering::Acquire) == 0 {
            return 0;
        }
        self.queue.take(&mut self.batch);
        let n = self.batch.len();
        for (tag, r) in self.batch.drain(..) {
            done(tag, r);
        }
        self.in_flight -= n.min(self.in_flight);
        adaptive::io_finished(n);
        n
    }

    fn arm(&mut self) -> bool {
        self.queue.arm()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.queue.efd.as_raw_fd())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// librbd's io_context and messenger threads complete every request.
    fn completed_by_helper_threads(&self) -> bool {
        true
    }
}

impl Drop for RbdChannel {
    fn drop(&mut self) {
        // Requests abandoned with the channel no longer count as in flight.
        adaptive::io_finished(self.in_flight);
    }
}

/// An rbd bdev the module manages: the generic bdev plus what delete/resize need.
struct Entry {
    bdev: Arc<Bdev>,
    shared: Arc<Shared>,
}

impl From<RbdError> for Error {
    /// The rbd library's errors are already an errno and a message naming the object.
    fn from(e: RbdError) -> Self {
        Error::new(e.errno, e.message)
    }
}

fn no_such_bdev(name: &str) -> RbdError {
    RbdError::new(libc::ENODEV, format!("rbd bdev {name} not found"))
}

/// The daemon's rbd state, owned by the application: the registered clusters and the rbd
/// bdevs with what delete/resize/shutdown need of them.
#[derive(Default)]
pub struct RbdState {
    pub clusters: cluster::Clusters,
    /// The record of this instance's RADOS clients, and the predecessor's to take over.
    pub takeover: takeover::Takeover,
    bdevs: Mutex<BTreeMap<String, Entry>>,
}

impl RbdState {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        lock(&self.bdevs)
    }

    /// Whether an rbd bdev called `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// The rbd bdev called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Bdev>> {
        self.lock().get(name).map(|e| e.bdev.clone())
    }

    /// Opens the image and builds the bdev (blocking: control thread only). The caller has
    /// checked that the name is free in the daemon's registry.
    pub fn create(&self, cfg: RbdBdevConfig) -> crate::error::Result<Arc<Bdev>> {
        check_block_size(cfg.block_size).map_err(RbdError::invalid)?;
        if cfg.pool_name.is_empty() || cfg.rbd_name.is_empty() {
            return Err(RbdError::invalid("pool_name and rbd_name must not be empty").into());
        }
        if self.exists(&cfg.name) {
            return Err(
                RbdError::new(libc::EEXIST, format!("bdev {} already exists", cfg.name)).into(),
            );
        }
        let (conn, config_file, key_file) = match &cfg.cluster_name {
            Some(c) => {
                let (conn, ccfg) = self.clusters.acquire(c, &cfg.name)?;
                (
                    conn,
                    ccfg.config_file.map(PathBuf::from),
                    ccfg.key_file.map(PathBuf::from),
                )
            }
            None => {
                let opts = ConnectOptions {
                    label: String::new(),
                    cluster: None,
                    user_id: cfg.user_id.clone(),
                    config_file: None,
                    key_file: None,
                    config: cfg.config.clone().unwrap_or_default(),
                };
                (Rados::connect(&opts)?, None, None)
            }
        };
        let release = |e: RbdError| -> Error {
            if let Some(c) = &cfg.cluster_name {
                self.clusters.release(c, &cfg.name);
            }
            e.into()
        };
        // Recorded before the image can be locked through it (see [`takeover`]).
        self.takeover.adopt(&conn).map_err(release)?;
        let opened = conn
            .ioctx(&cfg.pool_name)
            .and_then(|io| {
                if cfg.read_only {
                    io.open_read_only(&cfg.rbd_name, None)
                } else {
                    io.open(&cfg.rbd_name, None)
                }
            })
            .and_then(|img| {
                // Before anything reads or writes through the handle; a wrong passphrase
                // fails here and the image is closed again (dropped).
                if let Some(enc) = &cfg.encryption {
                    img.encryption_load(enc.format, enc.key.bytes())?;
                }
                img.size().map(|s| (img, s))
            });
        let (image, size) = opened.map_err(release)?;
        if !cfg.read_only {
            // A failure costs only the wait for the dead owner's watch to expire.
            if let Err(e) = self.takeover.take_over(&conn, &image) {
                tracing::warn!(
                    "{}: cannot take the image over from the previous instance: {e}; its \
                     first write waits until the old lock owner's watch expires",
                    image.what()
                );
            }
        }
        let blocks = size / cfg.block_size as u64;
        if blocks == 0 {
            return Err(release(RbdError::invalid(format!(
                "{} ({size} bytes) is smaller than one block of {}",
                image.what(),
                cfg.block_size
            ))));
        }
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            image: Mutex::new(Some(Arc::new(image))),
            config_file,
            key_file,
            watch: Mutex::new(None),
        });
        let bdev = Bdev::new(
            BdevParams {
                name: cfg.name.clone(),
                uuid: cfg.uuid,
                block_size: cfg.block_size,
                num_blocks: blocks,
            },
            Box::new(RbdBackend {
                shared: shared.clone(),
            }),
        );
        shared.start_watch(Arc::downgrade(&bdev)).map_err(release)?;
        let mut map = self.lock();
        if map.contains_key(&cfg.name) {
            drop(map);
            shared.stop_watch();
            return Err(release(RbdError::new(
                libc::EEXIST,
                format!("bdev {} already exists", cfg.name),
            )));
        }
        map.insert(
            cfg.name.clone(),
            Entry {
                bdev: bdev.clone(),
                shared,
            },
        );
        Ok(bdev)
    }

    /// Deletes an rbd bdev: stops the watch, flushes, releases the exclusive lock and its
    /// cluster. The image is closed when the last channel using it is dropped.
    pub fn delete(&self, name: &str) -> crate::error::Result<Arc<Bdev>> {
        let e = self.lock().remove(name).ok_or_else(|| no_such_bdev(name))?;
        let r = e.bdev.backend().close();
        if let Some(c) = &e.shared.cfg.cluster_name {
            self.clusters.release(c, name);
        }
        if let Err(err) = r {
            tracing::warn!("{name}: flushing on delete: {err}");
        }
        Ok(e.bdev)
    }

    /// `bdev_rbd_resize`: grows the image to `new_size_mib` MiB (shrinking is refused, as in
    /// SPDK: a guest would lose data) and tells the frontends.
    pub fn resize(&self, name: &str, new_size_mib: u64) -> crate::error::Result<()> {
        let (bdev, shared) = {
            let map = self.lock();
            let e = map.get(name).ok_or_else(|| no_such_bdev(name))?;
            (e.bdev.clone(), e.shared.clone())
        };
        let bytes = new_size_mib.checked_mul(1 << 20).ok_or_else(|| {
            RbdError::invalid(format!("new_size {new_size_mib} MiB is too large"))
        })?;
        let image = shared.image()?;
        if shared.cfg.read_only {
            return Err(RbdError::new(
                libc::EROFS,
                format!(
                    "rbd bdev {name} is read-only: cannot resize {}",
                    image.what()
                ),
            )
            .into());
        }
        let cur = image.size()?;
        if bytes < cur {
            return Err(RbdError::invalid(format!(
                "new size {new_size_mib} MiB of bdev {name} is smaller than the current {cur} bytes"
            ))
            .into());
        }
        image.resize(bytes)?;
        bdev.set_num_blocks(bytes / shared.cfg.block_size as u64);
        Ok(())
    }

    /// Names of the rbd bdevs.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> CompletionQueue {
        CompletionQueue {
            done: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(0),
            efd: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// The eventfd's counter, drained (0 when it was not signalled).
    fn signals(q: &CompletionQueue) -> u64 {
        q.efd.read().unwrap_or(0)
    }

    #[test]
    fn completion_queue_signals_once_per_batch() {
        let q = queue();
        q.push(1, Ok(()));
        q.push(2, Err(Errno(libc::EIO)));
        q.push(3, Ok(()));
        assert_eq!(signals(&q), 1, "only the push into the empty queue signals");
        assert_eq!(q.pending.load(Ordering::Acquire), 3);

        let mut batch = Vec::new();
        q.take(&mut batch);
        assert_eq!(batch.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(q.pending.load(Ordering::Acquire), 0);

        q.push(4, Ok(()));
        assert_eq!(signals(&q), 1, "the first push after a take signals again");
    }

    #[test]
    fn completion_queue_arm_drains_and_reports_waiting_completions() {
        let q = queue();
        assert!(!q.arm(), "nothing pushed: the reactor may sleep");

        q.push(1, Ok(()));
        assert!(q.arm(), "a completion waits: the reactor must not sleep");
        assert_eq!(signals(&q), 0, "arm drained the eventfd");
        q.push(2, Ok(()));
        assert_eq!(signals(&q), 0, "the queue was not empty: no new signal");

        let mut batch = Vec::new();
        q.take(&mut batch);
        assert_eq!(batch.len(), 2);
        assert!(!q.arm());
        q.push(3, Ok(()));
        assert_eq!(signals(&q), 1, "a push after the reactor armed wakes it");
    }
}
