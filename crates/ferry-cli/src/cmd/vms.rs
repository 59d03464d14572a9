//! `ferry vms --source NAME [--json]`: the VMs of a hypervisor source.

use super::source::SourceArgs;
use ferry_core::size::human_bytes;
use std::process::ExitCode;

/// Arguments of `ferry vms`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    source: SourceArgs,
    /// Print JSON (one array of VMs) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Lists the VMs.
pub async fn run(args: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let driver = args.source.connect().await?;
    let vms = driver.list_vms().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<36} {:<9} {:>5} {:>10}  {:<16} TAGS",
        "NAME", "ID", "POWER", "DISKS", "SIZE", "CLUSTER"
    );
    for v in &vms {
        let size: u64 = v.disks.iter().map(|d| d.size).sum();
        let power = serde_json::to_value(v.power_state)?;
        println!(
            "{:<24} {:<36} {:<9} {:>5} {:>10}  {:<16} {}",
            v.name,
            v.id,
            power.as_str().unwrap_or("?"),
            v.disks.len(),
            human_bytes(size),
            // The vSphere cluster, Xen pool or Hyper-V failover cluster.
            v.cluster.as_deref().unwrap_or("-"),
            v.tags.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}
