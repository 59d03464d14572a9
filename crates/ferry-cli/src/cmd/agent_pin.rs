//! `ferry source agent-pin NAME [--json]`: the fingerprint of this appliance's client
//! certificate for the Hyper-V host agents of source NAME (what each agent's `client_pins`
//! holds), making the certificate in the state directory on first use (ADR 0150).

use anyhow::Context;
use ferry_hv::{FerryConfig, SourceKind};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `ferry source agent-pin`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Hyper-V source (a `[sources.NAME]` table of ferry.toml).
    source: String,
    /// Configuration file (default: $FERRY_CONFIG, ./ferry.toml, /etc/ferry/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Print `{source, identity, fingerprint, created}` as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints the pin.
pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let cfg = FerryConfig::load(a.config.as_deref())?;
    let src = cfg.source(&a.source)?;
    if src.kind != SourceKind::Hyperv {
        anyhow::bail!(
            "source `{}` is not Hyper-V: only Hyper-V sources read through a host agent",
            a.source
        );
    }
    let (id, created) = ferry_hv_hyperv::agent::load_identity(&a.source, src)?;
    let fingerprint = id
        .fingerprint()
        .context("cannot read the agent client certificate")?;
    let path = ferry_hv_hyperv::agent::identity_path(src);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "source": a.source,
                "identity": path,
                "fingerprint": fingerprint,
                "created": created,
            })
        );
    } else {
        println!("{fingerprint}");
        eprintln!(
            "{} {}: add the fingerprint to each agent's client_pins (--client-pin)",
            if created { "made" } else { "using" },
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
