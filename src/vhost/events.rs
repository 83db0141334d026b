//! The vhost-user control thread: accepts frontends on every controller's socket and handles
//! their protocol messages (vhost-user.rst), one epoll for all controllers.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::guest_fault;
use super::session::Session;
use super::{lock, Controller};
use crate::reactor::Reactors;

type Handler = BackendReqHandler<Mutex<Session>>;

/// How long the rest of a vhost-user message may take once its first bytes arrived (and
/// how long a reply may wait for the frontend to read it) before the connection is dropped.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

enum Entry {
    Listener(Arc<Controller>, UnixListener),
    Conn(Arc<Controller>, Arc<Mutex<Handler>>, i32),
}

/// The epoll token of the guest-fault eventfd (connection tokens start at 1).
const FAULT_TOKEN: u64 = 0;

pub(super) struct Events {
    epoll: Epoll,
    /// Written by the SIGBUS handler when it repaired a guest mapping ([`guest_fault`]).
    fault: EventFd,
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    reactors: Arc<Reactors>,
}

impl Events {
    pub(super) fn start(reactors: Arc<Reactors>) -> std::io::Result<Arc<Self>> {
        let fault = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            fault.as_raw_fd(),
            EpollEvent::new(EventSet::IN, FAULT_TOKEN),
        )?;
        // The handler keeps writing to this fd: the events object lives as long as the
        // process (its thread never ends), so the fd is never reused for something else.
        if !guest_fault::add_wake_fd(fault.as_raw_fd()) {
            tracing::warn!("too many vhost event loops: guest memory faults go unnoticed here");
        }
        let ev = Arc::new(Events {
            epoll,
            fault,
            entries: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            reactors,
        });
        let me = ev.clone();
        std::thread::Builder::new()
            .name("vhost-events".into())
            .spawn(move || me.run())?;
        Ok(ev)
    }

    fn register(&self, fd: i32, entry: Entry) -> std::io::Result<()> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.entries).insert(token, entry);
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            lock(&self.entries).remove(&token);
            return Err(e);
        }
        Ok(())
    }

    pub(super) fn add_listener(
        &self,
        ctrl: Arc<Controller>,
        l: UnixListener,
    ) -> std::io::Result<()> {
        let fd = l.as_raw_fd();
        self.register(fd, Entry::Listener(ctrl, l))
    }

    /// Stops accepting frontends on the controller's socket (the daemon is stopping); the
    /// socket and a connected frontend's connection stay open until
    /// [`Events::remove_controller`].
    pub(super) fn stop_accepting(&self, ctrl: &Arc<Controller>) {
        let entries = lock(&self.entries);
        for e in entries.values() {
            if let Entry::Listener(c, l) = e {
                if Arc::ptr_eq(c, ctrl) {
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        l.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
            }
        }
    }

    /// Stops watching the controller's listener and connection (the caller detaches the
    /// session).
    pub(super) fn remove_controller(&self, ctrl: &Arc<Controller>) {
        let mut entries = lock(&self.entries);
        let tokens: Vec<u64> = entries
            .iter()
            .filter(|(_, e)| match e {
                Entry::Listener(c, _) | Entry::Conn(c, _, _) => Arc::ptr_eq(c, ctrl),
            })
            .map(|(t, _)| *t)
            .collect();
        for t in tokens {
            if let Some(e) = entries.remove(&t) {
                let fd = match &e {
                    Entry::Listener(_, l) => l.as_raw_fd(),
                    Entry::Conn(_, _, fd) => *fd,
                };
                // Best effort: dropping the entry closes the fd, which leaves the set anyway.
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vhost event loop failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                self.handle(ev.data());
            }
        }
    }

    fn handle(&self, token: u64) {
        if token == FAULT_TOKEN {
            let _ = self.fault.read();
            self.close_broken_sessions();
            return;
        }
        enum Work {
            Accept(Arc<Controller>, Option<std::os::unix::net::UnixStream>),
            Message(Arc<Controller>, Arc<Mutex<Handler>>, i32),
        }
        let work = {
            let entries = lock(&self.entries);
            match entries.get(&token) {
                None => return,
                Some(Entry::Listener(c, l)) => {
                    Work::Accept(c.clone(), l.accept().ok().map(|(s, _)| s))
                }
                Some(Entry::Conn(c, h, fd)) => Work::Message(c.clone(), h.clone(), *fd),
            }
        };
        match work {
            Work::Accept(_, None) => {}
            Work::Accept(ctrl, Some(stream)) => self.accept(ctrl, stream),
            Work::Message(ctrl, h, fd) => {
                let r = lock(&h).handle_request();
                if let Err(e) = r {
                    if is_fatal(&e) {
                        if !matches!(e, VuError::Disconnected | VuError::PartialMessage) {
                            tracing::warn!(ctrlr = %ctrl.name, "closing the frontend connection: {e}");
                        }
                        drop(h);
                        self.close(token, &ctrl, fd);
                    } else {
                        tracing::warn!(ctrlr = %ctrl.name, "vhost-user request failed: {e}");
                    }
                }
            }
        }
    }

    /// Stops watching connection `token` and detaches its session.
    fn close(&self, token: u64, ctrl: &Arc<Controller>, fd: i32) {
        // Best effort: removing the entry closes the fd, which leaves the set.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        // Drop the connection (socket, handler's session reference) first.
        lock(&self.entries).remove(&token);
        ctrl.detach();
    }

    /// Closes the connections whose guest memory the frontend shrank under us: the SIGBUS
    /// handler replaced it with zeros, so their devices must serve nothing more.
    fn close_broken_sessions(&self) {
        let broken: Vec<(u64, Arc<Controller>, i32)> = lock(&self.entries)
            .iter()
            .filter_map(|(t, e)| match e {
                Entry::Conn(c, _, fd) => Some((*t, c.clone(), *fd)),
                Entry::Listener(..) => None,
            })
            .filter(|(_, c, _)| {
                let s = lock(&c.session).clone();
                s.is_some_and(|s| lock(&s).memory_broken())
            })
            .collect();
        for (token, ctrl, fd) in broken {
            tracing::error!(
                ctrlr = %ctrl.name,
                "the frontend shrank guest memory it shared (SIGBUS): closing its connection"
            );
            self.close(token, &ctrl, fd);
        }
    }

    fn accept(&self, ctrl: Arc<Controller>, stream: std::os::unix::net::UnixStream) {
        if ctrl.connected() {
            tracing::warn!(ctrlr = %ctrl.name, "refusing a second frontend: one is connected");
            return;
        }
        // One thread serves every controller's control plane, and the vhost-user handler
        // reads a message with blocking recvs: a frontend that sends part of a header, a
        // header and never its body, or stops reading our replies must not hold that thread
        // (the vendored vhost crate gives up on a timeout, third_party/README.md). A
        // message is handled only when epoll reports the socket readable and frontends
        // send each message whole, so a body that is not there within the timeout never
        // comes: the read fails and the connection is closed as broken.
        let timeouts = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(MESSAGE_TIMEOUT)))
            .and_then(|()| stream.set_write_timeout(Some(MESSAGE_TIMEOUT)));
        if let Err(e) = timeouts {
            tracing::error!(ctrlr = %ctrl.name, "cannot set up the frontend connection: {e}");
            return;
        }
        let session = Arc::new(Mutex::new(Session::new(
            &ctrl.name,
            ctrl.device.clone(),
            self.reactors.clone(),
            ctrl.cpumask.clone(),
            ctrl.notifier.clone(),
            ctrl.coalescing.clone(),
        )));
        let fd = stream.as_raw_fd();
        let handler = Handler::from_stream(stream, session.clone());
        if !ctrl.attach(session) {
            return;
        }
        if let Err(e) = self.register(
            fd,
            Entry::Conn(ctrl.clone(), Arc::new(Mutex::new(handler)), fd),
        ) {
            tracing::error!(ctrlr = %ctrl.name, "cannot watch the frontend connection: {e}");
            ctrl.detach();
            return;
        }
        tracing::info!(ctrlr = %ctrl.name, "frontend connected");
    }
}

/// Errors after which the connection cannot continue: the socket or the message framing is
/// broken. Errors of a single request (bad parameter, refused operation) were already
/// answered (REPLY_ACK) and the connection goes on.
pub(super) fn is_fatal(e: &VuError) -> bool {
    !matches!(
        e,
        VuError::InvalidParam
            | VuError::InvalidOperation(_)
            | VuError::InactiveFeature(_)
            | VuError::InactiveOperation(_)
            | VuError::ReqHandlerError(_)
    )
}
