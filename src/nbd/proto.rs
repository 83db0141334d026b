//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): constants, parsing of what a
//! client sends and encoding of what the server answers. Pure functions over byte slices: no
//! I/O, no panics on any input (every length is checked before it is used).

/// "NBDMAGIC", first 8 bytes of the newstyle greeting (proto.md "Newstyle negotiation").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second greeting word, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of option replies.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (proto.md "Transmission flags").
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_REP_INFO` types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` states (proto.md "`base:` meta context").
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context blockd serves, and the id it answers with.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Error values allowed on the wire (proto.md "Error values").
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Size of an option request header (magic, option, length).
pub const OPT_HEADER_LEN: usize = 16;
/// Size of a transmission request (magic, flags, type, cookie, offset, length).
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Longest string (export name, query) proto.md allows.
pub const MAX_STRING: usize = 4096;

/// Maps a host errno to a value proto.md allows on the wire (EDQUOT/EFBIG → ENOSPC; anything
/// unknown → EIO).
pub fn wire_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// A big-endian reader over a slice that fails instead of panicking.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_be_bytes(a))
    }

    /// A string preceded by its u32 length (at most [`MAX_STRING`] bytes, valid UTF-8).
    pub fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        std::str::from_utf8(self.bytes(n)?).ok()
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// The server's newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags (18 bytes).
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses an option header; `None` when the magic is not IHAVEOPT (the client is not
/// speaking NBD: the connection must be dropped).
pub fn parse_opt_header(b: &[u8; OPT_HEADER_LEN]) -> Option<OptHeader> {
    let mut r = Reader::new(b);
    if r.u64()? != IHAVEOPT {
        return None;
    }
    Some(OptHeader {
        option: r.u32()?,
        len: r.u32()?,
    })
}

/// Appends an option reply (proto.md "Option reply") to `out`.
pub fn opt_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the info types the
/// client asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub requests: Vec<u16>,
}

/// Parses an INFO/GO payload; `None` when lengths do not add up exactly (→ ERR_INVALID).
pub fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let mut r = Reader::new(data);
    let name = r.string()?;
    let n = r.u16()? as usize;
    let mut requests = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        requests.push(r.u16()?);
    }
    (r.remaining() == 0).then_some(InfoRequest { name, requests })
}

/// The payload of `NBD_OPT_{LIST,SET}_META_CONTEXT`: an export name and queries.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    pub name: &'a str,
    pub queries: Vec<&'a str>,
}

/// Parses a meta context payload; `None` when malformed (→ ERR_INVALID).
pub fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    let mut r = Reader::new(data);
    let name = r.string()?;
    let n = r.u32()? as usize;
    let mut queries = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        queries.push(r.string()?);
    }
    (r.remaining() == 0).then_some(MetaRequest { name, queries })
}

/// Whether a meta context query selects `base:allocation` (exact name, or the namespace
/// `base:` alone, which only LIST may use).
pub fn query_matches_base_allocation(query: &str, list: bool) -> bool {
    query == META_BASE_ALLOCATION || (list && query == "base:")
}

/// `NBD_INFO_EXPORT` payload: type, size, transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// `NBD_INFO_BLOCK_SIZE` payload: type, minimum, preferred, maximum.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for x in [min, preferred, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` payload: type then the string (no length).
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// `NBD_REP_SERVER` payload for LIST: name length, name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// `NBD_REP_META_CONTEXT` payload: context id, name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, flags and (unless NO_ZEROES) 124 zeroes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// A transmission request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a request; `None` when the magic is wrong (→ drop the connection).
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    let mut r = Reader::new(b);
    if r.u32()? != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: r.u16()?,
        typ: r.u16()?,
        cookie: r.u64()?,
        offset: r.u64()?,
        len: r.u32()?,
    })
}

/// Encodes a request (for tests and the kernel-attach self check).
pub fn encode_request(q: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&q.flags.to_be_bytes());
    b[6..8].copy_from_slice(&q.typ.to_be_bytes());
    b[8..16].copy_from_slice(&q.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&q.offset.to_be_bytes());
    b[24..28].copy_from_slice(&q.len.to_be_bytes());
    b
}

/// A simple reply header (data, for a successful read, follows it).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `len` is the payload length that follows.
pub fn chunk_header(flags: u16, typ: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `data_len` bytes read at
/// `offset` (the chunk header followed by the offset; the data follows).
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut b = [0u8; CHUNK_HEADER_LEN + 8];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len.saturating_add(8),
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with an empty message.
pub fn error_chunk(cookie: u64, error: u32) -> [u8; CHUNK_HEADER_LEN + 6] {
    let mut b = [0u8; CHUNK_HEADER_LEN + 6];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6,
    ));
    b[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 4].copy_from_slice(&error.to_be_bytes());
    // Message length 0.
    b
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id and `(length, flags)` extents.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    v.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    ));
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn option_header_and_reply() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(parse_opt_header(&b), Some(OptHeader { option: 7, len: 9 }));
        b[0] = b'X';
        assert_eq!(parse_opt_header(&b), None);

        let mut out = Vec::new();
        opt_reply(&mut out, OPT_GO, REP_ERR_UNSUP, b"ab");
        assert_eq!(
            out,
            [
                &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9][..],
                &[0, 0, 0, 7],
                &[0x80, 0, 0, 1],
                &[0, 0, 0, 2],
                b"ab"
            ]
            .concat()
        );
    }

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(InfoRequest {
                name: "abc",
                requests: vec![3, 1]
            })
        );
        // Trailing garbage, truncation, a name length past the end: all refused.
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_info_request(&long), None);
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        let mut bad = d.clone();
        bad[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_info_request(&bad), None);
        assert_eq!(parse_info_request(&[]), None);
    }

    #[test]
    fn meta_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(b"e");
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let m = parse_meta_request(&d).unwrap();
        assert_eq!(m.name, "e");
        assert_eq!(m.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        assert!(query_matches_base_allocation(m.queries[0], false));
        assert!(!query_matches_base_allocation(m.queries[1], true));
        assert!(query_matches_base_allocation("base:", true));
        assert!(!query_matches_base_allocation("base:", false));
        // A query count that promises more than is there.
        let mut bad = d.clone();
        bad[5..9].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(parse_meta_request(&bad), None);
    }

    #[test]
    fn requests_and_replies() {
        let q = Request {
            flags: CMD_FLAG_FUA,
            typ: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        let b = encode_request(&q);
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(parse_request(&b), Some(q));
        let mut bad = b;
        bad[3] = 0;
        assert_eq!(parse_request(&bad), None);

        let r = simple_reply(EINVAL, 9);
        assert_eq!(&r[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&r[4..8], &[0, 0, 0, 22]);
        assert_eq!(&r[8..], &9u64.to_be_bytes());

        let h = offset_data_header(5, 1024, 512);
        assert_eq!(&h[..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&h[4..6], &[0, 1]); // DONE
        assert_eq!(&h[6..8], &[0, 1]); // OFFSET_DATA
        assert_eq!(&h[16..20], &520u32.to_be_bytes());
        assert_eq!(&h[20..], &1024u64.to_be_bytes());

        let e = error_chunk(5, EPERM);
        assert_eq!(&e[6..8], &[0x80, 0x01]);
        assert_eq!(&e[16..20], &6u32.to_be_bytes());
        assert_eq!(&e[20..], &[0, 0, 0, 1, 0, 0]);

        let s = block_status_chunk(5, 1, &[(4096, 0), (512, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(&s[6..8], &[0, 5]);
        assert_eq!(&s[16..20], &20u32.to_be_bytes());
        assert_eq!(
            &s[20..],
            &[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3]
        );
    }

    #[test]
    fn info_payloads() {
        assert_eq!(
            info_export(0x1000, 0x15),
            [0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x15]
        );
        assert_eq!(
            info_block_size(512, 4096, 1 << 25),
            [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 2, 0, 0, 0]
        );
        assert_eq!(info_string(INFO_NAME, "x"), [0, 1, b'x']);
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
        assert_eq!(export_name_reply(1, 3, false).len(), 134);
        assert_eq!(rep_server("ab"), [0, 0, 0, 2, b'a', b'b']);
        assert_eq!(rep_meta_context(1, "b"), [0, 0, 0, 1, b'b']);
        assert_eq!(wire_errno(libc::EDQUOT), ENOSPC);
        assert_eq!(wire_errno(libc::EBADF), EIO);
    }
}
