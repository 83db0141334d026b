//! Hostile peers of the RPC socket and the NBD server hurt only themselves (issue 18):
//! half-sent RPC requests cannot lock other clients out, one NBD client cannot make the
//! daemon allocate without bound, and connections beyond the NBD limit are refused while
//! the others keep being served with verified data. Memory and fds are measured on a real
//! daemon process (/proc/PID/status VmRSS, /proc/PID/fd).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd::nbd::proto;
use common::Daemon;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// The daemon's resident memory in bytes (proc(5) VmRSS).
fn rss(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// The daemon's open fds.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// True once the peer closed `s` (EOF or reset before `s`'s read timeout).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// More half-sent requests than the server has connection slots, then a normal call: it is
/// served at once (idle connections give up their slots), and every half-sent connection
/// is closed within the partial-request timeout, returning its fd.
#[test]
fn half_sent_rpc_requests_do_not_lock_clients_out() {
    let d = Daemon::start();
    let pid = d.pid();
    let before = fds(pid);
    let n = blockd::rpc::server::MAX_CONNECTIONS + 6;
    let mut held: Vec<UnixStream> = (0..n)
        .map(|_| {
            let mut s = d.raw();
            s.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"spdk_get_ver"#)
                .unwrap();
            s
        })
        .collect();
    // An idle client that completed a request holds a connection too.
    let mut idle = d.raw();
    idle.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"}"#)
        .unwrap();
    let mut b = [0u8; 4096];
    assert!(idle.read(&mut b).unwrap() > 0);
    let t0 = Instant::now();
    assert!(d.rpc("spdk_get_version", json!(null)).is_ok());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a normal call waited {:?}",
        t0.elapsed()
    );
    let bound = blockd::rpc::server::PARTIAL_REQUEST_TIMEOUT + Duration::from_secs(5);
    for (i, s) in held.iter_mut().enumerate() {
        let left = bound
            .saturating_sub(t0.elapsed())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        assert!(
            closed(s),
            "half-sent connection {i} still open after {bound:?}"
        );
    }
    drop(held);
    drop(idle);
    // The daemon's fds come back (connection threads end as their sockets close).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds(pid) > before + 1 {
        assert!(
            Instant::now() < deadline,
            "fds: {} before, {} after",
            before,
            fds(pid)
        );
        std::thread::yield_now();
    }
    assert!(d.log().contains("request incomplete after"), "{}", d.log());
    assert!(d.rpc("spdk_get_version", json!(null)).is_ok());
}

// ---------------- NBD ----------------

struct Nbd {
    s: UnixStream,
}

impl Nbd {
    /// Connects and reads the greeting; None when the server closed without one.
    fn greet(sock: &Path) -> Option<UnixStream> {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        match s.read_exact(&mut g) {
            Ok(()) => {
                assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
                Some(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("greeting: {e}"),
        }
    }

    /// Greeting, fixed newstyle, NBD_OPT_GO on `export`.
    fn open(sock: &Path, export: &str) -> Nbd {
        Self::go(Self::greet(sock).expect("greeting"), export)
    }

    /// Fixed newstyle and NBD_OPT_GO on `export`, after the greeting.
    fn go(mut s: UnixStream, export: &str) -> Nbd {
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut o = b"IHAVEOPT".to_vec();
        o.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        o.extend_from_slice(&(d.len() as u32).to_be_bytes());
        o.extend_from_slice(&d);
        s.write_all(&o).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            assert_eq!(&h[..8], &proto::REPLY_MAGIC.to_be_bytes());
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).unwrap();
            if typ == proto::REP_ACK {
                return Nbd { s };
            }
            assert_eq!(typ, proto::REP_INFO, "unexpected option reply {typ:#x}");
        }
    }

    fn request(&mut self, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let q = proto::Request {
            flags: 0,
            typ,
            cookie,
            offset,
            len,
        };
        let mut b = proto::encode_request(&q).to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply's (error, cookie), then `data` bytes of read data into `data`.
    fn reply(&mut self, data: &mut [u8]) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).unwrap();
        assert_eq!(&r[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(r[4..8].try_into().unwrap());
        if err == 0 {
            self.s.read_exact(data).unwrap();
        }
        (err, u64::from_be_bytes(r[8..].try_into().unwrap()))
    }

    /// Writes `buf` at `offset` and reads it back.
    fn write_verify(&mut self, offset: u64, buf: &[u8]) {
        self.request(proto::CMD_WRITE, 1, offset, buf.len() as u32, buf);
        assert_eq!(self.reply(&mut []), (0, 1));
        self.request(proto::CMD_READ, 2, offset, buf.len() as u32, &[]);
        let mut back = vec![0u8; buf.len()];
        assert_eq!(self.reply(&mut back), (0, 2));
        assert!(back == buf, "read back differs");
    }
}

fn nbd_daemon() -> (Daemon, PathBuf) {
    let d = Daemon::start();
    let sock = d.tmp_dir().join("nbd.sock");
    d.rpc_ok("nbd_server_start", json!({"unix_path": sock}));
    for (name, mib) in [("Big", 32), ("Small", 1)] {
        d.rpc_ok(
            "bdev_malloc_create",
            json!({"name": name, "num_blocks": mib * 2048, "block_size": 512}),
        );
        d.rpc_ok("nbd_export_add", json!({"bdev_name": name, "name": name}));
    }
    (d, sock)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
        .collect()
}

/// One client queues 128 reads of 32 MiB (4 GiB) without reading replies: the daemon's
/// RSS stays within a bound (it stops reading the client's requests while it holds
/// `MAX_IN_FLIGHT_BYTES`), another client is served meanwhile, and the hog gets every
/// reply, with the right data, once it reads.
#[test]
fn nbd_bytes_in_flight_are_capped() {
    let (d, sock) = nbd_daemon();
    let pid = d.pid();
    const LEN: usize = 32 << 20;
    const N: u64 = 128;
    let data = pattern(LEN, 9);
    let mut hog = Nbd::open(&sock, "Big");
    for (i, chunk) in data.chunks(4 << 20).enumerate() {
        hog.request(
            proto::CMD_WRITE,
            100 + i as u64,
            (i * (4 << 20)) as u64,
            chunk.len() as u32,
            chunk,
        );
        assert_eq!(hog.reply(&mut []), (0, 100 + i as u64));
    }
    let base = rss(pid);
    let peak = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    for i in 0..N {
        hog.request(proto::CMD_READ, i, 0, LEN as u32, &[]);
    }
    // While the hog does not read, another client is served.
    let mut other = Nbd::open(&sock, "Small");
    other.write_verify(4096, &pattern(65536, 3));
    let mut back = vec![0u8; LEN];
    for i in 0..N {
        back.fill(0);
        assert_eq!(hog.reply(&mut back), (0, i));
        assert!(back == data, "read {i} returned wrong data");
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let grew = peak.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!("RSS grew by {} MiB serving {N} x 32 MiB reads", grew / MIB);
    assert!(
        grew < 320 * MIB,
        "RSS grew by {} MiB for one client",
        grew / MIB
    );
    other.write_verify(8192, &pattern(4096, 4));
}

/// Connections beyond the server's limit are closed before the greeting (and logged);
/// those within keep being served; once one closes, a new client is served again.
#[test]
fn nbd_connections_are_capped() {
    let (d, sock) = nbd_daemon();
    let max = blockd::nbd::server::MAX_CONNECTIONS;
    let mut first = Nbd::open(&sock, "Small");
    let mut conns: Vec<UnixStream> = (1..max)
        .map(|i| Nbd::greet(&sock).unwrap_or_else(|| panic!("connection {i} refused")))
        .collect();
    assert!(
        Nbd::greet(&sock).is_none(),
        "connection {} was served",
        max + 1
    );
    assert!(d.log().contains("connections are open"), "{}", d.log());
    first.write_verify(0, &pattern(65536, 5));
    // A connection that goes away frees its slot (its poller ends asynchronously).
    drop(conns.pop());
    let mut again = Nbd::go(greet_within(&sock, Duration::from_secs(20)), "Small");
    again.write_verify(65536, &pattern(4096, 6));
    assert!(Nbd::greet(&sock).is_none(), "the limit holds again");
    drop(conns);
    first.write_verify(0, &pattern(4096, 7));
}

/// A greeting from a server at its limit, retried until a slot frees or `bound` passes.
fn greet_within(sock: &Path, bound: Duration) -> UnixStream {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(s) = Nbd::greet(sock) {
            return s;
        }
        assert!(Instant::now() < deadline, "no slot freed within {bound:?}");
        std::thread::yield_now();
    }
}
