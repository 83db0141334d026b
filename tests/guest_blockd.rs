//! blockd serving real Linux guests: every scenario boots QEMU (TCG) with vhost-user-blk
//! disks on blockd controllers made through RPC exactly as a user would, and checks the
//! guest's own report *and* the bytes behind the bdev on the host.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;
#[path = "common/guest.rs"]
mod guest;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Daemon;
use guest::{
    assert_region_in_file, read_at, sparse_image, write_host_pattern, Disk, Guest, GuestOpts,
    GuestRun,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// An aio bdev on a new sparse 64 MiB image, exported as controller `ctrlr`.
fn aio_controller(d: &Daemon, name: &str, block_size: u32, extra: Value) -> (PathBuf, PathBuf) {
    let image = sparse_image(d.tmp_dir(), &format!("{name}.img"), 64 * MIB);
    d.rpc_ok(
        "bdev_aio_create",
        json!({"filename": image.to_str().unwrap(), "name": name, "block_size": block_size,
               "fallocate": true}),
    );
    let ctrlr = format!("vhost.{name}");
    let mut p = json!({"ctrlr": ctrlr, "dev_name": name, "cpumask": "0x1"});
    if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    d.rpc_ok("vhost_create_blk_controller", p);
    (image, d.socket_dir().join(ctrlr))
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

/// A two-vCPU guest on a two-queue disk at `sock`: both queues used, a pattern written
/// and verified from each vCPU, in the guest and in `img`.
fn boot_two_queues(d: &Daemon, sock: &Path, img: &Path) -> GuestRun {
    let run = boot(
        &GuestOpts::new("multiqueue", d.tmp_dir().join("g"))
            .smp(2)
            .disk(Disk::blk(sock, 2)),
    );
    assert_eq!(run.require_u64("vda.queues"), 2);
    for cpu in 0..2 {
        let tag = format!("cpu{cpu}");
        assert_eq!(run.require(&format!("vda.pattern.{tag}")), "ok");
        assert_region_in_file(&run, "vda", &tag, img);
    }
    run
}

fn iostat(d: &Daemon, bdev: &str) -> Value {
    d.rpc_ok("bdev_get_iostat", json!({"name": bdev}))["bdevs"][0].clone()
}

/// Waits (bounded) until the controller has no frontend.
fn wait_disconnected(d: &Daemon, ctrlr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = d.rpc_ok("vhost_get_controllers", json!({"name": ctrlr}));
        if c[0]["sessions"].as_array().is_some_and(|s| s.is_empty()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ctrlr} still has a frontend: {c}"
        );
        std::thread::yield_now();
    }
}

/// File descriptors a vhost session holds: eventfds (kick/call), io_uring instances, guest
/// memory (memfd). Sockets are left out: RPC connections close asynchronously.
fn session_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| {
            let t = t.to_string_lossy();
            t.contains("eventfd") || t.contains("io_uring") || t.contains("memfd")
        })
        .count()
}

/// Guest memory mappings (memfd regions).
fn guest_mappings(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("memfd"))
        .count()
}

#[test]
fn seed_512_and_4k() {
    let d = Daemon::start_with(&["-m", "0x3"]);
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({}));
    let run = boot(&GuestOpts::new("seed", d.tmp_dir().join("g1")).disk(Disk::blk(&sock, 2)));
    assert_eq!(run.require_u64("vda.size"), 64 * MIB / 512);
    assert_eq!(run.require_u64("vda.logical_block_size"), 512);
    assert_eq!(run.require("vda.ro"), "0");
    assert_eq!(run.require("vda.pattern.direct"), "ok");
    assert_eq!(run.require("vda.pattern.buffered"), "ok");
    assert_region_in_file(&run, "vda", "direct", &img);
    assert_region_in_file(&run, "vda", "buffered", &img);

    let (img4k, sock4k) = aio_controller(&d, "vm4k", 4096, json!({}));
    let run = boot(&GuestOpts::new("seed", d.tmp_dir().join("g2")).disk(Disk::blk(&sock4k, 1)));
    assert_eq!(run.require_u64("vda.size"), 64 * MIB / 512);
    assert_eq!(run.require_u64("vda.logical_block_size"), 4096);
    assert_region_in_file(&run, "vda", "direct", &img4k);
    assert_region_in_file(&run, "vda", "buffered", &img4k);
}

#[test]
fn multiqueue() {
    let d = Daemon::start_with(&["-m", "0x3"]);
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({"cpumask": "0x3"}));
    let run = boot_two_queues(&d, &sock, &img);
    for h in 0..2 {
        assert!(
            run.require_u64(&format!("vda.hctx{h}.run")) > 0,
            "hctx{h} idle"
        );
    }
}

/// A Linux guest's virtio-blk driver through reactors with a poll window
/// (`--wake-cost-us 10` stands in for a host with cheap wake-ups, src/reactor/poll_window.rs):
/// between its requests they poll for the window, then re-enable kicks and sleep, so every
/// request the guest publishes meanwhile must still be seen. Two queues on two reactors;
/// the patterns verify in the guest and in the file.
#[test]
fn a_guest_through_reactors_with_a_poll_window() {
    let d = Daemon::start_with(&["-m", "0x3", "--wake-cost-us", "10"]);
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({"cpumask": "0x3"}));
    boot_two_queues(&d, &sock, &img);
    let r = d.rpc_ok("framework_get_reactors", Value::Null);
    for reactor in r["reactors"].as_array().expect("reactors") {
        assert_eq!(reactor["wake_cost_us"], json!(10.0), "{r}");
        assert!(reactor["poll_window_us"].is_number(), "{r}");
    }
}

/// Packed virtqueues (virtio 1.2 §2.8): a controller created with `packed_ring` and
/// QEMU's `packed=on`; the guest negotiates them and its patterns verify on both queues,
/// in the guest and in the file. A controller without `packed_ring` gets the same QEMU
/// on split rings.
#[test]
fn packed_virtqueues() {
    let d = Daemon::start_with(&["-m", "0x3"]);
    let extra = json!({"cpumask": "0x3", "packed_ring": true});
    let (img, sock) = aio_controller(&d, "vm1", 512, extra);
    let run = boot(
        &GuestOpts::new("multiqueue", d.tmp_dir().join("g"))
            .smp(2)
            .disk(Disk::blk(&sock, 2).packed()),
    );
    assert_eq!(
        run.require("vda.ring_packed"),
        "1",
        "packed rings negotiated"
    );
    assert_eq!(run.require_u64("vda.queues"), 2);
    for cpu in 0..2 {
        let tag = format!("cpu{cpu}");
        assert_eq!(run.require(&format!("vda.pattern.{tag}")), "ok");
        assert_region_in_file(&run, "vda", &tag, &img);
    }
    let saved = d.rpc_ok("framework_get_config", json!({"name": "vhost_blk"}));
    assert!(
        saved.to_string().contains("\"packed_ring\":true"),
        "the saved config carries packed_ring: {saved}"
    );

    let (img2, sock2) = aio_controller(&d, "vm2", 512, json!({}));
    let run =
        boot(&GuestOpts::new("seed", d.tmp_dir().join("g2")).disk(Disk::blk(&sock2, 1).packed()));
    assert_eq!(
        run.require("vda.ring_packed"),
        "0",
        "not offered: split rings"
    );
    assert_region_in_file(&run, "vda", "direct", &img2);
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    let d = Daemon::start();
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({}));
    let run = boot(&GuestOpts::new("discard", d.tmp_dir().join("g")).disk(Disk::blk(&sock, 1)));
    assert!(run.require_u64("vda.discard_max_bytes") > 0);
    assert_eq!(run.require("vda.discard"), "ok");
    assert_eq!(run.require("vda.zeroout.verify"), "ok");
    let (zoff, zlen) = run.region("vda", "zero");
    assert!(read_at(&img, zoff, zlen).unwrap().iter().all(|&b| b == 0));
    let (doff, dlen) = run.region("vda", "discard");
    let f = std::fs::File::open(&img).unwrap();
    // SAFETY: lseek on a valid fd.
    let data = unsafe { libc::lseek(f.as_raw_fd(), doff as libc::off_t, libc::SEEK_DATA) };
    assert!(
        data < 0 || data as u64 >= doff + dlen,
        "discarded range still allocated: data at {data}"
    );
    let st = iostat(&d, "vm1");
    assert!(st["num_unmap_ops"].as_u64().unwrap() > 0, "{st}");
}

/// A Linux guest's virtio-blk driver sleeps until its interrupt: with coalescing at its most
/// aggressive (every interrupt held back up to the 10 ms cap), every held-back interrupt
/// must still arrive, and the data must be right.
#[test]
fn seed_with_interrupt_coalescing() {
    let d = Daemon::start();
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({}));
    d.rpc_ok(
        "vhost_controller_set_coalescing",
        json!({"ctrlr": "vhost.vm1", "delay_base_us": 1000, "iops_threshold": 100}),
    );
    let run = boot(&GuestOpts::new("seed", d.tmp_dir().join("g")).disk(Disk::blk(&sock, 1)));
    assert_eq!(run.require("vda.pattern.direct"), "ok");
    assert_eq!(run.require("vda.pattern.buffered"), "ok");
    assert_region_in_file(&run, "vda", "direct", &img);
    assert_region_in_file(&run, "vda", "buffered", &img);
    let c = d.rpc_ok("vhost_get_controllers", json!({"name": "vhost.vm1"}));
    assert_eq!(c[0]["delay_base_us"], 1000);
    let held = c[0]["interrupts_held_back"].as_u64().unwrap();
    assert!(held > 0, "the guest's interrupts were never held back: {c}");
    eprintln!("interrupts held back: {held}");
}

#[test]
fn readonly_controller() {
    let d = Daemon::start();
    let image = d.tmp_dir().join("ro.img");
    let host = write_host_pattern(&image, 64 * MIB);
    d.rpc_ok(
        "bdev_aio_create",
        json!({"filename": image.to_str().unwrap(), "name": "ro", "block_size": 512}),
    );
    let out = d.blockctl(&["vhost_create_blk_controller", "-r", "vhost.ro", "ro"]);
    assert!(out.status.success());
    let sock = d.socket_dir().join("vhost.ro");
    let run = boot(&GuestOpts::new("readonly", d.tmp_dir().join("g")).disk(Disk::blk(&sock, 1)));
    assert_eq!(run.require("vda.ro"), "1");
    assert_eq!(run.require("vda.write"), "rejected");
    assert_eq!(
        read_at(&image, 0, MIB).unwrap(),
        host,
        "read-only image changed"
    );
    assert_eq!(iostat(&d, "ro")["num_write_ops"], 0);
}

#[test]
fn guest_flush_reaches_the_backend() {
    let d = Daemon::start();
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({}));
    let before = iostat(&d, "vm1")["num_flush_ops"].as_u64().unwrap();
    let run = boot(&GuestOpts::new("flush", d.tmp_dir().join("g")).disk(Disk::blk(&sock, 1)));
    assert_eq!(run.require("vda.sync"), "ok");
    assert_region_in_file(&run, "vda", "flush", &img);
    let after = iostat(&d, "vm1")["num_flush_ops"].as_u64().unwrap();
    assert!(
        after > before,
        "no flush reached the bdev ({before} -> {after})"
    );
}

#[test]
fn write_through_cache_mode_flushes_every_write() {
    let d = Daemon::start();
    let (_img, sock) = aio_controller(&d, "vm1", 512, json!({}));
    let run =
        boot(&GuestOpts::new("writethrough", d.tmp_dir().join("g")).disk(Disk::blk(&sock, 1)));
    assert_eq!(run.require("vda.cache_type"), "write_through");
    let st = iostat(&d, "vm1");
    let (writes, flushes) = (
        st["num_write_ops"].as_u64().unwrap(),
        st["num_flush_ops"].as_u64().unwrap(),
    );
    // The guest wrote 64 blocks with O_DIRECT and never synced; in writeback mode that
    // takes no flush at all.
    assert!(writes >= 64, "{st}");
    assert!(
        flushes >= writes,
        "{writes} writes but {flushes} flushes: {st}"
    );
}

#[test]
fn guest_and_qemu_restart_on_a_live_controller_leak_nothing() {
    let d = Daemon::start();
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({}));
    let run = boot(&GuestOpts::new("seed", d.tmp_dir().join("g0")).disk(Disk::blk(&sock, 1)));
    assert_region_in_file(&run, "vda", "direct", &img);
    wait_disconnected(&d, "vhost.vm1");
    let (fds, maps) = (session_fds(d.pid()), guest_mappings(d.pid()));
    assert_eq!(maps, 0, "guest memory still mapped after the VM left");
    for i in 1..=2 {
        let run = boot(
            &GuestOpts::new("seed", d.tmp_dir().join(format!("g{i}"))).disk(Disk::blk(&sock, 1)),
        );
        assert_region_in_file(&run, "vda", "buffered", &img);
        wait_disconnected(&d, "vhost.vm1");
    }
    assert_eq!(
        session_fds(d.pid()),
        fds,
        "file descriptors leaked across VM restarts"
    );
    assert_eq!(
        guest_mappings(d.pid()),
        0,
        "guest memory mappings leaked across VM restarts"
    );
}

#[test]
fn many_disks_one_guest() {
    let d = Daemon::start_with(&["-m", "0x3"]);
    let disks: Vec<(PathBuf, PathBuf)> = (0..4)
        .map(|i| aio_controller(&d, &format!("d{i}"), 512, json!({"cpumask": "0x3"})))
        .collect();
    let mut opts = GuestOpts::new("many", d.tmp_dir().join("g")).arg("disks", "4");
    for (_, sock) in &disks {
        opts = opts.disk(Disk::blk(sock, 1));
    }
    let run = boot(&opts);
    assert_eq!(run.require_u64("disks"), 4);
    for ((img, _), dev) in disks.iter().zip(["vda", "vdb", "vdc", "vdd"]) {
        assert_region_in_file(&run, dev, dev, img);
    }
}

#[test]
fn hostile_guest_leaves_other_controllers_serving() {
    let d = Daemon::start();
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({}));
    let (img2, sock2) = aio_controller(&d, "vm2", 512, json!({}));
    let run = boot(&GuestOpts::new("hostile", d.tmp_dir().join("g")).disk(Disk::blk(&sock, 1)));
    assert_eq!(run.require_u64("hostile.read_past_end_bytes"), 0);
    assert_eq!(run.require("hostile.write_past_end"), "rejected");
    assert_eq!(run.require("hostile.discard_past_end"), "rejected");
    assert_eq!(run.require("hostile.last_4k"), "ok");
    assert_eq!(run.require("hostile.big_io"), "ok");
    assert_eq!(run.require("hostile.read_storm"), "ok");
    assert_region_in_file(&run, "vda", "last", &img);
    assert_region_in_file(&run, "vda", "big", &img);
    let again = boot(&GuestOpts::new("seed", d.tmp_dir().join("again")).disk(Disk::blk(&sock2, 1)));
    assert_region_in_file(&again, "vda", "direct", &img2);
}

#[test]
fn guest_memory_from_a_plain_file_and_hugetlbfs() {
    let d = Daemon::start();
    let (img, sock) = aio_controller(&d, "vm1", 512, json!({}));
    // A plain file: the backend maps whatever fd the frontend shares.
    let ram = d.tmp_dir().join("guest.ram");
    let run = boot(
        &GuestOpts::new("seed", d.tmp_dir().join("g-file"))
            .mem_path(&ram)
            .disk(Disk::blk(&sock, 1)),
    );
    assert_region_in_file(&run, "vda", "direct", &img);
    wait_disconnected(&d, "vhost.vm1");

    // hugetlbfs, when the machine can give 256 huge pages (added to the pool, given back).
    let Some(huge) = hugepages::Lease::take(256, d.tmp_dir()) else {
        eprintln!("hugetlbfs part skipped: no 2 MiB huge pages available on this machine");
        return;
    };
    let run = boot(
        &GuestOpts::new("seed", d.tmp_dir().join("g-huge"))
            .mem_path(huge.dir().join("guest.ram"))
            .disk(Disk::blk(&sock, 1)),
    );
    assert_region_in_file(&run, "vda", "buffered", &img);
}

/// Borrowing 2 MiB huge pages for one test: added to the machine-wide pool and given back.
mod hugepages {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const NR: &str = "/proc/sys/vm/nr_hugepages";

    fn read() -> Option<u64> {
        std::fs::read_to_string(NR).ok()?.trim().parse().ok()
    }

    fn free() -> Option<u64> {
        let m = std::fs::read_to_string("/proc/meminfo").ok()?;
        m.lines()
            .find(|l| l.starts_with("HugePages_Free:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    pub struct Lease {
        added: u64,
        mount: PathBuf,
    }

    impl Lease {
        pub fn take(pages: u64, under: &Path) -> Option<Lease> {
            let before = read()?;
            std::fs::write(NR, (before + pages).to_string()).ok()?;
            let added = read()?.saturating_sub(before);
            let mount = under.join("hugetlbfs");
            std::fs::create_dir_all(&mount).ok()?;
            let mounted = Command::new("mount")
                .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
                .arg(&mount)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            let lease = Lease { added, mount };
            if added < pages || !mounted || free()? < pages {
                drop(lease);
                return None;
            }
            Some(lease)
        }

        pub fn dir(&self) -> &Path {
            &self.mount
        }
    }

    impl Drop for Lease {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.mount).status();
            if let Some(now) = read() {
                let _ = std::fs::write(NR, now.saturating_sub(self.added).to_string());
            }
        }
    }
}
