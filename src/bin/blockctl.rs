//! `blockctl`: blockd's command line (see `blockd::cli`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    blockd::cli::main_with(blockd::cli::Cli::parse())
}
