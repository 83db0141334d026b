//! The vhost-user control thread: accepts frontends on every controller's socket and handles
//! their protocol messages (vhost-user.rst), one epoll for all controllers.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::session::Session;
use super::{lock, Controller};
use crate::reactor::Reactors;

type Handler = BackendReqHandler<Mutex<Session>>;

enum Entry {
    Listener(Arc<Controller>, UnixListener),
    Conn(Arc<Controller>, Arc<Mutex<Handler>>, i32),
}

pub(super) struct Events {
    epoll: Epoll,
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    reactors: Arc<Reactors>,
}

impl Events {
    pub(super) fn start(reactors: Arc<Reactors>) -> std::io::Result<Arc<Self>> {
        let ev = Arc::new(Events {
            epoll: Epoll::new()?,
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
                        let _ = self
                            .epoll
                            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        // Drop the connection (socket, handler's session reference) first.
                        lock(&self.entries).remove(&token);
                        drop(h);
                        ctrl.detach();
                    } else {
                        tracing::warn!(ctrlr = %ctrl.name, "vhost-user request failed: {e}");
                    }
                }
            }
        }
    }

    fn accept(&self, ctrl: Arc<Controller>, stream: std::os::unix::net::UnixStream) {
        if ctrl.connected() {
            tracing::warn!(ctrlr = %ctrl.name, "refusing a second frontend: one is connected");
            return;
        }
        let _ = stream.set_nonblocking(false);
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
fn is_fatal(e: &VuError) -> bool {
    !matches!(
        e,
        VuError::InvalidParam
            | VuError::InvalidOperation(_)
            | VuError::InactiveFeature(_)
            | VuError::InactiveOperation(_)
            | VuError::ReqHandlerError(_)
    )
}
