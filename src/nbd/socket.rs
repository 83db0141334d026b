//! The client socket of an NBD connection: the non-blocking fd, the private epoll the
//! reactor waits on, the receive buffer, and the queue of replies sent with `sendmsg`
//! (several replies, headers and read data, per call).

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::buf::{AlignedBuf, BufPool};
use super::negotiation::MAX_OPT_LEN;

/// Receive buffer: room for a maximal option and its header.
const INBUF_LEN: usize = MAX_OPT_LEN + 4096;
/// Replies gathered per `sendmsg`.
const MAX_IOV: usize = 64;

/// Epoll data of the client socket in the connection's epoll.
const EP_SOCKET: u64 = 0;
/// Epoll data of the bdev channel's completion fd.
pub const EP_CHANNEL: u64 = 1;
/// Epoll data of the offloaded-query eventfd.
pub const EP_STATUS: u64 = 2;

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

/// What a `recv` gave.
#[derive(Debug)]
pub enum Received {
    /// This many bytes (more than zero).
    Bytes(usize),
    /// The client closed its end.
    Eof,
    /// Nothing now (the socket is empty, or there is no room to receive into).
    Nothing,
    /// A socket error: the connection is over.
    Failed(std::io::Error),
}

/// One `recv` into `dst`, retried on EINTR.
fn recv(fd: RawFd, dst: &mut [u8]) -> Received {
    loop {
        // SAFETY: `dst` is a valid, exclusively borrowed buffer of `dst.len()` bytes.
        let r = unsafe { libc::recv(fd, dst.as_mut_ptr().cast(), dst.len(), 0) };
        if r > 0 {
            return Received::Bytes(r as usize);
        }
        if r == 0 {
            return Received::Eof;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return Received::Nothing,
            _ => return Received::Failed(e),
        }
    }
}

/// Bytes received and not consumed yet.
pub struct RecvBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    fn new(len: usize) -> Self {
        RecvBuf {
            buf: vec![0u8; len].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The unconsumed bytes.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// How many bytes are unconsumed.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether everything received was consumed.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Drops the first `n` unconsumed bytes (at most all of them).
    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
    }

    /// The free end to receive into (unconsumed bytes are moved to the front when the end
    /// is reached); None when full.
    fn room(&mut self) -> Option<&mut [u8]> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end;
        self.buf.get_mut(end..).filter(|r| !r.is_empty())
    }
}

/// Bytes to send: a header and optionally data from a pooled buffer.
struct Outgoing {
    head: Vec<u8>,
    data: Option<AlignedBuf>,
    data_len: usize,
    /// Bytes of head+data already sent.
    pos: usize,
}

impl Outgoing {
    fn total(&self) -> usize {
        self.head.len() + self.data_len
    }
}

/// Replies waiting for the socket, and the pool their data buffers go back to once sent.
pub struct SendQueue {
    queue: VecDeque<Outgoing>,
    /// Bytes queued and not sent yet.
    bytes: usize,
    /// A send failed: nothing more is queued.
    failed: bool,
    /// Data buffers of the connection (read data is sent from them).
    pool: BufPool,
}

impl SendQueue {
    fn new() -> Self {
        SendQueue {
            queue: VecDeque::new(),
            bytes: 0,
            failed: false,
            pool: BufPool::new(8),
        }
    }

    /// The connection's data buffers.
    pub fn pool(&mut self) -> &mut BufPool {
        &mut self.pool
    }

    /// Replaces the buffer pool (transmission wants the backend's alignment).
    pub fn set_pool(&mut self, pool: BufPool) {
        self.pool = pool;
    }

    /// Bytes queued and not sent yet.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether a send failed (the queue is dropped and stays empty).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Queues bytes without data.
    pub fn push_bytes(&mut self, head: Vec<u8>) {
        self.push(head, None, 0);
    }

    /// Queues `head` followed by the first `data_len` bytes of `data`.
    pub fn push(&mut self, head: Vec<u8>, data: Option<AlignedBuf>, data_len: usize) {
        if self.failed {
            if let Some(b) = data {
                self.pool.put(b);
            }
            return;
        }
        let o = Outgoing {
            head,
            data,
            data_len,
            pos: 0,
        };
        self.bytes += o.total();
        self.queue.push_back(o);
    }

    /// Drops everything queued.
    fn clear(&mut self) {
        while let Some(o) = self.queue.pop_front() {
            if let Some(b) = o.data {
                self.pool.put(b);
            }
        }
        self.bytes = 0;
    }

    /// Sends what the socket accepts; returns the bytes sent, and the error that ended the
    /// connection's output if one did (the queue is then dropped).
    fn send(&mut self, fd: RawFd) -> (usize, Option<std::io::Error>) {
        let mut sent_total = 0;
        while !self.queue.is_empty() && !self.failed {
            let mut iov: [libc::iovec; MAX_IOV] = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOV];
            let mut n = 0;
            for o in self.queue.iter_mut() {
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
                        let base = unsafe { d.as_mut_ptr().add(from) };
                        iov[n] = libc::iovec {
                            iov_base: base.cast(),
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
                libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => break,
                    std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        self.failed = true;
                        self.clear();
                        return (sent_total, Some(e));
                    }
                }
            }
            let mut left = r as usize;
            sent_total += left;
            self.bytes -= left;
            while left > 0 {
                let Some(o) = self.queue.front_mut() else {
                    break;
                };
                let rest = o.total() - o.pos;
                if left >= rest {
                    left -= rest;
                    self.pop_front();
                } else {
                    o.pos += left;
                    left = 0;
                }
            }
            // Drop fully sent zero-length entries.
            while self.queue.front().is_some_and(|o| o.pos >= o.total()) {
                self.pop_front();
            }
        }
        (sent_total, None)
    }

    fn pop_front(&mut self) {
        if let Some(Outgoing { data: Some(b), .. }) = self.queue.pop_front() {
            self.pool.put(b);
        }
    }
}

/// The client's socket with its buffers.
pub struct ClientSocket {
    fd: OwnedFd,
    /// Watches the socket (IN/OUT as needed), the channel's completion fd and the
    /// offloaded-query eventfd; its own fd is what the reactor watches.
    ep: Epoll,
    /// Socket events registered in `ep` (0 = not registered).
    registered: u32,
    /// The last `recv` found the socket empty: ask epoll before the next one.
    drained: bool,
    pub input: RecvBuf,
    pub output: SendQueue,
}

impl ClientSocket {
    /// Takes `fd`, making it non-blocking.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(ClientSocket {
            fd,
            ep: Epoll::new()?,
            registered: 0,
            drained: false,
            input: RecvBuf::new(INBUF_LEN),
            output: SendQueue::new(),
        })
    }

    /// The fd the reactor sleeps on.
    pub fn wake_fd(&self) -> RawFd {
        self.ep.as_raw_fd()
    }

    /// Adds `fd` (readable) to the connection's epoll under `data`.
    pub fn watch(&self, fd: RawFd, data: u64) -> std::io::Result<()> {
        self.ep.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, data),
        )
    }

    /// Receives into the input buffer, skipping the `recv` when the socket was found empty
    /// last time and epoll says it still is.
    pub fn receive(&mut self) -> Received {
        if self.drained && !self.readable() {
            return Received::Nothing;
        }
        let fd = self.fd.as_raw_fd();
        let Some(room) = self.input.room() else {
            return Received::Nothing;
        };
        let r = recv(fd, room);
        match r {
            Received::Bytes(n) => {
                self.input.end += n;
                self.drained = false;
            }
            Received::Eof => self.drained = false,
            Received::Nothing => self.drained = true,
            Received::Failed(_) => {}
        }
        r
    }

    /// One `recv` straight into `dst` (write payloads skip the input buffer).
    pub fn recv_into(&self, dst: &mut [u8]) -> Received {
        recv(self.fd.as_raw_fd(), dst)
    }

    /// Sends what the socket accepts: bytes sent, and the error that ended output if any.
    pub fn send(&mut self) -> (usize, Option<std::io::Error>) {
        self.output.send(self.fd.as_raw_fd())
    }

    /// Whether the socket may have input, asked of the private epoll (`epoll_wait` with a
    /// zero timeout) rather than with a `recv` that finds nothing.
    ///
    /// A reactor that busy-polls would otherwise call `recv` on an empty socket on every
    /// pass: a costlier syscall than an empty `epoll_wait`, which also takes the socket's
    /// locks the client's `send` needs.
    fn readable(&mut self) -> bool {
        if self.registered & EventSet::IN.bits() == 0 {
            // Not watched yet (a reactor that never slept): watch it, and read this time.
            // Only called while the connection reads.
            self.update_interest(true);
            return true;
        }
        let mut ev = [EpollEvent::default(); 4];
        match self.ep.wait(0, &mut ev) {
            Ok(n) => ev[..n].iter().any(|e| {
                e.data() == EP_SOCKET
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

    /// Keeps the socket's registration in the private epoll in line with what the
    /// connection waits for: input when `want_read`, room to send when replies are queued.
    pub fn update_interest(&mut self, want_read: bool) {
        let mut want = 0u32;
        if want_read {
            want |= EventSet::IN.bits();
        }
        if !self.output.is_empty() && !self.output.failed() {
            want |= EventSet::OUT.bits();
        }
        if want == self.registered {
            return;
        }
        let fd = self.fd.as_raw_fd();
        let ev = EpollEvent::new(EventSet::from_bits_truncate(want), EP_SOCKET);
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
            Err(e) => tracing::warn!("epoll_ctl on the nbd client socket: {e}"),
        }
    }
}
