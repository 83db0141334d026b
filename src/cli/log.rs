//! Log commands, with rpc.py's arguments: `log_set_level LEVEL`, `log_get_level`,
//! `log_set_print_level LEVEL`, `log_get_print_level`, `log_set_flag FLAG`,
//! `log_clear_flag FLAG`, `log_get_flags`.

use serde_json::json;

use super::{Ctx, Run};

/// Log methods.
#[derive(clap::Subcommand, Debug)]
#[command(rename_all = "snake_case")]
pub enum LogCmd {
    /// Set the log level (ERROR, WARNING, NOTICE, INFO, DEBUG).
    LogSetLevel { level: String },
    /// The log level.
    LogGetLevel,
    /// Set the console level (blockd has one sink: the same level).
    LogSetPrintLevel { level: String },
    /// The console level (the same as log_get_level).
    LogGetPrintLevel,
    /// Log a component's debug messages (`all` for every component).
    LogSetFlag { flag: String },
    /// Stop logging a component's debug messages.
    LogClearFlag { flag: String },
    /// Every log flag with whether it is set.
    LogGetFlags,
}

impl Run for LogCmd {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            LogCmd::LogSetLevel { level } => {
                ctx.call_print("log_set_level", Some(json!({ "level": level })))
            }
            LogCmd::LogGetLevel => ctx.call_print("log_get_level", None),
            LogCmd::LogSetPrintLevel { level } => {
                ctx.call_print("log_set_print_level", Some(json!({ "level": level })))
            }
            LogCmd::LogGetPrintLevel => ctx.call_print("log_get_print_level", None),
            LogCmd::LogSetFlag { flag } => {
                ctx.call_print("log_set_flag", Some(json!({ "flag": flag })))
            }
            LogCmd::LogClearFlag { flag } => {
                ctx.call_print("log_clear_flag", Some(json!({ "flag": flag })))
            }
            LogCmd::LogGetFlags => ctx.call_print("log_get_flags", None),
        }
    }
}
