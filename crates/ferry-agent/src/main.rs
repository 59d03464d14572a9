//! `ferry-agent`: serves a Hyper-V host's checkpoint disks to the Ferry appliance (read-only
//! NBD over mutual TLS). Prints one JSON line on start: listen address, certificate
//! fingerprint, roots.

use anyhow::Context;
use clap::Parser;
use ferry_agent::{AgentConfig, PathMap};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "ferry-agent", version, about)]
struct Args {
    /// TOML configuration file (keys: listen, roots, restore_roots, maps, cert, key, state_dir, client_pins);
    /// flags add to it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:10809].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A directory whose virtual disks may be exported (repeatable).
    #[arg(long = "root")]
    roots: Vec<PathBuf>,
    /// A directory under which restores may create new folders and VHDX files (repeatable).
    #[arg(long = "restore-root")]
    restore_roots: Vec<PathBuf>,
    /// Host path prefix translation, `C:\VMs=/srv/vms` (repeatable; labs and tests).
    #[arg(long = "map")]
    maps: Vec<PathMap>,
    /// The agent's certificate chain (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// The agent's private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Where a generated certificate is kept across restarts.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// SHA-256 fingerprint of an appliance client certificate allowed to connect (repeatable).
    #[arg(long = "client-pin")]
    client_pins: Vec<String>,
}

fn config(a: Args) -> anyhow::Result<AgentConfig> {
    let mut cfg = match &a.config {
        Some(p) => AgentConfig::from_file(p)?,
        None => AgentConfig::new(SocketAddr::from(([0, 0, 0, 0], ferry_agent::DEFAULT_PORT))),
    };
    if let Some(l) = a.listen {
        cfg.listen = l;
    }
    cfg.roots.extend(a.roots);
    cfg.restore_roots.extend(a.restore_roots);
    cfg.maps.extend(a.maps);
    cfg.client_pins.extend(a.client_pins);
    cfg.cert = a.cert.or(cfg.cert);
    cfg.key = a.key.or(cfg.key);
    cfg.state_dir = a.state_dir.or(cfg.state_dir);
    Ok(cfg)
}

async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = config(Args::parse())?;
    let roots = cfg.roots.clone();
    let agent = ferry_agent::start(cfg)
        .await
        .context("cannot start the agent")?;
    println!("{}", agent.announce(&roots));
    let token = agent.shutdown_token();
    tokio::spawn(async move {
        stopped().await;
        token.cancel();
    });
    agent.wait().await.context("agent stopped")?;
    Ok(())
}
