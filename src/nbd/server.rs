//! NBD listeners: a Unix socket and/or a TCP address, accepted on one control thread
//! (`nbd-accept`). Each accepted client becomes a [`Conn`] poller on the least-loaded
//! reactor; the control thread never reads from a client.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::conn::{Conn, ConnCtx};
use super::export::Attachment;
use crate::reactor::Reactors;

/// Client connections the server serves at once. Each costs a poller, a socket and up to
/// `conn::MAX_IN_FLIGHT_BYTES` of buffers; a connection beyond it is closed before the
/// greeting (proto.md has no error a server can send before the client's first option),
/// and the refusal is logged.
pub const MAX_CONNECTIONS: usize = 256;

/// Where the server listens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerOpts {
    pub unix_path: Option<PathBuf>,
    /// Normalized `host:port` (a bare port means 127.0.0.1).
    pub tcp_addr: Option<String>,
}

/// Parses a TCP address: `PORT` (bound on 127.0.0.1), `HOST:PORT` or `[V6]:PORT`.
pub fn parse_tcp_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse::<SocketAddr>()
        .map_err(|e| format!("tcp_addr '{s}' is not PORT or HOST:PORT: {e}"))
}

/// A running server.
pub struct Server {
    pub opts: ServerOpts,
    /// The address actually bound (port 0 resolved).
    pub tcp_bound: Option<SocketAddr>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// What a new connection starts with.
pub enum Start {
    /// The newstyle greeting and option haggling (socket clients).
    Negotiate,
    /// Straight to transmission on an export (kernel attach).
    Transmission(Attachment),
}

/// Places a connection on the least-loaded reactor. Returns its id, or None when no
/// reactor takes it.
pub fn spawn_conn(
    reactors: &Reactors,
    ctx: &Arc<ConnCtx>,
    fd: OwnedFd,
    peer: String,
    start: Start,
) -> Option<u64> {
    let core = reactors.pick(reactors.mask())?;
    let (id, entry) = ctx.conns.register(core, peer.clone());
    let c = ctx.clone();
    let sent = reactors.run(core, move |rctx| {
        let conn = match start {
            Start::Negotiate => Conn::new(id, c.clone(), entry, fd),
            Start::Transmission(att) => Conn::transmission(id, c.clone(), entry, fd, att),
        };
        match conn {
            Ok(conn) => {
                rctx.add_poller(&format!("nbd_conn{id}"), Box::new(conn));
            }
            Err(e) => {
                tracing::error!(conn = id, peer, "cannot serve the nbd client: {e}");
                c.conns.unregister(id);
            }
        }
    });
    if !sent {
        ctx.conns.unregister(id);
        return None;
    }
    Some(id)
}

impl Server {
    /// Binds the listeners and starts the accept thread.
    pub fn start(
        reactors: Arc<Reactors>,
        ctx: Arc<ConnCtx>,
        opts: ServerOpts,
        socket_mode: u32,
    ) -> anyhow::Result<Server> {
        let mut listeners = Vec::new();
        let mut tcp_bound = None;
        if let Some(p) = &opts.unix_path {
            let l = crate::unix_socket::bind_listener(p, socket_mode)
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", p.display()))?;
            listeners.push(Listener::Unix(l));
        }
        if let Some(a) = &opts.tcp_addr {
            let addr = parse_tcp_addr(a).map_err(|e| anyhow::anyhow!(e))?;
            let l = TcpListener::bind(addr).map_err(|e| {
                if let Some(p) = &opts.unix_path {
                    // Undo of the bind above; the error returned is the one that matters.
                    let _ = std::fs::remove_file(p);
                }
                anyhow::anyhow!("cannot listen on {addr}: {e}")
            })?;
            l.set_nonblocking(true)?;
            tcp_bound = l.local_addr().ok();
            listeners.push(Listener::Tcp(l));
        }
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, u64::MAX),
        )?;
        for (i, l) in listeners.iter().enumerate() {
            let fd = match l {
                Listener::Unix(l) => l.as_raw_fd(),
                Listener::Tcp(l) => l.as_raw_fd(),
            };
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(epoll, listeners, reactors, ctx))?;
        tracing::info!(unix = ?opts.unix_path, tcp = ?tcp_bound, "nbd server started");
        Ok(Server {
            opts,
            tcp_bound,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and removes the Unix socket (connections are stopped by the caller).
    pub fn stop(&mut self) {
        // The eventfd write fails only when the counter would overflow, i.e. it is already signalled.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the nbd accept thread panicked");
            }
        }
        if let Some(p) = &self.opts.unix_path {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!("cannot remove {}: {e}", p.display());
            }
        }
        tracing::info!("nbd server stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

fn accept_loop(epoll: Epoll, listeners: Vec<Listener>, reactors: Arc<Reactors>, ctx: Arc<ConnCtx>) {
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("nbd accept thread: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let Some(l) = listeners.get(ev.data() as usize) else {
                // The stop eventfd.
                return;
            };
            loop {
                let accepted = match l {
                    Listener::Unix(l) => l
                        .accept()
                        .map(|(s, _)| (OwnedFd::from(s), "unix".to_string())),
                    Listener::Tcp(l) => l.accept().map(|(s, a)| {
                        // Latency only: replies still flow without TCP_NODELAY.
                        let _ = s.set_nodelay(true);
                        (OwnedFd::from(s), a.to_string())
                    }),
                };
                match accepted {
                    Ok((fd, peer)) if ctx.conns.len() >= MAX_CONNECTIONS => {
                        tracing::warn!(
                            peer,
                            "refusing an nbd client: {MAX_CONNECTIONS} connections are open"
                        );
                        drop(fd);
                    }
                    Ok((fd, peer)) => {
                        if spawn_conn(&reactors, &ctx, fd, peer.clone(), Start::Negotiate).is_none()
                        {
                            tracing::error!(peer, "no reactor to serve the nbd client");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EMFILE and friends: log and retry on the next wake-up.
                        tracing::warn!("nbd accept: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        break;
                    }
                }
            }
        }
    }
}
