//! A connection driven by hand over a socketpair, on a malloc export: the exact bytes of
//! the greeting, of GO through the real export registry, and of transmission replies
//! (proto.md "Simple reply message", "Structured reply chunk message", "Error values").

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::*;
use crate::bdev::malloc::{self, MallocOpts};
use crate::bdev::{Bdev, BdevRegistry};
use crate::nbd::export::Exports;

/// A connection on export "m" (malloc bdev "M": 1 MiB of 512-byte blocks) and the
/// client's end of its socket.
struct Pair {
    conn: Option<Conn>,
    client: UnixStream,
    bdev: Arc<Bdev>,
    conns: Arc<Conns>,
    id: u64,
}

impl Pair {
    fn new() -> Pair {
        let registry = BdevRegistry::default();
        let bdev = malloc::create(
            &registry,
            MallocOpts {
                name: Some("M".into()),
                uuid: None,
                num_blocks: 2048,
                block_size: 512,
            },
        )
        .unwrap();
        let exports = Arc::new(Exports::default());
        exports.add("m", bdev.clone(), false, false).unwrap();
        let conns = Arc::new(Conns::default());
        let ctx = Arc::new(ConnCtx {
            exports,
            conns: conns.clone(),
        });
        let (id, entry) = conns.register(0, "test".into());
        let (ours, client) = UnixStream::pair().unwrap();
        client.set_nonblocking(true).unwrap();
        let conn = Conn::new(id, ctx, entry, OwnedFd::from(ours)).unwrap();
        Pair {
            conn: Some(conn),
            client,
            bdev,
            conns,
            id,
        }
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().unwrap()
    }

    /// Sends `bytes` and polls the connection until `n` reply bytes came back.
    fn exchange(&mut self, bytes: &[u8], n: usize) -> Vec<u8> {
        self.client.write_all(bytes).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut b = vec![0u8; 1 << 16];
        while got.len() < n {
            assert!(Instant::now() < deadline, "{} of {n} bytes came", got.len());
            self.conn().poll();
            match self.client.read(&mut b) {
                Ok(0) => panic!("closed after {} of {n} bytes", got.len()),
                Ok(k) => got.extend_from_slice(&b[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got.len(), n, "more bytes than expected: {got:02x?}");
        got
    }

    /// Polls until the connection has finished closing, drops it (as the reactor does),
    /// and checks the client sees EOF and the registry forgot it.
    fn expect_closed(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.conn().finished() {
            assert!(Instant::now() < deadline, "the connection never finished");
            self.conn().poll();
        }
        self.conn = None;
        self.client.set_nonblocking(false).unwrap();
        let mut rest = Vec::new();
        self.client.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"", "bytes sent while closing");
        assert!(self.conns.wait_gone(&[self.id], Duration::ZERO));
    }

    /// Greeting, flags (FIXED_NEWSTYLE | NO_ZEROES), optionally STRUCTURED_REPLY, then
    /// GO on "m".
    fn go(&mut self, structured: bool) {
        assert_eq!(self.exchange(&[], 18), proto::greeting());
        self.client.write_all(&[0, 0, 0, 3]).unwrap();
        if structured {
            let r = self.exchange(&opt(proto::OPT_STRUCTURED_REPLY, &[]), 20);
            assert_eq!(&r[12..16], &[0, 0, 0, 1]);
        }
        let go = opt(proto::OPT_GO, &[0, 0, 0, 1, b'm', 0, 0]);
        // INFO_EXPORT (20 + 12), INFO_BLOCK_SIZE (20 + 14), ACK (20).
        let r = self.exchange(&go, 86);
        assert_eq!(r[66..], rep(proto::OPT_GO, proto::REP_ACK));
    }
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A reply without data.
fn rep(option: u32, typ: u32) -> [u8; 20] {
    let mut r = [0u8; 20];
    r[..8].copy_from_slice(&[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
    r[8..12].copy_from_slice(&option.to_be_bytes());
    r[12..16].copy_from_slice(&typ.to_be_bytes());
    r
}

/// A request: magic 0x25609513, flags, type, cookie, offset, length.
fn req(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = vec![0x25, 0x60, 0x95, 0x13];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// A simple reply: magic 0x67446698, error, cookie.
fn simple(error: u32, cookie: u64) -> Vec<u8> {
    let mut v = vec![0x67, 0x44, 0x66, 0x98];
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

#[test]
fn go_through_the_export_registry() {
    let mut p = Pair::new();
    assert_eq!(
        p.exchange(&[], 18),
        [b"NBDMAGIC".as_slice(), b"IHAVEOPT", &[0, 3]].concat()
    );
    p.client.write_all(&[0, 0, 0, 3]).unwrap();
    // GO "m" asking for NBD_INFO_DESCRIPTION.
    let description = b"\0\x02blockd bdev M (Malloc disk)";
    let expected = [
        &rep(proto::OPT_GO, proto::REP_INFO)[..16],
        &[0, 0, 0, 12],
        // 1 MiB; HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES,
        // CAN_MULTI_CONN.
        &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d],
        &rep(proto::OPT_GO, proto::REP_INFO)[..16],
        &(description.len() as u32).to_be_bytes(),
        description,
        &rep(proto::OPT_GO, proto::REP_INFO)[..16],
        &[0, 0, 0, 14],
        &[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0],
        &rep(proto::OPT_GO, proto::REP_ACK),
    ]
    .concat();
    let go = opt(proto::OPT_GO, &[0, 0, 0, 1, b'm', 0, 1, 0, 2]);
    assert_eq!(p.exchange(&go, expected.len()), expected);
    assert_eq!(p.bdev.claimed_by().as_deref(), Some("nbd export m"));
    // Transmission: a read of block 0 (zeroes).
    let r = p.exchange(&req(0, proto::CMD_READ, 7, 0, 512), 16 + 512);
    assert_eq!(r[..16], simple(0, 7));
    assert!(r[16..].iter().all(|&b| b == 0));
}

#[test]
fn bad_requests_are_refused_and_the_stream_stays_in_sync() {
    let mut p = Pair::new();
    p.go(false);
    // Unknown command: EINVAL (22), no payload assumed.
    assert_eq!(p.exchange(&req(0, 99, 1, 0, 512), 16), simple(22, 1));
    // Read past the end: EINVAL; write past the end: ENOSPC (28), its payload skipped.
    assert_eq!(
        p.exchange(&req(0, proto::CMD_READ, 2, (1 << 20) - 512, 1024), 16),
        simple(22, 2)
    );
    let mut w = req(0, proto::CMD_WRITE, 3, 1 << 20, 512);
    w.extend_from_slice(&[0xee; 512]);
    assert_eq!(p.exchange(&w, 16), simple(28, 3));
    // A write with an unknown flag: EINVAL, payload skipped too.
    let mut w = req(1 << 9, proto::CMD_WRITE, 4, 0, 512);
    w.extend_from_slice(&[0xee; 512]);
    assert_eq!(p.exchange(&w, 16), simple(22, 4));
    // Misaligned: EINVAL. Block status without structured replies: EINVAL.
    assert_eq!(
        p.exchange(&req(0, proto::CMD_READ, 5, 100, 512), 16),
        simple(22, 5)
    );
    assert_eq!(
        p.exchange(&req(0, proto::CMD_BLOCK_STATUS, 6, 0, 512), 16),
        simple(22, 6)
    );
    // None of the refused writes reached the bdev.
    assert_eq!(p.bdev.stats.totals().num_write_ops(), 0);
    // A write and its read back, the payload split across sends.
    let w = req(0, proto::CMD_WRITE, 8, 512, 1024);
    p.client.write_all(&w[..20]).unwrap();
    p.conn().poll();
    p.client.write_all(&w[20..]).unwrap();
    p.client.write_all(&[0x5a; 100]).unwrap();
    p.conn().poll();
    assert_eq!(p.exchange(&[0x5a; 924], 16), simple(0, 8));
    let r = p.exchange(&req(0, proto::CMD_READ, 9, 512, 1024), 16 + 1024);
    assert_eq!(r[..16], simple(0, 9));
    assert_eq!(r[16..], [0x5a; 1024]);
    // Bad magic: no reply, closed (proto.md allows a hard disconnect).
    let mut bad = req(0, proto::CMD_READ, 10, 0, 512);
    bad[0] = 0;
    p.client.write_all(&bad).unwrap();
    p.expect_closed();
}

#[test]
fn fua_replies_come_after_the_flush() {
    let mut p = Pair::new();
    p.go(false);
    let bdev = p.bdev.clone();
    let stats = &bdev.stats;
    let fua = proto::CMD_FLAG_FUA;
    let mut w = req(fua, proto::CMD_WRITE, 1, 4096, 512);
    w.extend_from_slice(&[1; 512]);
    assert_eq!(p.exchange(&w, 16), simple(0, 1));
    assert_eq!(
        (
            stats.totals().num_write_ops(),
            stats.totals().num_flush_ops()
        ),
        (1, 1)
    );
    // Without FUA: no flush.
    let mut w = req(0, proto::CMD_WRITE, 2, 0, 512);
    w.extend_from_slice(&[2; 512]);
    assert_eq!(p.exchange(&w, 16), simple(0, 2));
    assert_eq!(stats.totals().num_flush_ops(), 1);
    // TRIM and WRITE_ZEROES with FUA are flushed too.
    assert_eq!(
        p.exchange(&req(fua, proto::CMD_TRIM, 3, 0, 512), 16),
        simple(0, 3)
    );
    assert_eq!(stats.totals().num_flush_ops(), 2);
    assert_eq!(
        p.exchange(&req(fua, proto::CMD_WRITE_ZEROES, 4, 4096, 512), 16),
        simple(0, 4)
    );
    assert_eq!(stats.totals().num_flush_ops(), 3);
    assert_eq!(stats.totals().num_unmap_ops(), 1);
    assert_eq!(stats.totals().num_write_zeroes_ops(), 1);
    // FUA on a read is accepted and ignored (proto.md: valid on every command).
    let mut w = req(0, proto::CMD_WRITE, 6, 8192, 512);
    w.extend_from_slice(&[7; 512]);
    assert_eq!(p.exchange(&w, 16), simple(0, 6));
    let mut r = simple(0, 7);
    r.extend_from_slice(&[7; 512]);
    assert_eq!(
        p.exchange(&req(fua, proto::CMD_READ, 7, 8192, 512), 16 + 512),
        r
    );
    assert_eq!(stats.totals().num_flush_ops(), 3);
    // NBD_CMD_DISC: closed, after the flush of a closing connection.
    p.client
        .write_all(&req(0, proto::CMD_DISC, 5, 0, 0))
        .unwrap();
    p.expect_closed();
    assert_eq!(p.bdev.stats.totals().num_flush_ops(), 4);
}

#[test]
fn structured_replies() {
    let mut p = Pair::new();
    p.go(true);
    // An error is an NBD_REPLY_TYPE_ERROR chunk: magic 0x668e33ef, DONE, type 0x8001,
    // cookie, length 6, error, message length 0.
    let r = p.exchange(&req(0, proto::CMD_READ, 1, 1 << 20, 512), 26);
    let mut expected = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1];
    expected.extend_from_slice(&1u64.to_be_bytes());
    expected.extend_from_slice(&[0, 0, 0, 6, 0, 0, 0, 22, 0, 0]);
    assert_eq!(r, expected);
    // Success without data: NBD_REPLY_TYPE_NONE, DONE, length 0.
    let r = p.exchange(&req(0, proto::CMD_FLUSH, 2, 0, 0), 20);
    let mut expected = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0];
    expected.extend_from_slice(&2u64.to_be_bytes());
    expected.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(r, expected);
    // A read: NBD_REPLY_TYPE_OFFSET_DATA, length 8 + data, the offset, the data.
    let r = p.exchange(&req(0, proto::CMD_READ, 3, 1024, 512), 28 + 512);
    let mut expected = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1];
    expected.extend_from_slice(&3u64.to_be_bytes());
    expected.extend_from_slice(&520u32.to_be_bytes());
    expected.extend_from_slice(&1024u64.to_be_bytes());
    expected.extend_from_slice(&[0; 512]);
    assert_eq!(r, expected);
    // Block status without SET_META_CONTEXT: EINVAL.
    let r = p.exchange(&req(0, proto::CMD_BLOCK_STATUS, 4, 0, 512), 26);
    assert_eq!(&r[20..24], &[0, 0, 0, 22]);
}

#[test]
fn client_hang_up_in_the_middle_of_a_write() {
    let mut p = Pair::new();
    p.go(false);
    let mut w = req(0, proto::CMD_WRITE, 1, 0, 4096);
    w.extend_from_slice(&[3; 1000]);
    p.client.write_all(&w).unwrap();
    p.client.shutdown(std::net::Shutdown::Write).unwrap();
    p.expect_closed();
    // The partial write was never submitted.
    assert_eq!(p.bdev.stats.totals().num_write_ops(), 0);
}
