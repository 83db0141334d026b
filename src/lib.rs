//! blockd: a userspace block-storage target for virtual machines.
//!
//! The layout follows the data path:
//! - [`frontend`-style modules](vhost) ([`vhost`] for vhost-user-blk) turn guest requests into
//!   bdev I/O;
//! - [`bdev`] is the generic block-device layer (claims, statistics, QoS) over the backends in
//!   `bdev::{malloc, null, aio}`;
//! - [`reactor`] runs frontends and backends on threads pinned to the cores of the cpumask;
//! - [`rpc`] speaks SPDK-compatible JSON-RPC 2.0 and only parses, validates and calls into the
//!   same library functions the configuration replay uses;
//! - [`app`] owns all the daemon's state, assembles the RPC method table from each module's
//!   `register`, and has the one shutdown path.
//!
//! Dependencies go one way: frontends (vhost, nbd) → bdev layer → backends; domain modules
//! return [`error::Error`] (an errno and a message) and never import `app` or `rpc`; only
//! each module's `rpc.rs` turns their errors into JSON-RPC errors. `tests/layering.rs`
//! checks it.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod app;
pub mod atomic_file;
pub mod bdev;
pub mod bench;
pub mod cli;
pub mod config;
pub mod cpumask;
pub mod error;
pub mod keyring;
pub mod localpool;
pub mod logging;
pub mod metrics;
pub mod nbd;
pub mod rbd;
pub mod rbdcli;
pub mod reactor;
pub mod rpc;
pub mod sd_notify;
pub mod sync;
pub mod unix_socket;
pub mod vhost;
