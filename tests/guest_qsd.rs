//! Proves the guest harness (tests/common/guest.rs, tests/guest/) against a real
//! vhost-user-blk backend that exists today: qemu-storage-daemon (QSD). Every test boots a
//! real Linux guest in QEMU (TCG) and checks the guest's report *and* the bytes in the
//! backend's image file. The same tests run against blockd by swapping [`Qsd`] for
//! blockd's `Daemon` helper (tests/common/mod.rs).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#[path = "common/guest.rs"]
mod guest;
#[path = "common/qsd.rs"]
mod qsd;

use guest::{
    assert_region_in_file, read_at, sha256_hex, sparse_image, write_host_pattern, Disk, Guest,
    GuestOpts, GuestRun,
};
use qsd::{Export, Qsd};
use std::os::fd::AsRawFd;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn export(dir: &Path, name: &str, num_queues: u16) -> Export {
    Export::new(
        sparse_image(dir, &format!("{name}.img"), 64 * MIB),
        dir.join(format!("{name}.sock")),
        num_queues,
        "discard=unmap",
    )
}

fn boot(opts: &GuestOpts) -> GuestRun {
    let run = Guest::boot(opts).expect("booting guest");
    eprintln!(
        "{}: {:.1?}\n{}",
        opts.scenario, run.elapsed, run.command_line
    );
    run.assert_ok();
    run
}

#[test]
fn seed_on_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let e = export(dir.path(), "d0", 2);
    let _qsd = Qsd::start(std::slice::from_ref(&e));
    let run = boot(&GuestOpts::new("seed", dir.path()).disk(Disk::blk(&e.socket, 2)));
    assert_eq!(run.require_u64("vda.size"), 64 * MIB / 512);
    assert_eq!(run.require_u64("vda.logical_block_size"), 512);
    assert_eq!(run.require("vda.ro"), "0");
    assert_eq!(run.require("vda.pattern.direct"), "ok");
    assert_eq!(run.require("vda.pattern.buffered"), "ok");
    assert_region_in_file(&run, "vda", "direct", &e.image);
    assert_region_in_file(&run, "vda", "buffered", &e.image);
}

#[test]
fn multiqueue_on_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let e = export(dir.path(), "d0", 2);
    let _qsd = Qsd::start(std::slice::from_ref(&e));
    let run = boot(
        &GuestOpts::new("multiqueue", dir.path())
            .smp(2)
            .disk(Disk::blk(&e.socket, 2)),
    );
    assert_eq!(run.require_u64("cpus"), 2);
    assert_eq!(run.require_u64("vda.queues"), 2);
    for cpu in 0..2 {
        let tag = format!("cpu{cpu}");
        assert_eq!(run.require(&format!("vda.pattern.{tag}")), "ok");
        assert_region_in_file(&run, "vda", &tag, &e.image);
    }
    // Each virtqueue carried requests (blk-mq debugfs `run` per hardware queue).
    for h in 0..2 {
        let runs = run.require_u64(&format!("vda.hctx{h}.run"));
        assert!(runs > 0, "hctx{h} never ran\n{}", run.diagnostics());
    }
}

#[test]
fn discard_on_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let e = export(dir.path(), "d0", 1);
    let _qsd = Qsd::start(std::slice::from_ref(&e));
    let run = boot(&GuestOpts::new("discard", dir.path()).disk(Disk::blk(&e.socket, 1)));
    assert!(run.require_u64("vda.discard_max_bytes") > 0);
    assert_eq!(run.require("vda.discard"), "ok");
    assert_eq!(run.require("vda.zeroout.verify"), "ok");
    // Zeroed range: zeros in the file. Discarded range: a hole (QSD `discard=unmap`).
    let (zoff, zlen) = run.region("vda", "zero");
    assert!(read_at(&e.image, zoff, zlen)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    let (doff, dlen) = run.region("vda", "discard");
    let f = std::fs::File::open(&e.image).unwrap();
    // SAFETY: lseek on a valid fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), doff as libc::off_t, libc::SEEK_DATA) };
    assert!(
        data < 0 || data as u64 >= doff + dlen,
        "discarded range still allocated: data at {data}"
    );
}

#[test]
fn readonly_on_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = export(dir.path(), "d0", 1);
    e.writable = false;
    let host = write_host_pattern(&e.image, 64 * MIB);
    let _qsd = Qsd::start(std::slice::from_ref(&e));
    let run = boot(&GuestOpts::new("readonly", dir.path()).disk(Disk::blk(&e.socket, 1)));
    assert_eq!(run.require("vda.ro"), "1");
    assert_eq!(run.require("vda.write"), "rejected");
    assert_eq!(
        run.require(&format!("vda.read.sha256.0+{MIB}")),
        sha256_hex(&host)
    );
    assert_eq!(
        read_at(&e.image, 0, MIB).unwrap(),
        host,
        "read-only image changed"
    );
}

#[test]
fn flush_on_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let e = export(dir.path(), "d0", 1);
    let _qsd = Qsd::start(std::slice::from_ref(&e));
    let run = boot(&GuestOpts::new("flush", dir.path()).disk(Disk::blk(&e.socket, 1)));
    assert_eq!(run.require("vda.sync"), "ok");
    assert_region_in_file(&run, "vda", "flush", &e.image);
}

#[test]
fn many_disks_on_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let exports: Vec<Export> = (0..4)
        .map(|i| export(dir.path(), &format!("d{i}"), 1))
        .collect();
    let _qsd = Qsd::start(&exports);
    let mut opts = GuestOpts::new("many", dir.path()).arg("disks", "4");
    for e in &exports {
        opts = opts.disk(Disk::blk(&e.socket, 1));
    }
    let run = boot(&opts);
    assert_eq!(run.require_u64("disks"), 4);
    // PCI slots are assigned in command-line order, so vda..vdd follow the exports.
    for (e, d) in exports.iter().zip(["vda", "vdb", "vdc", "vdd"]) {
        assert_region_in_file(&run, d, d, &e.image);
    }
}

#[test]
fn hostile_on_qsd() {
    let dir = tempfile::tempdir().unwrap();
    let e = export(dir.path(), "d0", 1);
    let mut qsd = Qsd::start(std::slice::from_ref(&e));
    let run = boot(&GuestOpts::new("hostile", dir.path()).disk(Disk::blk(&e.socket, 1)));
    // The kernel bounds-checks these before the backend sees them.
    assert_eq!(run.require_u64("hostile.read_past_end_bytes"), 0);
    assert_eq!(run.require("hostile.write_past_end"), "rejected");
    assert_eq!(run.require("hostile.discard_past_end"), "rejected");
    assert_eq!(run.require("hostile.last_4k"), "ok");
    assert_eq!(run.require("hostile.big_io"), "ok");
    assert_eq!(run.require("hostile.read_storm"), "ok");
    assert_region_in_file(&run, "vda", "last", &e.image);
    assert_region_in_file(&run, "vda", "big", &e.image);
    // The backend survived and serves a fresh guest on the same socket.
    assert!(qsd.alive(), "qemu-storage-daemon died");
    let again =
        boot(&GuestOpts::new("seed", dir.path().join("again")).disk(Disk::blk(&e.socket, 1)));
    assert_region_in_file(&again, "vda", "direct", &e.image);
}
