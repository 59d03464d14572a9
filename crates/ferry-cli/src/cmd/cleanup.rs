//! `ferry source cleanup --source NAME [--json]`: removes what killed backups left on a
//! hypervisor (snapshots, disk attachments, tasks) — the same sweep every backup runs first.

use super::source::SourceArgs;
use std::process::ExitCode;

/// `ferry source …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Remove leftover Ferry snapshots, attachments and tasks from the source.
    Cleanup(Args),
    /// Print this appliance's client certificate fingerprint for the source's Hyper-V host
    /// agents (made on first use).
    AgentPin(super::agent_pin::Args),
}

/// Arguments of `ferry source cleanup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    source: SourceArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the sweep.
pub async fn run(cmd: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let args = match cmd {
        Command::Cleanup(a) => a,
        Command::AgentPin(a) => return super::agent_pin::run(a).await,
    };
    let driver = args.source.connect().await?;
    let report = driver.recover().await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "source `{}`: removed {} snapshot(s), {} attachment(s), {} task(s), {} partial VM(s) of killed restores",
            args.source.source,
            report.snapshots,
            report.attachments,
            report.tasks,
            report.partial_vms
        );
    }
    Ok(ExitCode::SUCCESS)
}
