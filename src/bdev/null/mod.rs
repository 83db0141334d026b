//! The `null` backend. (being written)

pub mod rpc;
