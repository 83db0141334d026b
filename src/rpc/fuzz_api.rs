//! The stream framer and request dispatch of [`super::server`], for the cargo-fuzz targets
//! in `fuzz/` (feature `fuzzing`): thin public wrappers, no behaviour of their own.

use std::sync::Arc;

use serde_json::Value;

use super::server::{self, Frame, Framer};
use super::RpcContext;

/// What [`StreamFramer::next_value`] found.
#[derive(Debug)]
pub enum Framed {
    Value(Value),
    NeedMore,
    Error(serde_json::Error),
}

/// The RPC server's delimiter-less JSON stream splitter.
#[derive(Default)]
pub struct StreamFramer(Framer);

impl StreamFramer {
    pub fn push(&mut self, data: &[u8]) {
        self.0.push(data);
    }

    pub fn pending(&self) -> usize {
        self.0.pending()
    }

    pub fn next_value(&mut self) -> Framed {
        match self.0.next_value() {
            Frame::Value(v) => Framed::Value(v),
            Frame::NeedMore => Framed::NeedMore,
            Frame::Error(e) => Framed::Error(e),
        }
    }
}

/// Validates and runs one decoded request as the server does; `None` for a notification.
pub fn handle_request<C: RpcContext>(app: &Arc<C>, v: Value) -> Option<Value> {
    server::handle_request(app, v)
}
