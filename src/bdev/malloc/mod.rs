//! The `malloc` backend. (being written)

pub mod rpc;
