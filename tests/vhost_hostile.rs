//! A hostile vhost-user frontend: malformed and out-of-range protocol messages on a
//! controller's socket never take blockd down; the controller serves the next frontend and
//! other controllers keep serving meanwhile (vhost-user.rst message framing).

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::blk_client::{pattern, BlkClient};
use common::Daemon;
use serde_json::json;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const VERSION: u32 = 0x1;

/// One vhost-user message: header (request, flags, size) and payload.
fn msg(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&VERSION.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn setup(d: &Daemon, name: &str) -> String {
    d.rpc_ok(
        "bdev_malloc_create",
        json!({"name": format!("M{name}"), "num_blocks": 8192, "block_size": 512}),
    );
    d.rpc_ok(
        "vhost_create_blk_controller",
        json!({"ctrlr": name, "dev_name": format!("M{name}")}),
    );
    d.socket_dir().join(name).to_str().unwrap().to_string()
}

/// The controller answers a real client with correct data.
fn serves(sock: &str, seed: u8) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        // The previous (hostile) frontend may still be being torn down.
        match BlkClient::connect(sock, 1, 1 << 20) {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < deadline, "controller unusable: {e}"),
        }
        std::thread::yield_now();
    };
    pattern(&mut c.buf()[..65536], 4096, seed);
    assert_eq!(c.write(0, 4096, 65536), 0);
    c.buf()[..65536].fill(0);
    assert_eq!(c.read(0, 4096, 65536), 0);
    let mut want = vec![0u8; 65536];
    pattern(&mut want, 4096, seed);
    assert!(c.buf()[..65536] == want[..]);
}

/// Sends `bytes`, then reads whatever comes back until the daemon closes or goes quiet.
fn send(sock: &str, bytes: &[u8]) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[test]
fn hostile_frontends_do_not_hurt_the_daemon() {
    let d = Daemon::start_with(&["-m", "0x1"]);
    let victim = setup(&d, "vhost.0");
    let bystander = setup(&d, "vhost.1");

    let hostile: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"\xff\xff\xff\xff this is not vhost-user at all".to_vec(),
        ),
        ("truncated header", vec![1, 0, 0]),
        ("huge size", {
            let mut m = Vec::new();
            m.extend_from_slice(&1u32.to_le_bytes());
            m.extend_from_slice(&VERSION.to_le_bytes());
            m.extend_from_slice(&u32::MAX.to_le_bytes());
            m
        }),
        ("unknown request", msg(9999, &[])),
        ("bad version", {
            let mut m = msg(1, &[]);
            m[4] = 0x7;
            m
        }),
        (
            "rings before memory",
            [
                msg(3, &[]),                                             // SET_OWNER
                msg(8, &u32s(&[999, 256])), // SET_VRING_NUM out of range
                msg(8, &u32s(&[0, 0])),     // SET_VRING_NUM 0
                msg(8, &u32s(&[0, 3])),     // not a power of two
                msg(9, &[0u8; 40]),         // SET_VRING_ADDR, no memory
                msg(10, &u32s(&[0, 7])),    // SET_VRING_BASE
                msg(11, &u32s(&[0, 0])),    // GET_VRING_BASE, not running
                msg(24, &u32s(&[1000, 4096, 0])), // GET_CONFIG out of range
                msg(25, &[u32s(&[0, 4, 0]), vec![1, 2, 3, 4]].concat()), // SET_CONFIG bad offset
                msg(18, &u32s(&[77, 1])),   // SET_VRING_ENABLE, unknown ring
                msg(37, &[0u8; 40]),        // REM_MEM_REG unknown
            ]
            .concat(),
        ),
    ];
    for (what, bytes) in hostile {
        send(&victim, &bytes);
        // The daemon is alive, the bystander serves, the victim serves the next frontend.
        assert!(
            d.rpc("spdk_get_version", json!(null)).is_ok(),
            "daemon died after {what}:\n{}",
            d.log()
        );
        serves(&bystander, 1);
        serves(&victim, 2);
    }
}

// ---------------- a raw frontend with memory (memfds passed with SCM_RIGHTS) ----------------

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const ADD_MEM_REG: u32 = 37;
const NEED_REPLY: u32 = 0x8;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;
const PF_REPLY_ACK: u64 = 1 << 3;
const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

/// A vhost-user frontend speaking raw messages, with REPLY_ACK negotiated so that every
/// refusal can be seen.
struct RawFrontend {
    s: UnixStream,
}

impl RawFrontend {
    fn connect(sock: &str) -> RawFrontend {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut f = RawFrontend { s };
        let features = f.get_u64(GET_FEATURES);
        f.send(
            SET_FEATURES,
            0,
            &(features & (F_PROTOCOL_FEATURES | F_VERSION_1)).to_le_bytes(),
            &[],
        );
        let pf = f.get_u64(GET_PROTOCOL_FEATURES);
        assert!(pf & PF_REPLY_ACK != 0 && pf & PF_CONFIGURE_MEM_SLOTS != 0);
        f.send(
            SET_PROTOCOL_FEATURES,
            0,
            &(PF_REPLY_ACK | PF_CONFIGURE_MEM_SLOTS).to_le_bytes(),
            &[],
        );
        assert_eq!(f.call(SET_OWNER, &[], &[]), 0);
        f
    }

    fn send(&mut self, req: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
        let mut m = msg(req, payload);
        m[4..8].copy_from_slice(&(VERSION | flags).to_le_bytes());
        if fds.is_empty() {
            self.s.write_all(&m).unwrap();
        } else {
            let n = self.s.send_with_fds(&[&m[..]], fds).unwrap();
            assert_eq!(n, m.len());
        }
    }

    fn reply(&mut self) -> Vec<u8> {
        let mut h = [0u8; 12];
        self.s.read_exact(&mut h).expect("a reply");
        let size = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        let mut b = vec![0u8; size];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn get_u64(&mut self, req: u32) -> u64 {
        self.send(req, 0, &[], &[]);
        u64::from_le_bytes(self.reply()[..8].try_into().unwrap())
    }

    /// Sends with NEED_REPLY; returns the acknowledgement (0: success).
    fn call(&mut self, req: u32, payload: &[u8], fds: &[RawFd]) -> u64 {
        self.send(req, NEED_REPLY, payload, fds);
        u64::from_le_bytes(self.reply()[..8].try_into().unwrap())
    }
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A memfd of `len` bytes.
fn memfd(len: u64) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is new and ours.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a valid descriptor nobody else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

const FRONTEND_VA: u64 = 0x7f00_0000_0000;

/// Sets ring 0 up at guest addresses `desc`, `avail`, `used` (frontend addresses
/// `FRONTEND_VA + gpa`), enables it and kicks it. Returns the acknowledgements.
fn start_ring(f: &mut RawFrontend, desc: u64, avail: u64, used: u64) -> Vec<u64> {
    let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let mut acks = vec![
        f.call(SET_VRING_NUM, &u32s(&[0, 256]), &[]),
        f.call(
            SET_VRING_ADDR,
            &[
                u32s(&[0, 0]),
                u64s(&[
                    FRONTEND_VA + desc,
                    FRONTEND_VA + used,
                    FRONTEND_VA + avail,
                    0,
                ]),
            ]
            .concat(),
            &[],
        ),
        f.call(SET_VRING_BASE, &u32s(&[0, 0]), &[]),
    ];
    acks.push(f.call(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_raw_fd()]));
    acks.push(f.call(SET_VRING_ENABLE, &u32s(&[0, 1]), &[]));
    kick.write(1).unwrap();
    acks
}

/// Writes a split ring into `mem` at `desc`/`avail` (virtio 1.2 §2.7): one virtio-blk read
/// of 4 KiB whose header sits at 0x3000 and whose data buffer is at `data`.
fn write_blk_read(mem: &std::fs::File, desc: u64, avail: u64, data: u64) {
    use std::os::unix::fs::FileExt;
    let d = |addr: u64, len: u32, flags: u16, next: u16| {
        [
            addr.to_le_bytes().to_vec(),
            len.to_le_bytes().to_vec(),
            flags.to_le_bytes().to_vec(),
            next.to_le_bytes().to_vec(),
        ]
        .concat()
    };
    let table = [
        d(0x3000, 16, 1, 1),     // header, NEXT
        d(data, 4096, 1 | 2, 2), // data, NEXT | WRITE
        d(0x3010, 1, 2, 0),      // status, WRITE
    ]
    .concat();
    mem.write_all_at(&table, desc).unwrap();
    // virtio_blk_outhdr: type 0 (IN), reserved, sector 0.
    mem.write_all_at(&[0u8; 16], 0x3000).unwrap();
    // avail: flags 0, idx 1, ring[0] = 0.
    mem.write_all_at(&[0, 0, 1, 0, 0, 0], avail).unwrap();
}

/// A frontend declares a region larger than the memfd behind it (64 KiB sent as 1 MiB),
/// then puts its rings, or a request's buffer, past the memfd's end: touching it would
/// raise SIGBUS in the daemon. The region is refused (vhost-user REPLY_ACK non-zero), the
/// daemon stays up, the bystander keeps serving and the victim serves the next frontend.
#[test]
fn memory_region_larger_than_its_fd_is_refused() {
    let d = Daemon::start_with(&["-m", "0x1"]);
    let victim = setup(&d, "vhost.0");
    let bystander = setup(&d, "vhost.1");
    let base_fds = fds(&d);
    const KIB64: u64 = 64 << 10;
    const MIB: u64 = 1 << 20;
    for (what, desc, avail, used, data) in [
        ("rings past the end", 0x80000, 0x90000, 0xa0000, 0x1000),
        ("buffer past the end", 0x4000, 0x5000, 0x6000, 0x80000),
    ] {
        for add_mem_reg in [false, true] {
            let mem = memfd(KIB64);
            write_blk_read(
                &mem,
                desc.min(KIB64 - 0x1000),
                avail.min(KIB64 - 0x1000),
                data,
            );
            let mut f = RawFrontend::connect(&victim);
            // gpa 0, size 1 MiB, frontend address, mmap offset 0.
            let region = u64s(&[0, MIB, FRONTEND_VA, 0]);
            let ack = if add_mem_reg {
                f.call(
                    ADD_MEM_REG,
                    &[0u64.to_le_bytes().to_vec(), region].concat(),
                    &[mem.as_raw_fd()],
                )
            } else {
                f.call(
                    SET_MEM_TABLE,
                    &[u32s(&[1, 0]), region].concat(),
                    &[mem.as_raw_fd()],
                )
            };
            assert_ne!(
                ack, 0,
                "{what}: a 1 MiB region on a 64 KiB memfd was accepted"
            );
            let acks = start_ring(&mut f, desc, avail, used);
            assert!(
                acks.iter().any(|a| *a != 0),
                "{what}: a ring without guest memory was started"
            );
            // A region that fits its fd is accepted on the same connection.
            let fits = u64s(&[0, KIB64, FRONTEND_VA, 0]);
            assert_eq!(
                f.call(
                    SET_MEM_TABLE,
                    &[u32s(&[1, 0]), fits].concat(),
                    &[mem.as_raw_fd()]
                ),
                0,
                "{what}"
            );
            drop(f);
            assert!(
                d.rpc("spdk_get_version", json!(null)).is_ok(),
                "daemon died after {what}:\n{}",
                d.log()
            );
            serves(&bystander, 3);
            serves(&victim, 4);
        }
    }
    // An offset past the fd's end, and an fd that is not a file, are refused too.
    let mem = memfd(KIB64);
    let mut f = RawFrontend::connect(&victim);
    let far = u64s(&[0, KIB64, FRONTEND_VA, 1 << 40]);
    assert_ne!(
        f.call(
            SET_MEM_TABLE,
            &[u32s(&[1, 0]), far].concat(),
            &[mem.as_raw_fd()]
        ),
        0
    );
    let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
    let region = u64s(&[0, KIB64, FRONTEND_VA, 0]);
    assert_ne!(
        f.call(
            SET_MEM_TABLE,
            &[u32s(&[1, 0]), region].concat(),
            &[pipe_r.as_raw_fd()]
        ),
        0
    );
    drop(f);
    serves(&bystander, 5);
    assert!(d.log().contains("does not fit in its fd"), "{}", d.log());
    fds_return_to(&d, base_fds);
}

/// The daemon's open fds.
fn fds(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count()
}

/// Waits (bounded) until the daemon holds no more fds than `base`: closed frontends
/// leave nothing behind (their teardown is asynchronous).
fn fds_return_to(d: &Daemon, base: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while fds(d) > base {
        assert!(
            Instant::now() < deadline,
            "fds: {base} before, {} after",
            fds(d)
        );
        std::thread::yield_now();
    }
}

/// Runs `f` on a thread; panics if it does not finish within `bound` (a blocked control
/// plane would otherwise hang the test).
fn within(bound: Duration, what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(bound) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} took over {bound:?}"),
        Err(e) => panic!("{what} failed: {e}"),
    }
}

/// Frontends that send a message header and never its body (or only part of it), or only
/// part of a header, do not block the one control thread: another controller connects,
/// negotiates and serves I/O meanwhile, and the stalled frontends are disconnected.
#[test]
fn a_stalled_frontend_does_not_block_the_control_plane() {
    let d = Daemon::start_with(&["-m", "0x1"]);
    let victim = setup(&d, "vhost.0");
    let victim2 = setup(&d, "vhost.2");
    let victim3 = setup(&d, "vhost.3");
    let bystander = setup(&d, "vhost.1");
    // 5 bytes of a header (found by the fuzz target vhost_session: the vhost crate retried
    // the timed-out read forever).
    let mut half_header = UnixStream::connect(&victim3).unwrap();
    half_header.write_all(&msg(SET_FEATURES, &[])[..5]).unwrap();
    // SET_FEATURES announcing 8 bytes, none sent.
    let mut stalled = UnixStream::connect(&victim).unwrap();
    stalled.write_all(&msg(SET_FEATURES, &[])[..8]).unwrap();
    stalled.write_all(&8u32.to_le_bytes()).unwrap();
    // SET_VRING_ADDR announcing 40 bytes, 12 sent.
    let mut partial = UnixStream::connect(&victim2).unwrap();
    let mut m = msg(SET_VRING_ADDR, &[0u8; 40]);
    m.truncate(12 + 12);
    partial.write_all(&m).unwrap();
    let t0 = Instant::now();
    within(Duration::from_secs(15), "serving a bystander", move || {
        serves(&bystander, 6)
    });
    assert_alive(&d);
    for (what, s) in [
        ("header only", &mut stalled),
        ("partial body", &mut partial),
        ("partial header", &mut half_header),
    ] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            r => panic!("{what}: the stalled frontend was not disconnected: {r:?}"),
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(15));
    // Both controllers serve the next frontend.
    serves(&victim, 7);
    serves(&victim2, 8);
    serves(&victim3, 9);
    assert!(d.rpc("spdk_get_version", json!(null)).is_ok());
}

/// The daemon is alive (its log is available for failures).
fn assert_alive(d: &Daemon) {
    assert!(
        d.rpc("spdk_get_version", json!(null)).is_ok(),
        "daemon died:\n{}",
        d.log()
    );
}

/// A frontend that shrinks its memfd after the daemon mapped it (ftruncate), then has the
/// device touch the lost part (a request's buffer on a reactor, or the rings on the
/// control thread): the SIGBUS is contained. The daemon stays up, closes that frontend's
/// connection, the bystander keeps serving and the victim serves the next frontend.
#[test]
fn a_frontend_that_shrinks_its_memory_is_disconnected() {
    let d = Daemon::start_with(&["-m", "0x1"]);
    let victim = setup(&d, "vhost.0");
    let bystander = setup(&d, "vhost.1");
    let base_fds = fds(&d);
    const KIB64: u64 = 64 << 10;
    const MIB: u64 = 1 << 20;
    for (what, desc, avail, used, data) in [
        ("buffer lost", 0x4000, 0x5000, 0x6000, 0x80000),
        ("rings lost", 0x80000, 0x90000, 0xa0000, 0x1000),
    ] {
        let mem = memfd(MIB);
        write_blk_read(&mem, desc, avail, data);
        let mut f = RawFrontend::connect(&victim);
        let region = u64s(&[0, MIB, FRONTEND_VA, 0]);
        assert_eq!(
            f.call(
                SET_MEM_TABLE,
                &[u32s(&[1, 0]), region].concat(),
                &[mem.as_raw_fd()]
            ),
            0,
            "{what}: a region that fits its fd"
        );
        mem.set_len(KIB64).unwrap();
        // The ring runs on what the device can still read; its acknowledgements do not
        // matter (the connection may already be closing).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            start_ring(&mut f, desc, avail, used)
        }));
        f.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 256];
        loop {
            match f.s.read(&mut b) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!(
                    "{what}: the frontend was not disconnected: {e}\n{}",
                    d.log()
                ),
            }
        }
        assert_alive(&d);
        assert!(
            d.log().contains("shrank guest memory"),
            "{what}:\n{}",
            d.log()
        );
        serves(&bystander, 9);
        serves(&victim, 10);
    }
    fds_return_to(&d, base_fds);
}
