//! The NBD handshake (proto.md "Fixed newstyle negotiation", "Option haggling") as the
//! server runs it: arbitrary client bytes through `Negotiation::step` until it closes or
//! enters transmission. Checks: `ready` predicts `step`, every message consumes bytes it
//! was given, and the replies are well-formed option replies to the option asked.
#![no_main]

use blockd::nbd::negotiation::{ExportCatalog, ExportFacts, Negotiation, Next, Step, Unopenable};
use blockd::nbd::proto::{OPT_EXPORT_NAME, OPT_HEADER_LEN, REPLY_MAGIC};
use libfuzzer_sys::fuzz_target;

/// "disk" (1 MiB) and "ro" (read-only, 4 KiB blocks), as in the unit tests.
struct Catalog(Vec<ExportFacts>);

impl ExportCatalog for Catalog {
    type Attachment = String;

    fn attach(&self, name: &str) -> Option<(String, ExportFacts)> {
        let e = self.0.iter().find(|e| e.name == name)?;
        Some((e.name.clone(), e.clone()))
    }

    fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|e| e.name == name)
    }

    fn names(&self) -> Vec<String> {
        self.0.iter().map(|e| e.name.clone()).collect()
    }
}

fn catalog() -> Catalog {
    Catalog(vec![
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
    ])
}

/// `replies` is a sequence of option replies (proto.md "Option reply") to `option`.
fn check_replies(replies: &[u8], option: u32) {
    let mut r = replies;
    while !r.is_empty() {
        assert!(r.len() >= 20, "truncated reply header");
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(r[8..12].try_into().unwrap()), option);
        let len = u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize;
        assert!(r.len() >= 20 + len, "reply data past the end");
        r = &r[20 + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = catalog();
    let mut neg = Negotiation::new();
    let mut input = data;
    let mut flags_done = false;
    loop {
        let ready = neg.ready(input);
        let step = neg.step(input, &exports);
        let Step::Handled {
            consumed,
            replies,
            next,
        } = step
        else {
            assert!(!ready, "ready but step needs more");
            return;
        };
        assert!(ready, "step handled what ready called incomplete");
        assert!(consumed > 0 && consumed <= input.len());
        let option = (flags_done && consumed >= OPT_HEADER_LEN)
            .then(|| u32::from_be_bytes(input[8..12].try_into().unwrap()));
        input = &input[consumed..];
        match next {
            Next::Negotiate => {
                if let Some(o) = option {
                    check_replies(&replies, o);
                } else {
                    assert!(!flags_done && replies.is_empty());
                }
                flags_done = true;
            }
            Next::Close(_) => {
                if let Some(o) = option {
                    check_replies(&replies, o);
                }
                return;
            }
            Next::Transmit {
                attachment,
                if_unopenable,
            } => {
                assert!(exports.contains(&attachment));
                let o = option.expect("transmission only after an option");
                if o == OPT_EXPORT_NAME {
                    assert!(matches!(if_unopenable, Unopenable::Close(_)));
                    assert!(replies.len() == 10 || replies.len() == 134);
                } else {
                    check_replies(&replies, o);
                    if let Unopenable::Reply(r) = if_unopenable {
                        check_replies(&r, o);
                    }
                }
                return;
            }
        }
    }
});
