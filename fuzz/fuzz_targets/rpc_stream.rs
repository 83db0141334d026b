//! The JSON-RPC server's input path (SPDK jsonrpc.md: JSON values back to back on a stream,
//! no delimiter): the framer on arbitrary bytes, whole and in chunks, then every value
//! through the server's request validation and dispatch into real method handlers (the
//! generic bdev, null bdev and log methods, on a registry of their own) with `params`
//! decoding their parameter structs. Checks: splitting the stream never changes what is
//! framed (for containers, the only top-level values requests can be), and every answer
//! is a well-formed JSON-RPC 2.0 response carrying the request's id.
#![no_main]

use std::sync::Arc;

use blockd::bdev::rpc::BdevContext;
use blockd::bdev::BdevRegistry;
use blockd::rpc::fuzz_api::{handle_request, Framed, StreamFramer};
use blockd::rpc::{RpcContext, RpcMethods};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

struct Ctx {
    bdevs: BdevRegistry,
    methods: RpcMethods<Ctx>,
}

impl RpcContext for Ctx {
    fn methods(&self) -> &RpcMethods<Self> {
        &self.methods
    }
}

impl BdevContext for Ctx {
    fn bdevs(&self) -> &BdevRegistry {
        &self.bdevs
    }
}

fn ctx() -> Arc<Ctx> {
    let mut methods = RpcMethods::default();
    blockd::bdev::rpc::register(&mut methods);
    blockd::bdev::null::rpc::register(&mut methods);
    blockd::rpc::log::register(&mut methods);
    Arc::new(Ctx {
        bdevs: BdevRegistry::default(),
        methods,
    })
}

/// Frames `data` fed in chunks of `chunk` bytes: the values, and whether it ended in a
/// syntax error.
fn frame(data: &[u8], chunk: usize) -> (Vec<Value>, bool) {
    let mut f = StreamFramer::default();
    let mut out = Vec::new();
    for c in data.chunks(chunk) {
        f.push(c);
        loop {
            match f.next_value() {
                Framed::Value(v) => out.push(v),
                Framed::NeedMore => break,
                Framed::Error(_) => return (out, true),
            }
        }
        assert!(f.pending() <= data.len());
    }
    (out, false)
}

fn scalar(v: &Value) -> bool {
    !matches!(v, Value::Object(_) | Value::Array(_))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let whole = frame(stream, stream.len().max(1));
    let chunked = frame(stream, usize::from(sel % 16) + 1);
    // A top-level number or literal has no end marker ("1" then "2" is 1 and 2, "12" is 12),
    // so only container streams must frame the same however they are split.
    if !whole.0.iter().chain(&chunked.0).any(scalar) {
        assert_eq!(whole.0, chunked.0, "values");
        // Chunks may only delay finding a syntax error: serde is retried when the
        // unparsed tail has doubled, so garbage at the end of a short final chunk can
        // still be waiting for bytes.
        assert!(whole.1 || !chunked.1, "syntax error only when split");
        // (The unconsumed byte counts may differ by whitespace between values, which a
        // chunk boundary lets the framer drop early.)
    }

    let app = ctx();
    for v in whole.0 {
        let id = v.get("id").cloned();
        let Some(reply) = handle_request(&app, v) else {
            assert!(id.is_none(), "a request with an id gets an answer");
            continue;
        };
        let r = reply.as_object().expect("reply is an object");
        assert_eq!(r.get("jsonrpc"), Some(&Value::from("2.0")));
        assert!(r.contains_key("id"));
        assert!(r.contains_key("result") != r.contains_key("error"));
        if let Some(e) = r.get("error") {
            assert!(e["code"].is_i64() && e["message"].is_string(), "{e}");
        }
    }
});
