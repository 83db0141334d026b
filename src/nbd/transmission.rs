//! The transmission phase of an NBD connection (proto.md "Transmission"): request headers
//! and write payloads from the socket's input, bdev I/O on a [`BdevChannel`] opened on the
//! connection's reactor, and replies (simple, or structured once negotiated) queued on the
//! socket's output.
//!
//! Write payloads are received straight into pooled, aligned buffers that the backend then
//! reads, and read data is sent from the buffer the backend filled.

use std::sync::Arc;
use std::time::Instant;

use super::buf::AlignedBuf;
use super::export::{Attachment, MAX_REQUEST_BYTES};
use super::negotiation::Agreed;
use super::offload::{self, Outcome, Results};
use super::proto::{self, Request};
use super::socket::{ClientSocket, Received, SendQueue, EP_CHANNEL, EP_STATUS};
use crate::bdev::{AllocState, BdevChannel, Errno, Extent, IoOp, IoResult, IoVecs};

/// The tag of the flush issued when a connection closes.
const FINAL_FLUSH_TAG: u64 = u64::MAX;

/// The flush a closing connection issues once nothing is in flight.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FinalFlush {
    NotStarted,
    InFlight,
    Done,
}

/// An accepted request holding a slot.
struct Accepted {
    req: Request,
    buf: Option<AlignedBuf>,
    /// The iovec handed to the backend (boxed with the request: its address is stable).
    iov: libc::iovec,
}

/// Accepted requests by slot; a slot number is the tag of the request's bdev I/O.
#[derive(Default)]
struct RequestTable {
    slots: Vec<Option<Box<Accepted>>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Bytes of data buffers the accepted requests hold (reads and writes).
    buf_bytes: usize,
}

impl RequestTable {
    fn insert(&mut self, a: Accepted) -> usize {
        let a = Box::new(a);
        self.in_flight += 1;
        self.buf_bytes += a.buf.as_ref().map_or(0, AlignedBuf::capacity);
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(a);
                i
            }
            None => {
                self.slots.push(Some(a));
                self.slots.len() - 1
            }
        }
    }

    fn get_mut(&mut self, slot: usize) -> Option<&mut Accepted> {
        self.slots.get_mut(slot).and_then(|s| s.as_deref_mut())
    }

    fn release(&mut self, slot: usize) -> Option<Box<Accepted>> {
        let r = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        self.in_flight -= 1;
        self.buf_bytes -= r.buf.as_ref().map_or(0, AlignedBuf::capacity);
        Some(r)
    }
}

/// Where the input stream is between request headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Incoming {
    /// At a request header.
    Header,
    /// Receiving the payload of the write in `slot`; `got` bytes are in.
    Payload { slot: usize, got: usize },
    /// Skipping the payload of a refused write, then answering `error`.
    Skipping { left: u64, cookie: u64, error: u32 },
}

/// `NBD_CMD_BLOCK_STATUS` queries on helper threads (see [`offload`]).
#[derive(Default)]
struct StatusQueries {
    /// Created on first use.
    results: Option<Arc<Results>>,
    /// Sent to helpers and not answered yet.
    pending: usize,
    scratch: Vec<Outcome>,
}

/// What the input did for [`Transmission::on_input`]'s caller.
#[derive(Debug)]
pub enum InputStep {
    /// Work was done (bytes moved or a request handled): go on.
    Progress(usize),
    /// The buffered input is not enough: receive more, then go on.
    NeedInput,
    /// A payload is waiting for the socket: stop reading for now.
    Stalled,
    /// Close the connection (why, for the log).
    Close(String),
}

/// The transmission state of one connection.
pub struct Transmission {
    conn: u64,
    att: Attachment,
    chan: BdevChannel,
    agreed: Agreed,
    requests: RequestTable,
    incoming: Incoming,
    status: StatusQueries,
    completions: Vec<(u64, IoResult)>,
    final_flush: FinalFlush,
}

impl Transmission {
    /// Opens the export's bdev channel on this reactor and watches its completions in the
    /// connection's epoll. `conn` is the connection id for logs.
    pub fn open(
        conn: u64,
        att: Attachment,
        agreed: Agreed,
        sock: &ClientSocket,
    ) -> std::io::Result<Self> {
        let chan = att.export.bdev.open_channel()?;
        if let Some(fd) = chan.completion_fd() {
            sock.watch(fd, EP_CHANNEL)?;
        }
        Ok(Transmission {
            conn,
            att,
            chan,
            agreed,
            requests: RequestTable::default(),
            incoming: Incoming::Header,
            status: StatusQueries::default(),
            completions: Vec::new(),
            final_flush: FinalFlush::NotStarted,
        })
    }

    /// The export served.
    pub fn attachment(&self) -> &Attachment {
        &self.att
    }

    pub fn channel(&self) -> &BdevChannel {
        &self.chan
    }

    pub fn channel_mut(&mut self) -> &mut BdevChannel {
        &mut self.chan
    }

    /// Requests in the backend or on helper threads (bounded by the caller's read pause).
    pub fn outstanding(&self) -> usize {
        self.requests.in_flight + self.status.pending
    }

    /// Bytes of data buffers held by requests not completed yet (read buffers being filled,
    /// write payloads being received or written).
    pub fn buffered_bytes(&self) -> usize {
        self.requests.buf_bytes
    }

    /// Block-status queries not answered yet.
    pub fn status_pending(&self) -> usize {
        self.status.pending
    }

    /// Whether the input is inside a write payload (being received or skipped).
    pub fn in_payload(&self) -> bool {
        self.incoming != Incoming::Header
    }

    /// Whether buffered input can be acted on without reading the socket.
    pub fn input_ready(&self, buffered: usize) -> bool {
        match self.incoming {
            Incoming::Header => buffered >= proto::REQUEST_LEN,
            _ => buffered > 0,
        }
    }

    /// Closing: a write whose payload never fully arrived is never submitted, just freed.
    pub fn abandon_payload(&mut self) {
        if let Incoming::Payload { slot, .. } = self.incoming {
            self.requests.release(slot);
        }
        self.incoming = Incoming::Header;
    }

    /// Takes the next step on the input: a payload, skipped bytes, or a request header.
    pub fn on_input(&mut self, sock: &mut ClientSocket) -> InputStep {
        match self.incoming {
            Incoming::Payload { slot, got } => self.read_payload(sock, slot, got),
            Incoming::Skipping {
                left,
                cookie,
                error,
            } => {
                let n = (sock.input.len() as u64).min(left);
                if n == 0 {
                    return InputStep::NeedInput;
                }
                sock.input.consume(n as usize);
                self.incoming = if left == n {
                    self.reply(&mut sock.output, cookie, error);
                    Incoming::Header
                } else {
                    Incoming::Skipping {
                        left: left - n,
                        cookie,
                        error,
                    }
                };
                InputStep::Progress(n as usize)
            }
            Incoming::Header => {
                let Some(h) = sock.input.pending().get(..proto::REQUEST_LEN) else {
                    return InputStep::NeedInput;
                };
                let mut header = [0u8; proto::REQUEST_LEN];
                header.copy_from_slice(h);
                sock.input.consume(proto::REQUEST_LEN);
                match self.on_request(&header, sock) {
                    Some(why) => InputStep::Close(why.to_string()),
                    None => InputStep::Progress(1),
                }
            }
        }
    }

    /// Moves payload bytes into the pending write's buffer (buffered bytes first, then
    /// straight from the socket); submits the write once complete.
    fn read_payload(&mut self, sock: &mut ClientSocket, slot: usize, mut got: usize) -> InputStep {
        let Some(a) = self.requests.get_mut(slot) else {
            self.incoming = Incoming::Header;
            return InputStep::Stalled;
        };
        let len = a.req.len as usize;
        let Some(buf) = a.buf.as_mut() else {
            return InputStep::Stalled;
        };
        let dst = buf.slice_mut(len);
        let mut moved = 0;
        let take = sock.input.len().min(len - got);
        if take > 0 {
            dst[got..got + take].copy_from_slice(&sock.input.pending()[..take]);
            sock.input.consume(take);
            got += take;
            moved += take;
        }
        let mut end = None;
        while got < len {
            match sock.recv_into(&mut dst[got..]) {
                Received::Bytes(n) => {
                    got += n;
                    moved += n;
                }
                Received::Nothing => break,
                Received::Eof => {
                    end = Some("client disconnected in the middle of a write payload".into());
                    break;
                }
                Received::Failed(e) => {
                    end = Some(format!("recv failed: {e}"));
                    break;
                }
            }
        }
        if got == len {
            self.incoming = Incoming::Header;
            self.submit(slot);
            return InputStep::Progress(moved.max(1));
        }
        self.incoming = Incoming::Payload { slot, got };
        match end {
            Some(why) => InputStep::Close(why),
            None if moved > 0 => InputStep::Progress(moved),
            None => InputStep::Stalled,
        }
    }

    /// Queues the final reply of a request that carries no data.
    fn reply(&self, out: &mut SendQueue, cookie: u64, err: u32) {
        let head = if !self.agreed.structured {
            proto::simple_reply(err, cookie).to_vec()
        } else if err != 0 {
            proto::error_chunk(cookie, err).to_vec()
        } else {
            proto::chunk_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, cookie, 0).to_vec()
        };
        out.push_bytes(head);
    }

    /// A request header; Some(why) when the connection must close.
    fn on_request(
        &mut self,
        h: &[u8; proto::REQUEST_LEN],
        sock: &mut ClientSocket,
    ) -> Option<&'static str> {
        let Some(q) = proto::parse_request(h) else {
            return Some("bad request magic");
        };
        if q.typ == proto::CMD_DISC {
            return Some("NBD_CMD_DISC");
        }
        match self.validate(&q) {
            Ok(()) => self.accept(q, sock),
            Err(error) => {
                if q.typ == proto::CMD_WRITE && q.len > 0 {
                    // The payload follows the header whatever we answer: skip it.
                    self.incoming = Incoming::Skipping {
                        left: q.len as u64,
                        cookie: q.cookie,
                        error,
                    };
                } else {
                    self.reply(&mut sock.output, q.cookie, error);
                }
            }
        }
        None
    }

    /// The checks of proto.md "Request types" and "Error values".
    fn validate(&self, q: &Request) -> Result<(), u32> {
        let e = &self.att.export;
        // FUA is valid on every command once SEND_FUA is advertised (always): "the server
        // MUST accept all commands with this bit set (even by ignoring the bit)"; it only
        // acts on the commands that write.
        let allowed = proto::CMD_FLAG_FUA
            | match q.typ {
                proto::CMD_READ if self.agreed.structured => proto::CMD_FLAG_DF,
                proto::CMD_READ | proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_FLUSH => 0,
                proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE,
                proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
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
            && (!self.agreed.structured || !self.agreed.base_allocation || q.len == 0)
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

    fn supports_flush(&self) -> bool {
        self.att.export.bdev.backend().io_types().flush
    }

    /// A valid request: answer it at once or give it a slot (and a buffer).
    fn accept(&mut self, q: Request, sock: &mut ClientSocket) {
        if q.typ == proto::CMD_BLOCK_STATUS {
            self.block_status(q, sock);
            return;
        }
        let out = &mut sock.output;
        match q.typ {
            proto::CMD_FLUSH if !self.supports_flush() => {
                // Nothing volatile to make durable.
                self.reply(out, q.cookie, 0);
                return;
            }
            proto::CMD_READ | proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES
                if q.len == 0 =>
            {
                self.reply(out, q.cookie, 0);
                return;
            }
            _ => {}
        }
        let buf = if matches!(q.typ, proto::CMD_READ | proto::CMD_WRITE) {
            match out.pool().get(q.len as usize) {
                Some(b) => Some(b),
                None => {
                    if q.typ == proto::CMD_WRITE {
                        self.incoming = Incoming::Skipping {
                            left: q.len as u64,
                            cookie: q.cookie,
                            error: proto::ENOMEM,
                        };
                    } else {
                        self.reply(out, q.cookie, proto::ENOMEM);
                    }
                    return;
                }
            }
        } else {
            None
        };
        let slot = self.requests.insert(Accepted {
            req: q,
            buf,
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        });
        if q.typ == proto::CMD_WRITE {
            self.incoming = Incoming::Payload { slot, got: 0 };
        } else {
            self.submit(slot);
        }
    }

    /// `NBD_CMD_BLOCK_STATUS` for `base:allocation`: the backend's allocation map, asked
    /// here when it answers from memory, else on a helper thread (the reply is sent when
    /// [`Transmission::reap_status`] sees it; replies may come out of order, as proto.md
    /// allows).
    fn block_status(&mut self, q: Request, sock: &mut ClientSocket) {
        let export = &self.att.export;
        let bdev = export.bdev.clone();
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
        if !export.bdev.backend().allocation_blocks() {
            let r = query();
            self.answer_status(&mut sock.output, q.cookie, len, r);
            return;
        }
        let results = match &self.status.results {
            Some(r) => r.clone(),
            None => {
                // The helper signals through an eventfd the connection's epoll watches.
                let r = Results::new().and_then(|r| {
                    sock.watch(r.fd(), EP_STATUS)?;
                    Ok(r)
                });
                match r {
                    Ok(r) => {
                        self.status.results = Some(r.clone());
                        r
                    }
                    Err(e) => {
                        tracing::warn!(conn = self.conn, "block status queue: {e}");
                        self.reply(&mut sock.output, q.cookie, proto::EIO);
                        return;
                    }
                }
            }
        };
        self.status.pending += 1;
        offload::run(&results, q.cookie, query);
    }

    /// Answers finished offloaded block-status queries; returns how many.
    pub fn reap_status(&mut self, out: &mut SendQueue) -> usize {
        if self.status.pending == 0 {
            return 0;
        }
        let Some(r) = self.status.results.clone() else {
            return 0;
        };
        let mut done = std::mem::take(&mut self.status.scratch);
        r.take(&mut done);
        let n = done.len();
        for (cookie, res) in done.drain(..) {
            self.status.pending = self.status.pending.saturating_sub(1);
            // The length only bounds the extents; the backend already clipped them.
            self.answer_status(out, cookie, u32::MAX as u64, res);
        }
        self.status.scratch = done;
        n
    }

    /// Queues the block-status reply: extents as (length, NBD_STATE_*) clipped to `len`
    /// bytes, or an error chunk.
    fn answer_status(
        &self,
        out: &mut SendQueue,
        cookie: u64,
        len: u64,
        r: Result<Vec<Extent>, Errno>,
    ) {
        let extents = match r {
            Ok(v) => v,
            Err(e) => {
                self.reply(out, cookie, proto::wire_errno(e.0));
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
        out.push_bytes(chunk);
    }

    /// Hands a request to the bdev channel. A request with FUA goes through
    /// [`BdevChannel::submit_fua`]: its one completion comes once what it wrote is durable
    /// (proto.md "NBD_CMD_FLAG_FUA": no reply before then).
    fn submit(&mut self, slot: usize) {
        let Some(a) = self.requests.get_mut(slot) else {
            return;
        };
        if let Some(b) = a.buf.as_mut() {
            a.iov = libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: a.req.len as usize,
            };
        }
        // SAFETY: `a.iov` lives in the boxed request, which stays in its slot (never moved,
        // never freed) until this tag's completion is reaped; the buffer is owned by the
        // request for as long.
        let iovs = unsafe { IoVecs::from_slice(std::slice::from_ref(&a.iov)) };
        let q = a.req;
        let op = match q.typ {
            proto::CMD_READ => IoOp::Read {
                offset: q.offset,
                iovs,
            },
            proto::CMD_WRITE => IoOp::Write {
                offset: q.offset,
                iovs,
            },
            proto::CMD_TRIM => IoOp::Unmap {
                offset: q.offset,
                len: q.len as u64,
            },
            proto::CMD_WRITE_ZEROES => IoOp::WriteZeroes {
                offset: q.offset,
                len: q.len as u64,
                may_unmap: q.flags & proto::CMD_FLAG_NO_HOLE == 0,
            },
            _ => IoOp::Flush,
        };
        let tag = slot as u64;
        if q.flags & proto::CMD_FLAG_FUA != 0 {
            // SAFETY: see above.
            unsafe { self.chan.submit_fua(tag, op) };
        } else {
            // SAFETY: see above.
            unsafe { self.chan.submit(tag, op) };
        }
    }

    /// Reaps completions and answers them; returns how many.
    pub fn reap(&mut self, out: &mut SendQueue) -> usize {
        let mut done = std::mem::take(&mut self.completions);
        let n = self.chan.poll(&mut |t, r| done.push((t, r)));
        for (tag, r) in done.drain(..) {
            self.on_complete(out, tag, r);
        }
        self.completions = done;
        if n > 0 {
            self.chan.kick();
        }
        n
    }

    fn on_complete(&mut self, out: &mut SendQueue, tag: u64, r: IoResult) {
        if tag == FINAL_FLUSH_TAG {
            if let Err(e) = r {
                tracing::warn!(conn = self.conn, "flush at disconnect failed: {e}");
            }
            self.final_flush = FinalFlush::Done;
            return;
        }
        let slot = tag as usize;
        let Some(mut a) = self.requests.release(slot) else {
            tracing::error!(conn = self.conn, tag, "completion for an unknown request");
            return;
        };
        let err = match r {
            Ok(()) => 0,
            Err(e) => proto::wire_errno(e.0),
        };
        let buf = a.buf.take();
        let q = a.req;
        if q.typ == proto::CMD_READ && err == 0 {
            let head = if self.agreed.structured {
                proto::offset_data_header(q.cookie, q.offset, q.len).to_vec()
            } else {
                proto::simple_reply(0, q.cookie).to_vec()
            };
            out.push(head, buf, q.len as usize);
            return;
        }
        if let Some(b) = buf {
            out.pool().put(b);
        }
        self.reply(out, q.cookie, err);
    }

    /// Closing: once nothing is in flight, flush the bdev once (not for a read-only export
    /// or a backend without a volatile cache).
    pub fn advance_close(&mut self) {
        if self.requests.in_flight > 0 || self.final_flush != FinalFlush::NotStarted {
            return;
        }
        if !self.att.export.readonly && self.supports_flush() {
            // SAFETY: a flush carries no buffer.
            unsafe { self.chan.submit(FINAL_FLUSH_TAG, IoOp::Flush) };
            self.chan.kick();
            self.final_flush = FinalFlush::InFlight;
        } else {
            self.final_flush = FinalFlush::Done;
        }
    }

    /// Whether a closing transmission is over: nothing in the backend, the final flush
    /// done, and no block-status query left (or `grace_over`: they are given up on).
    pub fn settled(&self, grace_over: bool) -> bool {
        self.requests.in_flight == 0
            && (self.status.pending == 0 || grace_over)
            && self.final_flush == FinalFlush::Done
    }

    /// Dropped by a reactor shutdown while requests are in the backend: waits for them
    /// (bounded) so no buffer the backend uses is freed, and leaks what never completes.
    pub fn drain_for_drop(mut self, out: &mut SendQueue) {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        self.abandon_payload();
        while self.requests.in_flight > 0 && Instant::now() < deadline {
            if self.reap(out) == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        if self.requests.in_flight > 0 {
            tracing::error!(
                conn = self.conn,
                in_flight = self.requests.in_flight,
                "nbd connection dropped with I/O in flight: leaking its buffers"
            );
            let Transmission { requests, chan, .. } = self;
            std::mem::forget(requests);
            std::mem::forget(chan);
        }
    }
}
