//! The JSON-RPC Unix socket server, wire-compatible with SPDK's (`lib/jsonrpc`).
//!
//! Framing is SPDK's: a client writes JSON-RPC 2.0 request objects back to back with no
//! delimiter (whitespace between them is allowed); one object may arrive in many reads and
//! one read may hold several objects. Each connection is served on its own thread (this is
//! the control plane; handlers may block while they wait on reactors), requests of one
//! connection are answered in order. Errors follow JSON-RPC 2.0 §5.1: malformed JSON answers
//! -32700 with a null id and closes the connection (the stream cannot be resynchronised),
//! a structurally invalid request answers -32600, an unknown method -32601. A request
//! without an `id` member is a notification (§4.1): it runs and gets no answer.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{code, RpcContext, RpcError};
use crate::sync::lock;

/// Unparsed bytes a connection may accumulate before it is answered -32700 and closed
/// (SPDK caps a request at a similar size).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Connections served at once (SPDK's `SPDK_JSONRPC_MAX_CONNS`). A new connection beyond
/// it takes the slot of the connection idle the longest (see `evict_idlest`); only when
/// every connection is running a request is it closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a request may take to arrive once its first byte did; a client that stops
/// in the middle of one is disconnected (SPDK has no such timeout: its fixed connection
/// limit then locks every other client out).
pub const PARTIAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client that stops reading its answers blocks its connection thread at most this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The RPC socket, bound and listening but not served yet.
///
/// `blockd` binds before it starts reactors and replays `--json`, so that a second daemon
/// pointed at the same socket fails before it touches anything; clients that connect during
/// the replay wait in the listen backlog. Dropping it removes the socket file (only if the
/// file is still the one it created).
pub struct RpcListener {
    listener: UnixListener,
    path: PathBuf,
    ident: (u64, u64),
}

impl RpcListener {
    /// Binds `path`. A live daemon answering on it is an error naming its pid; a stale socket
    /// file (nobody listening) is replaced; anything that is not a socket is left alone and
    /// is an error; a missing parent directory is an error naming it.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                anyhow::bail!(
                    "cannot create RPC socket {}: directory {} does not exist",
                    path.display(),
                    parent.display()
                );
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(s) => {
                    let pid = crate::unix_socket::peer_pid(&s)
                        .map(|p| format!("pid {p}"))
                        .unwrap_or_else(|| "pid unknown".into());
                    anyhow::bail!(
                        "RPC socket {} is in use by another blockd ({pid})",
                        path.display()
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "removing stale RPC socket");
                    std::fs::remove_file(path).map_err(|e| {
                        anyhow::anyhow!("cannot remove stale RPC socket {}: {e}", path.display())
                    })?;
                }
                Err(e) => anyhow::bail!(
                    "RPC socket {} exists and cannot be probed: {e}",
                    path.display()
                ),
            },
            Ok(_) => anyhow::bail!(
                "cannot create RPC socket {}: a file that is not a socket exists there",
                path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot create RPC socket {}: {e}", path.display()),
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| anyhow::anyhow!("cannot create RPC socket {}: {e}", path.display()))?;
        let md = std::fs::symlink_metadata(path)
            .map_err(|e| anyhow::anyhow!("RPC socket {} vanished: {e}", path.display()))?;
        Ok(RpcListener {
            listener,
            path: path.to_path_buf(),
            ident: (md.dev(), md.ino()),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RpcListener {
    fn drop(&mut self) {
        // Remove the file only if it is still ours (a later daemon may have replaced it).
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if (md.dev(), md.ino()) == self.ident {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
        }
    }
}

struct Shared {
    stopping: AtomicBool,
    next_conn: AtomicU64,
    /// Open connections (clones used to shut them down on stop or eviction).
    conns: Mutex<HashMap<u64, OpenConn>>,
}

/// [`ConnState::state`] values: waiting for (or reading) a request, running one, closed to
/// make room for a new connection.
const IDLE: u8 = 0;
const BUSY: u8 = 1;
const EVICTED: u8 = 2;

/// What the accept thread knows of one connection, to pick one to evict.
struct ConnState {
    /// `IDLE`, `BUSY` or `EVICTED`. The connection thread moves IDLE -> BUSY before it runs
    /// a request and back after answering; the accept thread moves IDLE -> EVICTED. Both by
    /// compare-and-swap, so a request that started is never cut off, and an evicted
    /// connection runs nothing more.
    state: AtomicU8,
    /// When the connection last finished a request (or was accepted).
    last_active: Mutex<Instant>,
}

struct OpenConn {
    stream: UnixStream,
    state: Arc<ConnState>,
}

/// A running JSON-RPC server: one accept thread, one thread per connection.
pub struct RpcServer {
    shared: Arc<Shared>,
    listener: Mutex<Option<Arc<RpcListener>>>,
    accept: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

impl RpcServer {
    /// Binds `path` (see [`RpcListener::bind`]) and serves `app`'s methods on it.
    pub fn start<C: RpcContext>(app: Arc<C>, path: &Path) -> anyhow::Result<RpcServer> {
        Self::serve(app, RpcListener::bind(path)?)
    }

    /// Serves `app`'s methods on an already bound socket.
    pub fn serve<C: RpcContext>(app: Arc<C>, listener: RpcListener) -> anyhow::Result<RpcServer> {
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        });
        let path = listener.path.clone();
        let listener = Arc::new(listener);
        let t = {
            let shared = shared.clone();
            let listener = listener.clone();
            std::thread::Builder::new()
                .name("rpc_accept".into())
                .spawn(move || accept_loop(app, &listener, shared))?
        };
        Ok(RpcServer {
            shared,
            listener: Mutex::new(Some(listener)),
            accept: Mutex::new(Some(t)),
            path,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, closes open connections (a handler already running finishes, its
    /// answer is lost) and removes the socket file. Idempotent.
    pub fn stop(&self) {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(l) = lock(&self.listener).as_ref() {
            // On Linux, shutdown() of a listening socket wakes a blocked accept() (EINVAL).
            // SAFETY: the fd is owned by the listener, alive while we hold the Arc.
            unsafe { libc::shutdown(l.listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(t) = lock(&self.accept).take() {
            if t.join().is_err() {
                tracing::error!("the RPC accept thread panicked");
            }
        }
        for (_, c) in lock(&self.shared.conns).drain() {
            // Fails only when the peer is already gone (ENOTCONN): nothing left to wake.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        // Last reference: dropping it closes the fd and removes the file.
        lock(&self.listener).take();
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop<C: RpcContext>(app: Arc<C>, listener: &RpcListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("RPC accept failed: {e}");
                    // Out of fds and the like: do not spin.
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            state: AtomicU8::new(IDLE),
            last_active: Mutex::new(Instant::now()),
        });
        {
            let mut conns = lock(&shared.conns);
            if conns.len() >= MAX_CONNECTIONS && !evict_idlest(&mut conns) {
                tracing::warn!(
                    "refusing RPC connection: {MAX_CONNECTIONS} open, all running requests"
                );
                continue;
            }
            match stream.try_clone() {
                Ok(c) => {
                    conns.insert(
                        id,
                        OpenConn {
                            stream: c,
                            state: state.clone(),
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!("RPC connection dropped: {e}");
                    continue;
                }
            }
        }
        let app = app.clone();
        let shared2 = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("rpc_conn{id}"))
            .spawn(move || {
                match serve_connection(&app, stream, &state) {
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        tracing::warn!(conn = id, "RPC connection closed: {e}");
                    }
                    Err(e) => tracing::debug!(conn = id, "RPC connection ended: {e}"),
                    Ok(()) => {}
                }
                lock(&shared2.conns).remove(&id);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start RPC connection thread: {e}");
            lock(&shared.conns).remove(&id);
        }
    }
}

/// Makes room for a new connection: closes the connection idle the longest (not running a
/// request). A client that holds connections open without completing requests thus cannot
/// lock others out; a busy server keeps its running requests. False when every
/// connection runs a request.
fn evict_idlest(conns: &mut HashMap<u64, OpenConn>) -> bool {
    let mut idle: Vec<(Instant, u64)> = conns
        .iter()
        .filter(|(_, c)| c.state.state.load(Ordering::Acquire) == IDLE)
        .map(|(id, c)| (*lock(&c.state.last_active), *id))
        .collect();
    idle.sort_unstable();
    for (_, id) in idle {
        let Some(c) = conns.get(&id) else { continue };
        if c.state
            .state
            .compare_exchange(IDLE, EVICTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(
                conn = id,
                "{MAX_CONNECTIONS} RPC connections open: closing the one idle the longest"
            );
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            conns.remove(&id);
            return true;
        }
    }
    false
}

fn serve_connection<C: RpcContext>(
    app: &Arc<C>,
    mut stream: UnixStream,
    conn: &ConnState,
) -> io::Result<()> {
    ON_CONNECTION.set(true);
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut framer = Framer::default();
    let mut chunk = vec![0u8; 64 * 1024];
    // When the first byte of the request being received arrived.
    let mut partial_since: Option<Instant> = None;
    loop {
        let timeout = match partial_since {
            None => None,
            Some(t) => match PARTIAL_REQUEST_TIMEOUT.checked_sub(t.elapsed()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(partial_timeout()),
            },
        };
        stream.set_read_timeout(timeout)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(partial_timeout())
            }
            Err(e) => return Err(e),
        };
        framer.push(&chunk[..n]);
        loop {
            match framer.next_value() {
                Frame::Value(v) => {
                    if conn
                        .state
                        .compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        // Evicted: the connection is closed, run nothing more.
                        return Ok(());
                    }
                    let reply = handle_request(app, v);
                    let written = reply.map_or(Ok(()), |r| write_reply(&mut stream, &r));
                    *lock(&conn.last_active) = Instant::now();
                    conn.state.store(IDLE, Ordering::Release);
                    written?;
                    if let Some(sig) = SIGNAL_AFTER_REPLY.take() {
                        raise(sig);
                    }
                }
                Frame::NeedMore => break,
                Frame::Error(e) => {
                    tracing::debug!("RPC parse error: {e}");
                    write_reply(
                        &mut stream,
                        &error_reply(Value::Null, code::PARSE_ERROR, "Parse error"),
                    )?;
                    return Ok(());
                }
            }
        }
        partial_since = match (framer.pending(), partial_since) {
            (0, _) => None,
            (_, None) => Some(Instant::now()),
            (_, since) => since,
        };
        if framer.pending() > MAX_REQUEST_BYTES {
            tracing::warn!("RPC request larger than {MAX_REQUEST_BYTES} bytes, closing");
            write_reply(
                &mut stream,
                &error_reply(Value::Null, code::PARSE_ERROR, "Parse error"),
            )?;
            return Ok(());
        }
    }
}

fn partial_timeout() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("request incomplete after {PARTIAL_REQUEST_TIMEOUT:?}, closing"),
    )
}

thread_local! {
    /// Whether this thread serves an RPC connection.
    static ON_CONNECTION: Cell<bool> = const { Cell::new(false) };
    /// A signal the request being handled on this connection asked for.
    static SIGNAL_AFTER_REPLY: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Raises `sig` against the daemon once the reply to the request being handled is written,
/// so that the caller (`spdk_kill_instance`) gets its answer before the stop closes the
/// connections. Kept per connection thread: another client's request ending first must
/// not raise it early. Outside a connection (a `--json` replay) there is no reply to wait
/// for, and the signal is raised at once.
pub fn raise_after_reply(sig: i32) {
    if ON_CONNECTION.get() {
        SIGNAL_AFTER_REPLY.set(Some(sig));
    } else {
        raise(sig);
    }
}

fn raise(sig: i32) {
    tracing::info!(signal = sig, "raising a signal an RPC asked for");
    // SAFETY: kill(2) on our own pid; the signal number comes from a method's table.
    unsafe { libc::kill(libc::getpid(), sig) };
}

fn write_reply(stream: &mut UnixStream, reply: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)
}

fn error_reply(id: Value, code: i32, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// Validates one decoded value as a JSON-RPC 2.0 request (§4), runs it, and returns the
/// answer (`None` for a notification).
pub(crate) fn handle_request<C: RpcContext>(app: &Arc<C>, v: Value) -> Option<Value> {
    let invalid = |id: Value| Some(error_reply(id, code::INVALID_REQUEST, "Invalid Request"));
    let Value::Object(mut req) = v else {
        // Batches (arrays) are not supported, like SPDK before v24.
        return invalid(Value::Null);
    };
    let id = match req.remove("id") {
        None => None,
        Some(id @ (Value::Number(_) | Value::String(_) | Value::Null)) => Some(id),
        Some(_) => return invalid(Value::Null),
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if req.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid(reply_id);
    }
    let method = match req.remove("method") {
        Some(Value::String(m)) => m,
        _ => return invalid(reply_id),
    };
    let params = match req.remove("params") {
        None | Some(Value::Null) => None,
        Some(p @ (Value::Object(_) | Value::Array(_))) => Some(p),
        Some(_) => return invalid(reply_id),
    };
    tracing::debug!(%method, id = %reply_id, "RPC request");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let r = app.methods().call(app, &method, params);
        let after = app.after_call(&method, r.is_ok());
        r.and_then(|v| after.map(|()| v))
    }))
    .unwrap_or_else(|_| {
        tracing::error!(%method, "RPC handler panicked");
        Err(RpcError::internal(format!("internal error in {method}")))
    });
    let id = id?;
    Some(match result {
        Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
        Err(e) => {
            tracing::debug!(%method, code = e.code, message = %e.message, "RPC error");
            error_reply(id, e.code, &e.message)
        }
    })
}

/// The outcome of [`Framer::next_value`].
#[derive(Debug)]
pub(crate) enum Frame {
    Value(Value),
    NeedMore,
    Error(serde_json::Error),
}

/// Splits a byte stream into JSON values without a delimiter, like SPDK's server.
///
/// A cheap scanner follows nesting and strings across reads to find where a top-level value
/// may end, so serde only parses a value once it is complete; serde is also tried whenever
/// the unparsed tail has doubled since the last try, so that garbage is answered without
/// waiting for a value to end. Both keep the work linear in the bytes received, even when a
/// client sends one byte at a time.
#[derive(Default)]
pub(crate) struct Framer {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf` (consumed ones are dropped on the next push,
    /// so that many small requests in one read cost no repeated moves).
    start: usize,
    /// Offset in `buf` up to which the scanner has looked.
    scanned: usize,
    depth: usize,
    in_str: bool,
    esc: bool,
    /// Inside a top-level scalar token (number, literal).
    in_token: bool,
    /// The scanner saw a possible end of a value at this offset.
    candidate: bool,
    /// Unconsumed length at the last parse that needed more bytes.
    last_try: usize,
}

impl Framer {
    /// Appends received bytes.
    pub(crate) fn push(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Unconsumed bytes.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    fn scan(&mut self) {
        while self.scanned < self.buf.len() && !self.candidate {
            let b = self.buf[self.scanned];
            self.scanned += 1;
            if self.in_str {
                if self.esc {
                    self.esc = false;
                } else if b == b'\\' {
                    self.esc = true;
                } else if b == b'"' {
                    self.in_str = false;
                    if self.depth == 0 {
                        self.candidate = true;
                    }
                }
                continue;
            }
            let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
            if self.in_token {
                // A top-level scalar ends at the first byte that cannot continue it.
                if ws || matches!(b, b'{' | b'[' | b'"' | b'}' | b']' | b',' | b':') {
                    self.candidate = true;
                }
                continue;
            }
            match b {
                b'"' => self.in_str = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    if self.depth <= 1 {
                        self.candidate = true;
                    }
                    self.depth = self.depth.saturating_sub(1);
                }
                _ if ws => {}
                b'-' | b'0'..=b'9' | b't' | b'f' | b'n' if self.depth == 0 => self.in_token = true,
                _ if self.depth == 0 => self.candidate = true,
                _ => {}
            }
        }
    }

    fn reset_scan(&mut self) {
        self.scanned = self.start;
        self.depth = 0;
        self.in_str = false;
        self.esc = false;
        self.in_token = false;
        self.candidate = false;
        self.last_try = 0;
    }

    /// The next complete value, `NeedMore` when the bytes so far end inside one (or hold
    /// only whitespace), or the syntax error.
    pub(crate) fn next_value(&mut self) -> Frame {
        self.scan();
        let len = self.pending();
        let grown = len >= self.last_try.saturating_mul(2).max(1);
        if !self.candidate && !grown {
            return Frame::NeedMore;
        }
        if len == self.last_try {
            // Nothing new since a parse that needed more bytes.
            return Frame::NeedMore;
        }
        let mut it =
            serde_json::Deserializer::from_slice(&self.buf[self.start..]).into_iter::<Value>();
        match it.next() {
            None => {
                // Only whitespace.
                self.buf.clear();
                self.start = 0;
                self.reset_scan();
                Frame::NeedMore
            }
            Some(Ok(v)) => {
                let used = it.byte_offset();
                self.start += used;
                self.reset_scan();
                Frame::Value(v)
            }
            Some(Err(e)) if e.is_eof() => {
                self.last_try = len;
                if self.candidate {
                    // The scanner was wrong (e.g. a literal cut short); look further.
                    self.candidate = false;
                }
                Frame::NeedMore
            }
            Some(Err(e)) => Frame::Error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&[u8]]) -> (Vec<Value>, bool) {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c);
            loop {
                match f.next_value() {
                    Frame::Value(v) => out.push(v),
                    Frame::NeedMore => break,
                    Frame::Error(_) => return (out, true),
                }
            }
        }
        (out, false)
    }

    #[test]
    fn back_to_back_and_split() {
        let two = br#"{"a":1}{"b":"}{\"x"} [1,2]"#;
        let (v, err) = feed(&[two]);
        assert!(!err);
        assert_eq!(v, vec![json!({"a":1}), json!({"b":"}{\"x"}), json!([1, 2])]);
        let chunks: Vec<&[u8]> = two.chunks(1).collect();
        let (v2, err) = feed(&chunks);
        assert!(!err);
        assert_eq!(v2, v);
    }

    #[test]
    fn garbage_is_an_error_early() {
        assert!(feed(&[b"{abc"]).1);
        assert!(feed(&[b"{", b"a", b"b"]).1);
        assert!(feed(&[b"}"]).1);
        assert!(feed(&[b"xyz"]).1);
        let (v, err) = feed(&[b"{\"a\":1} garbage"]);
        assert_eq!(v, vec![json!({"a":1})]);
        assert!(err);
    }

    #[test]
    fn scalars_and_whitespace() {
        let (v, err) = feed(&[b"  12 ", b"true\n\"s\" "]);
        assert!(!err);
        assert_eq!(v, vec![json!(12), json!(true), json!("s")]);
        let (v, _) = feed(&[b"\n\n  "]);
        assert!(v.is_empty());
    }

    #[test]
    fn big_value_in_small_chunks() {
        let big = json!({"k": "x".repeat(200_000), "n": [1, 2, {"z": "]}"}]});
        let bytes = serde_json::to_vec(&big).unwrap();
        let chunks: Vec<&[u8]> = bytes.chunks(4096).collect();
        let (v, err) = feed(&chunks);
        assert!(!err);
        assert_eq!(v, vec![big]);
    }
}
