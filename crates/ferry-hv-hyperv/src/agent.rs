//! The `network` transport per owner node: which node runs the VM ([`owner_node`], from WMI),
//! where that node's `ferry-agent` listens (`[sources.NAME.agent]`, ADR 0150), and the
//! appliance's client certificate the agents pin ([`load_identity`], generated on first use).

use crate::client::WsmanClient;
use crate::error::HypervError;
use crate::transport::{CheckpointDisk, Transport};
use async_trait::async_trait;
use ferry_core::BlockSource;
use ferry_hv::agent::AgentSettings;
use ferry_hv::config::ConfigError;
use ferry_hv::{SourceConfig, TransportMode};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The node that runs a VM at backup time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerNode {
    /// Its name as WMI reports it (`HV01`): the key of `agent.nodes`.
    pub name: String,
    /// Where its services are when `agent.nodes` does not name it: the host of the WinRM
    /// endpoint that answers for it (a cluster node's own endpoint, or the source's URL).
    pub host: String,
}

/// The node that owns VM `vm_id`, as the host behind `client` reports it: the
/// `Msvm_ComputerSystem` of Caption `Hosting Computer System`, reached at `client`'s host. On a
/// cluster, `client` is the owner node's own (the driver's per-node view), so this names that
/// node; a cluster's `Node { name, url }` maps to `OwnerNode { name, host: node.host() }`.
pub async fn owner_node(client: &WsmanClient, vm_id: &str) -> Result<OwnerNode, HypervError> {
    let _ = vm_id;
    let hosts = client
        .enumerate(
            "Msvm_ComputerSystem",
            Some("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Hosting Computer System'"),
        )
        .await?;
    let name = hosts
        .iter()
        .find_map(|h| h.text("Name").or(h.text("ElementName")))
        .map(str::to_string)
        .ok_or_else(|| {
            HypervError::protocol(
                client.url(),
                "owner node",
                "the host reports no Msvm_ComputerSystem of caption `Hosting Computer System`",
            )
        })?;
    Ok(OwnerNode {
        name,
        host: url_host(client.url()),
    })
}

/// The host part of the source's URL (`hv01.lab`, `10.0.0.5`, `::1`).
fn url_host(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
        .unwrap_or_default()
}

/// `network`: the agent of the node that owns the VM, over NBD with pinned mutual TLS.
#[derive(Clone)]
pub struct NodeAgentTransport {
    settings: AgentSettings,
    source_host: String,
    source: String,
    cfg: SourceConfig,
    /// Loaded at the first open, so an identity problem refuses `network` (with the reason)
    /// but never stops what does not read disks (inventory, cleanup).
    identity: Arc<std::sync::OnceLock<Result<ferry_tls::ClientIdentity, String>>>,
}

impl std::fmt::Debug for NodeAgentTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgentTransport")
            .field("port", &self.settings.port)
            .field("nodes", &self.settings.nodes)
            .field("identity", &identity_path(&self.cfg))
            .field("loaded", &self.identity.get().map(|r| r.is_ok()))
            .finish()
    }
}

impl NodeAgentTransport {
    /// Where the agent of `node` listens.
    pub fn address(&self, node: &OwnerNode) -> String {
        let fallback = if node.host.is_empty() {
            &node.name
        } else {
            &node.host
        };
        self.settings.address(&node.name, fallback)
    }

    async fn open_at(
        &self,
        disk: &CheckpointDisk,
        node: &OwnerNode,
    ) -> Result<Arc<dyn BlockSource>, String> {
        let identity = self
            .identity
            .get_or_init(|| {
                load_identity(&self.source, &self.cfg)
                    .map(|(id, _)| id)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| e.clone())?;
        let addr = self.address(node);
        ferry_agent::client::open(&addr, &self.settings.fingerprint, identity, &disk.host_path)
            .await
            .map_err(|e| format!("the agent of node {} at {addr}: {e}", node.name))
    }
}

#[async_trait]
impl Transport for NodeAgentTransport {
    fn mode(&self) -> TransportMode {
        TransportMode::Network
    }

    async fn open(&self, disk: &CheckpointDisk) -> Result<Arc<dyn BlockSource>, String> {
        let node = OwnerNode {
            name: self.source_host.clone(),
            host: self.source_host.clone(),
        };
        self.open_at(disk, &node).await
    }

    async fn open_on(
        &self,
        disk: &CheckpointDisk,
        node: Option<&OwnerNode>,
    ) -> Result<Arc<dyn BlockSource>, String> {
        match node {
            Some(n) => self.open_at(disk, n).await,
            None => self.open(disk).await,
        }
    }
}

/// The `network` transport of source `name`, when it lists `network` and has an `agent` table.
pub fn transport(
    name: &str,
    cfg: &SourceConfig,
) -> Result<Option<Arc<dyn Transport>>, ConfigError> {
    let Some(settings) = &cfg.agent else {
        return Ok(None);
    };
    if !cfg.transports.contains(&TransportMode::Network) {
        return Ok(None);
    }
    Ok(Some(Arc::new(NodeAgentTransport {
        settings: settings.clone(),
        source_host: url_host(&cfg.url),
        source: name.to_string(),
        cfg: cfg.clone(),
        identity: Arc::default(),
    })))
}

/// The appliance's client identity file of source `cfg`: `agent.identity`, else
/// `<state-dir>/agent-client.pem`.
pub fn identity_path(cfg: &SourceConfig) -> PathBuf {
    cfg.agent
        .as_ref()
        .and_then(|a| a.identity.clone())
        .unwrap_or_else(|| cfg.state_dir().join("agent-client.pem"))
}

/// Loads the appliance's client certificate and key (one PEM file); the default file in the
/// state directory is generated on first use. Returns it and whether it was just made.
pub fn load_identity(
    name: &str,
    cfg: &SourceConfig,
) -> Result<(ferry_tls::ClientIdentity, bool), ConfigError> {
    let bad = |message: String| ConfigError::Source {
        source_name: name.into(),
        message,
    };
    let path = identity_path(cfg);
    let explicit = cfg.agent.as_ref().is_some_and(|a| a.identity.is_some());
    let created = if path.exists() || explicit {
        false
    } else {
        let s = ferry_tls::SelfSigned::generate(&["ferry-appliance"])
            .map_err(|e| bad(format!("cannot make the agent client certificate: {e}")))?;
        write_private(&path, &format!("{}{}", s.cert_pem, s.key_pem))
            .map_err(|e| bad(format!("cannot write {}: {e}", path.display())))?;
        tracing::info!(source = %name, path = %path.display(), fingerprint = %s.fingerprint(), "made the appliance's agent client certificate: pin it on the agents");
        true
    };
    let pem = std::fs::read_to_string(&path).map_err(|e| {
        bad(format!(
            "cannot read the agent identity {}: {e}",
            path.display()
        ))
    })?;
    let id = ferry_tls::ClientIdentity {
        cert_pem: pem.clone(),
        key_pem: pem,
    };
    // Both halves must be there: a file with only a certificate fails here, not at a backup.
    ferry_tls::client_config_with_identity(&ferry_tls::Trust::Insecure, Some(&id)).map_err(
        |e| {
            bad(format!(
                "the agent identity {} must hold a certificate and its private key (PEM): {e}",
                path.display()
            ))
        },
    )?;
    Ok((id, created))
}

/// Writes a file readable by its owner only, through a temporary name (never half a key).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &Path, identity: Option<&Path>) -> SourceConfig {
        let mut t = format!(
            "[sources.s]\nkind = \"hyperv\"\nurl = \"https://hv01.lab:5986/wsman\"\nusername = \"u\"\ntls-insecure = true\nstate-dir = \"{}\"\ntransports = [\"network\"]\n[sources.s.agent]\nfingerprint = \"sha256:{}\"\n",
            dir.display(),
            "AB".repeat(32)
        );
        if let Some(p) = identity {
            t.push_str(&format!("identity = \"{}\"\n", p.display()));
        }
        let cfg = ferry_hv::FerryConfig::parse(&t, Path::new("ferry.toml")).unwrap();
        cfg.sources["s"].clone()
    }

    #[test]
    fn identities_made_once_never_where_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = source(dir.path(), None);
        let (a, made) = load_identity("s", &cfg).unwrap();
        assert!(made);
        let (b, made) = load_identity("s", &cfg).unwrap();
        assert!(!made);
        assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let m = std::fs::metadata(identity_path(&cfg)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
        }
        // A named identity that is missing is an error, and is not made.
        let named = dir.path().join("etc/agent-client.pem");
        let e = load_identity("s", &source(dir.path(), Some(&named))).unwrap_err();
        assert!(
            e.to_string().contains("cannot read the agent identity"),
            "{e}"
        );
        assert!(!named.exists());
        // A certificate without its key is refused when loaded.
        std::fs::create_dir_all(named.parent().unwrap()).unwrap();
        std::fs::write(
            &named,
            &a.cert_pem[..a.cert_pem.find("-----END CERTIFICATE-----").unwrap() + 25],
        )
        .unwrap();
        let e = load_identity("s", &source(dir.path(), Some(&named))).unwrap_err();
        assert!(
            e.to_string()
                .contains("must hold a certificate and its private key"),
            "{e}"
        );
        assert!(!e.to_string().contains("PRIVATE KEY-----"), "{e}");
        // The transport's Debug shows where the identity is, never the key.
        let t = transport("s", &cfg).unwrap().unwrap();
        assert!(!format!("{t:?}").contains("PRIVATE"), "{t:?}");
        // An unusable identity refuses `network` with the reason at the first open.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t = transport("s", &source(dir.path(), Some(&named)))
            .unwrap()
            .unwrap();
        let disk = CheckpointDisk {
            vm: "v".into(),
            key: "k".into(),
            host_path: "C:\\v\\d.vhdx".into(),
        };
        let e = rt.block_on(t.open(&disk)).err().unwrap();
        assert!(
            e.contains("must hold a certificate and its private key"),
            "{e}"
        );
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("https://hv01.lab:5986/wsman"), "hv01.lab");
        assert_eq!(url_host("http://[::1]:5985/wsman"), "::1");
        assert_eq!(url_host("nonsense"), "");
    }
}
