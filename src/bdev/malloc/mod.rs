//! The `malloc` backend (SPDK's `bdev_malloc`): a bdev in RAM.
//!
//! The data lives in one anonymous private mapping (`MAP_NORESERVE`, so a big bdev costs
//! only what is written, in 2 MiB steps where transparent huge pages are on). Unmap and write-zeroes give whole pages back with
//! `madvise(MADV_DONTNEED)` (they read back as zeroes) and zero the partial pages at the
//! edges. Every operation is a memcpy done at submit; its completion is reported by the next
//! `reap`. A channel also lends the mapping for zero-copy access (`zcopy_start`, as SPDK's
//! malloc bdev does): a stacked bdev (crypto) then transforms straight between it and its
//! caller's buffers, with no memcpy. Channels on several reactors access the memory concurrently, as a disk would be:
//! the frontends order dependent requests, not this backend.

pub mod rpc;

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::{json, Value};
use uuid::Uuid;

use super::{check_block_size, Bdev, BdevBackend, BdevParams, BdevRegistry, Errno, IoChannel};
use super::{IoOp, IoResult, IoTypes, Lent};
use crate::error::Error;

/// `product_name` of malloc bdevs.
pub const PRODUCT_NAME: &str = "Malloc disk";

/// What `bdev_malloc_create` needs; `name` None = first free `MallocN`.
#[derive(Clone, Debug)]
pub struct MallocOpts {
    pub name: Option<String>,
    pub uuid: Option<Uuid>,
    pub num_blocks: u64,
    pub block_size: u32,
}

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value and unmapped only by its drop;
// it is not tied to the creating thread.
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` gives no safe access to the bytes; concurrent access goes through raw
// pointers in `MallocChannel::copy` and `zero`, and through memory lent for zero-copy
// access (`MallocChannel::zcopy_start`, see `Lent`), only (see the module doc).
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Transparent huge pages where the host allows them (`madvise` mode): random 4K
        // requests over a big bdev otherwise miss the TLB on nearly every copy, which costs
        // more than the copy itself under nested paging. Advice only: failure is harmless.
        // SAFETY: advice on the mapping just created.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Whether `[offset, offset + len)` lies inside the mapping.
    fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64)
    }

    /// Zeroes `[offset, offset + len)` (in range), dropping the whole pages.
    fn zero(&self, offset: usize, len: usize) {
        // SAFETY: sysconf has no preconditions.
        let page = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize;
        let end = offset + len;
        let first = offset.div_ceil(page) * page;
        let last = end / page * page;
        // SAFETY: every range below is inside the mapping (caller checked `contains`).
        unsafe {
            if first < last {
                std::ptr::write_bytes(self.ptr.add(offset), 0, first - offset);
                let r = libc::madvise(
                    self.ptr.add(first).cast(),
                    last - first,
                    libc::MADV_DONTNEED,
                );
                if r != 0 {
                    std::ptr::write_bytes(self.ptr.add(first), 0, last - first);
                }
                std::ptr::write_bytes(self.ptr.add(last), 0, end - last);
            } else {
                std::ptr::write_bytes(self.ptr.add(offset), 0, len);
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` with this length and is unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The malloc backend.
struct MallocBackend {
    mem: Arc<Mapping>,
}

/// A channel: memcpy at submit, completions queued for `reap`.
struct MallocChannel {
    mem: Arc<Mapping>,
    done: VecDeque<(u64, IoResult)>,
}

impl MallocChannel {
    /// Copies between the bdev and the iovecs.
    ///
    /// # Safety
    /// The iovecs must be valid for the direction of the copy.
    unsafe fn copy(&self, offset: u64, iovs: super::IoVecs, write: bool) -> IoResult {
        if !self.mem.contains(offset, iovs.total_len()) {
            return Err(Errno(libc::EINVAL));
        }
        let mut pos = offset as usize;
        // SAFETY: the caller keeps the iovecs valid (`# Safety`).
        for v in unsafe { iovs.as_slice() } {
            let buf: *mut u8 = v.iov_base.cast();
            // SAFETY: `contains` checked `offset + total_len <= mem.len`, and `pos` advances by
            // the `iov_len`s that sum to `total_len`, so `[pos, pos + iov_len)` is inside the
            // mapping, which `self.mem` keeps alive; `buf` is valid for `iov_len` bytes.
            unsafe {
                let disk = self.mem.ptr.add(pos);
                if write {
                    std::ptr::copy_nonoverlapping(buf, disk, v.iov_len);
                } else {
                    std::ptr::copy_nonoverlapping(disk, buf, v.iov_len);
                }
            }
            pos += v.iov_len;
        }
        Ok(())
    }
}

impl IoChannel for MallocChannel {
    unsafe fn submit(&mut self, tag: u64, op: IoOp) {
        let r = match op {
            // SAFETY: `submit`'s caller keeps the buffers valid until `tag` is reaped.
            IoOp::Read { offset, iovs } => unsafe { self.copy(offset, iovs, false) },
            // SAFETY: as above.
            IoOp::Write { offset, iovs } => unsafe { self.copy(offset, iovs, true) },
            IoOp::Flush => Ok(()),
            IoOp::Unmap { offset, len } | IoOp::WriteZeroes { offset, len, .. } => {
                if self.mem.contains(offset, len) {
                    self.mem.zero(offset as usize, len as usize);
                    Ok(())
                } else {
                    Err(Errno(libc::EINVAL))
                }
            }
        };
        self.done.push_back((tag, r));
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, IoResult)) -> usize {
        let n = self.done.len();
        while let Some((t, r)) = self.done.pop_front() {
            done(t, r);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn zcopy_supported(&self) -> bool {
        true
    }

    /// Lends the mapping itself, as SPDK's malloc bdev points a zcopy I/O at its buffer.
    fn zcopy_start(
        &mut self,
        offset: u64,
        len: u64,
        _populate: bool,
    ) -> Option<Result<Lent, Errno>> {
        if !self.mem.contains(offset, len) {
            return Some(Err(Errno(libc::EINVAL)));
        }
        // SAFETY: `contains` checked `offset + len <= mem.len`, so the `len` bytes at
        // `ptr + offset` lie inside the mapping, which `self.mem` keeps mapped while this
        // channel (owner of the `Lent`'s user through its `BdevChannel`) lives; the
        // mapping is never covered by a Rust reference (the `Sync` argument above).
        Some(Ok(unsafe {
            Lent::new(self.mem.ptr.add(offset as usize), len as usize)
        }))
    }
}

impl BdevBackend for MallocBackend {
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }

    fn io_types(&self) -> IoTypes {
        IoTypes {
            flush: true,
            unmap: true,
            write_zeroes: true,
            zcopy: true,
        }
    }

    fn open_channel(&self) -> std::io::Result<Box<dyn IoChannel>> {
        Ok(Box::new(MallocChannel {
            mem: self.mem.clone(),
            done: VecDeque::new(),
        }))
    }

    fn config(&self, bdev: &Bdev) -> Option<(&'static str, Value)> {
        Some((
            "bdev_malloc_create",
            json!({"name": bdev.name(), "uuid": bdev.uuid().to_string(),
                   "num_blocks": bdev.num_blocks(), "block_size": bdev.block_size()}),
        ))
    }
}

/// Creates a malloc bdev and registers it (`bdev_malloc_create`).
pub fn create(registry: &BdevRegistry, opts: MallocOpts) -> crate::error::Result<Arc<Bdev>> {
    check_block_size(opts.block_size).map_err(Error::invalid)?;
    if opts.num_blocks == 0 {
        return Err(Error::invalid("num_blocks must be greater than 0"));
    }
    let len = opts
        .num_blocks
        .checked_mul(opts.block_size as u64)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| Error::invalid("num_blocks * block_size overflows"))?;
    let name = match opts.name {
        Some(n) if n.is_empty() => return Err(Error::invalid("name must not be empty")),
        Some(n) => n,
        None => registry.first_free_name("Malloc"),
    };
    if registry.get(&name).is_some() {
        return Err(super::registry::RegistryError::Exists(name).into());
    }
    let mem = Mapping::new(len).map_err(|e| {
        let errno = e.raw_os_error().unwrap_or(libc::ENOMEM);
        Error::new(
            errno,
            format!("cannot allocate {len} bytes for {name}: {e}"),
        )
    })?;
    let bdev = Bdev::new(
        BdevParams {
            name,
            uuid: opts.uuid,
            block_size: opts.block_size,
            num_blocks: opts.num_blocks,
        },
        Box::new(MallocBackend { mem: Arc::new(mem) }),
    );
    registry.add(bdev.clone())?;
    tracing::info!(bdev = bdev.name(), bytes = len, "malloc bdev created");
    Ok(bdev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::channel::test_support::{err, iov, reap_all, submit};
    use crate::bdev::IoVecs;

    fn opts(name: Option<&str>) -> MallocOpts {
        MallocOpts {
            name: name.map(str::to_string),
            uuid: None,
            num_blocks: 64,
            block_size: 512,
        }
    }

    #[test]
    fn default_names_and_duplicates() {
        let r = BdevRegistry::default();
        assert_eq!(create(&r, opts(None)).unwrap().name(), "Malloc0");
        assert_eq!(create(&r, opts(None)).unwrap().name(), "Malloc1");
        let e = err(create(&r, opts(Some("Malloc1"))));
        assert_eq!(e.errno, libc::EEXIST);
        r.remove_product("Malloc0", Some(PRODUCT_NAME)).unwrap();
        assert_eq!(create(&r, opts(None)).unwrap().name(), "Malloc0");
        assert_eq!(
            err(create(
                &r,
                MallocOpts {
                    block_size: 1000,
                    ..opts(None)
                }
            ))
            .fault,
            crate::error::Fault::Argument
        );
    }

    #[test]
    fn malloc_io_roundtrip() {
        let r = BdevRegistry::default();
        // 64 KiB: page-sized unmaps take the madvise path.
        let b = create(
            &r,
            MallocOpts {
                num_blocks: 128,
                ..opts(Some("M"))
            },
        )
        .unwrap();
        let mut ch = b.open_channel().unwrap();
        let mut a: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut c = vec![0x11u8; 512];
        let mut rd = vec![0u8; 8192 + 512];
        // Write 8 KiB at 4096 from two iovecs, then 512 at 0.
        let (a1, a2) = a.split_at_mut(1536);
        let w = [iov(a1), iov(a2)];
        let w2 = [iov(&mut c)];
        // SAFETY: all buffers outlive the reaps.
        unsafe {
            submit(
                &mut ch,
                1,
                IoOp::Write {
                    offset: 4096,
                    iovs: IoVecs::from_slice(&w),
                },
            );
            submit(
                &mut ch,
                2,
                IoOp::Write {
                    offset: 0,
                    iovs: IoVecs::from_slice(&w2),
                },
            );
        }
        assert!(reap_all(&mut ch, 2).iter().all(|r| r.1.is_ok()));
        let (r1, r2) = rd.split_at_mut(512);
        let rv = [iov(r1), iov(r2)];
        // SAFETY: as above.
        unsafe {
            submit(
                &mut ch,
                3,
                IoOp::Read {
                    offset: 3584,
                    iovs: IoVecs::from_slice(&rv),
                },
            )
        };
        assert_eq!(reap_all(&mut ch, 1), vec![(3, Ok(()))]);
        assert!(rd[..512].iter().all(|&x| x == 0));
        assert_eq!(&rd[512..], &a[..]);

        // Unmap [4608, 4608 + 8192 - 1024): partial pages at both ends, one whole page.
        // SAFETY: no buffers.
        unsafe {
            submit(
                &mut ch,
                4,
                IoOp::Unmap {
                    offset: 4608,
                    len: 7168,
                },
            );
            submit(
                &mut ch,
                5,
                IoOp::WriteZeroes {
                    offset: 0,
                    len: 512,
                    may_unmap: false,
                },
            );
        }
        assert!(reap_all(&mut ch, 2).iter().all(|r| r.1.is_ok()));
        let mut back = vec![0xffu8; 65536];
        let bv = [iov(&mut back)];
        // SAFETY: as above.
        unsafe {
            submit(
                &mut ch,
                6,
                IoOp::Read {
                    offset: 0,
                    iovs: IoVecs::from_slice(&bv),
                },
            )
        };
        assert_eq!(reap_all(&mut ch, 1), vec![(6, Ok(()))]);
        assert!(back[..4096].iter().all(|&x| x == 0));
        assert_eq!(&back[4096..4608], &a[..512]);
        assert!(back[4608..11776].iter().all(|&x| x == 0));
        assert_eq!(&back[11776..12288], &a[7680..]);
        assert!(back[12288..].iter().all(|&x| x == 0));

        let s = b.stats.to_json("M");
        assert_eq!(s["num_write_ops"], 2);
        assert_eq!(s["bytes_written"], 8192 + 512);
        assert_eq!(s["num_read_ops"], 2);
        assert_eq!(s["bytes_unmapped"], 7168);
        assert_eq!(s["num_write_zeroes_ops"], 1);
        assert_eq!(s["io_error"], 0);
        let (m, p) = b.backend().config(&b).unwrap();
        assert_eq!(
            (m, p["block_size"].as_u64()),
            ("bdev_malloc_create", Some(512))
        );
    }

    #[test]
    fn fua_write_reports_once_after_its_flush() {
        let r = BdevRegistry::default();
        let b = create(&r, opts(Some("F"))).unwrap();
        let mut ch = b.open_channel().unwrap();
        let mut buf = vec![0x5au8; 1024];
        let w = [iov(&mut buf)];
        // SAFETY: `buf` outlives the reap.
        unsafe {
            ch.submit_fua(
                7,
                IoOp::Write {
                    offset: 512,
                    iovs: IoVecs::from_slice(&w),
                },
            );
            ch.kick();
        }
        let done = reap_all(&mut ch, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, 7);
        assert!(done[0].1.is_ok());
        let stats = &b.stats;
        assert_eq!(stats.totals().num_write_ops(), 1);
        assert_eq!(stats.totals().num_flush_ops(), 1);
        // A FUA read is a plain read: no flush.
        // SAFETY: as above.
        unsafe {
            ch.submit_fua(
                8,
                IoOp::Read {
                    offset: 512,
                    iovs: IoVecs::from_slice(&w),
                },
            );
            ch.kick();
        }
        assert_eq!(reap_all(&mut ch, 1)[0].0, 8);
        assert_eq!(stats.totals().num_flush_ops(), 1);
    }
}
