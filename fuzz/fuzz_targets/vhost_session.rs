//! One vhost-user session of a real vhost-user-blk controller (a 1 MiB malloc bdev, rings on
//! a running reactor), driven by a hostile frontend: the fuzz input is a list of operations,
//! each sending one vhost-user message (vhost-user.rst framing: u32 request, u32 flags, u32
//! size, body, fds by SCM_RIGHTS) over a socketpair to `blockd::vhost::fuzz_api::FuzzSession`
//! (the real `Session` behind the vendored vhost crate's request handler), or acting as the
//! frontend's guest: writing descriptors, requests and avail entries into the memfds it
//! shared, kicking rings, shrinking a memfd under its mapping, hanging up.
//!
//! Checks: no panic (on this thread or a reactor), no SIGBUS/SIGSEGV (a fault in guest memory
//! must be caught by blockd's guard, `src/vhost/guest_fault.rs`, which marks the session
//! broken: the harness then closes it as the control thread does), every message handled and
//! every session torn down within a deadline (a watchdog aborts an input that runs for more
//! than 30 s), and the fds the session held are released after each input.
//!
//! Input: operations until the input ends; each starts with a byte `b`: operation
//! `(b & 0x1f) % 20`, bit 7 sets NEED_REPLY in the message's flags, bits 5-6 attach that
//! many extra memfds to the message (wrong fd counts). Numbers are little-endian; a missing
//! byte ends the input. Guest addresses (gpa) are those of the memory table the harness
//! sent; the frontend's virtual address of gpa `g` is `UADDR + g` (+ a region's skew).
//!
//! ```text
//!  0 raw        u8 request, le16 header size, u8 n, n body bytes (size != n: bad framing)
//!  1 features   u8 mode, le64 x: SET_FEATURES of (mode&1 ? x : offered & !x)
//!  2 protocol   u8 mode, le64 x: SET_PROTOCOL_FEATURES, same
//!  3 simple     u8 sel: SET_OWNER RESET_OWNER GET_FEATURES GET_PROTOCOL_FEATURES
//!               GET_QUEUE_NUM GET_MAX_MEM_SLOTS RESET_DEVICE GET_SHMEM_CONFIG (sel % 8)
//!  4 mem table  u8 n (n % 16; > 8 is invalid), n region records
//!  5 add region one region record (ADD_MEM_REG)
//!  6 rem region one region record (REM_MEM_REG, no fd)
//!  7 vring u32  u8 sel (NUM BASE ENABLE GET_BASE), u8 index, le16 num
//!  8 vring addr u8 index, u8 flags, le32 desc gpa, le32 avail gpa, le32 used gpa
//!  9 vring fd   u8 sel (KICK CALL ERR), u8 index (bit 7: no fd, the NOFD flag)
//! 10 get infl.  le16 queues, le16 queue size
//! 11 set infl.  u8 mode (bit 0: the fd GET_INFLIGHT_FD returned, if any; bit 1: seal a new
//!               one), le32 mmap size, u8 offset sel, le16 queues, le16 queue size, le32 fd size
//! 12 get config u8 offset, u8 size, u8 flags
//! 13 set config u8 offset, u8 n, n bytes, u8 flags
//! 14 request    u8 ring, u8 type, le32 sector, le16 len, u8 head, le32 gpa, u8 layout: a
//!               virtio-blk chain (header at gpa, status at gpa+16, data at gpa+32) in the
//!               ring's descriptor table from `head`, then an avail entry (not kicked)
//! 15 write      u8 target (0 guest memory, 1 the in-flight fd), le32 addr, u8 n, n bytes
//! 16 kick       u8 ring: signal its kick eventfd, wait (bounded) until the used index
//!               catches up with what the harness made available
//! 17 resize fd  u8 memfd, le32 size / 256 (ftruncate: shrink under a mapping)
//! 18 truncated  u8 k: the first k % 12 bytes of a header; bit 7: hang up, else stay silent
//! 19 reconnect  close the session, open a new one (memfds and the in-flight fd survive)
//!
//! region record (16 bytes): le32 gpa / 4096, le32 size / 256, le32 fd size / 256 (for a
//! new memfd, at most 64 MiB), u8 offset sel (0xff: huge, else sel * 64 KiB), u8 memfd
//! (an existing one by index, or a new one), le16 user address skew (in 4 KiB pages)
//! ```
#![no_main]

use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use blockd::bdev::malloc::{self, MallocOpts};
use blockd::bdev::BdevRegistry;
use blockd::cpumask::CpuMask;
use blockd::reactor::{PollOptions, Reactors};
use blockd::vhost::blk::BlkDevice;
use blockd::vhost::device::VirtioDevice;
use blockd::vhost::fuzz_api::{FuzzSession, Step};
use blockd::vhost::ConfigNotifier;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const UADDR: u64 = 0x7f00_0000_0000;
/// The backend's read timeout (the daemon uses 2 s): a message that never completes costs
/// this much.
const READ_TIMEOUT: Duration = Duration::from_millis(20);
const MAX_OPS: usize = 200;
const MAX_SESSIONS: usize = 4;
const MAX_MEMFDS: usize = 16;
const MAX_FD_SIZE: u64 = 64 << 20;
/// How long one message or one teardown may take.
const STEP_LIMIT: Duration = Duration::from_secs(10);
const NEED_REPLY: u32 = 0x8;

struct Ctx {
    device: Arc<dyn VirtioDevice>,
    reactors: Arc<Reactors>,
    mask: CpuMask,
}

fn ctx() -> &'static Ctx {
    static C: OnceLock<Ctx> = OnceLock::new();
    C.get_or_init(|| {
        let r = BdevRegistry::default();
        let m = malloc::create(
            &r,
            MallocOpts {
                name: Some("M".into()),
                uuid: None,
                num_blocks: 2048,
                block_size: 512,
            },
        )
        .expect("malloc bdev");
        let mask = CpuMask::parse("0x1").expect("mask");
        let reactors = Reactors::start(&mask, PollOptions::default()).expect("reactors");
        std::thread::spawn(watchdog);
        Ctx {
            device: Arc::new(BlkDevice::new("fuzz", m, false, ConfigNotifier::default())),
            reactors: Arc::new(reactors),
            mask,
        }
    })
}

/// Milliseconds since the epoch at which the current input started (0: none running).
static STARTED: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A hang is a finding too: abort when one input runs for more than 30 s.
fn watchdog() {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = STARTED.load(Ordering::Relaxed);
        if s != 0 && now_ms().saturating_sub(s) > 30_000 {
            eprintln!("vhost_session: one input has run for more than 30 s: hang");
            std::process::abort();
        }
    }
}

/// `VHOST_SESSION_TRACE=1`: print what each message did (to check what a seed reaches).
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var_os("VHOST_SESSION_TRACE").is_some())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
}

fn memfd(size: u64, seal: bool) -> File {
    let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a NUL-terminated name; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size.min(MAX_FD_SIZE)).expect("memfd size");
    if seal {
        // SAFETY: fcntl on our own fd.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
    }
    f
}

fn eventfd() -> File {
    // SAFETY: eventfd(2) returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd nobody else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// A region as the harness declared it (not necessarily as the backend accepted it).
#[derive(Clone, Copy)]
struct Region {
    gpa: u64,
    size: u64,
    user_addr: u64,
    offset: u64,
    fd: usize,
}

#[derive(Clone, Copy, Default)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The avail index the harness published last.
    avail_idx: u16,
}

struct Frontend {
    memfds: Vec<File>,
    regions: Vec<Region>,
    rings: [Ring; 4],
    kicks: [Option<File>; 4],
    inflight: Option<File>,
    client: UnixStream,
    session: Option<FuzzSession>,
    sessions: usize,
    /// The harness sent a frame whose bytes do not match its header: the rest of the
    /// session is a desynchronised stream.
    closed_write: bool,
}

impl Frontend {
    fn connect(&mut self) {
        let c = ctx();
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        ours.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        theirs.set_nonblocking(true).unwrap();
        self.session = Some(FuzzSession::new(
            "fuzz",
            c.device.clone(),
            c.reactors.clone(),
            c.mask.clone(),
            ours,
        ));
        self.client = theirs;
        self.sessions += 1;
        self.closed_write = false;
        self.rings = Default::default();
        self.kicks = Default::default();
    }

    /// Closes the connection as the control thread does (`events::close`): socket first,
    /// then the session, whose rings are stopped and waited for.
    fn disconnect(&mut self) {
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(s) = self.session.take() {
            let t = Instant::now();
            drop(s);
            assert!(
                t.elapsed() < STEP_LIMIT,
                "session teardown took {:?}",
                t.elapsed()
            );
        }
    }

    fn new_memfd(&mut self, size: u64, seal: bool) -> Option<usize> {
        if self.memfds.len() >= MAX_MEMFDS {
            return None;
        }
        self.memfds.push(memfd(size, seal));
        Some(self.memfds.len() - 1)
    }

    /// Sends one message; false once the connection is unusable.
    fn send(&mut self, code: u32, flags: u32, size: u32, body: &[u8], fds: &[RawFd]) -> bool {
        let mut m = Vec::with_capacity(12 + body.len());
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&(0x1 | flags).to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(body);
        self.send_bytes(&m, fds)
    }

    fn send_bytes(&mut self, m: &[u8], fds: &[RawFd]) -> bool {
        match self.client.send_with_fds(&[m], fds) {
            Ok(n) if n == m.len() => true,
            Ok(n) => self.client.write_all(&m[n..]).is_ok(),
            Err(_) => false,
        }
    }

    /// Lets the backend handle what was sent, as the control thread does when the socket is
    /// readable; reads the replies (keeping an fd passed back, the in-flight region's).
    fn step(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let t = Instant::now();
        let r = s.handle_request();
        assert!(
            t.elapsed() < STEP_LIMIT,
            "one message took {:?}",
            t.elapsed()
        );
        if trace() {
            eprintln!("step: {r:?}, {} ring(s) running", s.running_rings());
        }
        self.drain();
        let broken = self.session.as_ref().is_some_and(|s| s.memory_broken());
        if matches!(r, Step::Fatal(_)) || broken {
            self.disconnect();
        }
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let mut fds = [-1; 4];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec points at our buffer, which may receive arbitrary bytes.
            match unsafe { self.client.recv_with_fds(&mut iov, &mut fds) } {
                Ok((0, _)) | Err(_) => return,
                Ok((_, n)) => {
                    for &fd in &fds[..n] {
                        // SAFETY: a descriptor we just received and own.
                        self.inflight = Some(unsafe { File::from_raw_fd(fd) });
                    }
                }
            }
        }
    }

    /// The memfd and offset backing `len` bytes at `gpa`, within the file as it is now.
    fn backing(&self, gpa: u64, len: u64) -> Option<(&File, u64)> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size && len <= r.size - (gpa - r.gpa))?;
        let f = &self.memfds[r.fd];
        let off = r.offset.checked_add(gpa - r.gpa)?;
        let flen = f.metadata().ok()?.len();
        (off.checked_add(len)? <= flen).then_some((f, off))
    }

    fn write_guest(&self, gpa: u64, data: &[u8]) {
        if let Some((f, off)) = self.backing(gpa, data.len() as u64) {
            let _ = f.write_all_at(data, off);
        }
    }

    fn read_u16(&self, gpa: u64) -> Option<u16> {
        let (f, off) = self.backing(gpa, 2)?;
        let mut b = [0u8; 2];
        f.read_exact_at(&mut b, off).ok()?;
        Some(u16::from_le_bytes(b))
    }

    fn region(&mut self, inp: &mut Input) -> Option<(Region, RawFd)> {
        let gpa = u64::from(inp.u32()?) << 12;
        let size = u64::from(inp.u32()?) << 8;
        let fd_size = u64::from(inp.u32()?) << 8;
        let off = inp.u8()?;
        let fd_sel = inp.u8()? as usize;
        let skew = u64::from(inp.u16()?) << 12;
        let fd = if fd_sel < self.memfds.len() {
            fd_sel
        } else {
            self.new_memfd(fd_size, false)?
        };
        let offset = if off == 0xff {
            u64::MAX & !0xfff
        } else {
            u64::from(off) << 16
        };
        let r = Region {
            gpa,
            size,
            user_addr: (UADDR + gpa).wrapping_add(skew),
            offset,
            fd,
        };
        Some((r, self.memfds[fd].as_raw_fd()))
    }

    fn region_body(r: &Region) -> Vec<u8> {
        [r.gpa, r.size, r.user_addr, r.offset]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// A virtio-blk chain (virtio 1.2 §5.2.6) in ring `q`'s descriptor table, made available.
    fn request(&mut self, inp: &mut Input) -> Option<()> {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        const INDIRECT: u16 = 4;
        let q = inp.u8()? as usize % 4;
        let typ = u32::from(inp.u8()?);
        let sector = u64::from(inp.u32()?);
        let len = u32::from(inp.u16()?);
        let head = u16::from(inp.u8()?);
        let gpa = u64::from(inp.u32()?);
        let layout = inp.u8()?;
        let ring = self.rings[q];
        if ring.size == 0 {
            return Some(());
        }
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&typ.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        hdr.extend_from_slice(&sector.to_le_bytes());
        self.write_guest(gpa, &hdr);
        // IN (0) and GET_ID (8) write the data buffer; layout bit 2 flips that.
        let device_writes = (typ == 0 || typ == 8) != (layout & 4 != 0);
        let mut descs: Vec<(u64, u32, u16)> = vec![(gpa, 16, 0)];
        if layout & 2 == 0 {
            descs.push((gpa + 32, len, if device_writes { WRITE } else { 0 }));
        }
        descs.push((gpa + 16, 1, WRITE));
        let encode = |descs: &[(u64, u32, u16)], first: u16, size: u16| -> Vec<u8> {
            let mut out = Vec::new();
            for (i, (a, l, f)) in descs.iter().enumerate() {
                let last = i + 1 == descs.len();
                let next = (first + i as u16 + 1) % size;
                out.extend_from_slice(&a.to_le_bytes());
                out.extend_from_slice(&l.to_le_bytes());
                out.extend_from_slice(&(f | if last { 0 } else { NEXT }).to_le_bytes());
                out.extend_from_slice(&(if last { 0 } else { next }).to_le_bytes());
            }
            out
        };
        let head = head % ring.size;
        if layout & 1 != 0 {
            // Indirect: the table after the data buffer, one descriptor in the ring.
            let table_gpa = (gpa + 32 + u64::from(len) + 15) & !15;
            let table = encode(&descs, 0, u16::MAX);
            self.write_guest(table_gpa, &table);
            let d = encode(
                &[(table_gpa, table.len() as u32, INDIRECT)],
                head,
                ring.size,
            );
            self.write_guest(ring.desc + u64::from(head) * 16, &d);
        } else {
            for (i, d) in encode(&descs, head, ring.size).chunks(16).enumerate() {
                let idx = (head + i as u16) % ring.size;
                self.write_guest(ring.desc + u64::from(idx) * 16, d);
            }
        }
        let idx = self.read_u16(ring.avail + 2).unwrap_or(ring.avail_idx);
        let slot = ring.avail + 4 + u64::from(idx % ring.size) * 2;
        self.write_guest(slot, &head.to_le_bytes());
        let next = idx.wrapping_add(1);
        self.write_guest(ring.avail + 2, &next.to_le_bytes());
        self.rings[q].avail_idx = next;
        Some(())
    }

    /// Kicks ring `q` and waits a little for its used index to catch up.
    fn kick(&mut self, q: usize) {
        let Some(k) = self.kicks[q].as_ref() else {
            return;
        };
        let _ = (&*k).write(&1u64.to_ne_bytes());
        let ring = self.rings[q];
        let deadline = Instant::now() + Duration::from_millis(20);
        while Instant::now() < deadline {
            if self.read_u16(ring.used + 2) == Some(ring.avail_idx) {
                break;
            }
            std::thread::yield_now();
        }
        // A fault in guest memory (a memfd shrunk under the ring) broke the session: the
        // control thread closes it when the guard wakes it.
        if self.session.as_ref().is_some_and(|s| s.memory_broken()) {
            self.disconnect();
        }
        if trace() {
            eprintln!(
                "kick ring {q}: avail {} used {:?}",
                ring.avail_idx,
                self.read_u16(ring.used + 2)
            );
        }
    }

    fn op(&mut self, inp: &mut Input) -> Option<()> {
        let b = inp.u8()?;
        let flags = if b & 0x80 != 0 { NEED_REPLY } else { 0 };
        let extra = usize::from((b >> 5) & 3);
        let mut fds: Vec<RawFd> = Vec::new();
        for _ in 0..extra {
            if self.memfds.is_empty() {
                self.new_memfd(4096, false)?;
            }
            fds.push(self.memfds[0].as_raw_fd());
        }
        let vring_state = |i: u32, n: u32| -> Vec<u8> {
            let mut v = i.to_le_bytes().to_vec();
            v.extend_from_slice(&n.to_le_bytes());
            v
        };
        let c = ctx();
        if trace() {
            eprintln!("op {}", (b & 0x1f) % 20);
        }
        let sent = match (b & 0x1f) % 20 {
            0 => {
                let code = u32::from(inp.u8()?);
                let size = inp.u16()?;
                let n = inp.u8()? as usize;
                let body = inp.bytes(n)?.to_vec();
                if usize::from(size) != n {
                    // From here on the stream is out of step; the frontend hangs up after
                    // this message so that nothing waits for bytes that never come.
                    let ok = self.send(code, flags, u32::from(size), &body, &fds);
                    let _ = self.client.shutdown(Shutdown::Write);
                    self.closed_write = true;
                    ok
                } else {
                    self.send(code, flags, u32::from(size), &body, &fds)
                }
            }
            op @ (1 | 2) => {
                let mode = inp.u8()?;
                let x = inp.u64()?;
                let offered = if op == 1 {
                    c.device.features()
                } else {
                    c.device.protocol_features().bits()
                };
                let v = if mode & 1 != 0 { x } else { offered & !x };
                let code = if op == 1 { 2 } else { 16 };
                self.send(code, flags, 8, &v.to_le_bytes(), &fds)
            }
            3 => {
                let code = [3, 4, 1, 15, 17, 36, 34, 44][inp.u8()? as usize % 8];
                self.send(code, flags, 0, &[], &fds)
            }
            4 => {
                let n = inp.u8()? as usize % 16;
                let mut body = (n as u32).to_le_bytes().to_vec();
                body.extend_from_slice(&0u32.to_le_bytes());
                let mut regions = Vec::new();
                for _ in 0..n {
                    let (r, fd) = self.region(inp)?;
                    body.extend_from_slice(&Self::region_body(&r));
                    fds.push(fd);
                    regions.push(r);
                }
                self.regions = regions;
                self.send(5, flags, body.len() as u32, &body, &fds)
            }
            5 => {
                let (r, fd) = self.region(inp)?;
                let mut body = 0u64.to_le_bytes().to_vec();
                body.extend_from_slice(&Self::region_body(&r));
                fds.push(fd);
                self.regions.push(r);
                self.send(37, flags, body.len() as u32, &body, &fds)
            }
            6 => {
                let (r, _) = self.region(inp)?;
                let mut body = 0u64.to_le_bytes().to_vec();
                body.extend_from_slice(&Self::region_body(&r));
                self.regions.retain(|x| x.gpa != r.gpa);
                self.send(38, flags, body.len() as u32, &body, &fds)
            }
            7 => {
                let sel = inp.u8()? % 4;
                let index = inp.u8()?;
                let num = inp.u16()?;
                let code = [8, 10, 18, 11][sel as usize];
                if sel == 0 {
                    if let Some(r) = self.rings.get_mut(usize::from(index)) {
                        r.size = if num.is_power_of_two() { num } else { 0 };
                    }
                }
                let body = vring_state(u32::from(index), u32::from(num));
                self.send(code, flags, 8, &body, &fds)
            }
            8 => {
                let index = inp.u8()?;
                let aflags = u32::from(inp.u8()? & 1);
                let desc = u64::from(inp.u32()?);
                let avail = u64::from(inp.u32()?);
                let used = u64::from(inp.u32()?);
                if let Some(r) = self.rings.get_mut(usize::from(index)) {
                    (r.desc, r.avail, r.used) = (desc, avail, used);
                }
                let mut body = u32::from(index).to_le_bytes().to_vec();
                body.extend_from_slice(&aflags.to_le_bytes());
                for a in [desc, used, avail, 0] {
                    body.extend_from_slice(&(UADDR + a).to_le_bytes());
                }
                self.send(9, flags, body.len() as u32, &body, &fds)
            }
            9 => {
                let sel = inp.u8()? % 3;
                let index = inp.u8()?;
                let code = 12 + u32::from(sel);
                let mut v = u64::from(index & 0x7f);
                let ev = eventfd();
                if index & 0x80 != 0 {
                    v |= 0x100;
                } else {
                    fds.insert(0, ev.as_raw_fd());
                }
                let ok = self.send(code, flags, 8, &v.to_le_bytes(), &fds);
                if sel == 0 && index & 0x80 == 0 {
                    if let Some(k) = self.kicks.get_mut(usize::from(index)) {
                        *k = Some(ev);
                    }
                }
                ok
            }
            10 => {
                let queues = inp.u16()?;
                let qsize = inp.u16()?;
                let mut body = [0u8; 24];
                body[16..18].copy_from_slice(&queues.to_le_bytes());
                body[18..20].copy_from_slice(&qsize.to_le_bytes());
                self.send(31, flags, 24, &body, &fds)
            }
            11 => {
                let mode = inp.u8()?;
                let mmap_size = u64::from(inp.u32()?);
                let off = inp.u8()?;
                let queues = inp.u16()?;
                let qsize = inp.u16()?;
                let fd_size = u64::from(inp.u32()?);
                let fd = match &self.inflight {
                    Some(f) if mode & 1 != 0 => f.as_raw_fd(),
                    _ => {
                        let i = self.new_memfd(fd_size, mode & 2 != 0)?;
                        self.memfds[i].as_raw_fd()
                    }
                };
                fds.insert(0, fd);
                let offset = if off == 0xff {
                    u64::MAX - 0xfff
                } else {
                    u64::from(off) << 12
                };
                let mut body = [0u8; 24];
                body[..8].copy_from_slice(&mmap_size.to_le_bytes());
                body[8..16].copy_from_slice(&offset.to_le_bytes());
                body[16..18].copy_from_slice(&queues.to_le_bytes());
                body[18..20].copy_from_slice(&qsize.to_le_bytes());
                self.send(32, flags, 24, &body, &fds)
            }
            12 => {
                let offset = u32::from(inp.u8()?);
                let size = inp.u8()?;
                let cflags = u32::from(inp.u8()? & 3);
                let mut body = Vec::new();
                for v in [offset, u32::from(size), cflags] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
                body.resize(12 + usize::from(size), 0);
                self.send(24, flags, body.len() as u32, &body, &fds)
            }
            13 => {
                let offset = u32::from(inp.u8()?);
                let n = inp.u8()? as usize;
                let data = inp.bytes(n)?.to_vec();
                let cflags = u32::from(inp.u8()? & 3);
                let mut body = Vec::new();
                for v in [offset, n as u32, cflags] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
                body.extend_from_slice(&data);
                self.send(25, flags, body.len() as u32, &body, &fds)
            }
            14 => return self.request(inp),
            15 => {
                let target = inp.u8()?;
                let addr = u64::from(inp.u32()?);
                let n = inp.u8()? as usize;
                let data = inp.bytes(n)?;
                if target & 1 == 0 {
                    self.write_guest(addr, data);
                } else if let Some(f) = &self.inflight {
                    let len = f.metadata().map_or(0, |m| m.len());
                    if addr + n as u64 <= len {
                        let _ = f.write_all_at(data, addr);
                    }
                }
                return Some(());
            }
            16 => {
                let q = inp.u8()? as usize % 4;
                self.kick(q);
                return Some(());
            }
            17 => {
                let i = inp.u8()? as usize;
                let size = (u64::from(inp.u32()?) << 8).min(MAX_FD_SIZE);
                if let Some(f) = self.memfds.get(i) {
                    let _ = f.set_len(size);
                }
                return Some(());
            }
            18 => {
                let k = inp.u8()?;
                let mut hdr = 2u32.to_le_bytes().to_vec();
                hdr.extend_from_slice(&1u32.to_le_bytes());
                hdr.extend_from_slice(&8u32.to_le_bytes());
                let n = usize::from(k % 12).max(1);
                let ok = self.send_bytes(&hdr[..n], &fds);
                if k & 0x80 != 0 {
                    let _ = self.client.shutdown(Shutdown::Write);
                }
                // Either way the connection cannot go on: the header never completes.
                self.closed_write = true;
                ok
            }
            _ => {
                self.disconnect();
                return Some(());
            }
        };
        if sent {
            self.step();
        } else {
            self.disconnect();
        }
        if self.closed_write {
            self.finish();
        }
        Some(())
    }

    /// The frontend hung up (or stopped): the backend reads what is left, then the
    /// connection is closed.
    fn finish(&mut self) {
        let mut n = 0;
        while self.session.is_some() && n < 64 {
            self.step();
            n += 1;
        }
        self.disconnect();
    }
}

fuzz_target!(|data: &[u8]| {
    let c = ctx();
    static BASELINE: OnceLock<usize> = OnceLock::new();
    let baseline = *BASELINE.get_or_init(open_fds);
    STARTED.store(now_ms(), Ordering::Relaxed);
    let (placeholder, _) = UnixStream::pair().expect("socketpair");
    let mut f = Frontend {
        memfds: Vec::new(),
        regions: Vec::new(),
        rings: Default::default(),
        kicks: Default::default(),
        inflight: None,
        client: placeholder,
        session: None,
        sessions: 0,
        closed_write: false,
    };
    let mut inp = Input(data);
    let mut ops = 0;
    while !inp.0.is_empty() && ops < MAX_OPS {
        if f.session.is_none() {
            if f.sessions >= MAX_SESSIONS {
                break;
            }
            f.connect();
        }
        if f.op(&mut inp).is_none() {
            break;
        }
        ops += 1;
    }
    // The frontend goes away: the backend sees EOF after what was sent.
    let _ = f.client.shutdown(Shutdown::Write);
    f.finish();
    drop(f);
    let _ = c;
    // Every fd of the session (eventfds, mappings' files, the socket) is released once its
    // rings are gone; the reactor drops a stopped poller right after it reports.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = open_fds();
        if n <= baseline + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fds leaked: {n} open, {baseline} before"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // No guest mapping outlives its session (blockd keeps one mapped for good only when a
    // ring never finished its requests).
    assert_eq!(
        blockd::vhost::guest_fault::registered(),
        0,
        "guest memory still mapped after every session closed"
    );
    STARTED.store(0, Ordering::Relaxed);
});
