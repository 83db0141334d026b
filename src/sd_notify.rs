//! systemd's readiness protocol (sd_notify(3)), by hand: one datagram with `READY=1` to
//! the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace). Without the variable (not under a `Type=notify` unit) it does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1\nSTATUS=...`) to the service manager, if there is one.
/// Returns whether it was sent.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    /// The datagram arrives as systemd would receive it (a path socket; the abstract
    /// form is the same call with another address).
    #[test]
    fn sends_ready_to_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&p).unwrap();
        // The test binary's other tests do not read NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &p);
        assert!(super::notify("READY=1").unwrap());
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!super::notify("READY=1").unwrap());
    }
}
