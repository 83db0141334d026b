//! `blockctl`: blockd's command line (see `blockd::cli`).

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    blockd::cli::main_with(blockd::cli::Cli::parse())
}
