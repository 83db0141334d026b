//! The NBD frontend against real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio's nbd
//! engine) and hostile raw sockets, on an in-process app: reactors, a malloc bdev, the NBD
//! server on a temporary Unix socket, everything driven through the JSON-RPC methods.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd::app::{App, AppOptions};
use blockd::bdev::{IoOp, IoVecs};
use blockd::cpumask::CpuMask;
use blockd::nbd::proto;
use blockd::reactor::{PollOptions, Reactors};
use serde_json::{json, Value};

struct Env {
    app: Arc<App>,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Env {
    fn new() -> Env {
        let mask = CpuMask::from_cores([0]);
        let reactors = Reactors::start(&mask, PollOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let app = App::new(
            AppOptions {
                cpumask: mask,
                socket_dir: dir.path().to_path_buf(),
                rpc_socket: dir.path().join("rpc.sock"),
                socket_mode: 0o600,
            },
            reactors,
        );
        let sock = dir.path().join("nbd.sock");
        let env = Env { app, dir, sock };
        env.rpc("nbd_server_start", json!({"unix_path": env.sock}))
            .unwrap();
        env
    }

    fn rpc(&self, m: &str, p: Value) -> Result<Value, blockd::rpc::RpcError> {
        self.app.rpc.call(&self.app, m, Some(p))
    }

    fn malloc(&self, name: &str, mib: u64) {
        self.rpc(
            "bdev_malloc_create",
            json!({"name": name, "num_blocks": mib * 2048, "block_size": 512}),
        )
        .unwrap();
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// Reads `len` bytes at `offset` straight from the bdev.
    fn bdev_read(&self, bdev: &str, offset: u64, len: usize) -> Vec<u8> {
        let b = self.app.bdevs.get(bdev).unwrap();
        let mut ch = b.open_channel().unwrap();
        let mut buf = vec![0u8; len];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        }];
        // SAFETY: buf and iov outlive the completion we wait for below.
        unsafe {
            ch.submit(
                1,
                IoOp::Read {
                    offset,
                    iovs: IoVecs::from_slice(&iov),
                },
            );
        }
        ch.kick();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut res = None;
        while res.is_none() {
            ch.poll(&mut |_, r| res = Some(r));
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        res.unwrap().unwrap();
        buf
    }

    fn clients(&self, export: &str) -> u64 {
        let v = self
            .rpc("nbd_get_exports", json!({"name": export}))
            .unwrap();
        v[0]["clients"].as_u64().unwrap()
    }

    fn wait_clients(&self, export: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.clients(export) != n {
            assert!(
                Instant::now() < deadline,
                "clients of {export} never became {n}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.app.shutdown();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let so = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    so
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn qemu_clients_read_write_discard_zeroes() {
    let env = Env::new();
    env.malloc("Malloc0", 8);
    assert_eq!(
        env.rpc("nbd_export_add", json!({"bdev_name": "Malloc0"}))
            .unwrap(),
        json!("Malloc0")
    );
    let uri = env.uri("Malloc0");

    let info = run(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    let v: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], json!(8u64 << 20));

    // Writes through qemu-io, read back by qemu-io and straight from the bdev.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0x5c 4M 64k",
        "-c",
        "write -P 0x11 -f 2M 4k",
        "-c",
        "flush",
        &uri,
    ]));
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0x5c 4M 64k",
        "-c",
        "read -P 0 1M 1M",
        &uri,
    ]));
    assert!(env
        .bdev_read("Malloc0", 0, 1 << 20)
        .iter()
        .all(|&b| b == 0xab));
    assert!(env
        .bdev_read("Malloc0", 4 << 20, 65536)
        .iter()
        .all(|&b| b == 0x5c));
    assert!(env
        .bdev_read("Malloc0", 2 << 20, 4096)
        .iter()
        .all(|&b| b == 0x11));

    // Write zeroes (with and without unmap) and discard.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -z 0 64k",
        "-c",
        "write -z -u 64k 64k",
        "-c",
        "discard 128k 64k",
        "-c",
        "read -P 0 0 192k",
        "-c",
        "read -P 0xab 192k 64k",
        &uri,
    ]));
    let d = env.bdev_read("Malloc0", 0, 256 * 1024);
    assert!(d[..192 * 1024].iter().all(|&b| b == 0));
    assert!(d[192 * 1024..].iter().all(|&b| b == 0xab));

    // qemu-img convert out and compare: identical to the bdev contents.
    let img = env.dir.path().join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&img));
    let data = std::fs::read(&img).unwrap();
    assert_eq!(
        &data[4 << 20..(4 << 20) + 65536],
        &env.bdev_read("Malloc0", 4 << 20, 65536)[..]
    );
    // And back in: convert a file with a pattern onto the export.
    let src = env.dir.path().join("src.raw");
    let pattern: Vec<u8> = (0..8u32 << 20).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&src, &pattern).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    assert_eq!(env.bdev_read("Malloc0", 0, 8 << 20), pattern);
    env.wait_clients("Malloc0", 0);
}

#[test]
fn libnbd_tools_list_map_copy() {
    if !have("nbdinfo") {
        eprintln!("libnbd-bin not installed: skipped");
        return;
    }
    let env = Env::new();
    env.malloc("Malloc1", 4);
    env.malloc("Malloc2", 4);
    env.rpc(
        "nbd_export_add",
        json!({"bdev_name": "Malloc1", "name": "disk1"}),
    )
    .unwrap();
    env.rpc(
        "nbd_export_add",
        json!({"bdev_name": "Malloc2", "name": "ro", "readonly": true}),
    )
    .unwrap();

    // NBD_OPT_LIST.
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &env.uri("")]));
    let v: Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk1", "ro"]);
    let ro = &v["exports"][1];
    assert_eq!(ro["is_read_only"], json!(true));
    assert_eq!(ro["export-size"], json!(4u64 << 20));
    assert_eq!(ro["block_size_minimum"], json!(512));
    assert_eq!(ro["block_size_maximum"], json!(32u64 << 20));
    assert_eq!(v["exports"][0]["can_multi_conn"], json!(true));
    assert_eq!(v["exports"][0]["can_trim"], json!(true));

    // base:allocation: the whole range is data.
    let map = run(Command::new("nbdinfo").args(["--map", &env.uri("disk1")]));
    let first: Vec<&str> = map.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(&first[..3], ["0", "4194304", "0"], "{map}");

    // nbdcopy in both directions, checked against the bdev.
    let f = env.dir.path().join("in.raw");
    let pattern: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&f, &pattern).unwrap();
    run(Command::new("nbdcopy").arg(&f).arg(env.uri("disk1")));
    assert_eq!(env.bdev_read("Malloc1", 0, 4 << 20), pattern);
    let out = env.dir.path().join("out.raw");
    run(Command::new("nbdcopy").arg(env.uri("disk1")).arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), pattern);

    // Writes to the readonly export fail.
    let st = Command::new("nbdcopy")
        .arg(&f)
        .arg(env.uri("ro"))
        .output()
        .unwrap();
    assert!(!st.status.success());
}

#[test]
fn fio_nbd_engine_verify() {
    let engines = Command::new("fio").arg("--enghelp").output().unwrap();
    if !String::from_utf8_lossy(&engines.stdout).contains("nbd") {
        eprintln!("fio has no nbd engine: skipped");
        return;
    }
    let env = Env::new();
    env.malloc("Malloc3", 16);
    env.rpc(
        "nbd_export_add",
        json!({"bdev_name": "Malloc3", "name": "fio"}),
    )
    .unwrap();
    let out = run(Command::new("fio").args([
        "--name=v",
        "--ioengine=nbd",
        &format!("--uri={}", env.uri("fio")),
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=32",
        "--size=16m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let v: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], json!(0));
    assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0);
}

// ---------------- hostile raw-socket clients ----------------

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// Connects, reads the greeting, sends client flags (fixed newstyle + no zeroes).
fn connect(env: &Env) -> UnixStream {
    let mut s = UnixStream::connect(&env.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let g = read_exact(&mut s, 18);
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Reads one option reply: (option, type, data).
fn read_opt_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let h = read_exact(s, 20);
    assert_eq!(&h[..8], &proto::REPLY_MAGIC.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    (opt, typ, read_exact(s, len))
}

/// NBD_OPT_GO on `name`, reading replies up to the ACK; returns the export size.
fn go(s: &mut UnixStream, name: &str) -> u64 {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_opt(s, proto::OPT_GO, &d);
    let mut size = 0;
    loop {
        let (_, t, data) = read_opt_reply(s);
        if t == proto::REP_INFO && data[..2] == [0, 0] {
            size = u64::from_be_bytes(data[2..10].try_into().unwrap());
        }
        if t == proto::REP_ACK {
            return size;
        }
        assert_eq!(t, proto::REP_INFO, "unexpected reply {t:#x}");
    }
}

fn request(s: &mut UnixStream, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let q = proto::Request {
        flags: 0,
        typ,
        cookie,
        offset,
        len,
    };
    let mut b = proto::encode_request(&q).to_vec();
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

/// Reads a simple reply: (error, cookie).
fn simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let r = read_exact(s, 16);
    assert_eq!(&r[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..].try_into().unwrap()),
    )
}

/// True once the server has closed `s` (EOF within 10 s).
fn closed_by_server(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A well-behaved client still gets served: write then read back 4 KiB.
fn still_works(env: &Env, export: &str) {
    let mut s = connect(env);
    go(&mut s, export);
    request(&mut s, proto::CMD_WRITE, 77, 8192, 4096, &[0x42; 4096]);
    assert_eq!(simple_reply(&mut s), (0, 77));
    request(&mut s, proto::CMD_READ, 78, 8192, 4096, &[]);
    assert_eq!(simple_reply(&mut s), (0, 78));
    assert_eq!(read_exact(&mut s, 4096), vec![0x42; 4096]);
    request(&mut s, proto::CMD_DISC, 79, 0, 0, &[]);
    assert!(closed_by_server(&mut s));
}

#[test]
fn hostile_clients() {
    let env = Env::new();
    env.malloc("Malloc4", 1);
    env.rpc(
        "nbd_export_add",
        json!({"bdev_name": "Malloc4", "name": "h"}),
    )
    .unwrap();
    let size = 1u64 << 20;

    // Bad option magic: closed.
    let mut s = connect(&env);
    s.write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0").unwrap();
    assert!(closed_by_server(&mut s));
    still_works(&env, "h");

    // Unknown option: ERR_UNSUP, and the connection goes on.
    let mut s = connect(&env);
    send_opt(&mut s, 0x4242, b"junk");
    assert_eq!(
        read_opt_reply(&mut s),
        (0x4242, proto::REP_ERR_UNSUP, vec![])
    );
    // Unknown export: ERR_UNKNOWN; malformed GO: ERR_INVALID.
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"nope\0\0");
    send_opt(&mut s, proto::OPT_GO, &d);
    assert_eq!(read_opt_reply(&mut s).1, proto::REP_ERR_UNKNOWN);
    send_opt(&mut s, proto::OPT_GO, &[0, 0, 0, 200, 1]);
    assert_eq!(read_opt_reply(&mut s).1, proto::REP_ERR_INVALID);
    // SET_META_CONTEXT before STRUCTURED_REPLY: invalid.
    send_opt(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &[0, 0, 0, 0, 0, 0, 0, 0],
    );
    assert_eq!(read_opt_reply(&mut s).1, proto::REP_ERR_INVALID);
    assert_eq!(go(&mut s, "h"), size);

    // Out of range: read → EINVAL, write → ENOSPC (payload skipped, stream in sync).
    request(&mut s, proto::CMD_READ, 1, size - 512, 1024, &[]);
    assert_eq!(simple_reply(&mut s), (proto::EINVAL, 1));
    request(&mut s, proto::CMD_WRITE, 2, size, 512, &[7; 512]);
    assert_eq!(simple_reply(&mut s), (proto::ENOSPC, 2));
    request(&mut s, proto::CMD_READ, 3, u64::MAX - 100, 512, &[]);
    assert_eq!(simple_reply(&mut s), (proto::EINVAL, 3));
    // Over the 32 MiB maximum: EINVAL (the write payload is skipped).
    request(&mut s, proto::CMD_READ, 4, 0, 64 << 20, &[]);
    assert_eq!(simple_reply(&mut s), (proto::EINVAL, 4));
    let big = vec![0u8; (32 << 20) + 512];
    request(&mut s, proto::CMD_WRITE, 5, 0, big.len() as u32, &big);
    assert_eq!(simple_reply(&mut s), (proto::EINVAL, 5));
    // Unaligned, unknown command, unknown flag: EINVAL.
    request(&mut s, proto::CMD_READ, 6, 100, 512, &[]);
    assert_eq!(simple_reply(&mut s), (proto::EINVAL, 6));
    request(&mut s, 99, 7, 0, 0, &[]);
    assert_eq!(simple_reply(&mut s), (proto::EINVAL, 7));
    // BLOCK_STATUS without structured replies: EINVAL.
    request(&mut s, proto::CMD_BLOCK_STATUS, 8, 0, 4096, &[]);
    assert_eq!(simple_reply(&mut s), (proto::EINVAL, 8));
    // The connection still serves.
    request(&mut s, proto::CMD_FLUSH, 9, 0, 0, &[]);
    assert_eq!(simple_reply(&mut s), (0, 9));
    // Bad request magic: closed.
    s.write_all(&[0u8; 28]).unwrap();
    assert!(closed_by_server(&mut s));
    still_works(&env, "h");

    // Oversized option: ERR_TOO_BIG then closed.
    let mut s = connect(&env);
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    b.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&b).unwrap();
    assert_eq!(read_opt_reply(&mut s).1, proto::REP_ERR_TOO_BIG);
    assert!(closed_by_server(&mut s));

    // Truncated request header then hang-up; truncated write payload then hang-up.
    let mut s = connect(&env);
    go(&mut s, "h");
    s.write_all(
        &proto::encode_request(&proto::Request {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: 1,
            offset: 0,
            len: 512,
        })[..10],
    )
    .unwrap();
    drop(s);
    let mut s = connect(&env);
    go(&mut s, "h");
    request(&mut s, proto::CMD_WRITE, 1, 0, 65536, &[1; 1000]);
    drop(s);

    // Abrupt disconnect with many writes in flight and replies unread.
    let mut s = connect(&env);
    go(&mut s, "h");
    let mut burst = Vec::new();
    for i in 0..200u64 {
        burst.extend_from_slice(&proto::encode_request(&proto::Request {
            flags: proto::CMD_FLAG_FUA,
            typ: proto::CMD_WRITE,
            cookie: i,
            offset: (i % 16) * 65536,
            len: 65536,
        }));
        burst.extend_from_slice(&[i as u8; 65536]);
    }
    let writer = std::thread::spawn(move || {
        let _ = s.write_all(&burst);
        drop(s);
    });
    writer.join().unwrap();
    env.wait_clients("h", 0);
    still_works(&env, "h");

    // Nothing leaked: every connection is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.app.nbd.connections() != 0 {
        assert!(Instant::now() < deadline, "connections left behind");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn structured_replies_and_meta_context() {
    let env = Env::new();
    env.malloc("Malloc5", 1);
    env.rpc(
        "nbd_export_add",
        json!({"bdev_name": "Malloc5", "name": "s"}),
    )
    .unwrap();
    let mut s = connect(&env);
    send_opt(&mut s, proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(read_opt_reply(&mut s).1, proto::REP_ACK);
    let mut d = 1u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"s");
    d.extend_from_slice(&2u32.to_be_bytes());
    for q in ["base:allocation", "qemu:other"] {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    send_opt(&mut s, proto::OPT_SET_META_CONTEXT, &d);
    let (_, t, data) = read_opt_reply(&mut s);
    assert_eq!(t, proto::REP_META_CONTEXT);
    assert_eq!(&data[..4], &[0, 0, 0, 1]);
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(read_opt_reply(&mut s).1, proto::REP_ACK);
    go(&mut s, "s");

    request(&mut s, proto::CMD_WRITE, 1, 512, 512, &[9; 512]);
    let c = read_exact(&mut s, 20);
    assert_eq!(&c[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&c[4..8], &[0, 1, 0, 0]); // DONE, NONE
    request(&mut s, proto::CMD_READ, 2, 512, 512, &[]);
    let c = read_exact(&mut s, 20);
    assert_eq!(&c[4..8], &[0, 1, 0, 1]); // DONE, OFFSET_DATA
    assert_eq!(&c[16..20], &520u32.to_be_bytes());
    assert_eq!(read_exact(&mut s, 8), 512u64.to_be_bytes());
    assert_eq!(read_exact(&mut s, 512), vec![9; 512]);
    request(&mut s, proto::CMD_READ, 3, 1 << 20, 512, &[]);
    let c = read_exact(&mut s, 20);
    assert_eq!(&c[4..8], &[0, 1, 0x80, 1]); // DONE, ERROR
    assert_eq!(read_exact(&mut s, 6), [0, 0, 0, 22, 0, 0]);
    request(&mut s, proto::CMD_BLOCK_STATUS, 4, 0, 65536, &[]);
    let c = read_exact(&mut s, 20);
    assert_eq!(&c[4..8], &[0, 1, 0, 5]);
    assert_eq!(read_exact(&mut s, 12), [0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn export_management_rpcs() {
    let env = Env::new();
    env.malloc("Malloc6", 1);
    env.rpc(
        "nbd_export_add",
        json!({"bdev_name": "Malloc6", "name": "a"}),
    )
    .unwrap();
    // One export per bdev; the bdev is claimed.
    let e = env
        .rpc(
            "nbd_export_add",
            json!({"bdev_name": "Malloc6", "name": "b"}),
        )
        .unwrap_err();
    assert_eq!(e.code, -libc::EBUSY);
    assert!(e.message.contains("nbd export a"), "{}", e.message);
    let e = env
        .rpc("bdev_malloc_delete", json!({"name": "Malloc6"}))
        .unwrap_err();
    assert!(e.message.contains("nbd export a"), "{}", e.message);
    let e = env
        .rpc("nbd_export_add", json!({"bdev_name": "Nope"}))
        .unwrap_err();
    assert_eq!(e.code, -libc::ENODEV);

    // Busy while a client is attached; force disconnects it.
    let mut s = connect(&env);
    go(&mut s, "a");
    env.wait_clients("a", 1);
    let e = env
        .rpc("nbd_export_remove", json!({"name": "a"}))
        .unwrap_err();
    assert_eq!(e.code, -libc::EBUSY);
    assert_eq!(
        env.rpc("nbd_export_remove", json!({"name": "a", "force": true}))
            .unwrap(),
        json!(true)
    );
    assert!(closed_by_server(&mut s));
    assert_eq!(env.rpc("nbd_get_exports", json!({})).unwrap(), json!([]));
    env.rpc("bdev_malloc_delete", json!({"name": "Malloc6"}))
        .unwrap();

    // Kernel attach on a machine without the nbd driver: a clear -19.
    env.malloc("Malloc7", 1);
    if !Path::new("/sys/module/nbd").exists() {
        let e = env
            .rpc("nbd_start_disk", json!({"bdev_name": "Malloc7"}))
            .unwrap_err();
        assert_eq!(e.code, -19);
        assert!(e.message.contains("modprobe nbd"), "{}", e.message);
        assert!(env.app.bdevs.get("Malloc7").unwrap().claimed_by().is_none());
    }
    assert_eq!(env.rpc("nbd_get_disks", json!({})).unwrap(), json!([]));

    // Config entries: the server and the exports.
    env.rpc(
        "nbd_export_add",
        json!({"bdev_name": "Malloc7", "readonly": true}),
    )
    .unwrap();
    let cfg = env.app.nbd.config_entries();
    assert_eq!(cfg[0].0, "nbd_server_start");
    assert_eq!(cfg[0].1["unix_path"], json!(env.sock.display().to_string()));
    assert_eq!(
        cfg[1],
        (
            "nbd_export_add",
            json!({"bdev_name": "Malloc7", "name": "Malloc7", "readonly": true})
        )
    );

    // Server stop disconnects clients and removes the socket; a second stop is -19.
    let mut s = connect(&env);
    go(&mut s, "Malloc7");
    env.rpc("nbd_server_stop", json!({})).unwrap();
    assert!(closed_by_server(&mut s));
    assert!(!env.sock.exists());
    assert_eq!(env.rpc("nbd_server_stop", json!({})).unwrap_err().code, -19);
    // TCP on a bare port binds loopback.
    env.rpc("nbd_server_start", json!({"tcp_addr": "0"}))
        .unwrap();
    let cfg = env.app.nbd.config_entries();
    assert_eq!(cfg[0].1["tcp_addr"], json!("0"));
}
