//! `sleap-rtc quickstart` on Windows: it runs a local worker, and the worker is Unix-only.

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct QuickstartArgs {}

pub async fn run(_: QuickstartArgs, _verbose: bool) -> Result<i32> {
    bail!("quickstart runs a local worker, which needs Linux or macOS; on Windows run it in WSL2")
}
