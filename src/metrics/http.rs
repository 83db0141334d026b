//! A minimal HTTP/1.1 server for `GET /metrics` (RFC 9112), on one thread, one connection
//! at a time: a scrape every few seconds needs no more, and nothing here can slow the
//! reactors. Every client is hostile: the request head is bounded ([`MAX_HEAD`]) and must
//! arrive within [`READ_DEADLINE`], writes time out, and every answer closes the
//! connection, so a slow or stuck client holds the server at most a few seconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8192;
/// Time a client has to send its request head.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);
/// Time a client has to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the exporter listens: `host:port` or a Unix socket path (anything with a `/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.contains('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(s)));
        }
        s.to_socket_addrs()
            .map_err(|e| format!("'{s}' is neither host:port nor a socket path: {e}"))?
            .next()
            .map(MetricsAddr::Tcp)
            .ok_or_else(|| format!("'{s}' resolves to no address"))
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

trait Conn: Read + Write {
    fn set_timeouts(&self, read: Duration, write: Duration) -> std::io::Result<()>;
}

impl Conn for TcpStream {
    fn set_timeouts(&self, read: Duration, write: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(read))?;
        self.set_write_timeout(Some(write))
    }
}

impl Conn for UnixStream {
    fn set_timeouts(&self, read: Duration, write: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(read))?;
        self.set_write_timeout(Some(write))
    }
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> std::io::Result<Box<dyn Conn>> {
        let c: Box<dyn Conn> = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Box::new(s)
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Box::new(s)
            }
        };
        Ok(c)
    }
}

/// What the server answers `GET /metrics` with: (content type, body).
pub type Render = Arc<dyn Fn() -> (&'static str, String) + Send + Sync>;

/// The running server; [`MetricsServer::stop`] (or drop) ends it.
pub struct MetricsServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
    local: Option<SocketAddr>,
}

impl MetricsServer {
    /// Binds `addr` (a Unix socket gets `mode`) and serves `render` on a thread.
    pub fn start(addr: &MetricsAddr, mode: u32, render: Render) -> std::io::Result<Self> {
        let (listener, unix_path, local) = match addr {
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                let local = l.local_addr().ok();
                (Listener::Tcp(l), None, local)
            }
            MetricsAddr::Unix(p) => (
                Listener::Unix(crate::unix_socket::bind_listener(p, mode)?),
                Some(p.clone()),
                None,
            ),
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l) => l.set_nonblocking(true)?,
        }
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(listener, stop2, render))?;
        Ok(MetricsServer {
            stop,
            thread: Some(thread),
            unix_path,
            local,
        })
    }

    /// The TCP address bound (the port chosen for `:0`).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Stops serving, joins the thread, removes the Unix socket.
    pub fn stop(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        // Fails only when the counter would overflow, i.e. it is already signalled.
        let _ = self.stop.write(1);
        if t.join().is_err() {
            tracing::error!("the metrics thread panicked");
        }
        if let Some(p) = &self.unix_path {
            // Best effort: the socket may have been removed by hand.
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sleeps in poll(2) until a client or the stop signal arrives: no timer, no CPU while idle.
fn serve(listener: Listener, stop: EventFd, render: Render) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds that live across the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("metrics server: poll: {e}");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok(mut c) => {
                if let Err(e) = handle(&mut *c, &render) {
                    tracing::debug!("metrics client: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("metrics server: accept: {e}");
                // EMFILE and the like: let the condition pass instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Headers a request may carry; more is answered 431.
const MAX_HEADERS: usize = 64;

/// How a request head ended.
enum Head {
    /// A complete, well-formed request line and headers (RFC 9112 §2-5).
    Request { method: String, path: String },
    /// Malformed (the parser's reason).
    Bad(httparse::Error),
    /// Over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] headers.
    TooLarge,
}

/// Reads the request head (parsed by `httparse`) within [`MAX_HEAD`] bytes and
/// [`READ_DEADLINE`].
fn read_head(c: &mut dyn Conn) -> std::io::Result<Head> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        c.set_timeouts(left, WRITE_TIMEOUT)?;
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(Head::Request {
                    method: req.method.unwrap_or_default().to_string(),
                    path: req.path.unwrap_or_default().to_string(),
                })
            }
            Ok(httparse::Status::Partial) if head.len() <= MAX_HEAD => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                return Ok(Head::TooLarge)
            }
            Err(e) => return Ok(Head::Bad(e)),
        }
    }
}

fn respond(
    c: &mut dyn Conn,
    status: &str,
    ctype: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let h = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(h.as_bytes())?;
    if !head_only {
        c.write_all(body.as_bytes())?;
    }
    c.flush()
}

/// Answers one request: `GET`/`HEAD /metrics` (query ignored), `/` with a pointer to it,
/// 404, 405, 400 or 431 otherwise.
fn handle(c: &mut dyn Conn, render: &Render) -> std::io::Result<()> {
    let text = "text/plain; charset=utf-8";
    let (method, path) = match read_head(c)? {
        Head::Request { method, path } => (method, path),
        Head::TooLarge => {
            return respond(
                c,
                "431 Request Header Fields Too Large",
                text,
                "request head too large\n",
                false,
            )
        }
        Head::Bad(e) => {
            return respond(
                c,
                "400 Bad Request",
                text,
                &format!("bad request: {e}\n"),
                false,
            )
        }
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(c, "405 Method Not Allowed", text, "only GET\n", false);
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let (ctype, body) = render();
            respond(c, "200 OK", ctype, &body, head_only)
        }
        "/" => respond(c, "200 OK", text, "blockd: see /metrics\n", head_only),
        _ => respond(c, "404 Not Found", text, "not found\n", head_only),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req).unwrap();
        let mut out = String::new();
        // The server closes after its answer (or a reset after an oversized head).
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let render: Render = Arc::new(|| ("text/plain; version=0.0.4", "x_total 1\n".into()));
        let addr: MetricsAddr = "127.0.0.1:0".parse().unwrap();
        let mut srv = MetricsServer::start(&addr, 0o600, render).unwrap();
        let a = srv.local_addr().unwrap();
        let r = get(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nx_total 1\n"),
            "{r}"
        );
        assert!(get(a, b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(a, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(get(a, b"GARBAGE\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(get(a, b"GET /metrics HTTP/1.1\r\nNo colon\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(get(a, b"GET /metrics HTTP/2.0\r\n\r\n").starts_with("HTTP/1.1 400"));
        let many: Vec<u8> = (0..=MAX_HEADERS)
            .flat_map(|i| format!("H{i}: v\r\n").into_bytes())
            .collect();
        let r = get(
            a,
            &[b"GET /metrics HTTP/1.1\r\n", &many[..], b"\r\n"].concat(),
        );
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 100, b'a');
        let r = get(a, &big);
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r}");
        // A client that sends nothing is dropped after the deadline; the next is served.
        let idle = TcpStream::connect(a).unwrap();
        let t = Instant::now();
        assert!(get(a, b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200"));
        assert!(t.elapsed() < READ_DEADLINE + Duration::from_secs(3));
        drop(idle);
        srv.stop();
        assert!(TcpStream::connect(a).is_err());
    }

    #[test]
    fn serves_on_a_unix_socket_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.sock");
        let render: Render = Arc::new(|| ("text/plain; version=0.0.4", "y 2\n".into()));
        let addr: MetricsAddr = p.to_str().unwrap().parse().unwrap();
        assert_eq!(addr, MetricsAddr::Unix(p.clone()));
        let mut srv = MetricsServer::start(&addr, 0o600, render).unwrap();
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 OK") && out.ends_with("y 2\n"),
            "{out}"
        );
        srv.stop();
        assert!(!p.exists());
        assert!("nonsense:port".parse::<MetricsAddr>().is_err());
    }
}
