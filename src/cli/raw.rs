//! `blockctl rpc <method> [params]`: any method with raw JSON params.

use std::io::Read;

use anyhow::Context;
use serde_json::Value;

use super::{Ctx, Run};

/// Arguments of `blockctl rpc`.
#[derive(clap::Args, Debug)]
pub struct RawArgs {
    /// Method name.
    pub method: String,
    /// Params as a JSON object or array; `-` reads them from stdin.
    pub params: Option<String>,
}

impl Run for RawArgs {
    fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let params = match self.params.as_deref() {
            None => None,
            Some(text) => {
                let text = if text == "-" {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading params from stdin")?;
                    s
                } else {
                    text.to_string()
                };
                let v: Value = serde_json::from_str(&text)
                    .with_context(|| format!("params of {} are not valid JSON", self.method))?;
                if !(v.is_object() || v.is_array()) {
                    anyhow::bail!("params of {} must be a JSON object or array", self.method);
                }
                Some(v)
            }
        };
        ctx.call_print(&self.method, params)
    }
}
