//! Helpers shared by the RBD test binaries (tests/rbd.rs, tests/rbd_daemon.rs): the test
//! cluster's connection, librbd images, the `rbd` and `blockctl` tools, bdev-channel I/O.
//! Include with `#[path = "common/rbd.rs"] mod rbd;` after `ceph` (it uses `super::ceph`).
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd::bdev::{BdevChannel, IoOp, IoResult};
use blockd::rbd::{ConnectOptions, Rados};
use clap::Parser;

use super::ceph;

/// The test cluster's ceph.conf, or a SKIP line and return when Ceph is not installed.
#[macro_export]
macro_rules! need_ceph {
    () => {
        match ceph::conf() {
            Some(c) => c,
            None => {
                eprintln!("SKIP: Ceph (ceph-mon, ceph-osd, rbd, librbd1) is not installed");
                return;
            }
        }
    };
}

pub fn connect(conf: &Path) -> Arc<Rados> {
    Rados::connect(&ConnectOptions {
        config_file: Some(conf.to_path_buf()),
        ..Default::default()
    })
    .expect("connecting to the test cluster")
}

/// Opens `pool/image` read-write straight through librbd (the image keeps its connection).
pub fn open_image(conf: &Path, spec: &str) -> blockd::rbd::Image {
    let spec = blockd::rbd::ImageSpec::parse(spec).expect("image spec");
    connect(conf)
        .ioctx(&spec.pool)
        .expect("opening the pool")
        .open(&spec.image, None)
        .expect("opening the image")
}

pub fn rbd_cli(conf: &Path, args: &[&str]) {
    ceph::rbd_cli(conf, args);
}

/// Waits (bounded) for `n` completions on `ch`.
pub fn wait(ch: &mut BdevChannel, n: usize) -> Vec<(u64, IoResult)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let fd = ch
        .completion_fd()
        .expect("rbd channels have a completion fd");
    while got.len() < n {
        assert!(Instant::now() < deadline, "timed out waiting for rbd I/O");
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 100) };
        ch.poll(&mut |tag, r| got.push((tag, r)));
    }
    assert_eq!(ch.in_flight(), 0);
    got
}

pub fn io(ch: &mut BdevChannel, tag: u64, op: IoOp) -> IoResult {
    // SAFETY: the buffers outlive `wait`, which returns after the completion.
    unsafe { ch.submit(tag, op) };
    ch.kick();
    let r = wait(ch, 1);
    assert_eq!(r[0].0, tag);
    r[0].1
}

pub fn iov(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }
}

/// `blockctl image|pool` as blockctl will wire them.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(clap::Subcommand)]
enum Top {
    #[command(subcommand)]
    Image(blockd::rbdcli::image::ImageCommand),
    #[command(subcommand)]
    Pool(blockd::rbdcli::pool::PoolCommand),
}

pub fn blockctl(conf: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut v = vec!["blockctl".to_string()];
    v.extend(args.iter().map(|s| s.to_string()));
    v.push("--conf".into());
    v.push(conf.display().to_string());
    match Cli::try_parse_from(v)?.cmd {
        Top::Image(c) => blockd::rbdcli::image::run(c),
        Top::Pool(c) => blockd::rbdcli::pool::run(c),
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // Data, a zero hole (skipped on import), data again.
    for (i, b) in v.iter_mut().enumerate() {
        if !(len / 3..2 * len / 3).contains(&i) {
            *b = (i as u8).wrapping_mul(7).wrapping_add(seed);
        }
    }
    v
}
