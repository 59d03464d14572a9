//! The agent's listener: NBD over TLS with pinned client certificates (ADR 0125).

use crate::AgentError;
use crate::config::AgentConfig;
use crate::export::AgentExports;
use crate::paths::PathPolicy;
use ferry_nbd::{NbdServer, ServerTls};
use ferry_tls::SelfSigned;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A started agent.
#[derive(Debug)]
pub struct RunningAgent {
    /// Where it listens (the port resolved when 0 was configured).
    pub addr: SocketAddr,
    /// `sha256:AB:…` of its certificate: what the appliance pins.
    pub fingerprint: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningAgent {
    /// Stops accepting, closes every connection and waits for them.
    pub async fn stop(self) -> std::io::Result<()> {
        self.shutdown.cancel();
        self.task
            .await
            .map_err(|e| std::io::Error::other(format!("agent task: {e}")))?
    }

    /// Serves until the server fails (the binary's main loop).
    pub async fn wait(self) -> std::io::Result<()> {
        self.task
            .await
            .map_err(|e| std::io::Error::other(format!("agent task: {e}")))?
    }

    /// A token that stops the agent when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The one JSON line the binary prints on start.
    pub fn announce(&self, roots: &[std::path::PathBuf]) -> String {
        serde_json::json!({
            "listen": self.addr.to_string(),
            "fingerprint": self.fingerprint,
            "roots": roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

/// The agent's certificate: configured files, kept in the state directory, or ephemeral.
fn certificate(cfg: &AgentConfig) -> Result<(String, String), AgentError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| AgentError::io(format!("read {}", p.display()), e))
    };
    match (&cfg.cert, &cfg.key, &cfg.state_dir) {
        (Some(c), Some(k), _) => Ok((read(c)?, read(k)?)),
        (Some(_), None, _) | (None, Some(_), _) => {
            Err(AgentError::Config("--cert and --key go together".into()))
        }
        (None, None, Some(dir)) => {
            let (c, k) = (dir.join("agent-cert.pem"), dir.join("agent-key.pem"));
            if c.exists() && k.exists() {
                return Ok((read(&c)?, read(&k)?));
            }
            let s = SelfSigned::generate(&["ferry-agent", "localhost"])?;
            std::fs::create_dir_all(dir)
                .map_err(|e| AgentError::io(format!("create {}", dir.display()), e))?;
            write_private(&k, &s.key_pem)?;
            write_private(&c, &s.cert_pem)?;
            Ok((s.cert_pem.clone(), s.key_pem.clone()))
        }
        (None, None, None) => {
            let s = SelfSigned::generate(&["ferry-agent", "localhost"])?;
            Ok((s.cert_pem.clone(), s.key_pem.clone()))
        }
    }
}

/// Writes a file readable by its owner only, through a temporary name, so a crash never
/// leaves half a key.
fn write_private(path: &Path, text: &str) -> Result<(), AgentError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let what = || format!("write {}", path.display());
    let mut f = o.open(&tmp).map_err(|e| AgentError::io(what(), e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| AgentError::io(what(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| AgentError::io(what(), e))
}

/// Starts an agent: checks the configuration, binds, and serves in a background task.
pub async fn start(cfg: AgentConfig) -> Result<RunningAgent, AgentError> {
    let pins = cfg.parsed_pins()?;
    start_with_pins(cfg, ferry_tls::ClientPins::new(pins)).await
}

/// [`start`] with a shared set of client pins instead of `cfg.client_pins`: pins added to
/// `pins` later are admitted from the next handshake on (the Hyper-V simulator pairs this
/// way with an appliance whose certificate it learns after starting).
pub async fn start_with_pins(
    cfg: AgentConfig,
    pins: ferry_tls::ClientPins,
) -> Result<RunningAgent, AgentError> {
    let policy = Arc::new(PathPolicy::new(&cfg.roots, &cfg.maps)?);
    let (cert_pem, key_pem) = certificate(&cfg)?;
    let tls = ferry_tls::server_config_shared_pins(&cert_pem, &key_pem, pins)?;
    let fingerprint = ferry_tls::certificate_fingerprint(&cert_pem)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| AgentError::io(format!("listen on {}", cfg.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::io("local address", e))?;
    let provider = Arc::new(crate::restore::AgentProvider {
        read: AgentExports::new(policy),
        restore: crate::restore::RestoreExports::new(&cfg.restore_roots, &cfg.maps)?,
    });
    let server = NbdServer::with_provider(provider.clone()).with_tls(ServerTls {
        config: tls,
        required: true,
    });
    let shutdown = CancellationToken::new();
    // Restored disks nobody commits are dropped (their staging files go) even when no request
    // comes.
    let idle = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = idle.cancelled() => return,
                _ = tick.tick() => provider.restore.sweep(),
            }
        }
    });
    let task = tokio::spawn(server.serve(listener, shutdown.clone()));
    Ok(RunningAgent {
        addr,
        fingerprint,
        shutdown,
        task,
    })
}
