//! `blockctl bench` against a real vhost-user-blk backend: qemu-storage-daemon's export.
//! (Calls `blockd::bench` directly until the subcommand is wired into blockctl.)

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockd::bench::{execute, BenchArgs, BenchReport};
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

fn args(v: &[&str]) -> BenchArgs {
    Cli::try_parse_from(std::iter::once("bench").chain(v.iter().copied()))
        .unwrap()
        .args
}

/// qemu-storage-daemon exporting `img` as vhost-user-blk on `sock`; killed on drop.
struct Qsd(Child);

impl Qsd {
    fn start(img: &Path, sock: &Path, queues: u32) -> Qsd {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,filename={},node-name=n0", img.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (apt: qemu-utils) must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not create {sock:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd(child)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn assert_phase(r: &BenchReport, i: usize, name: &str, reads: u64, writes: u64) {
    let p = &r.phases[i];
    assert_eq!(p.name, name);
    assert_eq!((p.reads, p.writes), (reads, writes));
    assert!(p.iops > 0.0 && p.mib_s > 0.0, "{p:?}");
    assert!(p.lat_us.p50 > 0.0 && p.lat_us.p50 <= p.lat_us.p99 && p.lat_us.p99 <= p.lat_us.max);
}

#[test]
fn verify_passes_on_a_healthy_device() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 64 << 20);
    let sock = dir.path().join("vhost.sock");
    let _qsd = Qsd::start(&img, &sock, 2);
    let s = sock.to_str().unwrap();
    let r = execute(&args(&[
        "-s", s, "--verify", "--size", "8m", "-b", "4k", "-q", "16", "--queues", "2",
    ]))
    .unwrap();
    assert_eq!(r.capacity, 64 << 20);
    assert_eq!(r.size, 8 << 20);
    assert_eq!(r.phases.len(), 2);
    assert_phase(&r, 0, "verify-write", 0, 2048);
    assert_phase(&r, 1, "verify-read", 2048, 0);
    // The pattern really is on the disk: the block at 1 MiB starts with its pattern word.
    let data = std::fs::read(&img).unwrap();
    assert_ne!(&data[1 << 20..(1 << 20) + 4096], &[0u8; 4096][..]);
    assert_eq!(&data[(8 << 20)..(8 << 20) + 4096], &[0u8; 4096][..]);
}

#[test]
fn verify_fails_when_data_is_corrupted_behind_its_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 16 << 20);
    let sock = dir.path().join("vhost.sock");
    let _qsd = Qsd::start(&img, &sock, 1);
    let s = sock.to_str().unwrap();
    let common = [
        "-s", s, "--verify", "--size", "4m", "-b", "64k", "-q", "4", "--seed", "42",
    ];
    let phase = |p: &str| {
        let mut v = common.to_vec();
        v.extend(["--verify-phase", p]);
        execute(&args(&v))
    };
    let w = phase("write").unwrap();
    assert_phase(&w, 0, "verify-write", 0, 64);
    // Control: an untouched device verifies.
    let r = phase("read").unwrap();
    assert_phase(&r, 0, "verify-read", 64, 0);
    // A different seed is a different pattern.
    let mut v = common.to_vec();
    v.extend(["--verify-phase", "read"]);
    let seed = v.iter().position(|a| *a == "42").unwrap();
    v[seed] = "43";
    assert!(execute(&args(&v)).is_err());

    // Overwrite 512 bytes at 1 MiB + 4 KiB with dd, as an outside writer.
    let st = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", img.display()),
            "bs=512",
            "count=1",
            &format!("seek={}", ((1 << 20) + 4096) / 512),
            "conv=notrunc",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let e = phase("read").unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("verify failed"), "{msg}");
    assert!(msg.contains(&format!("byte {}", (1 << 20) + 4096)), "{msg}");
}

#[test]
fn timed_patterns_with_polling_and_eventfd() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 32 << 20);
    let sock = dir.path().join("vhost.sock");
    let _qsd = Qsd::start(&img, &sock, 2);
    let s = sock.to_str().unwrap();
    for extra in [
        &[
            "-w",
            "randrw",
            "--rwmixread",
            "70",
            "-q",
            "8",
            "--queues",
            "2",
            "--cpus",
            "0",
        ][..],
        &["-w", "write", "-b", "128k", "-q", "8", "--no-poll"][..],
        &["-w", "read", "-q", "1", "--json"][..],
        &["-w", "randwrite", "-q", "4", "--norandommap"][..],
    ] {
        let mut v = vec!["-s", s, "-t", "1"];
        v.extend_from_slice(extra);
        let a = args(&v);
        let r = execute(&a).unwrap();
        assert_eq!(r.phases.len(), 1);
        let p = &r.phases[0];
        assert!(p.iops > 0.0, "{extra:?}: {p:?}");
        assert!(p.seconds > 0.9 && p.seconds < 5.0, "{p:?}");
        match a.pattern {
            blockd::bench::Pattern::Randrw => assert!(p.reads > 0 && p.writes > 0),
            blockd::bench::Pattern::Write | blockd::bench::Pattern::Randwrite => {
                assert_eq!(p.reads, 0)
            }
            _ => assert_eq!(p.writes, 0),
        }
        assert_eq!(r.poll, !a.no_poll);
        assert_eq!(r.random_map, !a.norandommap);
    }
}

#[test]
fn silent_backend_times_out_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mute.sock");
    let _listener = UnixListener::bind(&sock).unwrap(); // accepts (backlog), never answers
    let t = Instant::now();
    let e = execute(&args(&[
        "-s",
        sock.to_str().unwrap(),
        "--timeout",
        "2",
        "-t",
        "1",
    ]))
    .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(format!("{e:#}").contains("no answer"), "{e:#}");
    // And a missing socket fails at once.
    let e = execute(&args(&["-s", "/nonexistent/x.sock"])).unwrap_err();
    assert!(format!("{e:#}").contains("connecting"), "{e:#}");
}
