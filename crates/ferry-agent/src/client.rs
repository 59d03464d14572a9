//! The appliance's side: what the Hyper-V driver calls to read a disk through an agent.

use crate::AgentError;
use ferry_core::BlockSource;
use ferry_nbd::{Address, NbdClient, NbdConfig};
use ferry_tls::ClientIdentity;
use std::sync::Arc;

/// Connects to the agent at `addr` (`host:port`, `[v6]:port`; port defaults to
/// [`DEFAULT_PORT`](crate::DEFAULT_PORT)), trusting exactly the agent certificate `agent_pin`
/// (`sha256:AB:…`) and presenting `identity`, and opens the disk `host_path` (the path Hyper-V
/// reports, e.g. `C:\VMs\vm\disk_1234.avhdx`). The source's `allocated()` comes from the
/// agent's `base:allocation`, so reads skip unallocated blocks.
pub async fn open(
    addr: &str,
    agent_pin: &str,
    identity: &ClientIdentity,
    host_path: &str,
) -> Result<Arc<dyn BlockSource>, AgentError> {
    let cfg = config(addr, agent_pin, identity, host_path)?;
    Ok(Arc::new(connect(cfg, addr, identity).await?))
}

/// Connects with `cfg`, naming a refused client certificate as such.
pub(crate) async fn connect(
    cfg: NbdConfig,
    addr: &str,
    identity: &ClientIdentity,
) -> Result<NbdClient, AgentError> {
    match NbdClient::connect(cfg).await {
        Ok(c) => Ok(c),
        // TLS 1.3 completes the client's side of the handshake before the server checks the
        // client certificate: a refusal arrives as an alert on the first read.
        Err(e) if refused_alert(&e.to_string()) => Err(AgentError::ClientRefused {
            agent: addr.to_string(),
            fingerprint: identity
                .fingerprint()
                .unwrap_or_else(|_| "(unreadable)".into()),
        }),
        Err(e) => Err(e.into()),
    }
}

fn refused_alert(message: &str) -> bool {
    [
        "CertificateUnknown",
        "BadCertificate",
        "CertificateRequired",
        "UnknownCA",
    ]
    .iter()
    .any(|a| message.contains(&format!("received fatal alert: {a}")))
}

/// The NBD client configuration [`open`] uses (for callers that tune connections or timeouts).
pub fn config(
    addr: &str,
    agent_pin: &str,
    identity: &ClientIdentity,
    host_path: &str,
) -> Result<NbdConfig, AgentError> {
    let address = parse_addr(addr)?;
    Ok(NbdConfig::new(address, host_path)
        .with_tls_fingerprint(agent_pin)?
        .with_client_identity(identity.clone()))
}

fn parse_addr(addr: &str) -> Result<Address, AgentError> {
    let bad = || AgentError::Config(format!("agent address `{addr}` must be HOST[:PORT]"));
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(bad)?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if tail.is_empty() => crate::DEFAULT_PORT,
            None => return Err(bad()),
        };
        (h.to_string(), port)
    } else {
        match addr.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().map_err(|_| bad())?),
            _ if addr.contains(':') => return Err(bad()),
            _ => (addr.to_string(), crate::DEFAULT_PORT),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Address::Tcp { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let tcp = |h: &str, p| Address::Tcp {
            host: h.into(),
            port: p,
        };
        assert_eq!(parse_addr("hv1:1234").unwrap(), tcp("hv1", 1234));
        assert_eq!(parse_addr("hv1").unwrap(), tcp("hv1", 10809));
        assert_eq!(parse_addr("[::1]:5").unwrap(), tcp("::1", 5));
        assert_eq!(parse_addr("[::1]").unwrap(), tcp("::1", 10809));
        assert!(parse_addr("::1").is_err());
        assert!(parse_addr(":5").is_err());
        assert!(parse_addr("hv1:x").is_err());
    }
}
