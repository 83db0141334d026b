//! Byte-level tests of the handshake: exact client bytes in, exact server bytes out, as
//! proto.md lays them out ("Fixed newstyle negotiation", "Option types", "Option reply
//! types"). Expected replies are spelled out here rather than built with `proto`'s encoders.

use super::*;

/// Exports as the tests want them: "disk" (1 MiB) and "ro" (read-only, 4 KiB blocks).
struct Catalog {
    exports: Vec<ExportFacts>,
}

impl Catalog {
    fn two() -> Self {
        Catalog {
            exports: vec![
                ExportFacts {
                    name: "disk".into(),
                    size: 1 << 20,
                    flags: 0x016d,
                    description: "the disk".into(),
                    block_sizes: (512, 4096, 32 << 20),
                },
                ExportFacts {
                    name: "ro".into(),
                    size: 0x1_0000_0000,
                    flags: 0x0107,
                    description: "read-only".into(),
                    block_sizes: (4096, 4096, 32 << 20),
                },
            ],
        }
    }

    fn one() -> Self {
        let mut c = Self::two();
        c.exports.truncate(1);
        c
    }
}

impl ExportCatalog for Catalog {
    /// The attached export's name.
    type Attachment = String;

    fn attach(&self, name: &str) -> Option<(String, ExportFacts)> {
        let e = if name.is_empty() && self.exports.len() == 1 {
            &self.exports[0]
        } else {
            self.exports.iter().find(|e| e.name == name)?
        };
        Some((e.name.clone(), e.clone()))
    }

    fn contains(&self, name: &str) -> bool {
        self.exports.iter().any(|e| e.name == name)
    }

    fn names(&self) -> Vec<String> {
        self.exports.iter().map(|e| e.name.clone()).collect()
    }
}

/// The option reply magic, 0x0003e889045565a9.
const REPLY_MAGIC: [u8; 8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];

/// Client flags: FIXED_NEWSTYLE | NO_ZEROES.
const FLAGS_BOTH: [u8; 4] = [0, 0, 0, 3];

fn be32(x: u32) -> [u8; 4] {
    x.to_be_bytes()
}

/// An option request: "IHAVEOPT", option, length, data.
fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    [
        b"IHAVEOPT",
        &be32(option)[..],
        &be32(data.len() as u32),
        data,
    ]
    .concat()
}

/// An option reply: magic, option, reply type, length, data.
fn rep(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    [
        &REPLY_MAGIC[..],
        &be32(option),
        &be32(typ),
        &be32(data.len() as u32),
        data,
    ]
    .concat()
}

/// An INFO/GO payload: name length, name, request count, info types.
fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = be32(name.len() as u32).to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// A meta context payload: name length, name, query count, (length, query)...
fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = be32(name.len() as u32).to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&be32(queries.len() as u32));
    for q in queries {
        d.extend_from_slice(&be32(q.len() as u32));
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// What a run of [`drive`] saw.
struct Run {
    /// Every reply byte, in order.
    out: Vec<u8>,
    /// The step that ended the run (`None`: all input consumed, more wanted).
    last: Option<Next<String>>,
    /// Input bytes left unconsumed.
    left: usize,
}

/// Feeds `input` to `n` as a connection would: steps until the input runs short or a step
/// closes or enters transmission.
fn drive(n: &mut Negotiation, c: &Catalog, input: &[u8]) -> Run {
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        assert_eq!(n.ready(&input[pos..]), n_would_act(n, c, &input[pos..]));
        match n.step(&input[pos..], c) {
            Step::NeedMore => {
                return Run {
                    out,
                    last: None,
                    left: input.len() - pos,
                }
            }
            Step::Handled {
                consumed,
                replies,
                next,
            } => {
                assert!(consumed > 0 && consumed <= input.len() - pos);
                pos += consumed;
                out.extend_from_slice(&replies);
                if next != Next::Negotiate {
                    return Run {
                        out,
                        last: Some(next),
                        left: input.len() - pos,
                    };
                }
            }
        }
    }
}

/// Whether `step` would act on `input`, asked of a copy so `ready` can be checked.
fn n_would_act(n: &Negotiation, c: &Catalog, input: &[u8]) -> bool {
    n.clone().step(input, c) != Step::NeedMore
}

/// A handshake past the client flags (FIXED_NEWSTYLE | NO_ZEROES).
fn haggling() -> Negotiation {
    let mut n = Negotiation::new();
    let r = drive(&mut n, &Catalog::two(), &FLAGS_BOTH);
    assert_eq!((r.out.len(), r.left, r.last), (0, 0, None));
    n
}

#[test]
fn client_flags_known_unknown_and_truncated() {
    let c = Catalog::two();
    // Three bytes are not flags yet.
    let mut n = Negotiation::new();
    assert_eq!(n.step(&[0, 0, 0], &c), Step::NeedMore);
    // Flags consume exactly four bytes and answer nothing.
    assert_eq!(
        n.step(&[0, 0, 0, 1, 0xaa], &c),
        Step::Handled {
            consumed: 4,
            replies: vec![],
            next: Next::Negotiate
        }
    );
    // proto.md: unknown client flags close the connection, without a reply.
    for flags in [[0, 0, 0, 4], [0x80, 0, 0, 0], [0, 0, 1, 3]] {
        let mut n = Negotiation::new();
        let r = drive(&mut n, &c, &flags);
        assert_eq!(r.out, b"");
        assert_eq!(r.last, Some(Next::Close("unknown client flags")));
    }
}

#[test]
fn option_before_client_flags_is_refused() {
    // A client that skips its flags: "IHAV" read as flags has unknown bits: closed, and
    // nothing of the option is answered.
    let mut n = Negotiation::new();
    let r = drive(&mut n, &Catalog::two(), &opt(proto::OPT_LIST, &[]));
    assert_eq!(r.out, b"");
    assert_eq!(r.last, Some(Next::Close("unknown client flags")));
    assert_eq!(r.left, 16 - 4);
}

#[test]
fn options_arriving_in_pieces() {
    // An option split at every byte: nothing happens until its last byte, then the same
    // reply as in one piece.
    let c = Catalog::two();
    let mut input = FLAGS_BOTH.to_vec();
    input.extend_from_slice(&opt(proto::OPT_LIST, &[]));
    let mut n = Negotiation::new();
    let mut pos = 0;
    let mut out = Vec::new();
    for end in 1..=input.len() {
        match n.step(&input[pos..end], &c) {
            Step::NeedMore => assert!(end != 4 && end != input.len(), "stalled at {end}"),
            Step::Handled {
                consumed,
                replies,
                next,
            } => {
                assert_eq!(next, Next::Negotiate);
                assert!(end == 4 || end == input.len(), "acted early at {end}");
                pos += consumed;
                out.extend_from_slice(&replies);
            }
        }
    }
    assert_eq!(pos, input.len());
    let expected = [
        rep(proto::OPT_LIST, proto::REP_SERVER, b"\0\0\0\x04disk"),
        rep(proto::OPT_LIST, proto::REP_SERVER, b"\0\0\0\x02ro"),
        rep(proto::OPT_LIST, proto::REP_ACK, &[]),
    ]
    .concat();
    assert_eq!(out, expected);
}

#[test]
fn list_exports() {
    let c = Catalog::two();
    let mut n = haggling();
    let r = drive(&mut n, &c, &opt(proto::OPT_LIST, &[]));
    assert_eq!(
        r.out,
        [
            &REPLY_MAGIC[..],
            &[0, 0, 0, 3], // NBD_OPT_LIST
            &[0, 0, 0, 2], // NBD_REP_SERVER
            &[0, 0, 0, 8], // length
            &[0, 0, 0, 4], // name length
            b"disk",
            &REPLY_MAGIC[..],
            &[0, 0, 0, 3],
            &[0, 0, 0, 2],
            &[0, 0, 0, 6],
            &[0, 0, 0, 2],
            b"ro",
            &REPLY_MAGIC[..],
            &[0, 0, 0, 3],
            &[0, 0, 0, 1], // NBD_REP_ACK
            &[0, 0, 0, 0],
        ]
        .concat()
    );
    assert_eq!(r.last, None);
    // LIST carries no data: ERR_INVALID (0x80000003), and haggling goes on.
    let r = drive(&mut n, &c, &opt(proto::OPT_LIST, b"x"));
    assert_eq!(
        r.out,
        [
            &REPLY_MAGIC[..],
            &[0, 0, 0, 3],
            &[0x80, 0, 0, 3],
            &[0, 0, 0, 0]
        ]
        .concat()
    );
    assert_eq!(r.last, None);
}

#[test]
fn unknown_options_and_starttls() {
    let c = Catalog::two();
    let mut n = haggling();
    // Unknown option with a payload: ERR_UNSUP (0x80000001), payload consumed, go on.
    let mut input = opt(0x4242, b"junk");
    // NOTLS server (proto.md "NOTLS mode"): STARTTLS is ERR_UNSUP too.
    input.extend_from_slice(&opt(proto::OPT_STARTTLS, &[]));
    let r = drive(&mut n, &c, &input);
    assert_eq!(
        r.out,
        [
            &REPLY_MAGIC[..],
            &[0, 0, 0x42, 0x42],
            &[0x80, 0, 0, 1],
            &[0, 0, 0, 0],
            &REPLY_MAGIC[..],
            &[0, 0, 0, 5],
            &[0x80, 0, 0, 1],
            &[0, 0, 0, 0],
        ]
        .concat()
    );
    assert_eq!((r.last, r.left), (None, 0));

    // Without fixed newstyle an unknown option can only be answered by closing.
    let mut n = Negotiation::new();
    let mut input = vec![0, 0, 0, 2]; // NO_ZEROES only
    input.extend_from_slice(&opt(proto::OPT_STARTTLS, &[]));
    let r = drive(&mut n, &c, &input);
    assert_eq!(r.out, b"");
    assert_eq!(
        r.last,
        Some(Next::Close(
            "unknown option from a non-fixed-newstyle client"
        ))
    );
}

#[test]
fn bad_option_magic_closes_after_the_whole_option() {
    let c = Catalog::two();
    let mut n = haggling();
    let mut bad = opt(proto::OPT_LIST, b"abc");
    bad[7] = b'X';
    // The length is honoured before the magic is judged.
    assert_eq!(n.step(&bad[..18], &c), Step::NeedMore);
    let r = drive(&mut n, &c, &bad);
    assert_eq!(r.out, b"");
    assert_eq!(r.last, Some(Next::Close("bad option magic")));
}

#[test]
fn oversized_options() {
    let c = Catalog::two();
    // Exactly MAX_OPT_LEN is accepted (and answered).
    let mut n = haggling();
    let r = drive(&mut n, &c, &opt(0x99, &vec![7; MAX_OPT_LEN]));
    assert_eq!(r.out, rep(0x99, proto::REP_ERR_UNSUP, &[]));
    assert_eq!((r.last, r.left), (None, 0));

    // One byte more: ERR_TOO_BIG (0x80000009) from the header alone, then close.
    let mut header = b"IHAVEOPT".to_vec();
    header.extend_from_slice(&be32(proto::OPT_GO));
    header.extend_from_slice(&be32(MAX_OPT_LEN as u32 + 1));
    assert!(n.ready(&header));
    let r = drive(&mut n, &c, &header);
    assert_eq!(
        r.out,
        [
            &REPLY_MAGIC[..],
            &[0, 0, 0, 7],
            &[0x80, 0, 0, 9],
            &[0, 0, 0, 0]
        ]
        .concat()
    );
    assert_eq!(
        r.last,
        Some(Next::Close("option payload over the 64 KiB limit"))
    );

    // An oversized EXPORT_NAME has no error reply (proto.md): closed silently.
    let mut n = haggling();
    let mut h = b"IHAVEOPT".to_vec();
    h.extend_from_slice(&be32(proto::OPT_EXPORT_NAME));
    h.extend_from_slice(&be32(u32::MAX));
    let r = drive(&mut n, &c, &h);
    assert_eq!(r.out, b"");
    assert_eq!(
        r.last,
        Some(Next::Close("bad option magic or oversized export name"))
    );

    // Nor does a non-fixed-newstyle client get one.
    let mut n = Negotiation::new();
    let mut input = vec![0, 0, 0, 0];
    input.extend_from_slice(&header);
    let r = drive(&mut n, &c, &input);
    assert_eq!(r.out, b"");
    assert!(matches!(r.last, Some(Next::Close(_))));
}

#[test]
fn export_name_enters_transmission() {
    let c = Catalog::two();
    // NO_ZEROES: size (8 bytes) and transmission flags (2 bytes), nothing else.
    let mut n = haggling();
    let r = drive(&mut n, &c, &opt(proto::OPT_EXPORT_NAME, b"ro"));
    assert_eq!(r.out, [0, 0, 0, 1, 0, 0, 0, 0, 0x01, 0x07]);
    assert_eq!(
        r.last,
        Some(Next::Transmit {
            attachment: "ro".into(),
            if_unopenable: Unopenable::Close("cannot open the bdev channel"),
        })
    );
    // Without NO_ZEROES: 124 zero bytes follow.
    let mut n = Negotiation::new();
    let mut input = vec![0, 0, 0, 1];
    input.extend_from_slice(&opt(proto::OPT_EXPORT_NAME, b"disk"));
    let r = drive(&mut n, &c, &input);
    let mut expected = vec![0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d];
    expected.extend_from_slice(&[0; 124]);
    assert_eq!(r.out, expected);
    assert!(matches!(r.last, Some(Next::Transmit { .. })));
    // "" is the default export when there is exactly one.
    let mut n = haggling();
    let r = drive(&mut n, &Catalog::one(), &opt(proto::OPT_EXPORT_NAME, b""));
    assert!(matches!(r.last, Some(Next::Transmit { attachment, .. }) if attachment == "disk"));
    // An unknown export cannot be refused with a reply: closed.
    for c in [Catalog::two(), Catalog::one()] {
        let mut n = haggling();
        let name: &[u8] = if c.exports.len() == 2 { b"" } else { b"nope" };
        let r = drive(&mut n, &c, &opt(proto::OPT_EXPORT_NAME, name));
        assert_eq!(r.out, b"");
        assert_eq!(
            r.last,
            Some(Next::Close("NBD_OPT_EXPORT_NAME for an unknown export"))
        );
    }
}

/// The replies to INFO/GO on "disk" with NAME and DESCRIPTION requested, up to the ACK.
fn disk_info_replies(option: u32) -> Vec<u8> {
    [
        // NBD_REP_INFO (3), NBD_INFO_EXPORT: type 0, size, flags.
        rep(option, 3, &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d]),
        // NBD_INFO_NAME: type 1, the name (no length).
        rep(option, 3, b"\0\x01disk"),
        // NBD_INFO_DESCRIPTION: type 2, the text.
        rep(option, 3, b"\0\x02the disk"),
        // NBD_INFO_BLOCK_SIZE: type 3, minimum, preferred, maximum.
        rep(option, 3, &[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0]),
        rep(option, proto::REP_ACK, &[]),
    ]
    .concat()
}

#[test]
fn info_then_go_with_info_requests() {
    let c = Catalog::two();
    let mut n = haggling();
    // NAME, an unknown info type (ignored), DESCRIPTION, BLOCK_SIZE (sent once anyway).
    let payload = info_payload("disk", &[1, 0x7777, 2, 3]);
    let r = drive(&mut n, &c, &opt(proto::OPT_INFO, &payload));
    assert_eq!(r.out, disk_info_replies(proto::OPT_INFO));
    assert_eq!(r.last, None, "INFO stays in negotiation");
    let r = drive(&mut n, &c, &opt(proto::OPT_GO, &payload));
    assert_eq!(r.out, disk_info_replies(proto::OPT_GO));
    assert_eq!(
        r.last,
        Some(Next::Transmit {
            attachment: "disk".into(),
            // NBD_REP_ERR_PLATFORM (0x80000004) if the export cannot be opened.
            if_unopenable: Unopenable::Reply(
                [
                    &REPLY_MAGIC[..],
                    &[0, 0, 0, 7],
                    &[0x80, 0, 0, 4],
                    &[0, 0, 0, 0]
                ]
                .concat()
            ),
        })
    );
    assert_eq!(n.agreed(), Agreed::default());
}

#[test]
fn go_without_info_requests_and_default_export() {
    let mut n = haggling();
    let r = drive(
        &mut n,
        &Catalog::one(),
        &opt(proto::OPT_GO, &info_payload("", &[])),
    );
    // EXPORT and BLOCK_SIZE are always sent; the name is the export's own.
    assert_eq!(
        r.out,
        [
            rep(7, 3, &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d]),
            rep(7, 3, &[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0]),
            rep(7, 1, &[]),
        ]
        .concat()
    );
    assert!(matches!(r.last, Some(Next::Transmit { attachment, .. }) if attachment == "disk"));
}

#[test]
fn go_errors_keep_haggling() {
    let c = Catalog::two();
    let mut n = haggling();
    let mut input = Vec::new();
    // Unknown export: ERR_UNKNOWN (0x80000006).
    input.extend_from_slice(&opt(proto::OPT_GO, &info_payload("nope", &[])));
    // "" with two exports: no default, ERR_UNKNOWN.
    input.extend_from_slice(&opt(proto::OPT_INFO, &info_payload("", &[])));
    // Name length past the payload: ERR_INVALID (0x80000003).
    input.extend_from_slice(&opt(proto::OPT_GO, &[0, 0, 0, 200, 1]));
    // Trailing byte after the info list: ERR_INVALID.
    let mut trailing = info_payload("disk", &[1]);
    trailing.push(0);
    input.extend_from_slice(&opt(proto::OPT_GO, &trailing));
    // Info count promising more than there is: ERR_INVALID.
    let mut short = info_payload("disk", &[1, 2]);
    short.truncate(short.len() - 2);
    input.extend_from_slice(&opt(proto::OPT_INFO, &short));
    // Empty payload: ERR_INVALID.
    input.extend_from_slice(&opt(proto::OPT_GO, &[]));
    let r = drive(&mut n, &c, &input);
    assert_eq!(
        r.out,
        [
            rep(7, 0x8000_0006, &[]),
            rep(6, 0x8000_0006, &[]),
            rep(7, 0x8000_0003, &[]),
            rep(7, 0x8000_0003, &[]),
            rep(6, 0x8000_0003, &[]),
            rep(7, 0x8000_0003, &[]),
        ]
        .concat()
    );
    assert_eq!((r.last, r.left), (None, 0));
    // Still able to go.
    let r = drive(&mut n, &c, &opt(proto::OPT_GO, &info_payload("ro", &[])));
    assert!(matches!(r.last, Some(Next::Transmit { attachment, .. }) if attachment == "ro"));
}

#[test]
fn structured_reply() {
    let c = Catalog::two();
    let mut n = haggling();
    // With a payload: ERR_INVALID, not negotiated.
    let r = drive(&mut n, &c, &opt(proto::OPT_STRUCTURED_REPLY, &[0]));
    assert_eq!(r.out, rep(8, 0x8000_0003, &[]));
    assert!(!n.agreed().structured);
    let r = drive(&mut n, &c, &opt(proto::OPT_STRUCTURED_REPLY, &[]));
    assert_eq!(
        r.out,
        [
            &REPLY_MAGIC[..],
            &[0, 0, 0, 8],
            &[0, 0, 0, 1],
            &[0, 0, 0, 0]
        ]
        .concat()
    );
    assert_eq!(
        n.agreed(),
        Agreed {
            structured: true,
            base_allocation: false
        }
    );
}

/// NBD_REP_META_CONTEXT (4) for `base:allocation`, context id 1.
fn base_allocation_context(option: u32) -> Vec<u8> {
    rep(option, 4, b"\0\0\0\x01base:allocation")
}

#[test]
fn set_meta_context() {
    let c = Catalog::two();
    let set = proto::OPT_SET_META_CONTEXT;
    let mut n = haggling();
    // Before STRUCTURED_REPLY: ERR_INVALID (proto.md).
    let r = drive(
        &mut n,
        &c,
        &opt(set, &meta_payload("disk", &["base:allocation"])),
    );
    assert_eq!(r.out, rep(set, 0x8000_0003, &[]));
    drive(&mut n, &c, &opt(proto::OPT_STRUCTURED_REPLY, &[]));

    // An unknown query selects nothing: only the ACK.
    let r = drive(
        &mut n,
        &c,
        &opt(set, &meta_payload("disk", &["qemu:dirty-bitmap:x"])),
    );
    assert_eq!(r.out, rep(set, proto::REP_ACK, &[]));
    assert!(!n.agreed().base_allocation);
    // "base:" alone is for LIST only.
    let r = drive(&mut n, &c, &opt(set, &meta_payload("disk", &["base:"])));
    assert_eq!(r.out, rep(set, proto::REP_ACK, &[]));
    // Unknown export: ERR_UNKNOWN; malformed: ERR_INVALID.
    let r = drive(
        &mut n,
        &c,
        &opt(set, &meta_payload("nope", &["base:allocation"])),
    );
    assert_eq!(r.out, rep(set, 0x8000_0006, &[]));
    let mut bad = meta_payload("disk", &["base:allocation"]);
    bad.pop();
    let r = drive(&mut n, &c, &opt(set, &bad));
    assert_eq!(r.out, rep(set, 0x8000_0003, &[]));

    let r = drive(
        &mut n,
        &c,
        &opt(set, &meta_payload("disk", &["qemu:x", "base:allocation"])),
    );
    assert_eq!(
        r.out,
        [base_allocation_context(set), rep(set, proto::REP_ACK, &[])].concat()
    );
    assert!(n.agreed().base_allocation);
}

#[test]
fn meta_context_holds_only_for_its_export() {
    let c = Catalog::two();
    let set = proto::OPT_SET_META_CONTEXT;
    let mut input = opt(proto::OPT_STRUCTURED_REPLY, &[]);
    input.extend_from_slice(&opt(set, &meta_payload("disk", &["base:allocation"])));
    // GO on the export the context was selected for keeps it.
    let mut n = haggling();
    let mut go = input.clone();
    go.extend_from_slice(&opt(proto::OPT_GO, &info_payload("disk", &[])));
    let r = drive(&mut n, &c, &go);
    assert!(matches!(r.last, Some(Next::Transmit { .. })));
    assert_eq!(
        n.agreed(),
        Agreed {
            structured: true,
            base_allocation: true
        }
    );
    // GO on another export drops it.
    let mut n = haggling();
    let mut go = input;
    go.extend_from_slice(&opt(proto::OPT_GO, &info_payload("ro", &[])));
    let r = drive(&mut n, &c, &go);
    assert!(matches!(r.last, Some(Next::Transmit { .. })));
    assert_eq!(
        n.agreed(),
        Agreed {
            structured: true,
            base_allocation: false
        }
    );
}

#[test]
fn list_meta_context() {
    let c = Catalog::two();
    let list = proto::OPT_LIST_META_CONTEXT;
    // Allowed before STRUCTURED_REPLY; no query lists every context; "base:" matches.
    let mut n = haggling();
    for queries in [&[][..], &["base:"], &["base:allocation", "other"]] {
        let r = drive(&mut n, &c, &opt(list, &meta_payload("disk", queries)));
        assert_eq!(
            r.out,
            [
                base_allocation_context(list),
                rep(list, proto::REP_ACK, &[])
            ]
            .concat(),
            "{queries:?}"
        );
    }
    let r = drive(&mut n, &c, &opt(list, &meta_payload("disk", &["other:"])));
    assert_eq!(r.out, rep(list, proto::REP_ACK, &[]));
    let r = drive(&mut n, &c, &opt(list, &meta_payload("nope", &[])));
    assert_eq!(r.out, rep(list, 0x8000_0006, &[]));
    // Listing selects nothing.
    assert_eq!(n.agreed(), Agreed::default());
}

#[test]
fn abort() {
    let c = Catalog::two();
    let mut n = haggling();
    // ACK, then close; what follows is not read.
    let mut input = opt(proto::OPT_ABORT, &[]);
    input.extend_from_slice(&opt(proto::OPT_LIST, &[]));
    let r = drive(&mut n, &c, &input);
    assert_eq!(
        r.out,
        [
            &REPLY_MAGIC[..],
            &[0, 0, 0, 2],
            &[0, 0, 0, 1],
            &[0, 0, 0, 0]
        ]
        .concat()
    );
    assert_eq!(r.last, Some(Next::Close("NBD_OPT_ABORT")));
    assert_eq!(r.left, 16);
}
