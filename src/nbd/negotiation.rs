//! The handshake of an NBD connection (proto.md "Fixed newstyle negotiation" and "Option
//! haggling") as a state machine over bytes: buffered client bytes in, reply bytes and a
//! decision out. No socket and no bdev: what it needs of the exports comes through
//! [`ExportCatalog`], so every reply can be checked byte by byte in unit tests.
//!
//! The server's greeting ([`proto::greeting`]) announces FIXED_NEWSTYLE and NO_ZEROES; the
//! client answers with its flags (4 bytes), then sends options until one of them
//! (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`) starts transmission or the connection closes.

use super::export::{Attachment, Exports};
use super::proto;

/// Longest option payload accepted; longer ones are answered NBD_REP_ERR_TOO_BIG and the
/// connection is closed.
pub const MAX_OPT_LEN: usize = 64 * 1024;

/// What the client is told about an export (NBD_OPT_INFO, NBD_OPT_GO, NBD_OPT_EXPORT_NAME).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportFacts {
    /// The export's own name (a client asking for "" gets the default export's).
    pub name: String,
    pub size: u64,
    /// Transmission flags (proto.md "Transmission flags").
    pub flags: u16,
    /// `NBD_INFO_DESCRIPTION` text.
    pub description: String,
    /// (minimum, preferred, maximum) for `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: (u32, u32, u32),
}

/// The exports as negotiation sees them.
pub trait ExportCatalog {
    /// Held while a client is attached (counts it as a client of the export).
    type Attachment;
    /// Attaches to the export `name` ("" selects the default export).
    fn attach(&self, name: &str) -> Option<(Self::Attachment, ExportFacts)>;
    /// Whether an export is named exactly `name` (meta context requests).
    fn contains(&self, name: &str) -> bool;
    /// The names `NBD_OPT_LIST` announces.
    fn names(&self) -> Vec<String>;
}

impl ExportCatalog for Exports {
    type Attachment = Attachment;

    fn attach(&self, name: &str) -> Option<(Attachment, ExportFacts)> {
        let att = Exports::attach(self, name)?;
        let e = &att.export;
        let facts = ExportFacts {
            name: e.name.clone(),
            size: e.bdev.size(),
            flags: e.transmission_flags(),
            description: format!(
                "blockd bdev {} ({})",
                e.bdev.name(),
                e.bdev.backend().product_name()
            ),
            block_sizes: e.block_sizes(),
        };
        Some((att, facts))
    }

    fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn names(&self) -> Vec<String> {
        self.socket_names()
    }
}

/// What the handshake settled for the transmission phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Agreed {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// `base:allocation` is selected for the export being entered (NBD_CMD_BLOCK_STATUS).
    pub base_allocation: bool,
}

/// The outcome of [`Negotiation::step`].
#[derive(Debug, PartialEq, Eq)]
pub enum Step<A> {
    /// The buffered input holds no complete message: read more.
    NeedMore,
    /// The first `consumed` bytes formed one message; send `replies`, then act on `next`.
    Handled {
        consumed: usize,
        replies: Vec<u8>,
        next: Next<A>,
    },
}

/// What follows a handled message.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<A> {
    /// More options may come.
    Negotiate,
    /// Close the connection once the replies are sent (why, for the log).
    Close(&'static str),
    /// Open `attachment` for transmission with [`Negotiation::agreed`]. The replies are for
    /// when that works; when it does not, they are dropped for `if_unopenable`.
    Transmit {
        attachment: A,
        if_unopenable: Unopenable,
    },
}

/// What to do when the export chosen for transmission cannot be opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Unopenable {
    /// `NBD_OPT_GO`: send this error reply and go on haggling.
    Reply(Vec<u8>),
    /// `NBD_OPT_EXPORT_NAME` has no error reply (proto.md): close.
    Close(&'static str),
}

/// What the client said in its flags (proto.md "Client flags").
#[derive(Clone, Copy, Debug)]
struct ClientFlags {
    fixed_newstyle: bool,
    no_zeroes: bool,
}

/// The `NBD_OPT_SET_META_CONTEXT` selection (proto.md "Metadata querying").
#[derive(Clone, Debug, Default)]
struct MetaSelection {
    /// The export the selection was made for: it only holds for that export.
    export: Option<String>,
    base_allocation: bool,
}

/// The handshake state of one connection, after the greeting was sent.
#[derive(Clone, Debug, Default)]
pub struct Negotiation {
    /// None until the client flags arrive.
    client: Option<ClientFlags>,
    structured: bool,
    meta: MetaSelection,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn reply(option: u32, typ: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::opt_reply(&mut out, option, typ, data);
    out
}

fn handled<A>(consumed: usize, replies: Vec<u8>, next: Next<A>) -> Step<A> {
    Step::Handled {
        consumed,
        replies,
        next,
    }
}

impl Negotiation {
    /// A handshake waiting for the client flags.
    pub fn new() -> Self {
        Self::default()
    }

    /// What transmission inherits from the handshake.
    pub fn agreed(&self) -> Agreed {
        Agreed {
            structured: self.structured,
            base_allocation: self.meta.base_allocation,
        }
    }

    /// Handles the first message of `input` (the client's unconsumed bytes).
    pub fn step<C: ExportCatalog>(&mut self, input: &[u8], exports: &C) -> Step<C::Attachment> {
        let Some(client) = self.client else {
            let Some(flags) = input.get(..4) else {
                return Step::NeedMore;
            };
            return self.on_client_flags(be32(flags));
        };
        let Some(head) = input.get(..proto::OPT_HEADER_LEN) else {
            return Step::NeedMore;
        };
        let mut h = [0u8; proto::OPT_HEADER_LEN];
        h.copy_from_slice(head);
        let len = be32(&h[12..]) as usize;
        if len > MAX_OPT_LEN {
            return option_too_big(&h, client);
        }
        let Some(msg) = input.get(..proto::OPT_HEADER_LEN + len) else {
            return Step::NeedMore;
        };
        let data = &msg[proto::OPT_HEADER_LEN..];
        let Some(oh) = proto::parse_opt_header(&h) else {
            return handled(msg.len(), Vec::new(), Next::Close("bad option magic"));
        };
        let (replies, next) = self.on_option(oh.option, data, client, exports);
        handled(msg.len(), replies, next)
    }

    /// Whether [`Negotiation::step`] would act on `input` without more bytes.
    pub fn ready(&self, input: &[u8]) -> bool {
        if self.client.is_none() {
            return input.len() >= 4;
        }
        match input.get(..proto::OPT_HEADER_LEN) {
            None => false,
            Some(h) => {
                let len = be32(&h[12..]) as usize;
                len > MAX_OPT_LEN || input.len() >= proto::OPT_HEADER_LEN + len
            }
        }
    }

    fn on_client_flags<A>(&mut self, f: u32) -> Step<A> {
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if f & !known != 0 {
            // proto.md: a server MUST close when it sees client flags it does not know.
            return handled(4, Vec::new(), Next::Close("unknown client flags"));
        }
        self.client = Some(ClientFlags {
            fixed_newstyle: f & proto::FLAG_C_FIXED_NEWSTYLE != 0,
            no_zeroes: f & proto::FLAG_C_NO_ZEROES != 0,
        });
        handled(4, Vec::new(), Next::Negotiate)
    }

    fn on_option<C: ExportCatalog>(
        &mut self,
        opt: u32,
        data: &[u8],
        client: ClientFlags,
        exports: &C,
    ) -> (Vec<u8>, Next<C::Attachment>) {
        match opt {
            proto::OPT_EXPORT_NAME => {
                // The name is the whole payload, without a length.
                let name = std::str::from_utf8(data).unwrap_or("\u{fffd}");
                match exports.attach(name) {
                    // Structured replies and meta contexts stay as negotiated: proto.md
                    // only ties them to the export for NBD_OPT_GO.
                    Some((attachment, facts)) => (
                        proto::export_name_reply(facts.size, facts.flags, client.no_zeroes),
                        Next::Transmit {
                            attachment,
                            if_unopenable: Unopenable::Close("cannot open the bdev channel"),
                        },
                    ),
                    None => (
                        Vec::new(),
                        Next::Close("NBD_OPT_EXPORT_NAME for an unknown export"),
                    ),
                }
            }
            proto::OPT_ABORT => (
                reply(opt, proto::REP_ACK, &[]),
                Next::Close("NBD_OPT_ABORT"),
            ),
            proto::OPT_LIST => {
                let mut out = Vec::new();
                if !data.is_empty() {
                    proto::opt_reply(&mut out, opt, proto::REP_ERR_INVALID, &[]);
                } else {
                    for n in exports.names() {
                        proto::opt_reply(&mut out, opt, proto::REP_SERVER, &proto::rep_server(&n));
                    }
                    proto::opt_reply(&mut out, opt, proto::REP_ACK, &[]);
                }
                (out, Next::Negotiate)
            }
            proto::OPT_INFO | proto::OPT_GO => self.info_or_go(opt, data, exports),
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return (reply(opt, proto::REP_ERR_INVALID, &[]), Next::Negotiate);
                }
                self.structured = true;
                (reply(opt, proto::REP_ACK, &[]), Next::Negotiate)
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                (self.meta_context(opt, data, exports), Next::Negotiate)
            }
            // Everything else, NBD_OPT_STARTTLS included (proto.md "NOTLS mode": ERR_UNSUP
            // when the server has no TLS at all).
            _ if !client.fixed_newstyle => (
                // Without fixed newstyle the only answer to an unknown option is closing.
                Vec::new(),
                Next::Close("unknown option from a non-fixed-newstyle client"),
            ),
            _ => (reply(opt, proto::REP_ERR_UNSUP, &[]), Next::Negotiate),
        }
    }

    /// NBD_OPT_INFO / NBD_OPT_GO: NBD_INFO_EXPORT, the NAME and DESCRIPTION asked for,
    /// NBD_INFO_BLOCK_SIZE, then ACK (GO: transmission follows).
    fn info_or_go<C: ExportCatalog>(
        &mut self,
        opt: u32,
        data: &[u8],
        exports: &C,
    ) -> (Vec<u8>, Next<C::Attachment>) {
        let Some(req) = proto::parse_info_request(data) else {
            return (reply(opt, proto::REP_ERR_INVALID, &[]), Next::Negotiate);
        };
        let Some((attachment, e)) = exports.attach(req.name) else {
            return (reply(opt, proto::REP_ERR_UNKNOWN, &[]), Next::Negotiate);
        };
        let mut out = reply(opt, proto::REP_INFO, &proto::info_export(e.size, e.flags));
        for r in &req.requests {
            let info = match *r {
                proto::INFO_NAME => proto::info_string(proto::INFO_NAME, &e.name),
                proto::INFO_DESCRIPTION => {
                    proto::info_string(proto::INFO_DESCRIPTION, &e.description)
                }
                // NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent; unknown ones
                // are ignored (proto.md "NBD_OPT_INFO").
                _ => continue,
            };
            proto::opt_reply(&mut out, opt, proto::REP_INFO, &info);
        }
        let (min, pref, max) = e.block_sizes;
        proto::opt_reply(
            &mut out,
            opt,
            proto::REP_INFO,
            &proto::info_block_size(min, pref, max),
        );
        proto::opt_reply(&mut out, opt, proto::REP_ACK, &[]);
        if opt == proto::OPT_INFO {
            return (out, Next::Negotiate);
        }
        // Meta contexts are bound to the export they were negotiated for.
        if self.meta.export.as_deref() != Some(e.name.as_str()) {
            self.meta.base_allocation = false;
        }
        let next = Next::Transmit {
            attachment,
            if_unopenable: Unopenable::Reply(reply(opt, proto::REP_ERR_PLATFORM, &[])),
        };
        (out, next)
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: `base:allocation` is the one
    /// context served.
    fn meta_context<C: ExportCatalog>(&mut self, opt: u32, data: &[u8], exports: &C) -> Vec<u8> {
        let list = opt == proto::OPT_LIST_META_CONTEXT;
        if !list && !self.structured {
            // proto.md: SET_META_CONTEXT before STRUCTURED_REPLY is invalid.
            return reply(opt, proto::REP_ERR_INVALID, &[]);
        }
        let Some(req) = proto::parse_meta_request(data) else {
            return reply(opt, proto::REP_ERR_INVALID, &[]);
        };
        if !exports.contains(req.name) {
            return reply(opt, proto::REP_ERR_UNKNOWN, &[]);
        }
        // LIST with no query lists every context.
        let selected = (list && req.queries.is_empty())
            || req
                .queries
                .iter()
                .any(|q| proto::query_matches_base_allocation(q, list));
        let mut out = Vec::new();
        if selected {
            proto::opt_reply(
                &mut out,
                opt,
                proto::REP_META_CONTEXT,
                &proto::rep_meta_context(
                    proto::META_BASE_ALLOCATION_ID,
                    proto::META_BASE_ALLOCATION,
                ),
            );
        }
        if !list {
            self.meta = MetaSelection {
                export: Some(req.name.to_string()),
                base_allocation: selected,
            };
        }
        proto::opt_reply(&mut out, opt, proto::REP_ACK, &[]);
        out
    }
}

/// An option whose length is over [`MAX_OPT_LEN`]: NBD_REP_ERR_TOO_BIG (fixed newstyle
/// only: proto.md allows no error reply otherwise, nor to NBD_OPT_EXPORT_NAME), then close,
/// since skipping the payload would mean reading it.
fn option_too_big<A>(h: &[u8; proto::OPT_HEADER_LEN], client: ClientFlags) -> Step<A> {
    match proto::parse_opt_header(h) {
        Some(oh) if oh.option != proto::OPT_EXPORT_NAME && client.fixed_newstyle => handled(
            proto::OPT_HEADER_LEN,
            reply(oh.option, proto::REP_ERR_TOO_BIG, &[]),
            Next::Close("option payload over the 64 KiB limit"),
        ),
        _ => handled(
            proto::OPT_HEADER_LEN,
            Vec::new(),
            Next::Close("bad option magic or oversized export name"),
        ),
    }
}

#[cfg(test)]
mod tests;
