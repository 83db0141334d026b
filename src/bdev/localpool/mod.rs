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

pub mod rpc;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use uuid::Uuid;

use super::aio::{self, AioFiles, AioOpts};
use super::{Bdev, BdevBackend, BdevParams, BdevRegistry, Errno, Extent, IoChannel, IoTypes};
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
}

/// The local backend: an aio bdev (never registered) on the image's data file.
struct LocalPoolBackend {
    inner: Arc<Bdev>,
    opts: LocalPoolBdevOpts,
    root: PoolRoot,
    /// The image's use lock, released when the bdev is deleted.
    served: Mutex<Option<ServedImage>>,
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
    let root = PoolRoot::resolve(opts.pool_dir.as_deref());
    let served = root
        .pool(&opts.pool)
        .and_then(|p| p.serve(&opts.image, opts.readonly))
        .map_err(pool_err)?;
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
        "local bdev created"
    );
    Ok(bdev)
}

impl BdevBackend for LocalPoolBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }

    fn io_types(&self) -> IoTypes {
        self.inner.backend().io_types()
    }

    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
        self.inner.backend().open_channel()
    }

    fn driver_specific(&self) -> Value {
        let aio = self.inner.backend().driver_specific();
        json!({"local": {"pool": self.opts.pool, "image": self.opts.image,
                         "pool_dir": self.root.dir(), "readonly": self.opts.readonly,
                         "aio": aio.get("aio").cloned().unwrap_or(Value::Null)}})
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        let mut p = json!({"name": bdev.name(), "pool": self.opts.pool,
                           "image": self.opts.image, "block_size": bdev.block_size(),
                           "readonly": self.opts.readonly, "uuid": bdev.uuid().to_string()});
        if let Some(d) = &self.opts.pool_dir {
            p["pool_dir"] = json!(d);
        }
        Some(("bdev_local_create", p))
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
