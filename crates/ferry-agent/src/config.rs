//! The agent's typed configuration, from a TOML file and/or command-line flags.

use crate::AgentError;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A translation from a host path prefix to a local directory: `C:\VMs=/srv/vms`. On a
/// Hyper-V host no map is needed (export names are local paths); labs and tests running the
/// agent on Linux use one so that export names stay the Windows paths Hyper-V reports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PathMap {
    /// Host path prefix as Hyper-V names it (`C:\VMs`), compared case-insensitively.
    pub host: String,
    /// Local directory it corresponds to.
    pub local: PathBuf,
}

impl std::str::FromStr for PathMap {
    type Err = AgentError;
    fn from_str(s: &str) -> Result<Self, AgentError> {
        let (host, local) = s.split_once('=').ok_or_else(|| {
            AgentError::Config(format!("map `{s}` must be HOST_PREFIX=LOCAL_DIR"))
        })?;
        if host.trim().is_empty() || local.trim().is_empty() {
            return Err(AgentError::Config(format!(
                "map `{s}` must be HOST_PREFIX=LOCAL_DIR"
            )));
        }
        Ok(Self {
            host: host.trim().to_string(),
            local: PathBuf::from(local.trim()),
        })
    }
}

/// Everything the agent needs. Paths in it are local to the agent's machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directories whose files may be exported (the VM storage locations, CSV mount points).
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// Directories under which restores may create new folders and VHDX files (ADR 0169);
    /// none: the agent takes no restores.
    #[serde(default)]
    pub restore_roots: Vec<PathBuf>,
    /// Host-path translations (labs, tests).
    #[serde(default)]
    pub maps: Vec<PathMap>,
    /// The agent's certificate chain (PEM); with `key`. Without both, the certificate is kept
    /// in `state_dir` (generated on first start), or is ephemeral when that is unset too.
    pub cert: Option<PathBuf>,
    /// The agent's private key (PEM).
    pub key: Option<PathBuf>,
    /// Where a generated certificate and key are kept across restarts.
    pub state_dir: Option<PathBuf>,
    /// SHA-256 fingerprints (`sha256:AB:…`) of the client certificates allowed to connect: the
    /// appliance's. At least one.
    #[serde(default)]
    pub client_pins: Vec<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], crate::DEFAULT_PORT))
}

impl AgentConfig {
    /// Reads a TOML configuration file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::io(format!("read {}", path.display()), e))?;
        toml::from_str(&text).map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
    }

    /// An empty configuration listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            roots: Vec::new(),
            restore_roots: Vec::new(),
            maps: Vec::new(),
            cert: None,
            key: None,
            state_dir: None,
            client_pins: Vec::new(),
        }
    }

    /// The pinned client fingerprints, parsed; refuses an empty or malformed list.
    pub fn parsed_pins(&self) -> Result<Vec<[u8; 32]>, AgentError> {
        if self.client_pins.is_empty() {
            return Err(AgentError::Config(
                "no client certificate is pinned (--client-pin): the agent serves only the appliance it is paired with".into(),
            ));
        }
        self.client_pins
            .iter()
            .map(|p| {
                ferry_tls::parse_fingerprint(p).ok_or_else(|| {
                    AgentError::Config(format!(
                        "client pin `{p}` is not a SHA-256 fingerprint (sha256:AB:CD:… or 64 hex digits)"
                    ))
                })
            })
            .collect()
    }
}
