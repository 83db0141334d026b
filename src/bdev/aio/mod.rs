//! The `aio` backend (SPDK's `bdev_aio`): a regular file or a block device, driven through
//! io_uring.
//!
//! Each channel owns one ring (created on its reactor thread) and an eventfd registered with
//! it, which is the channel's completion fd. Reads and writes are `READV`/`WRITEV` whose
//! `user_data` is an index into the channel's slab of operations; `submit` only fills SQEs,
//! `kick` submits the batch with one `io_uring_enter`. Flush is `fdatasync`
//! (`IORING_OP_FSYNC` with `DATASYNC`), unmap is `fallocate(PUNCH_HOLE|KEEP_SIZE)` and
//! write-zeroes `fallocate(ZERO_RANGE|KEEP_SIZE)` (`PUNCH_HOLE` when unmapping is allowed,
//! or when the filesystem lacks `ZERO_RANGE`), both through `IORING_OP_FALLOCATE`, which
//! works on files and, as discard/zero-out, on block devices. As in SPDK, unmap and
//! write-zeroes are only offered when the bdev is created with `fallocate`.
//!
//! The file is opened with `O_DIRECT` when the block size is a multiple of the file's
//! direct-I/O offset alignment (`statx(STATX_DIOALIGN)`, or the logical block size); else
//! buffered, which `driver_specific.aio.o_direct` shows. With `O_DIRECT`, an operation
//! whose iovecs are not aligned (address to the memory alignment, length to the offset
//! alignment) goes through an aligned bounce buffer.
//!
//! A short transfer is resubmitted for the remainder; one that makes no progress fails with
//! `EIO` (a transfer is never reported successful unless complete). `EAGAIN`/`EINTR` are
//! retried. When the ring is full, operations wait in a backlog.

pub mod rpc;

mod channel;
mod file;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use uuid::Uuid;

use super::{check_block_size, Bdev, BdevBackend, BdevParams, BdevRegistry, Errno, IoChannel};
use super::{Extent, IoTypes};
use crate::error::Error;
use channel::AioChannel;
pub use file::AioFiles;
use file::{blockdev_geometry, dio_align, open, seek_extents, AioFile};

/// `product_name` of aio bdevs.
pub const PRODUCT_NAME: &str = "AIO disk";

/// What `bdev_aio_create` needs.
#[derive(Clone, Debug)]
pub struct AioOpts {
    pub filename: PathBuf,
    pub name: String,
    /// None = the device's logical block size, 512 for regular files.
    pub block_size: Option<u32>,
    pub readonly: bool,
    /// Offer unmap and write-zeroes (through `fallocate`).
    pub fallocate: bool,
    pub uuid: Option<Uuid>,
}

/// The aio backend.
struct AioBackend {
    file: Arc<AioFile>,
    filename: String,
    block_size: u32,
    block_size_override: bool,
    readonly: bool,
    fallocate: bool,
}

/// Creates an aio bdev, registers it in `registry` and its file in `files`
/// (`bdev_aio_create`).
pub fn create(
    registry: &BdevRegistry,
    files: &AioFiles,
    opts: AioOpts,
) -> crate::error::Result<Arc<Bdev>> {
    let path_s = opts.filename.display().to_string();
    if opts.name.is_empty() {
        return Err(Error::invalid("name must not be empty"));
    }
    if registry.get(&opts.name).is_some() {
        return Err(super::registry::RegistryError::Exists(opts.name).into());
    }
    let io_err = |e: std::io::Error, what: &str| Error::io(format_args!("{what} {path_s}"), &e);
    let probe = open(&opts.filename, opts.readonly, false).map_err(|e| io_err(e, "cannot open"))?;
    let meta = probe.metadata().map_err(|e| io_err(e, "cannot stat"))?;
    let ft = meta.file_type();
    let (lbs, size) = if ft.is_block_device() {
        blockdev_geometry(probe.as_raw_fd()).map_err(|e| io_err(e, "cannot size"))?
    } else if ft.is_file() {
        (512, meta.len())
    } else {
        return Err(Error::new(
            libc::EINVAL,
            format!("{path_s} is neither a regular file nor a block device"),
        ));
    };
    let block_size = opts.block_size.unwrap_or(lbs);
    check_block_size(block_size).map_err(Error::invalid)?;
    if ft.is_block_device() && block_size < lbs {
        return Err(Error::invalid(format!(
            "block_size {block_size} is smaller than the logical block size {lbs} of {path_s}"
        )));
    }
    let num_blocks = size / block_size as u64;
    if num_blocks == 0 {
        return Err(Error::new(
            libc::EINVAL,
            format!("{path_s} ({size} bytes) is smaller than one block of {block_size} bytes"),
        ));
    }
    let (mem_align, off_align) =
        dio_align(probe.as_raw_fd()).unwrap_or((lbs as usize, lbs as usize));
    let mut file = None;
    if (block_size as usize).is_multiple_of(off_align.max(1)) {
        match open(&opts.filename, opts.readonly, true) {
            Ok(f) => {
                file = Some(AioFile {
                    fd: f.into(),
                    direct: true,
                    mem_align: mem_align.max(1),
                    len_align: off_align.max(1),
                })
            }
            Err(e) => tracing::warn!(bdev = %opts.name, file = %path_s,
                                     "O_DIRECT refused ({e}), using buffered I/O"),
        }
    } else {
        tracing::warn!(bdev = %opts.name, file = %path_s, block_size, off_align,
                       "block size not a multiple of the direct-I/O alignment, using buffered I/O");
    }
    let file = file.unwrap_or_else(|| AioFile {
        fd: probe.into(),
        direct: false,
        mem_align: 1,
        len_align: 1,
    });
    let file = Arc::new(file);
    files.insert(&opts.name, &file);
    let backend = AioBackend {
        file,
        filename: path_s,
        block_size,
        block_size_override: opts.block_size.is_some(),
        readonly: opts.readonly,
        fallocate: opts.fallocate,
    };
    let bdev = Bdev::new(
        BdevParams {
            name: opts.name,
            uuid: opts.uuid,
            block_size,
            num_blocks,
        },
        Box::new(backend),
    );
    registry.add(bdev.clone())?;
    tracing::info!(
        bdev = bdev.name(),
        num_blocks,
        block_size,
        "aio bdev created"
    );
    Ok(bdev)
}

/// Re-reads the size of aio bdev `name`'s file or block device (`bdev_aio_rescan`) and,
/// when it changed, updates the bdev's block count, which notifies the frontends (a
/// vhost-user-blk guest sees the new capacity). As SPDK's `spdk_bdev_notify_blockcnt_change`,
/// shrinking a bdev that is claimed (exported) is refused with `EBUSY`.
pub fn rescan(registry: &BdevRegistry, files: &AioFiles, name: &str) -> crate::error::Result<()> {
    let not_found = || Error::new(libc::ENODEV, format!("aio bdev {name} not found"));
    let bdev = registry
        .get(name)
        .filter(|b| b.backend().product_name() == PRODUCT_NAME)
        .ok_or_else(not_found)?;
    let file = files.get(name).ok_or_else(not_found)?;
    let fd = file.fd.as_raw_fd();
    // SAFETY: `stat` is plain old data, all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor the bdev keeps open; `st` is valid for writes.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::io(
            format_args!("cannot stat the file of aio bdev {name}"),
            &e,
        ));
    }
    let size = if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
        blockdev_geometry(fd)
            .map_err(|e| {
                Error::io(
                    format_args!("cannot size the device of aio bdev {name}"),
                    &e,
                )
            })?
            .1
    } else {
        st.st_size as u64
    };
    let blocks = size / bdev.block_size() as u64;
    let old = bdev.num_blocks();
    if blocks == old {
        return Ok(());
    }
    if blocks < old && bdev.claimed_by().is_some() {
        return Err(Error::new(
            libc::EBUSY,
            format!("aio bdev {name} is in use and cannot shrink from {old} to {blocks} blocks"),
        ));
    }
    tracing::info!(bdev = name, old, blocks, "aio bdev resized");
    bdev.set_num_blocks(blocks);
    Ok(())
}

impl BdevBackend for AioBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }

    fn io_types(&self) -> IoTypes {
        IoTypes {
            flush: true,
            unmap: self.fallocate && !self.readonly,
            write_zeroes: self.fallocate && !self.readonly,
            zcopy: false,
        }
    }

    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
        Ok(Box::new(AioChannel::new(self.file.clone(), self.readonly)?))
    }

    fn driver_specific(&self) -> Value {
        json!({"aio": {"filename": self.filename, "block_size_override": self.block_size_override,
                       "readonly": self.readonly, "fallocate": self.fallocate,
                       "o_direct": self.file.direct}})
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        Some((
            "bdev_aio_create",
            json!({"name": bdev.name(), "filename": self.filename, "block_size": self.block_size,
                   "readonly": self.readonly, "fallocate": self.fallocate,
                   "uuid": bdev.uuid().to_string()}),
        ))
    }

    fn buf_align(&self) -> usize {
        self.file.mem_align
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Errno> {
        seek_extents(self.file.fd.as_raw_fd(), offset, len)
    }

    /// `lseek(SEEK_DATA/SEEK_HOLE)` is usually a lookup in cached extents, but it takes the
    /// inode lock and may read extent-tree blocks from the disk (or go over the network on
    /// NFS/FUSE): not something a reactor may wait for.
    fn allocation_blocks(&self) -> bool {
        true
    }

    fn read_only(&self) -> bool {
        self.readonly
    }

    /// `fdatasync`: every completed write reaches the disk before the frontend's stop is
    /// answered (another host, a migration's destination, reads the file next).
    fn deactivate(&self) -> std::io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        // SAFETY: fdatasync on a descriptor we own.
        if unsafe { libc::fdatasync(self.file.fd.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn close(&self) -> std::io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        // SAFETY: fsync on a descriptor we own.
        if unsafe { libc::fsync(self.file.fd.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
