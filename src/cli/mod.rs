//! `blockctl` subcommands implemented as library code (wired into `src/bin/blockctl.rs`).

pub mod map;
