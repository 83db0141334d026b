//! The local-pool backend: a bdev over an image of the embedded local pool
//! ([`crate::localpool`]), blockd's own `bdev_local_create`.
//!
//! A thin layer over the [`aio`] backend: the pool library resolves
//! `{pool, image}` to the image's data file and takes the image's use lock (exclusive for
//! a read-write bdev, shared for a read-only one) so `blockctl image rm`/`snap rollback`/
//! shrinking refuse a served image and no second writer opens it; the data path is an aio
//! bdev on that file with `fallocate` (unmap punches holes, the image stays sparse), i.e.
//! io_uring with `O_DIRECT` where the filesystem allows it.
//!
//! Snapshots of a served image (`blockctl image snap create`) capture every write that
//! completed before them: flush first (the guest's own flush, or stop I/O) for a
//! crash-consistent snapshot, freeze the guest filesystem for an application-consistent
//! one. A reflink snapshot is atomic; a sparse copy (filesystems without reflinks) is not
//! point-in-time while writes continue (blockctl warns).
//!
//! The bdev's size is the image size when it was created: after `blockctl image resize`,
//! delete and recreate the bdev.
//!
//! Live migration ([`crate::localpool::ServedImage`] has the protocol): a read-write bdev
//! created `incoming` (the destination, as QEMU's `-incoming`) takes the image's write role
//! when it is free, else opens as a waiter. A bdev without the role fails writes, unmaps and
//! write-zeroes with EBUSY (an atomic flag read per request) and reads what the writer made
//! durable. [`BdevBackend::deactivate`] (the source's device stopped) syncs the file and
//! hands the role to a waiting instance; [`BdevBackend::activate`] (the destination's
//! device starts) takes it, or refuses the start with EBUSY while another instance holds
//! it. Only vhost devices call these hooks: an NBD export of a waiting bdev stays
//! read-only in effect.

pub mod rpc;
#[cfg(test)]
mod tests;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use uuid::Uuid;

use super::aio::{self, AioFiles, AioOpts};
use super::{
    Bdev, BdevBackend, BdevParams, BdevRegistry, Errno, Extent, IoChannel, IoKind, IoOp, IoResult,
    IoTypes,
};
use crate::error::Error;
use crate::localpool::{self, PoolRoot, ServedImage};

/// `product_name` of local bdevs.
pub const PRODUCT_NAME: &str = "Local pool image";

/// What `bdev_local_create` needs.
#[derive(Clone, Debug)]
pub struct LocalPoolBdevOpts {
    pub name: String,
    pub pool: String,
    pub image: String,
    /// Root of the pools; `None` = `$BLOCKD_POOL_DIR` of the daemon, else the default.
    pub pool_dir: Option<PathBuf>,
    /// None = 512.
    pub block_size: Option<u32>,
    pub readonly: bool,
    pub uuid: Option<Uuid>,
    /// The destination of a live migration: wait for the write role if another instance
    /// holds it (read-write only).
    pub incoming: bool,
}

/// The local backend: an aio bdev (never registered) on the image's data file.
struct LocalPoolBackend {
    inner: Arc<Bdev>,
    opts: LocalPoolBdevOpts,
    root: PoolRoot,
    /// The image's use lock, released when the bdev is deleted.
    served: Mutex<Option<ServedImage>>,
    /// Whether the bdev holds the write role ([`ServedImage::write_role`]).
    role: Arc<AtomicBool>,
}

fn pool_err(e: localpool::Error) -> Error {
    Error::new(e.errno(), e.to_string())
}

/// Creates a bdev on `{pool, image}` and registers it (`bdev_local_create`).
pub fn create(registry: &BdevRegistry, opts: LocalPoolBdevOpts) -> crate::error::Result<Arc<Bdev>> {
    if opts.name.is_empty() {
        return Err(Error::invalid("name must not be empty"));
    }
    if registry.get(&opts.name).is_some() {
        return Err(super::registry::RegistryError::Exists(opts.name).into());
    }
    if opts.incoming && opts.readonly {
        return Err(Error::invalid(
            "incoming applies to read-write bdevs (a read-only one never writes)",
        ));
    }
    let root = PoolRoot::resolve(opts.pool_dir.as_deref());
    let served = root
        .pool(&opts.pool)
        .and_then(|p| {
            if opts.incoming {
                p.serve_incoming(&opts.image)
            } else {
                p.serve(&opts.image, opts.readonly)
            }
        })
        .map_err(pool_err)?;
    let role = served.write_role();
    let write_role = served.has_write_role();
    // The aio bdev lives in a private registry that is dropped at once: only this backend
    // holds it, and the daemon's registry sees one bdev, the local one (which
    // `bdev_aio_rescan` does not take).
    let scratch = BdevRegistry::default();
    let inner = aio::create(
        &scratch,
        &AioFiles::default(),
        AioOpts {
            filename: served.path.clone(),
            name: opts.name.clone(),
            block_size: opts.block_size,
            readonly: opts.readonly,
            fallocate: true,
            uuid: opts.uuid,
        },
    )
    .map_err(|e| e.context(format_args!("local image {}/{}", opts.pool, opts.image)))?;
    drop(scratch);
    let params = BdevParams {
        name: opts.name.clone(),
        uuid: Some(inner.uuid()),
        block_size: inner.block_size(),
        num_blocks: inner.num_blocks(),
    };
    let backend = LocalPoolBackend {
        inner,
        opts,
        root,
        served: Mutex::new(Some(served)),
        role,
    };
    let bdev = Bdev::new(params, Box::new(backend));
    if let Err(e) = registry.add(bdev.clone()) {
        if let Err(c) = bdev.backend().close() {
            tracing::warn!(bdev = bdev.name(), "closing a duplicate local bdev: {c}");
        }
        return Err(e.into());
    }
    tracing::info!(
        bdev = bdev.name(),
        num_blocks = bdev.num_blocks(),
        write_role,
        "local bdev created"
    );
    Ok(bdev)
}

/// The pool error of a hook, kept whole (errno and message) through the `io::Error`.
fn hook_err(e: localpool::Error) -> std::io::Error {
    std::io::Error::other(pool_err(e))
}

impl LocalPoolBackend {
    fn served<T>(&self, f: impl FnOnce(&ServedImage) -> T) -> Option<T> {
        crate::sync::lock(&self.served).as_ref().map(f)
    }
}

impl BdevBackend for LocalPoolBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }

    fn io_types(&self) -> IoTypes {
        self.inner.backend().io_types()
    }

    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
        let inner = self.inner.backend().open_channel()?;
        if self.opts.readonly {
            // The aio channel refuses writes with EROFS itself.
            return Ok(inner);
        }
        Ok(Box::new(RoleChannel {
            inner,
            role: self.role.clone(),
            refused: Vec::new(),
        }))
    }

    fn driver_specific(&self) -> Value {
        let aio = self.inner.backend().driver_specific();
        json!({"local": {"pool": self.opts.pool, "image": self.opts.image,
                         "pool_dir": self.root.dir(), "readonly": self.opts.readonly,
                         "incoming": self.opts.incoming,
                         "write_role": self.role.load(Ordering::Acquire),
                         "aio": aio.get("aio").cloned().unwrap_or(Value::Null)}})
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        let mut p = json!({"name": bdev.name(), "pool": self.opts.pool,
                           "image": self.opts.image, "block_size": bdev.block_size(),
                           "readonly": self.opts.readonly, "uuid": bdev.uuid().to_string()});
        if let Some(d) = &self.opts.pool_dir {
            p["pool_dir"] = json!(d);
        }
        if self.opts.incoming {
            p["incoming"] = json!(true);
        }
        Some(("bdev_local_create", p))
    }

    /// Takes the write role if the bdev waits for it: EBUSY (the device does not start)
    /// while another instance holds it.
    fn activate(&self) -> std::io::Result<()> {
        match self.served(|s| s.take_write_role()) {
            Some(r) => r.map_err(hook_err),
            None => Ok(()),
        }
    }

    /// Syncs the file (every completed write durable), then hands the write role to an
    /// instance waiting for it: it becomes a waiter itself.
    fn deactivate(&self) -> std::io::Result<()> {
        self.inner.backend().deactivate()?;
        if let Some(true) = self
            .served(|s| s.yield_write_role())
            .transpose()
            .map_err(hook_err)?
        {
            tracing::info!(
                pool = self.opts.pool,
                image = self.opts.image,
                "write role handed over to the waiting instance"
            );
        }
        Ok(())
    }

    fn buf_align(&self) -> usize {
        self.inner.backend().buf_align()
    }

    /// The image file's holes (`SEEK_HOLE`): unmapped ranges of a local image.
    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        self.inner.backend().allocation(offset, len)
    }

    fn allocation_blocks(&self) -> bool {
        self.inner.backend().allocation_blocks()
    }

    fn close(&self) -> std::io::Result<()> {
        let r = self.inner.backend().close();
        crate::sync::lock(&self.served).take();
        r
    }
}

/// The channel of a read-write local bdev: while the bdev does not hold the image's write
/// role, writes, unmaps and write-zeroes fail with EBUSY (one atomic load per request, no
/// lock); reads and flushes go through.
struct RoleChannel {
    inner: Box<dyn IoChannel>,
    role: Arc<AtomicBool>,
    /// Tags refused at submission, reported by the next `reap`.
    refused: Vec<u64>,
}

impl IoChannel for RoleChannel {
    unsafe fn submit(&mut self, tag: u64, op: IoOp) {
        let writes = !matches!(op.kind(), IoKind::Read | IoKind::Flush);
        if writes && !self.role.load(Ordering::Acquire) {
            self.refused.push(tag);
            return;
        }
        // SAFETY: the caller keeps the buffers valid until `tag` is reaped (our contract
        // is the inner channel's).
        unsafe { self.inner.submit(tag, op) }
    }

    fn kick(&mut self) {
        self.inner.kick();
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        let n = self.refused.len();
        for tag in self.refused.drain(..) {
            done(tag, Err(Errno(libc::EBUSY)));
        }
        n + self.inner.reap(done)
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn arm(&mut self) -> bool {
        self.inner.arm() || !self.refused.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.refused.len()
    }

    fn completed_by_helper_threads(&self) -> bool {
        self.inner.completed_by_helper_threads()
    }
}
