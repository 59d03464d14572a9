//! The simulated host's data paths beside WinRM (ADR 0151):
//!
//! - the host agent (`ferry-agent`, the `network` transport) served in-process on a loopback
//!   port with its own certificate, mapping the host's `C:\…` paths to its disk directory,
//!   which is also its restore root (restores written through the agent, ADR 0169).
//!   It admits the appliance certificates pinned with `--agent-client-pin` and those a test
//!   registers later through the side door (`FerrySim_SideDoor.AgentPin`), so a test can start
//!   the host before the appliance has made its identity;
//! - snapshot LUNs ([`super::lun`]): when asked for, each checkpoint refreshes an NTFS volume
//!   image holding the VM's VHDX/AVHDX chain, what an array snapshot of the CSV gives a proxy.

use super::{HypervSimError, lun};
use std::path::Path;

/// What the simulated host offers beside WinRM.
#[derive(Debug, Clone, Default)]
pub struct DataPathOptions {
    /// Appliance client certificates (`sha256:…`) the agent admits from the start.
    pub agent_client_pins: Vec<String>,
    /// Present a snapshot LUN (NTFS volume image) per VM folder, refreshed at each checkpoint.
    pub san_luns: bool,
}

/// The data paths' state the WMI side needs (the side door, checkpoints).
#[derive(Debug, Default)]
pub(super) struct DataPaths {
    pins: ferry_tls::ClientPins,
    pub(super) luns: Option<lun::Luns>,
    /// Where the agent listens (what [`super::node_agent`]'s relays pass through to).
    pub(super) agent: Option<std::net::SocketAddr>,
}

impl DataPaths {
    /// Admits the appliance certificate of fingerprint `pin` (`sha256:…`).
    pub(super) fn add_pin(&self, pin: &str) -> Result<(), String> {
        let p = ferry_tls::parse_fingerprint(pin).ok_or_else(|| {
            format!("`{pin}` is not a SHA-256 fingerprint (sha256:AB:CD:… or 64 hex digits)")
        })?;
        self.pins.add(p);
        Ok(())
    }
}

/// The running agent of the simulated host.
#[derive(Debug)]
pub(super) struct SimAgent {
    /// `127.0.0.1:PORT`.
    pub(super) addr: std::net::SocketAddr,
    /// Its certificate's fingerprint (what the source's `agent.fingerprint` pins).
    pub(super) fingerprint: String,
}

/// Starts the agent over the host's volumes under `dir` (`<dir>/volumes/C` is `C:\`) and sets
/// up the data paths; the agent stops when `shutdown` is cancelled.
pub(super) async fn start(
    dir: &Path,
    opts: &DataPathOptions,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(SimAgent, DataPaths), HypervSimError> {
    let mut paths = DataPaths {
        pins: ferry_tls::ClientPins::default(),
        luns: opts.san_luns.then(|| lun::Luns::new(dir.join("luns"))),
        agent: None,
    };
    for p in &opts.agent_client_pins {
        paths
            .add_pin(p)
            .map_err(|e| HypervSimError::Other(format!("--agent-client-pin: {e}")))?;
    }
    let volumes = dir.join("volumes");
    let mut cfg = ferry_agent::AgentConfig::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.roots.push(volumes.clone());
    // Restores through the agent (ADR 0169) land on the same volumes, where DefineSystem'd VMs
    // find their VHDX files.
    cfg.restore_roots.push(volumes.clone());
    for letter in ["C", "E"] {
        cfg.maps.push(ferry_agent::PathMap {
            host: format!("{letter}:\\"),
            local: volumes.join(letter),
        });
    }
    let agent = ferry_agent::start_with_pins(cfg, paths.pins.clone())
        .await
        .map_err(|e| HypervSimError::Other(format!("the host agent: {e}")))?;
    paths.agent = Some(agent.addr);
    let info = SimAgent {
        addr: agent.addr,
        fingerprint: agent.fingerprint.clone(),
    };
    tokio::spawn(async move {
        shutdown.cancelled().await;
        if let Err(e) = agent.stop().await {
            tracing::warn!(error = %e, "the simulated host agent stopped with an error");
        }
    });
    Ok((info, paths))
}

impl SimAgent {
    /// The `agent` member of the simulator's JSON line.
    pub(super) fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.addr.to_string(),
            "port": self.addr.port(),
            "fingerprint": self.fingerprint,
        })
    }
}

/// VM folder (host path) → its LUN image, for the JSON line (a source's `san-luns`); null
/// when LUNs are off. An image exists once the VM has had a checkpoint.
pub(super) fn lun_files(
    paths: &DataPaths,
    storage: Option<&super::disks::Storage>,
) -> serde_json::Value {
    let (Some(l), Some(s)) = (&paths.luns, storage) else {
        return serde_json::Value::Null;
    };
    let m: serde_json::Map<String, serde_json::Value> = s
        .disks
        .iter()
        .filter_map(|d| lun::split(&d.host_path))
        .map(|(folder, _)| (folder.to_string(), serde_json::json!(l.image(folder))))
        .collect();
    serde_json::Value::Object(m)
}
