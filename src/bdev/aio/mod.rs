//! The `aio` backend. (being written)

pub mod rpc;
