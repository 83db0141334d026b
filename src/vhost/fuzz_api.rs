//! One vhost-user session over a socket the caller holds, for the cargo-fuzz target
//! `vhost_session` in `fuzz/` (feature `fuzzing`): the same [`Session`] and the same request
//! handler of the vendored vhost crate (message framing, fd passing, reply-ack) that the
//! control thread ([`super::events`]) runs for an accepted frontend, without the listener
//! and the epoll loop. Thin wrappers, no behaviour of their own.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::BackendReqHandler;

use super::coalescing::Coalescing;
use super::device::VirtioDevice;
use super::session::Session;
use super::{events, lock, ConfigNotifier};
use crate::cpumask::CpuMask;
use crate::reactor::Reactors;

/// What one [`FuzzSession::handle_request`] did, as the control thread sees it.
#[derive(Debug)]
pub enum Step {
    /// The message was handled (or refused with a reply the frontend sees).
    Handled,
    /// A request failed; the connection goes on (the control thread only logs it).
    Refused(String),
    /// The socket or the framing is broken: the control thread closes the connection.
    Fatal(String),
}

/// A frontend connection's session and its message handler.
pub struct FuzzSession {
    handler: BackendReqHandler<Mutex<Session>>,
    session: Arc<Mutex<Session>>,
}

impl FuzzSession {
    /// A fresh session of controller `ctrlr` on `stream` (the backend's end of the
    /// connection; the caller sets its timeouts, as `events` does with its own).
    pub fn new(
        ctrlr: &str,
        device: Arc<dyn VirtioDevice>,
        reactors: Arc<Reactors>,
        cpumask: CpuMask,
        stream: UnixStream,
    ) -> Self {
        let session = Arc::new(Mutex::new(Session::new(
            ctrlr,
            device,
            reactors,
            cpumask,
            ConfigNotifier::default(),
            Arc::new(Coalescing::default()),
        )));
        FuzzSession {
            handler: BackendReqHandler::from_stream(stream, session.clone()),
            session,
        }
    }

    /// Reads and handles one message, as the control thread does when the socket is
    /// readable.
    pub fn handle_request(&mut self) -> Step {
        match self.handler.handle_request() {
            Ok(()) => Step::Handled,
            Err(e) if events::is_fatal(&e) => Step::Fatal(e.to_string()),
            Err(e) => Step::Refused(e.to_string()),
        }
    }

    /// Requests the session's rings have in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.session).in_flight()
    }

    /// Rings running on reactors.
    pub fn running_rings(&self) -> usize {
        lock(&self.session).running_rings()
    }

    /// A SIGBUS hit the session's guest memory: the control thread closes the connection.
    pub fn memory_broken(&self) -> bool {
        lock(&self.session).memory_broken()
    }
}
