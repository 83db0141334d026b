//! One NBD client connection, served by a [`Poller`] on one reactor.
//!
//! The socket is non-blocking. The handshake ([`Negotiation`]) and then the transmission
//! phase ([`Transmission`]) are driven from the same poll, so a slow or hostile client
//! never blocks a thread; [`ClientSocket`] holds the buffered input and the queued replies.
//!
//! Closing (EOF, bad magic, `NBD_CMD_DISC`, server stop, send failure) stops reading, waits
//! for every submitted request (a buffer the backend still writes into is never freed),
//! flushes the bdev, sends what is queued (for at most [`CLOSE_GRACE`]), then reports
//! [`Poller::finished`] so the reactor drops it.

use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::buf::BufPool;
use super::export::Attachment;
use super::negotiation::{Agreed, Negotiation, Next, Step, Unopenable};
use super::proto;
use super::socket::{ClientSocket, Received};
use super::transmission::{InputStep, Transmission};
use crate::reactor::Poller;
use crate::sync::lock;

/// The registry moved to [`super::conns`]; `mod.rs` and `server.rs` still import it from here.
pub use super::conns::{ConnCtx, ConnEntry, Conns};

/// Requests a connection may have in flight before it stops reading the socket.
pub const MAX_IN_FLIGHT: usize = 128;
/// Reply bytes queued before the connection stops reading (client not reading replies).
const MAX_OUT_BYTES: usize = 64 * 1024 * 1024;
/// Data bytes one connection may hold before it stops reading requests: buffers of
/// requests in flight plus replies not sent yet. Each request may carry up to
/// `export::MAX_REQUEST_BYTES`, so without this a client could make the daemon allocate
/// `MAX_IN_FLIGHT` times that. Beyond it the connection applies backpressure (proto.md
/// lets a server delay reading requests); it never refuses a valid request.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// How long a closing connection keeps trying to send queued replies.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Where the connection is in the protocol.
enum Phase {
    Negotiating(Negotiation),
    Transmitting(Box<Transmission>),
}

/// One client connection.
pub struct Conn {
    id: u64,
    ctx: Arc<ConnCtx>,
    entry: Arc<ConnEntry>,
    sock: ClientSocket,
    phase: Phase,
    /// Set when closing starts (no more input is read from then on): until when queued
    /// replies and block-status answers are waited for.
    closing_until: Option<Instant>,
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
        c.sock.output.push_bytes(proto::greeting().to_vec());
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
        c.enter_transmission(att, Default::default())?;
        Ok(c)
    }

    fn bare(
        id: u64,
        ctx: Arc<ConnCtx>,
        entry: Arc<ConnEntry>,
        fd: OwnedFd,
    ) -> std::io::Result<Self> {
        Ok(Conn {
            id,
            ctx,
            entry,
            sock: ClientSocket::new(fd)?,
            phase: Phase::Negotiating(Negotiation::new()),
            closing_until: None,
        })
    }

    /// Attaches to the export: opens the bdev channel on this reactor.
    fn enter_transmission(&mut self, att: Attachment, agreed: Agreed) -> std::io::Result<()> {
        let t = Transmission::open(self.id, att, agreed, &self.sock)?;
        let export = &t.attachment().export;
        self.sock
            .output
            .set_pool(BufPool::new(export.bdev.backend().buf_align()));
        *lock(&self.entry.export) = Some(export.name.clone());
        tracing::info!(conn = self.id, peer = %self.entry.peer, export = %export.name,
                       structured = agreed.structured, "nbd client attached");
        self.phase = Phase::Transmitting(Box::new(t));
        Ok(())
    }

    fn transmitting(&self) -> Option<&Transmission> {
        match &self.phase {
            Phase::Transmitting(t) => Some(t),
            Phase::Negotiating(_) => None,
        }
    }

    fn transmitting_mut(&mut self) -> Option<&mut Transmission> {
        match &mut self.phase {
            Phase::Transmitting(t) => Some(t),
            Phase::Negotiating(_) => None,
        }
    }

    fn begin_close(&mut self, why: &str) {
        if self.closing_until.is_none() {
            tracing::debug!(conn = self.id, peer = %self.entry.peer, "nbd connection closing: {why}");
            self.closing_until = Some(Instant::now() + CLOSE_GRACE);
        }
        if let Some(t) = self.transmitting_mut() {
            t.abandon_payload();
        }
    }

    /// Whether the close grace period is over.
    fn grace_over(&self) -> bool {
        self.closing_until.is_some_and(|d| Instant::now() >= d)
    }

    fn want_read(&self) -> bool {
        let t = self.transmitting();
        // A write payload being received already has its buffer: finishing it costs
        // nothing more, and the request cannot complete (and free bytes) before.
        let held = t.map_or(0, Transmission::buffered_bytes) + self.sock.output.bytes();
        let bytes_ok = held < MAX_IN_FLIGHT_BYTES || t.is_some_and(Transmission::in_payload);
        self.closing_until.is_none()
            && t.map_or(0, Transmission::outstanding) < MAX_IN_FLIGHT
            && self.sock.output.bytes() < MAX_OUT_BYTES
            && bytes_ok
    }

    /// Sends what the socket accepts; returns bytes sent.
    fn flush_out(&mut self) -> usize {
        let (sent, err) = self.sock.send();
        if let Some(e) = err {
            self.begin_close(&format!("send failed: {e}"));
        }
        sent
    }

    /// Whether buffered input can be acted on without reading the socket.
    fn input_ready(&self) -> bool {
        if !self.want_read() {
            return false;
        }
        let input = self.sock.input.pending();
        match &self.phase {
            Phase::Negotiating(n) => n.ready(input),
            Phase::Transmitting(t) => t.input_ready(input.len()),
        }
    }

    /// Reads and handles messages until the socket has nothing or reading must pause.
    fn read_input(&mut self) -> usize {
        let mut work = 0;
        while self.want_read() {
            let step = match &mut self.phase {
                Phase::Negotiating(n) => {
                    match n.step(self.sock.input.pending(), &*self.ctx.exports) {
                        Step::NeedMore => InputStep::NeedInput,
                        Step::Handled {
                            consumed,
                            replies,
                            next,
                        } => {
                            self.sock.input.consume(consumed);
                            self.after_option(replies, next);
                            InputStep::Progress(1)
                        }
                    }
                }
                Phase::Transmitting(t) => t.on_input(&mut self.sock),
            };
            match step {
                InputStep::Progress(n) => work += n,
                InputStep::Stalled => break,
                InputStep::Close(why) => {
                    self.begin_close(&why);
                    work += 1;
                }
                InputStep::NeedInput => {
                    if !self.receive() {
                        break;
                    }
                }
            }
        }
        work
    }

    /// Acts on a handled option: queue its replies, close, or enter transmission.
    fn after_option(&mut self, replies: Vec<u8>, next: Next<Attachment>) {
        match next {
            Next::Negotiate => self.sock.output.push_bytes(replies),
            Next::Close(why) => {
                self.sock.output.push_bytes(replies);
                self.begin_close(why);
            }
            Next::Transmit {
                attachment,
                if_unopenable,
            } => {
                let agreed = match &self.phase {
                    Phase::Negotiating(n) => n.agreed(),
                    Phase::Transmitting(_) => return,
                };
                let export = attachment.export.name.clone();
                match self.enter_transmission(attachment, agreed) {
                    Ok(()) => self.sock.output.push_bytes(replies),
                    Err(e) => match if_unopenable {
                        Unopenable::Reply(r) => {
                            tracing::error!(conn = self.id, export = %export,
                                            "cannot open the bdev channel: {e}");
                            self.sock.output.push_bytes(r);
                        }
                        Unopenable::Close(why) => self.begin_close(&format!("{why}: {e}")),
                    },
                }
            }
        }
    }

    /// Receives more input, closing on EOF or error; false when nothing was received.
    fn receive(&mut self) -> bool {
        match self.sock.receive() {
            Received::Bytes(_) => true,
            Received::Nothing => false,
            Received::Eof => {
                let mid = !self.sock.input.is_empty()
                    || self.transmitting().is_some_and(Transmission::in_payload);
                self.begin_close(if mid {
                    "client disconnected in the middle of a message"
                } else {
                    "client disconnected"
                });
                false
            }
            Received::Failed(e) => {
                self.begin_close(&format!("recv failed: {e}"));
                false
            }
        }
    }

    /// Reaps bdev completions and block-status answers; returns how many.
    fn reap(&mut self) -> usize {
        match &mut self.phase {
            Phase::Transmitting(t) => t.reap(&mut self.sock.output),
            Phase::Negotiating(_) => 0,
        }
    }
}

impl Poller for Conn {
    fn poll(&mut self) -> usize {
        if self.closing_until.is_none() && self.entry.stop.load(Ordering::Acquire) {
            self.begin_close("server stop or export removal");
        }
        let mut work = self.reap();
        if let Phase::Transmitting(t) = &mut self.phase {
            work += t.reap_status(&mut self.sock.output);
        }
        work += self.read_input();
        if let Some(t) = self.transmitting_mut() {
            t.channel_mut().kick();
        }
        work += self.reap();
        if self.closing_until.is_some() {
            if let Some(t) = self.transmitting_mut() {
                t.advance_close();
            }
        }
        work += self.flush_out();
        work
    }

    fn arm(&mut self) -> bool {
        let want_read = self.want_read();
        self.sock.update_interest(want_read);
        let backend_pending = self
            .transmitting_mut()
            .is_some_and(|t| t.channel_mut().arm());
        backend_pending || self.input_ready()
    }

    fn disarm(&mut self) {}

    fn wake_fds(&self) -> Vec<RawFd> {
        vec![self.sock.wake_fd()]
    }

    fn next_deadline(&self) -> Option<Instant> {
        let t = self.transmitting();
        let chan = t.and_then(|t| t.channel().next_deadline());
        let waiting = !self.sock.output.is_empty() || t.is_some_and(|t| t.status_pending() > 0);
        let close = self.closing_until.filter(|_| waiting);
        match (chan, close) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn request_stop(&mut self) {
        self.begin_close("poller stop requested");
    }

    fn awaits_helper_threads(&self) -> bool {
        self.transmitting()
            .is_some_and(|t| t.channel().awaits_helper_threads())
    }

    fn finished(&self) -> bool {
        let grace_over = self.grace_over();
        self.closing_until.is_some()
            && self.transmitting().is_none_or(|t| t.settled(grace_over))
            && (self.sock.output.is_empty() || self.sock.output.failed() || grace_over)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let phase = std::mem::replace(&mut self.phase, Phase::Negotiating(Negotiation::new()));
        if let Phase::Transmitting(t) = phase {
            t.drain_for_drop(&mut self.sock.output);
        }
        self.ctx.conns.unregister(self.id);
        tracing::info!(conn = self.id, peer = %self.entry.peer, "nbd connection closed");
    }
}

#[cfg(test)]
mod tests;
