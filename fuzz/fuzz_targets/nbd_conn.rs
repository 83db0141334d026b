//! A whole NBD server connection (proto.md: handshake, then transmission) over a socketpair,
//! fed arbitrary client bytes followed by EOF: negotiation, request parsing and validation,
//! write payloads, reads, trims, block-status queries and structured replies on a real
//! malloc export ("m", 1 MiB of 512-byte blocks) and a read-only null export ("ro", 4 KiB
//! blocks). Checks: no panic, the connection always finishes after EOF (within a deadline:
//! no hang), and the server's registry forgets it.
//!
//! Byte 0: bit 0 skips the handshake (a connection attached straight to "m" with simple
//! replies, as for the kernel's nbd driver), so the fuzzer reaches transmission at once.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use blockd::bdev::malloc::{self, MallocOpts};
use blockd::bdev::null::{self, NullOpts};
use blockd::bdev::BdevRegistry;
use blockd::nbd::conn::{Conn, ConnCtx, Conns};
use blockd::nbd::export::Exports;
use blockd::reactor::Poller;
use libfuzzer_sys::fuzz_target;

fn ctx() -> &'static Arc<ConnCtx> {
    static C: OnceLock<Arc<ConnCtx>> = OnceLock::new();
    C.get_or_init(|| {
        let r = BdevRegistry::default();
        let m = malloc::create(
            &r,
            MallocOpts {
                name: Some("M".into()),
                uuid: None,
                num_blocks: 2048,
                block_size: 512,
            },
        )
        .expect("malloc bdev");
        let n = null::create(
            &r,
            NullOpts {
                name: "N".into(),
                uuid: None,
                num_blocks: 1 << 20,
                block_size: 4096,
            },
        )
        .expect("null bdev");
        let exports = Arc::new(Exports::default());
        exports.add("m", m, false, false).expect("export m");
        exports.add("ro", n, true, false).expect("export ro");
        Arc::new(ConnCtx {
            exports,
            conns: Arc::new(Conns::default()),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let ctx = ctx();
    let (id, entry) = ctx.conns.register(0, "fuzz".into());
    let (ours, mut client) = UnixStream::pair().expect("socketpair");
    let mut conn = if mode & 1 != 0 {
        let att = ctx.exports.attach("m").expect("export m");
        Conn::transmission(id, ctx.clone(), entry, OwnedFd::from(ours), att)
    } else {
        Conn::new(id, ctx.clone(), entry, OwnedFd::from(ours))
    }
    .expect("connection");
    client
        .write_all(input)
        .expect("client bytes fit the socket buffer");
    client.shutdown(Shutdown::Write).expect("EOF");
    client.set_nonblocking(true).expect("nonblocking");

    // Poll as the reactor would, reading (and dropping) the replies so that the server's
    // output never stalls on a full socket.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut b = vec![0u8; 1 << 16];
    while !conn.finished() {
        assert!(
            Instant::now() < deadline,
            "the connection never finished after EOF"
        );
        conn.poll();
        loop {
            match client.read(&mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("client read: {e}"),
            }
        }
    }
    drop(conn);
    assert!(
        ctx.conns.wait_gone(&[id], Duration::ZERO),
        "registry still holds the connection"
    );
});
