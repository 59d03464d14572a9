//! Where a whole-VM restore writes its disks (ADR 0170): through the host agent (`network`,
//! no share needed) or through `san-paths` (`san`), tried in the source's `transports` order.
//!
//! The first mode that can make the VM's new folder is used: `network` asks the owner node's
//! `ferry-agent` (`[sources.NAME.agent]`, the same pins as backups) to make it under one of
//! its restore roots and writes each disk as a VHDX through it (ADR 0169); `san` makes it on
//! the proxy's side of `san-paths`. A mode that cannot (agent unreachable, wrong pin, no
//! restore roots, no `san-paths` entry) is skipped with a WARN naming the next; none left is
//! an error before the VM is defined. The folder is journaled as `restore-folder`: a local
//! path, or `agent:<address>|<host folder>`, removed through the agent's `delete` request.

use crate::agent;
use ferry_agent::restore_client::RestoreClient;
use ferry_core::BlockSource;
use ferry_hv::{SourceConfig, TransportMode};
use std::path::PathBuf;

/// Journal id prefix of a folder made through an agent.
const AGENT_ENTRY: &str = "agent:";

/// Where the disks of one restore go.
#[derive(Debug)]
pub enum Sink {
    /// A folder the proxy sees through `san-paths`.
    Local {
        /// The folder on the proxy.
        local: PathBuf,
    },
    /// A folder the host's agent made.
    Agent {
        /// The agent.
        client: RestoreClient,
        /// Its node, for messages.
        node: String,
    },
}

impl Sink {
    /// The restore's transport, as `ferry restore` reports it.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Local { .. } => "san (VHDX written through san-paths)",
            Self::Agent { .. } => "network (VHDX written through the host agent, nbd+tls)",
        }
    }

    /// The journal id of the VM's folder `host_folder`.
    pub fn journal_id(&self, host_folder: &str) -> String {
        match self {
            Self::Local { local } => local.display().to_string(),
            Self::Agent { client, .. } => {
                format!("{AGENT_ENTRY}{}|{host_folder}", client.address())
            }
        }
    }

    /// Writes `src` as the dynamic VHDX `file` in the folder (`host_path` on the host); the
    /// bytes written, and the proxy-side file when there is one.
    pub async fn write(
        &self,
        host_path: &str,
        file: &str,
        src: &dyn BlockSource,
    ) -> Result<(u64, Option<PathBuf>), String> {
        match self {
            Self::Local { local } => {
                let path = local.join(file);
                let n = crate::restore::write_vhdx(src, &path).await?;
                Ok((n, Some(path)))
            }
            Self::Agent { client, node } => client
                .write_vhdx(host_path, src)
                .await
                .map(|n| (n, None))
                .map_err(|e| format!("through the agent of node {node}: {e}")),
        }
    }
}

/// The restore client of the agent on the host behind `c`.
pub(crate) async fn agent_client(
    c: &crate::client::WsmanClient,
    source: &str,
    cfg: &SourceConfig,
) -> Result<(RestoreClient, String), String> {
    let settings = cfg
        .agent
        .as_ref()
        .ok_or_else(|| format!("source `{source}` has no [sources.{source}.agent] table"))?;
    let (identity, _) = agent::load_identity(source, cfg).map_err(|e| e.to_string())?;
    let node = agent::owner_node(c, "")
        .await
        .map_err(|e| format!("which node runs the host: {e}"))?;
    let fallback = if node.host.is_empty() {
        &node.name
    } else {
        &node.host
    };
    let addr = settings.address(&node.name, fallback);
    Ok((
        RestoreClient::new(addr, settings.fingerprint.clone(), identity),
        node.name,
    ))
}

/// The `n`th name tried for the VM's folder: `root\base`, then `root\base (2)`, ….
fn candidate(root: &str, base: &str, n: u32) -> String {
    if n <= 1 {
        format!("{root}\\{base}")
    } else {
        format!("{root}\\{base} ({n})")
    }
}

/// `root\base`, else `root\base (2)`, … : a new folder through the agent.
async fn agent_folder(
    c: &crate::client::WsmanClient,
    source: &str,
    cfg: &SourceConfig,
    root: &str,
    base: &str,
) -> Result<(Sink, String), String> {
    let (client, node) = agent_client(c, source, cfg).await?;
    let mut n = 1;
    loop {
        let folder = candidate(root, base, n);
        match client.mkdir(&folder).await {
            Ok(()) => return Ok((Sink::Agent { client, node }, folder)),
            Err(e) if e.already_exists() && n < 100 => n += 1,
            Err(e) => return Err(format!("the agent of node {node}: {e}")),
        }
    }
}

/// `root\base`, else `root\base (2)`, … : a new folder through `san-paths`.
fn local_folder(cfg: &SourceConfig, root: &str, base: &str) -> Result<(Sink, String), String> {
    let map = |f: &str| {
        crate::transport::map_host_path(&cfg.san_paths, f).ok_or_else(|| {
            format!("no san-paths entry covers `{f}`: the proxy cannot write the VM's disks there (set restore-dir under one)")
        })
    };
    let mut n = 1;
    let (mut folder, mut local) = (candidate(root, base, n), map(&candidate(root, base, n))?);
    while local.exists() {
        n += 1;
        folder = candidate(root, base, n);
        local = map(&folder)?;
    }
    std::fs::create_dir_all(&local)
        .map_err(|e| format!("cannot create {} (for {folder}): {e}", local.display()))?;
    Ok((Sink::Local { local }, folder))
}

/// Makes the restored VM's new folder `root\base` (or `root\base (N)`) with the first of the
/// source's transports that can; its sink and host path.
pub async fn make_folder(
    c: &crate::client::WsmanClient,
    source: &str,
    cfg: &SourceConfig,
    root: &str,
    base: &str,
) -> Result<(Sink, String), String> {
    let modes: Vec<TransportMode> = cfg
        .transports
        .iter()
        .copied()
        .filter(|m| matches!(m, TransportMode::Network | TransportMode::San))
        .collect();
    let mut why = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        let r = match mode {
            TransportMode::Network => agent_folder(c, source, cfg, root, base).await,
            _ => local_folder(cfg, root, base),
        };
        match r {
            Ok(x) => return Ok(x),
            Err(e) => {
                if let Some(next) = modes.get(i + 1) {
                    tracing::warn!(source = %source, "restore: {mode} cannot write the disks: {e}; trying {next}");
                }
                why.push(format!("{mode}: {e}"));
            }
        }
    }
    if why.is_empty() {
        return Err(format!(
            "source `{source}` lists no transport that writes a restore (network or san)"
        ));
    }
    Err(format!(
        "no transport can write the restored disks: {}",
        why.join("; ")
    ))
}

/// Removes the journaled restore folder `id` (a proxy path, or one an agent made); whether it
/// is gone.
pub async fn remove_folder(source: &str, cfg: &SourceConfig, id: &str) -> bool {
    let Some((addr, folder)) = id.strip_prefix(AGENT_ENTRY).and_then(|r| r.split_once('|')) else {
        return crate::restore::remove_folder(source, id);
    };
    let client = cfg
        .agent
        .as_ref()
        .ok_or_else(|| "no agent table".to_string())
        .and_then(|s| {
            let (identity, _) = agent::load_identity(source, cfg).map_err(|e| e.to_string())?;
            Ok(RestoreClient::new(addr, s.fingerprint.clone(), identity))
        });
    let r = match client {
        Ok(c) => c.delete(folder).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => {
            tracing::warn!(source = %source, folder = %folder, agent = %addr, "removed the files of an unfinished restore");
            true
        }
        Err(e) => {
            tracing::warn!(source = %source, folder = %folder, agent = %addr, error = %e, "cannot remove the folder of an unfinished restore; `ferry source cleanup` retries");
            false
        }
    }
}
