//! Real I/O on temporary files (on the worktree's filesystem, which supports `O_DIRECT`).

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use super::*;
use crate::bdev::channel::test_support::{err, iov, reap_all, submit};
use crate::bdev::BdevChannel;
use crate::bdev::{IoOp, IoResult, IoVecs};

const MIB: u64 = 1 << 20;

fn sparse_file(len: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(len).unwrap();
    f
}

fn opts(f: &tempfile::NamedTempFile, name: &str) -> AioOpts {
    AioOpts {
        filename: f.path().to_path_buf(),
        name: name.into(),
        block_size: None,
        readonly: false,
        fallocate: true,
        uuid: None,
    }
}

/// A 4096-aligned buffer of `len` bytes filled with `seed`-derived bytes, at offset `skew`
/// from the alignment (to make it deliberately misaligned).
struct Buf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, skew: usize, seed: u8) -> Self {
        let mut raw = vec![0u8; len + 8192];
        let start = (4096 - raw.as_ptr() as usize % 4096) % 4096 + skew;
        for (i, b) in raw[start..start + len].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        Buf { raw, start, len }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn io(ch: &mut BdevChannel, op: IoOp) -> IoResult {
    // SAFETY: the callers' buffers outlive this call, which reaps the completion.
    unsafe { submit(ch, 7, op) };
    let r = reap_all(ch, 1);
    assert_eq!(r[0].0, 7);
    r[0].1
}

fn write(ch: &mut BdevChannel, offset: u64, data: &mut [u8]) -> IoResult {
    let v = [iov(data)];
    io(
        ch,
        IoOp::Write {
            offset,
            // SAFETY: `v` outlives the reap inside `io`.
            iovs: unsafe { IoVecs::from_slice(&v) },
        },
    )
}

fn read(ch: &mut BdevChannel, offset: u64, data: &mut [u8]) -> IoResult {
    let v = [iov(data)];
    io(
        ch,
        IoOp::Read {
            offset,
            // SAFETY: as in `write`.
            iovs: unsafe { IoVecs::from_slice(&v) },
        },
    )
}

fn file_bytes(f: &tempfile::NamedTempFile) -> Vec<u8> {
    std::fs::read(f.path()).unwrap()
}

#[test]
fn aio_direct_and_bounce_paths() {
    let f = sparse_file(MIB);
    let r = BdevRegistry::default();
    let b = create(&r, &AioFiles::default(), opts(&f, "Aio0")).unwrap();
    assert_eq!((b.block_size(), b.num_blocks()), (512, 2048));
    let j = b.to_json();
    assert_eq!(j["product_name"], "AIO disk");
    assert_eq!(j["driver_specific"]["aio"]["o_direct"], true, "{j}");
    assert_eq!(j["driver_specific"]["aio"]["block_size_override"], false);
    assert!(b.backend().buf_align() >= 1);
    let mut ch = b.open_channel().unwrap();
    assert!(ch.completion_fd().is_some());

    // Aligned buffer: straight O_DIRECT.
    let mut a = Buf::new(8192, 0, 1);
    write(&mut ch, 65536, a.bytes()).unwrap();
    let mut back = Buf::new(8192, 0, 99);
    read(&mut ch, 65536, back.bytes()).unwrap();
    assert_eq!(back.bytes(), a.bytes());
    assert_eq!(&file_bytes(&f)[65536..65536 + 8192], a.bytes());

    // Misaligned buffers (address off by 3, and split into odd-length iovecs): bounce.
    let mut u = Buf::new(4096, 3, 2);
    write(&mut ch, 131072, u.bytes()).unwrap();
    assert_eq!(&file_bytes(&f)[131072..131072 + 4096], u.bytes());
    let mut back = Buf::new(4096, 5, 0);
    let (p1, p2) = back.bytes().split_at_mut(100);
    let v = [iov(p1), iov(p2)];
    io(
        &mut ch,
        IoOp::Read {
            offset: 131072,
            // SAFETY: `v` and `back` outlive the reap.
            iovs: unsafe { IoVecs::from_slice(&v) },
        },
    )
    .unwrap();
    assert_eq!(back.bytes(), u.bytes());

    io(&mut ch, IoOp::Flush).unwrap();
    let s = b.stats.to_json("Aio0");
    assert_eq!(s["num_write_ops"], 2);
    assert_eq!(s["bytes_written"], 8192 + 4096);
    assert_eq!(s["num_read_ops"], 2);
    assert_eq!(s["bytes_read"], 8192 + 4096);
    assert_eq!(s["num_flush_ops"], 1);
    assert_eq!(s["queue_depth"], 0);
    assert!(s["write_latency_ticks"].as_u64().unwrap() > 0);

    let (m, p) = b.backend().config(&b).unwrap();
    assert_eq!(m, "bdev_aio_create");
    assert_eq!(p["filename"], f.path().display().to_string());
    assert_eq!(p["block_size"], 512);
    drop(ch);
    r.remove_product("Aio0", Some(PRODUCT_NAME)).unwrap();
}

#[test]
fn aio_unmap_punches_and_write_zeroes_zero() {
    let f = sparse_file(MIB);
    let r = BdevRegistry::default();
    let b = create(
        &r,
        &AioFiles::default(),
        AioOpts {
            block_size: Some(4096),
            ..opts(&f, "Aio1")
        },
    )
    .unwrap();
    assert_eq!(b.num_blocks(), 256);
    assert_eq!(
        b.to_json()["driver_specific"]["aio"]["block_size_override"],
        true
    );
    let mut ch = b.open_channel().unwrap();
    let mut d = Buf::new(256 * 1024, 0, 3);
    write(&mut ch, 256 * 1024, d.bytes()).unwrap();
    io(&mut ch, IoOp::Flush).unwrap();
    let blocks_before = f.as_file().metadata().unwrap().blocks();
    assert!(blocks_before >= 512, "allocated: {blocks_before}");

    // Unmap the first 64 KiB of the data: a hole appears there.
    io(
        &mut ch,
        IoOp::Unmap {
            offset: 256 * 1024,
            len: 65536,
        },
    )
    .unwrap();
    let blocks_after = f.as_file().metadata().unwrap().blocks();
    assert!(
        blocks_after + 128 <= blocks_before,
        "{blocks_before} -> {blocks_after}"
    );
    // SAFETY: lseek on our own descriptor.
    let hole = unsafe { libc::lseek(f.as_file().as_raw_fd(), 256 * 1024, libc::SEEK_HOLE) };
    assert_eq!(hole, 256 * 1024);

    // Write-zeroes without unmap over the next 64 KiB.
    io(
        &mut ch,
        IoOp::WriteZeroes {
            offset: 320 * 1024,
            len: 65536,
            may_unmap: false,
        },
    )
    .unwrap();
    let mut back = Buf::new(256 * 1024, 0, 0);
    read(&mut ch, 256 * 1024, back.bytes()).unwrap();
    assert!(back.bytes()[..128 * 1024].iter().all(|&x| x == 0));
    assert_eq!(&back.bytes()[128 * 1024..], &d.bytes()[128 * 1024..]);
    let s = b.stats.to_json("Aio1");
    assert_eq!(s["bytes_unmapped"], 65536);
    assert_eq!(s["num_write_zeroes_ops"], 1);

    // Without `fallocate`, unmap is not offered: ENOTSUP, nothing reaches the file.
    let g = sparse_file(MIB);
    let b2 = create(
        &r,
        &AioFiles::default(),
        AioOpts {
            fallocate: false,
            ..opts(&g, "Aio2")
        },
    )
    .unwrap();
    let mut ch2 = b2.open_channel().unwrap();
    assert_eq!(
        io(
            &mut ch2,
            IoOp::Unmap {
                offset: 0,
                len: 4096
            }
        ),
        Err(Errno(libc::ENOTSUP))
    );
}

#[test]
fn aio_rejects_out_of_range_and_readonly_writes() {
    // 1 MiB + 300 bytes: the tail is not a whole block and not part of the bdev.
    let f = sparse_file(MIB + 300);
    let r = BdevRegistry::default();
    let b = create(&r, &AioFiles::default(), opts(&f, "Aio3")).unwrap();
    assert_eq!(b.num_blocks(), 2048);
    let mut ch = b.open_channel().unwrap();
    let before = file_bytes(&f);
    let mut d = Buf::new(1024, 0, 4);
    assert_eq!(
        write(&mut ch, MIB - 512, d.bytes()),
        Err(Errno(libc::EINVAL))
    );
    assert_eq!(write(&mut ch, 100, d.bytes()), Err(Errno(libc::EINVAL)));
    assert_eq!(
        io(
            &mut ch,
            IoOp::Unmap {
                offset: u64::MAX - 511,
                len: 1024
            }
        ),
        Err(Errno(libc::EINVAL))
    );
    let mut odd = Buf::new(700, 0, 4);
    assert_eq!(write(&mut ch, 0, odd.bytes()), Err(Errno(libc::EINVAL)));
    assert_eq!(file_bytes(&f), before);
    assert_eq!(b.stats.to_json("x")["io_error"], 4);

    let ro = create(
        &r,
        &AioFiles::default(),
        AioOpts {
            readonly: true,
            ..opts(&f, "Aio4")
        },
    )
    .unwrap();
    assert_eq!(ro.to_json()["supported_io_types"]["unmap"], false);
    let mut ch = ro.open_channel().unwrap();
    assert_eq!(write(&mut ch, 0, d.bytes()), Err(Errno(libc::EROFS)));
    read(&mut ch, 0, d.bytes()).unwrap();
    assert!(d.bytes().iter().all(|&x| x == 0));
    assert_eq!(file_bytes(&f), before);
}

#[test]
fn aio_short_read_is_an_error_not_success() {
    let f = sparse_file(MIB);
    let r = BdevRegistry::default();
    let b = create(&r, &AioFiles::default(), opts(&f, "Aio5")).unwrap();
    let mut ch = b.open_channel().unwrap();
    // The file shrinks under the bdev: a read across the new end gets a short transfer,
    // then no progress at all.
    f.as_file().set_len(MIB / 2).unwrap();
    let mut d = Buf::new(8192, 0, 0);
    assert_eq!(
        read(&mut ch, MIB / 2 - 4096, d.bytes()),
        Err(Errno(libc::EIO))
    );
}

#[test]
fn aio_deep_queue_overflows_the_ring() {
    let f = sparse_file(4 * MIB);
    let r = BdevRegistry::default();
    let b = create(
        &r,
        &AioFiles::default(),
        AioOpts {
            block_size: Some(4096),
            ..opts(&f, "Aio6")
        },
    )
    .unwrap();
    let mut ch = b.open_channel().unwrap();
    let n = 600usize;
    let mut data = Buf::new(n * 4096, 0, 9);
    let iovs: Vec<libc::iovec> = data.bytes().chunks_mut(4096).map(iov).collect();
    for (i, v) in iovs.iter().enumerate() {
        // SAFETY: `iovs` and `data` outlive the reap below.
        unsafe {
            ch.submit(
                i as u64,
                IoOp::Write {
                    offset: i as u64 * 4096,
                    iovs: IoVecs::from_slice(std::slice::from_ref(v)),
                },
            )
        };
    }
    ch.kick();
    let mut res = reap_all(&mut ch, n);
    res.sort_by_key(|r| r.0);
    assert!(res
        .iter()
        .enumerate()
        .all(|(i, r)| r.0 == i as u64 && r.1.is_ok()));
    assert_eq!(&file_bytes(&f)[..n * 4096], data.bytes());
    assert_eq!(b.stats.to_json("x")["num_write_ops"], n as u64);
}

#[test]
fn aio_create_errors_name_the_file() {
    let r = BdevRegistry::default();
    let e = err(create(
        &r,
        &AioFiles::default(),
        AioOpts {
            filename: "/nonexistent/blockd-test.img".into(),
            name: "A".into(),
            block_size: None,
            readonly: false,
            fallocate: false,
            uuid: None,
        },
    ));
    assert_eq!(e.errno, libc::ENOENT);
    assert!(
        e.message.contains("/nonexistent/blockd-test.img"),
        "{}",
        e.message
    );
    let tiny = sparse_file(100);
    let e = err(create(&r, &AioFiles::default(), opts(&tiny, "T")));
    assert_eq!(e.errno, libc::EINVAL);
    assert!(
        e.message.contains("smaller than one block"),
        "{}",
        e.message
    );
    let f = sparse_file(MIB);
    create(&r, &AioFiles::default(), opts(&f, "A")).unwrap();
    assert_eq!(
        err(create(&r, &AioFiles::default(), opts(&f, "A"))).errno,
        libc::EEXIST
    );
}

#[test]
fn aio_allocation_reports_holes_and_data() {
    use crate::bdev::{AllocState, Extent};
    let f = sparse_file(8 * MIB);
    // Data at [1 MiB, 1 MiB + 64 KiB) and [6 MiB, 8 MiB); holes elsewhere.
    let data = vec![0xabu8; 64 * 1024];
    std::os::unix::fs::FileExt::write_all_at(f.as_file(), &data, MIB).unwrap();
    let tail = vec![0xcdu8; 2 * MIB as usize];
    std::os::unix::fs::FileExt::write_all_at(f.as_file(), &tail, 6 * MIB).unwrap();
    f.as_file().sync_all().unwrap();
    let reg = BdevRegistry::default();
    let b = create(&reg, &AioFiles::default(), opts(&f, "alloc0")).unwrap();
    assert!(b.backend().allocation_blocks());
    let map = b.backend().allocation(0, 8 * MIB).unwrap();
    let ext = |len, state| Extent { len, state };
    assert_eq!(
        map,
        vec![
            ext(MIB, AllocState::Hole),
            ext(64 * 1024, AllocState::Data),
            ext(5 * MIB - 64 * 1024, AllocState::Hole),
            ext(2 * MIB, AllocState::Data),
        ]
    );
    // A sub-range starting inside data and ending inside a hole is clipped to the range.
    let map = b
        .backend()
        .allocation(MIB + 4096, 8192 + 64 * 1024)
        .unwrap();
    assert_eq!(
        map,
        vec![
            ext(60 * 1024, AllocState::Data),
            ext(12 * 1024, AllocState::Hole)
        ]
    );
    // Punching a hole through the bdev shows up in the map.
    let mut ch = b.open_channel().unwrap();
    assert_eq!(
        io(
            &mut ch,
            IoOp::Unmap {
                offset: 7 * MIB,
                len: MIB
            }
        ),
        Ok(())
    );
    let map = b.backend().allocation(6 * MIB, 2 * MIB).unwrap();
    assert_eq!(
        map,
        vec![ext(MIB, AllocState::Data), ext(MIB, AllocState::Hole)]
    );
    drop(ch);
    reg.remove_product("alloc0", Some(PRODUCT_NAME)).unwrap();
}
