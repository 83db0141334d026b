//! The `null` backend (SPDK's `bdev_null`): a bdev that stores nothing.
//!
//! Writes, flush, unmap and write-zeroes succeed without doing anything. Reads succeed
//! **without touching the buffer**, as SPDK's null bdev does: the guest gets whatever its
//! buffer held, which costs no memset and keeps this backend a pure measure of the I/O path.
//! Completions are synchronous: decided at submit, reported by the next `reap`.

pub mod rpc;

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::{json, Value};
use uuid::Uuid;

use super::{check_block_size, Bdev, BdevBackend, BdevParams, BdevRegistry, IoChannel, IoOp};
use super::{IoResult, IoTypes};
use crate::error::Error;

/// `product_name` of null bdevs.
pub const PRODUCT_NAME: &str = "Null disk";

/// What `bdev_null_create` needs.
#[derive(Clone, Debug)]
pub struct NullOpts {
    pub name: String,
    pub uuid: Option<Uuid>,
    pub num_blocks: u64,
    pub block_size: u32,
}

/// The null backend.
struct NullBackend;

/// Completes everything immediately.
#[derive(Default)]
struct NullChannel {
    done: VecDeque<u64>,
}

impl IoChannel for NullChannel {
    unsafe fn submit(&mut self, tag: u64, _op: IoOp) {
        self.done.push_back(tag);
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        let n = self.done.len();
        while let Some(t) = self.done.pop_front() {
            done(t, Ok(()));
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

impl BdevBackend for NullBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }

    fn io_types(&self) -> IoTypes {
        IoTypes {
            flush: true,
            unmap: true,
            write_zeroes: true,
            zcopy: false,
        }
    }

    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
        Ok(Box::<NullChannel>::default())
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        Some((
            "bdev_null_create",
            json!({"name": bdev.name(), "uuid": bdev.uuid().to_string(),
                   "num_blocks": bdev.num_blocks(), "block_size": bdev.block_size()}),
        ))
    }
}

/// Creates a null bdev and registers it (`bdev_null_create`).
pub fn create(registry: &BdevRegistry, opts: NullOpts) -> crate::error::Result<Arc<Bdev>> {
    check_block_size(opts.block_size).map_err(Error::invalid)?;
    if opts.name.is_empty() {
        return Err(Error::invalid("name must not be empty"));
    }
    if opts.num_blocks == 0 {
        return Err(Error::invalid("num_blocks must be greater than 0"));
    }
    if opts
        .num_blocks
        .checked_mul(opts.block_size as u64)
        .is_none()
    {
        return Err(Error::invalid("num_blocks * block_size overflows"));
    }
    let bdev = Bdev::new(
        BdevParams {
            name: opts.name,
            uuid: opts.uuid,
            block_size: opts.block_size,
            num_blocks: opts.num_blocks,
        },
        Box::new(NullBackend),
    );
    registry.add(bdev.clone())?;
    tracing::info!(bdev = bdev.name(), "null bdev created");
    Ok(bdev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::channel::test_support::{iov, reap_all, submit};
    use crate::bdev::{Errno, IoVecs};

    #[test]
    fn null_io_leaves_buffers_alone_and_counts() {
        let r = BdevRegistry::default();
        let b = create(
            &r,
            NullOpts {
                name: "Null0".into(),
                uuid: None,
                num_blocks: 8,
                block_size: 512,
            },
        )
        .unwrap();
        assert_eq!(b.to_json()["product_name"], "Null disk");
        let mut ch = b.open_channel().unwrap();
        let mut buf = vec![0xa5u8; 1024];
        let v = [iov(&mut buf)];
        // SAFETY: `buf` and `v` outlive the reap below.
        unsafe {
            submit(
                &mut ch,
                1,
                IoOp::Write {
                    offset: 0,
                    iovs: IoVecs::from_slice(&v),
                },
            );
            submit(
                &mut ch,
                2,
                IoOp::Read {
                    offset: 3072,
                    iovs: IoVecs::from_slice(&v),
                },
            );
            // Past the end (8 blocks = 4096 bytes): refused by the channel.
            submit(
                &mut ch,
                3,
                IoOp::Read {
                    offset: 3584,
                    iovs: IoVecs::from_slice(&v),
                },
            );
            submit(&mut ch, 4, IoOp::Flush);
        }
        let mut res = reap_all(&mut ch, 4);
        res.sort_by_key(|r| r.0);
        assert_eq!(
            res,
            vec![
                (1, Ok(())),
                (2, Ok(())),
                (3, Err(Errno(libc::EINVAL))),
                (4, Ok(()))
            ]
        );
        assert!(buf.iter().all(|&x| x == 0xa5));
        let s = b.stats.to_json(b.name());
        assert_eq!(s["num_read_ops"], 1);
        assert_eq!(s["bytes_read"], 1024);
        assert_eq!(s["num_write_ops"], 1);
        assert_eq!(s["num_flush_ops"], 1);
        assert_eq!(s["io_error"], 1);
        assert_eq!(s["queue_depth"], 0);
        let (m, p) = b.backend().config(&b).unwrap();
        assert_eq!(m, "bdev_null_create");
        assert_eq!(p["num_blocks"], 8);
        assert_eq!(p["uuid"], b.uuid().to_string());
        r.remove_product("Null0", Some(PRODUCT_NAME)).unwrap();
        let gone = r.remove_product("Null0", Some(PRODUCT_NAME)).err();
        assert_eq!(gone.map(|e| Error::from(e).errno), Some(libc::ENODEV));
    }
}
