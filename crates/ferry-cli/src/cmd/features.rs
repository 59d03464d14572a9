//! `ferry features`: what this build supports, for humans or (`--json`) for scripts.

use serde::Serialize;
use std::process::ExitCode;

/// Arguments of `ferry features`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Features {
    version: &'static str,
    hypervisors: Vec<&'static str>,
    transports: Vec<&'static str>,
    repositories: Vec<&'static str>,
    image_formats: Vec<&'static str>,
}

/// Prints the feature list.
pub async fn run(args: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let f = Features {
        version: env!("CARGO_PKG_VERSION"),
        hypervisors: vec![
            "xen (XenAPI; `ferry sim xen` simulates one)",
            "hyperv (WinRM/WMI: child-VM or saved-state per VM, RCT; `ferry sim hyperv` simulates one)",
        ],
        transports: vec![
            "network: nbd, nbds (TLS), nbd+unix",
            "hot-add (xen)",
            "san: image files and block devices",
        ],
        repositories: vec!["local filesystem", "s3://", "az://"],
        image_formats: vec![
            "raw",
            "vhd (fixed, dynamic, differencing)",
            "vhdx (incl. avhdx chains)",
            "vmdk (flat, sparse, streamOptimized, vmfsSparse, deltas)",
        ],
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        println!("ferry {}", f.version);
        for (label, items) in [
            ("hypervisors", &f.hypervisors),
            ("transports", &f.transports),
            ("repositories", &f.repositories),
            ("image formats", &f.image_formats),
        ] {
            let list = if items.is_empty() {
                "none yet".to_string()
            } else {
                items.join(", ")
            };
            println!("{label:>13}: {list}");
        }
    }
    tracing::debug!("features listed");
    Ok(ExitCode::SUCCESS)
}
