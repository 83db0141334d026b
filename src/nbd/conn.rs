//! One NBD client connection, served by a [`Poller`] on one reactor.
//!
//! The socket is non-blocking. Negotiation (proto.md "Fixed newstyle negotiation") and
//! transmission run in the same state machine, so a slow or hostile client never blocks a
//! thread. Requests are submitted to a [`BdevChannel`] opened on the reactor; write payloads
//! are received straight into pooled, aligned buffers that the backend then reads, and read
//! data is sent from the buffer the backend filled, with `sendmsg` of several replies at once.
//!
//! Closing (EOF, bad magic, `NBD_CMD_DISC`, server stop, send failure) stops reading, waits
//! for every submitted request (a buffer the backend still writes into is never freed),
//! flushes the bdev, sends what is queued (for at most [`CLOSE_GRACE`]), then reports
//! [`Poller::finished`] so the reactor drops it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::buf::{AlignedBuf, BufPool};
use super::export::{Attachment, Exports, MAX_REQUEST_BYTES};
use super::offload::{self, Outcome, Results};
use super::proto::{self, Request};
use crate::bdev::{AllocState, BdevChannel, Errno, Extent, IoOp, IoResult, IoVecs};
use crate::reactor::{Poller, Reactors};

/// Longest option payload accepted; longer ones are answered NBD_REP_ERR_TOO_BIG and the
/// connection is closed.
pub const MAX_OPT_LEN: usize = 64 * 1024;
/// Requests a connection may have in flight before it stops reading the socket.
pub const MAX_IN_FLIGHT: usize = 128;
/// Reply bytes queued before the connection stops reading (client not reading replies).
const MAX_OUT_BYTES: usize = 64 * 1024 * 1024;
/// How long a closing connection keeps trying to send queued replies.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Receive buffer: room for a maximal option and its header.
const INBUF_LEN: usize = MAX_OPT_LEN + 4096;
/// The tag of the flush issued when a connection closes.
const FINAL_FLUSH_TAG: u64 = u64::MAX;
/// Replies gathered per `sendmsg`.
const MAX_IOV: usize = 64;
/// Epoll data of the offloaded-query eventfd (the socket is 0, the channel 1).
const EP_STATUS: u64 = 2;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the server knows about a live connection.
pub struct ConnEntry {
    /// Reactor serving it.
    pub core: usize,
    /// Peer description for logs and `nbd_get_exports`.
    pub peer: String,
    /// Set to ask the connection to close (it notices on its next poll).
    pub stop: AtomicBool,
    /// Export the client attached to, once in transmission.
    pub export: Mutex<Option<String>>,
}

/// Live connections by id.
#[derive(Default)]
pub struct Conns {
    map: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    next: AtomicU64,
}

impl Conns {
    /// Records a new connection served on `core`.
    pub fn register(&self, core: usize, peer: String) -> (u64, Arc<ConnEntry>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let e = Arc::new(ConnEntry {
            core,
            peer,
            stop: AtomicBool::new(false),
            export: Mutex::new(None),
        });
        lock(&self.map).insert(id, e.clone());
        (id, e)
    }

    /// Forgets a connection (it is gone).
    pub fn unregister(&self, id: u64) {
        lock(&self.map).remove(&id);
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks every connection `pick` selects to close and wakes its reactor; returns their ids.
    pub fn stop_where(&self, reactors: &Reactors, pick: impl Fn(&ConnEntry) -> bool) -> Vec<u64> {
        let chosen: Vec<(u64, usize)> = lock(&self.map)
            .iter()
            .filter(|(_, e)| pick(e))
            .map(|(id, e)| {
                e.stop.store(true, Ordering::Release);
                (*id, e.core)
            })
            .collect();
        for (_, core) in &chosen {
            // An empty message wakes a sleeping reactor, which then polls every poller.
            reactors.run(*core, |_| {});
        }
        chosen.into_iter().map(|(id, _)| id).collect()
    }

    /// Waits until none of `ids` is live; false on timeout.
    pub fn wait_gone(&self, ids: &[u64], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if ids.iter().all(|id| !lock(&self.map).contains_key(id)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// What a connection shares with the server.
pub struct ConnCtx {
    pub exports: Arc<Exports>,
    pub conns: Arc<Conns>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for the client flags (4 bytes).
    ClientFlags,
    /// Option haggling.
    Options,
    /// Requests.
    Transmission,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FinalFlush {
    NotStarted,
    InFlight,
    Done,
}

/// An accepted request holding a slot.
struct Req {
    cookie: u64,
    typ: u16,
    flags: u16,
    offset: u64,
    len: u32,
    buf: Option<AlignedBuf>,
    /// The iovec handed to the backend (boxed with the request: its address is stable).
    iov: libc::iovec,
    /// A FUA write whose data is written: its flush is in flight.
    flushing: bool,
}

/// Bytes to send: a header and optionally data from a pooled buffer.
struct Out {
    head: Vec<u8>,
    data: Option<AlignedBuf>,
    data_len: usize,
    /// Bytes of head+data already sent.
    pos: usize,
}

impl Out {
    fn total(&self) -> usize {
        self.head.len() + self.data_len
    }
}

/// A write payload being received into a request's buffer.
struct Payload {
    slot: usize,
    got: usize,
}

/// One client connection.
pub struct Conn {
    id: u64,
    ctx: Arc<ConnCtx>,
    entry: Arc<ConnEntry>,
    fd: OwnedFd,
    /// Watches the socket (IN/OUT as needed) and the channel's completion fd; its own fd is
    /// what the reactor watches.
    ep: Epoll,
    /// Socket events registered in `ep` (0 = not registered).
    registered: u32,
    phase: Phase,
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export name SET_META_CONTEXT selected `base:allocation` for.
    meta_for: Option<String>,
    base_allocation: bool,
    att: Option<Attachment>,
    tflags: u16,
    chan: Option<BdevChannel>,
    pool: BufPool,
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    payload: Option<Payload>,
    /// Payload bytes of a refused write still to be skipped, then the error to answer.
    discard: u64,
    discard_reply: Option<(u64, u32)>,
    out: VecDeque<Out>,
    out_bytes: usize,
    slots: Vec<Option<Box<Req>>>,
    free: Vec<usize>,
    in_flight: usize,
    closing: bool,
    close_deadline: Option<Instant>,
    read_closed: bool,
    write_failed: bool,
    final_flush: FinalFlush,
    done_scratch: Vec<(u64, IoResult)>,
    /// Block-status queries running on helper threads (created on first use).
    status: Option<Arc<Results>>,
    /// Queries sent to helpers and not answered yet.
    status_pending: usize,
    status_scratch: Vec<Outcome>,
    /// The last `recv` found the socket empty: ask epoll before the next one.
    drained: bool,
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Conn {
    /// A connection that starts with the newstyle greeting. Must be called on the reactor
    /// thread that polls it.
    pub fn new(
        id: u64,
        ctx: Arc<ConnCtx>,
        entry: Arc<ConnEntry>,
        fd: OwnedFd,
    ) -> std::io::Result<Self> {
        let mut c = Self::bare(id, ctx, entry, fd)?;
        c.queue_bytes(proto::greeting().to_vec());
        Ok(c)
    }

    /// A connection already in transmission on `att` with simple replies (the kernel's nbd
    /// driver, attached over a socketpair, skips negotiation).
    pub fn transmission(
        id: u64,
        ctx: Arc<ConnCtx>,
        entry: Arc<ConnEntry>,
        fd: OwnedFd,
        att: Attachment,
    ) -> std::io::Result<Self> {
        let mut c = Self::bare(id, ctx, entry, fd)?;
        c.enter_transmission(att)?;
        Ok(c)
    }

    fn bare(
        id: u64,
        ctx: Arc<ConnCtx>,
        entry: Arc<ConnEntry>,
        fd: OwnedFd,
    ) -> std::io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Conn {
            id,
            ctx,
            entry,
            fd,
            ep: Epoll::new()?,
            registered: 0,
            phase: Phase::ClientFlags,
            fixed_newstyle: false,
            no_zeroes: false,
            structured: false,
            meta_for: None,
            base_allocation: false,
            att: None,
            tflags: 0,
            chan: None,
            pool: BufPool::new(8),
            inbuf: vec![0u8; INBUF_LEN].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            payload: None,
            discard: 0,
            discard_reply: None,
            out: VecDeque::new(),
            out_bytes: 0,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            closing: false,
            close_deadline: None,
            read_closed: false,
            write_failed: false,
            final_flush: FinalFlush::NotStarted,
            done_scratch: Vec::new(),
            status: None,
            status_pending: 0,
            status_scratch: Vec::new(),
            drained: false,
        })
    }

    /// Attaches to the export: opens the bdev channel on this reactor.
    fn enter_transmission(&mut self, att: Attachment) -> std::io::Result<()> {
        let chan = att.export.bdev.open_channel()?;
        if let Some(fd) = chan.completion_fd() {
            self.ep
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 1))?;
        }
        self.pool = BufPool::new(att.export.bdev.backend().buf_align());
        self.tflags = att.export.transmission_flags();
        *lock(&self.entry.export) = Some(att.export.name.clone());
        tracing::info!(conn = self.id, peer = %self.entry.peer, export = %att.export.name,
                       structured = self.structured, "nbd client attached");
        self.chan = Some(chan);
        self.att = Some(att);
        self.phase = Phase::Transmission;
        Ok(())
    }

    fn begin_close(&mut self, why: &str) {
        if !self.closing {
            tracing::debug!(conn = self.id, peer = %self.entry.peer, "nbd connection closing: {why}");
            self.closing = true;
            self.close_deadline = Some(Instant::now() + CLOSE_GRACE);
        }
        self.read_closed = true;
        if let Some(p) = self.payload.take() {
            // A write whose payload never fully arrived: never submitted, just freed.
            self.release_slot(p.slot);
        }
    }

    fn want_read(&self) -> bool {
        !self.read_closed
            && !self.closing
            && self.in_flight + self.status_pending < MAX_IN_FLIGHT
            && self.out_bytes < MAX_OUT_BYTES
    }

    // ---- output ----

    fn queue_bytes(&mut self, head: Vec<u8>) {
        self.queue(head, None, 0);
    }

    fn queue(&mut self, head: Vec<u8>, data: Option<AlignedBuf>, data_len: usize) {
        if self.write_failed {
            if let Some(b) = data {
                self.pool.put(b);
            }
            return;
        }
        let o = Out {
            head,
            data,
            data_len,
            pos: 0,
        };
        self.out_bytes += o.total();
        self.out.push_back(o);
    }

    /// Queues the final reply of a request that carries no data.
    fn reply(&mut self, cookie: u64, err: u32) {
        let head = if !self.structured {
            proto::simple_reply(err, cookie).to_vec()
        } else if err != 0 {
            proto::error_chunk(cookie, err).to_vec()
        } else {
            proto::chunk_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, cookie, 0).to_vec()
        };
        self.queue_bytes(head);
    }

    /// Sends what the socket accepts; returns bytes sent.
    fn flush_out(&mut self) -> usize {
        let mut sent_total = 0;
        while !self.out.is_empty() && !self.write_failed {
            let mut iov: [libc::iovec; MAX_IOV] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV];
            let mut n = 0;
            for o in self.out.iter_mut() {
                if n + 2 > MAX_IOV {
                    break;
                }
                let hl = o.head.len();
                if o.pos < hl {
                    iov[n] = libc::iovec {
                        iov_base: o.head[o.pos..].as_mut_ptr().cast(),
                        iov_len: hl - o.pos,
                    };
                    n += 1;
                }
                if let Some(d) = o.data.as_mut() {
                    let from = o.pos.saturating_sub(hl);
                    if from < o.data_len {
                        // SAFETY: from < data_len <= capacity.
                        iov[n] = libc::iovec {
                            iov_base: unsafe { d.as_mut_ptr().add(from) }.cast(),
                            iov_len: o.data_len - from,
                        };
                        n += 1;
                    }
                }
            }
            // SAFETY: msghdr zeroed then pointed at `n` valid iovecs over live buffers.
            let r = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = n as _;
                libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => break,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.write_failed = true;
                        self.drop_output();
                        self.begin_close(&format!("send failed: {e}"));
                        break;
                    }
                }
            }
            let mut left = r as usize;
            sent_total += left;
            self.out_bytes -= left;
            while left > 0 {
                let Some(o) = self.out.front_mut() else { break };
                let rest = o.total() - o.pos;
                if left >= rest {
                    left -= rest;
                    if let Some(o) = self.out.pop_front() {
                        if let Some(b) = o.data {
                            self.pool.put(b);
                        }
                    }
                } else {
                    o.pos += left;
                    left = 0;
                }
            }
            // Drop fully sent zero-length entries.
            while self.out.front().is_some_and(|o| o.pos >= o.total()) {
                if let Some(o) = self.out.pop_front() {
                    if let Some(b) = o.data {
                        self.pool.put(b);
                    }
                }
            }
        }
        sent_total
    }

    fn drop_output(&mut self) {
        while let Some(o) = self.out.pop_front() {
            if let Some(b) = o.data {
                self.pool.put(b);
            }
        }
        self.out_bytes = 0;
    }

    // ---- input ----

    fn avail(&self) -> usize {
        self.in_end - self.in_start
    }

    /// Receives into the free end of `inbuf`; Some(0) = EOF, None = nothing now.
    fn recv_more(&mut self) -> Option<usize> {
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        } else if self.in_end == self.inbuf.len() {
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        let room = self.inbuf.len() - self.in_end;
        if room == 0 {
            return None;
        }
        loop {
            // SAFETY: the destination is the unused tail of inbuf.
            let r = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.inbuf[self.in_end..].as_mut_ptr().cast(),
                    room,
                    0,
                )
            };
            if r >= 0 {
                self.in_end += r as usize;
                self.drained = false;
                return Some(r as usize);
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    self.drained = true;
                    return None;
                }
                _ => {
                    self.begin_close(&format!("recv failed: {e}"));
                    return None;
                }
            }
        }
    }

    /// Bytes the current phase needs before it can act (header, payload, or option).
    fn needed(&self) -> usize {
        match self.phase {
            Phase::ClientFlags => 4,
            Phase::Transmission => proto::REQUEST_LEN,
            Phase::Options => {
                if self.avail() < proto::OPT_HEADER_LEN {
                    return proto::OPT_HEADER_LEN;
                }
                let s = self.in_start;
                let len = u32::from_be_bytes([
                    self.inbuf[s + 12],
                    self.inbuf[s + 13],
                    self.inbuf[s + 14],
                    self.inbuf[s + 15],
                ]) as usize;
                proto::OPT_HEADER_LEN + len.min(MAX_OPT_LEN + 1)
            }
        }
    }

    /// Whether buffered input can be acted on without reading the socket.
    fn input_ready(&self) -> bool {
        if !self.want_read() {
            return false;
        }
        if self.payload.is_some() || self.discard > 0 {
            return self.avail() > 0;
        }
        self.avail() >= self.needed().min(proto::OPT_HEADER_LEN + MAX_OPT_LEN)
    }

    /// Reads and handles requests until the socket has nothing or reading must pause.
    fn read_input(&mut self) -> usize {
        let mut work = 0;
        while self.want_read() {
            if self.payload.is_some() {
                match self.read_payload() {
                    Some(n) => work += n,
                    None => break,
                }
                continue;
            }
            if self.discard > 0 {
                let n = (self.avail() as u64).min(self.discard) as usize;
                if n > 0 {
                    self.in_start += n;
                    self.discard -= n as u64;
                    work += n;
                } else if self.recv_more_or_eof().is_none() {
                    break;
                }
                if self.discard == 0 {
                    if let Some((cookie, err)) = self.discard_reply.take() {
                        self.reply(cookie, err);
                    }
                }
                continue;
            }
            let need = self.needed();
            if need > proto::OPT_HEADER_LEN + MAX_OPT_LEN {
                self.option_too_big();
                work += 1;
                continue;
            }
            if self.avail() >= need {
                let s = self.in_start;
                self.in_start += need;
                match self.phase {
                    Phase::ClientFlags => {
                        let f = u32::from_be_bytes([
                            self.inbuf[s],
                            self.inbuf[s + 1],
                            self.inbuf[s + 2],
                            self.inbuf[s + 3],
                        ]);
                        self.on_client_flags(f);
                    }
                    Phase::Options => {
                        let mut h = [0u8; proto::OPT_HEADER_LEN];
                        h.copy_from_slice(&self.inbuf[s..s + proto::OPT_HEADER_LEN]);
                        let data = self.inbuf[s + proto::OPT_HEADER_LEN..s + need].to_vec();
                        self.on_option(&h, &data);
                    }
                    Phase::Transmission => {
                        let mut h = [0u8; proto::REQUEST_LEN];
                        h.copy_from_slice(&self.inbuf[s..s + need]);
                        self.on_request(&h);
                    }
                }
                work += 1;
                continue;
            }
            if self.recv_more_or_eof().is_none() {
                break;
            }
        }
        work
    }

    /// `recv_more`, closing on EOF; None when nothing was received.
    fn recv_more_or_eof(&mut self) -> Option<usize> {
        if self.drained && !self.socket_readable() {
            return None;
        }
        match self.recv_more() {
            Some(0) => {
                let why = if self.avail() > 0 || self.payload.is_some() || self.discard > 0 {
                    "client disconnected in the middle of a message"
                } else {
                    "client disconnected"
                };
                self.begin_close(why);
                None
            }
            other => other,
        }
    }

    /// Moves payload bytes into the pending write's buffer (buffered bytes first, then
    /// straight from the socket); submits the write once complete.
    fn read_payload(&mut self) -> Option<usize> {
        let p = self.payload.as_mut()?;
        let slot = p.slot;
        let Some(req) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) else {
            self.payload = None;
            return None;
        };
        let len = req.len as usize;
        let buf = req.buf.as_mut()?;
        let mut got = p.got;
        let mut moved = 0;
        let take = (self.in_end - self.in_start).min(len - got);
        if take > 0 {
            buf.slice_mut(len)[got..got + take]
                .copy_from_slice(&self.inbuf[self.in_start..self.in_start + take]);
            self.in_start += take;
            got += take;
            moved += take;
        }
        let mut eof = false;
        let mut err = None;
        while got < len {
            // SAFETY: the destination is inside the request's buffer.
            let r = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().add(got).cast(),
                    len - got,
                    0,
                )
            };
            if r > 0 {
                got += r as usize;
                moved += r as usize;
                continue;
            }
            if r == 0 {
                eof = true;
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => break,
                _ => {
                    err = Some(e);
                    break;
                }
            }
        }
        if let Some(p) = self.payload.as_mut() {
            p.got = got;
        }
        if got == len {
            self.payload = None;
            self.submit(slot);
            return Some(moved.max(1));
        }
        if eof {
            self.begin_close("client disconnected in the middle of a write payload");
            return None;
        }
        if let Some(e) = err {
            self.begin_close(&format!("recv failed: {e}"));
            return None;
        }
        if moved > 0 {
            Some(moved)
        } else {
            None
        }
    }

    // ---- negotiation ----

    fn on_client_flags(&mut self, f: u32) {
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if f & !known != 0 {
            // proto.md: a server MUST close when it sees client flags it does not know.
            self.begin_close("unknown client flags");
            return;
        }
        self.fixed_newstyle = f & proto::FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = f & proto::FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::Options;
    }

    fn option_too_big(&mut self) {
        let s = self.in_start;
        let mut h = [0u8; proto::OPT_HEADER_LEN];
        h.copy_from_slice(&self.inbuf[s..s + proto::OPT_HEADER_LEN]);
        match proto::parse_opt_header(&h) {
            Some(oh) if oh.option != proto::OPT_EXPORT_NAME && self.fixed_newstyle => {
                let mut out = Vec::new();
                proto::opt_reply(&mut out, oh.option, proto::REP_ERR_TOO_BIG, &[]);
                self.queue_bytes(out);
                self.begin_close("option payload over the 64 KiB limit");
            }
            _ => self.begin_close("bad option magic or oversized export name"),
        }
    }

    fn on_option(&mut self, h: &[u8; proto::OPT_HEADER_LEN], data: &[u8]) {
        let Some(oh) = proto::parse_opt_header(h) else {
            self.begin_close("bad option magic");
            return;
        };
        let opt = oh.option;
        let mut out = Vec::new();
        match opt {
            proto::OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(data).unwrap_or("\u{fffd}");
                match self.ctx.exports.attach(name) {
                    Some(att) => {
                        let (size, flags) =
                            (att.export.bdev.size(), att.export.transmission_flags());
                        // Structured replies are only valid after NBD_OPT_GO-style haggling
                        // completes; EXPORT_NAME keeps what was negotiated.
                        if let Err(e) = self.enter_transmission(att) {
                            self.begin_close(&format!("cannot open the bdev channel: {e}"));
                            return;
                        }
                        self.queue_bytes(proto::export_name_reply(size, flags, self.no_zeroes));
                    }
                    None => self.begin_close("NBD_OPT_EXPORT_NAME for an unknown export"),
                }
                return;
            }
            proto::OPT_ABORT => {
                proto::opt_reply(&mut out, opt, proto::REP_ACK, &[]);
                self.queue_bytes(out);
                self.begin_close("NBD_OPT_ABORT");
                return;
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    proto::opt_reply(&mut out, opt, proto::REP_ERR_INVALID, &[]);
                } else {
                    for n in self.ctx.exports.socket_names() {
                        proto::opt_reply(&mut out, opt, proto::REP_SERVER, &proto::rep_server(&n));
                    }
                    proto::opt_reply(&mut out, opt, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                if self.info_or_go(opt, data, &mut out) {
                    self.queue_bytes(out);
                    return;
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    proto::opt_reply(&mut out, opt, proto::REP_ERR_INVALID, &[]);
                } else {
                    self.structured = true;
                    proto::opt_reply(&mut out, opt, proto::REP_ACK, &[]);
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                self.meta_context(opt, data, &mut out);
            }
            _ => {
                if !self.fixed_newstyle {
                    // Without fixed newstyle the only answer to an unknown option is closing.
                    self.begin_close("unknown option from a non-fixed-newstyle client");
                    return;
                }
                proto::opt_reply(&mut out, opt, proto::REP_ERR_UNSUP, &[]);
            }
        }
        self.queue_bytes(out);
    }

    /// NBD_OPT_INFO / NBD_OPT_GO; true when GO succeeded (transmission starts).
    fn info_or_go(&mut self, opt: u32, data: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(req) = proto::parse_info_request(data) else {
            proto::opt_reply(out, opt, proto::REP_ERR_INVALID, &[]);
            return false;
        };
        let Some(att) = self.ctx.exports.attach(req.name) else {
            proto::opt_reply(out, opt, proto::REP_ERR_UNKNOWN, &[]);
            return false;
        };
        let e = att.export.clone();
        let flags = e.transmission_flags();
        proto::opt_reply(
            out,
            opt,
            proto::REP_INFO,
            &proto::info_export(e.bdev.size(), flags),
        );
        for r in &req.requests {
            match *r {
                proto::INFO_NAME => proto::opt_reply(
                    out,
                    opt,
                    proto::REP_INFO,
                    &proto::info_string(proto::INFO_NAME, &e.name),
                ),
                proto::INFO_DESCRIPTION => proto::opt_reply(
                    out,
                    opt,
                    proto::REP_INFO,
                    &proto::info_string(
                        proto::INFO_DESCRIPTION,
                        &format!(
                            "blockd bdev {} ({})",
                            e.bdev.name(),
                            e.bdev.backend().product_name()
                        ),
                    ),
                ),
                _ => {}
            }
        }
        let (min, pref, max) = e.block_sizes();
        proto::opt_reply(
            out,
            opt,
            proto::REP_INFO,
            &proto::info_block_size(min, pref, max),
        );
        if opt == proto::OPT_INFO {
            proto::opt_reply(out, opt, proto::REP_ACK, &[]);
            return false;
        }
        // Meta contexts are bound to the export they were negotiated for.
        if self.meta_for.as_deref() != Some(e.name.as_str()) {
            self.base_allocation = false;
        }
        if let Err(err) = self.enter_transmission(att) {
            tracing::error!(conn = self.id, export = %e.name, "cannot open the bdev channel: {err}");
            out.clear();
            proto::opt_reply(out, opt, proto::REP_ERR_PLATFORM, &[]);
            return false;
        }
        proto::opt_reply(out, opt, proto::REP_ACK, &[]);
        true
    }

    fn meta_context(&mut self, opt: u32, data: &[u8], out: &mut Vec<u8>) {
        let list = opt == proto::OPT_LIST_META_CONTEXT;
        if !list && !self.structured {
            // proto.md: SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
            proto::opt_reply(out, opt, proto::REP_ERR_INVALID, &[]);
            return;
        }
        let Some(req) = proto::parse_meta_request(data) else {
            proto::opt_reply(out, opt, proto::REP_ERR_INVALID, &[]);
            return;
        };
        if self.ctx.exports.get(req.name).is_none() {
            proto::opt_reply(out, opt, proto::REP_ERR_UNKNOWN, &[]);
            return;
        }
        let selected = if list && req.queries.is_empty() {
            true
        } else {
            req.queries
                .iter()
                .any(|q| proto::query_matches_base_allocation(q, list))
        };
        if selected {
            proto::opt_reply(
                out,
                opt,
                proto::REP_META_CONTEXT,
                &proto::rep_meta_context(
                    proto::META_BASE_ALLOCATION_ID,
                    proto::META_BASE_ALLOCATION,
                ),
            );
        }
        if !list {
            self.base_allocation = selected;
            self.meta_for = Some(req.name.to_string());
        }
        proto::opt_reply(out, opt, proto::REP_ACK, &[]);
    }

    // ---- transmission ----

    fn on_request(&mut self, h: &[u8; proto::REQUEST_LEN]) {
        let Some(q) = proto::parse_request(h) else {
            self.begin_close("bad request magic");
            return;
        };
        if q.typ == proto::CMD_DISC {
            self.begin_close("NBD_CMD_DISC");
            return;
        }
        match self.validate(&q) {
            Ok(()) => self.accept(q),
            Err(err) => {
                if q.typ == proto::CMD_WRITE && q.len > 0 {
                    // The payload follows the header whatever we answer: skip it.
                    self.discard = q.len as u64;
                    self.discard_reply = Some((q.cookie, err));
                } else {
                    self.reply(q.cookie, err);
                }
            }
        }
    }

    /// The checks of proto.md "Request types" and "Error values".
    fn validate(&self, q: &Request) -> Result<(), u32> {
        let Some(att) = self.att.as_ref() else {
            return Err(proto::EINVAL);
        };
        let e = &att.export;
        let allowed = match q.typ {
            proto::CMD_READ => {
                if self.structured {
                    proto::CMD_FLAG_DF
                } else {
                    0
                }
            }
            proto::CMD_WRITE | proto::CMD_TRIM => proto::CMD_FLAG_FUA,
            proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE,
            proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
            proto::CMD_FLUSH => 0,
            _ => return Err(proto::EINVAL),
        };
        if q.flags & !allowed != 0 {
            return Err(proto::EINVAL);
        }
        let writes = matches!(
            q.typ,
            proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
        );
        if writes && e.readonly {
            return Err(proto::EPERM);
        }
        if q.typ == proto::CMD_FLUSH {
            return Ok(());
        }
        if q.typ == proto::CMD_BLOCK_STATUS
            && (!self.structured || !self.base_allocation || q.len == 0)
        {
            return Err(proto::EINVAL);
        }
        if matches!(q.typ, proto::CMD_READ | proto::CMD_WRITE) && q.len > MAX_REQUEST_BYTES {
            return Err(proto::EINVAL);
        }
        let size = e.bdev.size();
        let beyond = q
            .offset
            .checked_add(q.len as u64)
            .is_none_or(|end| end > size);
        if beyond {
            return Err(match q.typ {
                proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => proto::ENOSPC,
                _ => proto::EINVAL,
            });
        }
        if q.typ != proto::CMD_BLOCK_STATUS {
            let bs = e.bdev.block_size() as u64;
            if !q.offset.is_multiple_of(bs) || !(q.len as u64).is_multiple_of(bs) {
                return Err(proto::EINVAL);
            }
        }
        Ok(())
    }

    fn alloc_slot(&mut self, q: &Request, buf: Option<AlignedBuf>) -> usize {
        let req = Box::new(Req {
            cookie: q.cookie,
            typ: q.typ,
            flags: q.flags,
            offset: q.offset,
            len: q.len,
            buf,
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            flushing: false,
        });
        self.in_flight += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(req);
                i
            }
            None => {
                self.slots.push(Some(req));
                self.slots.len() - 1
            }
        }
    }

    fn release_slot(&mut self, slot: usize) -> Option<Box<Req>> {
        let r = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        self.in_flight -= 1;
        Some(r)
    }

    /// A valid request: answer it at once or give it a slot (and a buffer).
    fn accept(&mut self, q: Request) {
        let supports_flush = self
            .att
            .as_ref()
            .is_some_and(|a| a.export.bdev.backend().io_types().flush);
        match q.typ {
            proto::CMD_BLOCK_STATUS => {
                self.block_status(q);
                return;
            }
            proto::CMD_FLUSH if !supports_flush => {
                // Nothing volatile to make durable.
                self.reply(q.cookie, 0);
                return;
            }
            proto::CMD_READ | proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
                if q.len == 0 =>
            {
                self.reply(q.cookie, 0);
                return;
            }
            _ => {}
        }
        let buf = if matches!(q.typ, proto::CMD_READ | proto::CMD_WRITE) {
            match self.pool.get(q.len as usize) {
                Some(b) => Some(b),
                None => {
                    if q.typ == proto::CMD_WRITE {
                        self.discard = q.len as u64;
                        self.discard_reply = Some((q.cookie, proto::ENOMEM));
                    } else {
                        self.reply(q.cookie, proto::ENOMEM);
                    }
                    return;
                }
            }
        } else {
            None
        };
        let slot = self.alloc_slot(&q, buf);
        if q.typ == proto::CMD_WRITE {
            self.payload = Some(Payload { slot, got: 0 });
        } else {
            self.submit(slot);
        }
    }

    /// `NBD_CMD_BLOCK_STATUS` for `base:allocation`: the backend's allocation map, asked
    /// here when it answers from memory, else on a helper thread (the reply is sent when
    /// [`Conn::reap_status`] sees it; replies may come out of order, as proto.md allows).
    fn block_status(&mut self, q: Request) {
        let Some(att) = self.att.as_ref() else {
            self.reply(q.cookie, proto::EINVAL);
            return;
        };
        let bdev = att.export.bdev.clone();
        let (offset, len) = (q.offset, q.len as u64);
        let req_one = q.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let query = move || {
            bdev.backend().allocation(offset, len).map(|mut v| {
                if req_one {
                    v.truncate(1);
                }
                v
            })
        };
        if !att.export.bdev.backend().allocation_blocks() {
            let r = query();
            self.answer_status(q.cookie, len, r);
            return;
        }
        if self.status.is_none() {
            let r = Results::new().and_then(|r| {
                self.ep.ctl(
                    ControlOperation::Add,
                    r.fd(),
                    EpollEvent::new(EventSet::IN, EP_STATUS),
                )?;
                Ok(r)
            });
            match r {
                Ok(r) => self.status = Some(r),
                Err(e) => {
                    tracing::warn!(conn = self.id, "block status queue: {e}");
                    self.reply(q.cookie, proto::EIO);
                    return;
                }
            }
        }
        if let Some(r) = &self.status {
            self.status_pending += 1;
            offload::run(r, q.cookie, query);
        }
    }

    /// Answers finished offloaded block-status queries; returns how many.
    fn reap_status(&mut self) -> usize {
        if self.status_pending == 0 {
            return 0;
        }
        let Some(r) = self.status.clone() else {
            return 0;
        };
        let mut done = std::mem::take(&mut self.status_scratch);
        r.take(&mut done);
        let n = done.len();
        for (cookie, res) in done.drain(..) {
            self.status_pending = self.status_pending.saturating_sub(1);
            // The length only bounds the extents; the backend already clipped them.
            self.answer_status(cookie, u32::MAX as u64, res);
        }
        self.status_scratch = done;
        n
    }

    /// Queues the block-status reply: extents as (length, NBD_STATE_*) clipped to `len`
    /// bytes, or an error chunk.
    fn answer_status(&mut self, cookie: u64, len: u64, r: Result<Vec<Extent>, Errno>) {
        let extents = match r {
            Ok(v) => v,
            Err(e) => {
                self.reply(cookie, proto::wire_errno(e.0));
                return;
            }
        };
        let mut wire = Vec::with_capacity(extents.len());
        let mut left = len;
        for e in extents {
            let l = e.len.min(left);
            if l == 0 {
                break;
            }
            let flags = match e.state {
                AllocState::Data => 0,
                AllocState::Hole => proto::STATE_HOLE | proto::STATE_ZERO,
            };
            // Request lengths are u32, so every extent length fits.
            wire.push((u32::try_from(l).unwrap_or(u32::MAX), flags));
            left -= l;
        }
        if wire.is_empty() {
            // Never an empty reply: a backend that said nothing said "data".
            wire.push((u32::try_from(len).unwrap_or(u32::MAX), 0));
        }
        let chunk = proto::block_status_chunk(cookie, proto::META_BASE_ALLOCATION_ID, &wire);
        self.queue_bytes(chunk);
    }

    /// Hands a request to the bdev channel.
    fn submit(&mut self, slot: usize) {
        let Some(chan) = self.chan.as_mut() else {
            return;
        };
        let Some(req) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) else {
            return;
        };
        if let Some(b) = req.buf.as_mut() {
            req.iov = libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: req.len as usize,
            };
        }
        // SAFETY: `req.iov` lives in the boxed request, which stays in its slot (never
        // moved, never freed) until this tag's completion is reaped; the buffer is owned by
        // the request for as long.
        let iovs = unsafe { IoVecs::from_slice(std::slice::from_ref(&req.iov)) };
        let op = if req.flushing {
            IoOp::Flush
        } else {
            match req.typ {
                proto::CMD_READ => IoOp::Read {
                    offset: req.offset,
                    iovs,
                },
                proto::CMD_WRITE => IoOp::Write {
                    offset: req.offset,
                    iovs,
                },
                proto::CMD_TRIM => IoOp::Unmap {
                    offset: req.offset,
                    len: req.len as u64,
                },
                proto::CMD_WRITE_ZEROES => IoOp::WriteZeroes {
                    offset: req.offset,
                    len: req.len as u64,
                    may_unmap: req.flags & proto::CMD_FLAG_NO_HOLE == 0,
                },
                _ => IoOp::Flush,
            }
        };
        // SAFETY: see above.
        unsafe { chan.submit(slot as u64, op) };
    }

    /// Reaps completions and answers them; returns how many.
    fn reap(&mut self) -> usize {
        let Some(chan) = self.chan.as_mut() else {
            return 0;
        };
        let mut done = std::mem::take(&mut self.done_scratch);
        let n = chan.poll(&mut |t, r| done.push((t, r)));
        for (tag, r) in done.drain(..) {
            self.on_complete(tag, r);
        }
        self.done_scratch = done;
        if n > 0 {
            if let Some(c) = self.chan.as_mut() {
                c.kick();
            }
        }
        n
    }

    fn on_complete(&mut self, tag: u64, r: IoResult) {
        if tag == FINAL_FLUSH_TAG {
            if let Err(e) = r {
                tracing::warn!(conn = self.id, "flush at disconnect failed: {e}");
            }
            self.final_flush = FinalFlush::Done;
            return;
        }
        let slot = tag as usize;
        let supports_flush = self
            .att
            .as_ref()
            .is_some_and(|a| a.export.bdev.backend().io_types().flush);
        if let Some(req) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) {
            let fua = req.flags & proto::CMD_FLAG_FUA != 0;
            if r.is_ok() && fua && !req.flushing && supports_flush {
                // FUA: the data is written; make it durable before answering.
                req.flushing = true;
                self.submit(slot);
                return;
            }
        }
        let Some(mut req) = self.release_slot(slot) else {
            tracing::error!(conn = self.id, tag, "completion for an unknown request");
            return;
        };
        let err = match r {
            Ok(()) => 0,
            Err(e) => proto::wire_errno(e.0),
        };
        let buf = req.buf.take();
        if req.typ == proto::CMD_READ && err == 0 {
            let head = if self.structured {
                proto::offset_data_header(req.cookie, req.offset, req.len).to_vec()
            } else {
                proto::simple_reply(0, req.cookie).to_vec()
            };
            self.queue(head, buf, req.len as usize);
            return;
        }
        if let Some(b) = buf {
            self.pool.put(b);
        }
        self.reply(req.cookie, err);
    }

    /// Closing: once nothing is in flight, flush the bdev once.
    fn advance_close(&mut self) {
        if !self.closing || self.in_flight > 0 || self.final_flush != FinalFlush::NotStarted {
            return;
        }
        let flush = self
            .att
            .as_ref()
            .is_some_and(|a| !a.export.readonly && a.export.bdev.backend().io_types().flush);
        match self.chan.as_mut() {
            Some(chan) if flush => {
                // SAFETY: a flush carries no buffer.
                unsafe { chan.submit(FINAL_FLUSH_TAG, IoOp::Flush) };
                chan.kick();
                self.final_flush = FinalFlush::InFlight;
            }
            _ => self.final_flush = FinalFlush::Done,
        }
    }

    /// Whether the socket may have input, asked of the private epoll (`epoll_wait` with a
    /// zero timeout) rather than with a `recv` that finds nothing.
    ///
    /// A reactor that busy-polls would otherwise call `recv` on an empty socket on every
    /// pass: a costlier syscall than an empty `epoll_wait`, which also takes the socket's
    /// locks the client's `send` needs (measured: nearly half of the reactor's time at
    /// 4K QD32).
    fn socket_readable(&mut self) -> bool {
        if self.registered & EventSet::IN.bits() == 0 {
            // Not watched yet (a reactor that never slept): watch it, and read this time.
            self.update_interest();
            return true;
        }
        let mut ev = [EpollEvent::default(); 4];
        match self.ep.wait(0, &mut ev) {
            Ok(n) => ev[..n].iter().any(|e| {
                e.data() == 0
                    && e.events()
                        & (EventSet::IN
                            | EventSet::HANG_UP
                            | EventSet::READ_HANG_UP
                            | EventSet::ERROR)
                            .bits()
                        != 0
            }),
            Err(_) => true,
        }
    }

    /// Keeps the socket's registration in the private epoll in line with what we wait for.
    fn update_interest(&mut self) {
        let mut want = 0u32;
        if self.want_read() {
            want |= EventSet::IN.bits();
        }
        if !self.out.is_empty() && !self.write_failed {
            want |= EventSet::OUT.bits();
        }
        if want == self.registered {
            return;
        }
        let fd = self.fd.as_raw_fd();
        let ev = EpollEvent::new(EventSet::from_bits_truncate(want), 0);
        let r = if self.registered == 0 {
            self.ep.ctl(ControlOperation::Add, fd, ev)
        } else if want == 0 {
            self.ep
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        } else {
            self.ep.ctl(ControlOperation::Modify, fd, ev)
        };
        match r {
            Ok(()) => self.registered = want,
            Err(e) => tracing::warn!(conn = self.id, "epoll_ctl on the client socket: {e}"),
        }
    }
}

impl Poller for Conn {
    fn poll(&mut self) -> usize {
        if !self.closing && self.entry.stop.load(Ordering::Acquire) {
            self.begin_close("server stop or export removal");
        }
        let mut work = self.reap() + self.reap_status();
        work += self.read_input();
        if let Some(c) = self.chan.as_mut() {
            c.kick();
        }
        work += self.reap();
        self.advance_close();
        work += self.flush_out();
        work
    }

    fn arm(&mut self) -> bool {
        self.update_interest();
        let backend_pending = self.chan.as_mut().is_some_and(BdevChannel::arm);
        backend_pending || self.input_ready()
    }

    fn disarm(&mut self) {}

    fn wake_fds(&self) -> Vec<RawFd> {
        vec![self.ep.as_raw_fd()]
    }

    fn next_deadline(&self) -> Option<Instant> {
        let chan = self.chan.as_ref().and_then(|c| c.next_deadline());
        let close = if self.closing && (!self.out.is_empty() || self.status_pending > 0) {
            self.close_deadline
        } else {
            None
        };
        match (chan, close) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn request_stop(&mut self) {
        self.begin_close("poller stop requested");
    }

    fn awaits_helper_threads(&self) -> bool {
        self.chan
            .as_ref()
            .is_some_and(BdevChannel::awaits_helper_threads)
    }

    fn finished(&self) -> bool {
        self.closing
            && self.in_flight == 0
            && (self.status_pending == 0
                || self.close_deadline.is_some_and(|d| Instant::now() >= d))
            && self.final_flush != FinalFlush::InFlight
            && (self.final_flush == FinalFlush::Done || self.chan.is_none())
            && (self.out.is_empty()
                || self.write_failed
                || self.close_deadline.is_some_and(|d| Instant::now() >= d))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Dropped by a reactor shutdown while requests are in the backend: wait for them
        // (bounded) so no buffer the backend uses is freed; leak what never completes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.in_flight > 0 && self.chan.is_some() && Instant::now() < deadline {
            if let Some(p) = self.payload.take() {
                self.release_slot(p.slot);
                continue;
            }
            if self.reap() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if self.in_flight > 0 {
            tracing::error!(
                conn = self.id,
                in_flight = self.in_flight,
                "nbd connection dropped with I/O in flight: leaking its buffers"
            );
            for s in self.slots.drain(..).flatten() {
                std::mem::forget(s);
            }
            if let Some(c) = self.chan.take() {
                std::mem::forget(c);
            }
        }
        self.ctx.conns.unregister(self.id);
        tracing::info!(conn = self.id, peer = %self.entry.peer, "nbd connection closed");
    }
}
