//! `[sources.NAME.agent]`: how the appliance reaches the Hyper-V host agent (`ferry-agent`, the
//! `network` transport, ADR 0125/0150) on the node that owns a VM.
//!
//! ```toml
//! [sources.hv01.agent]
//! port = 10809                                 # default 10809
//! fingerprint = "sha256:AB:CD:…"               # the agent's certificate (same on every node, or one pin per node below)
//! identity = "/etc/ferry/agent-client.pem"     # the appliance's certificate + key; default <state-dir>/agent-client.pem, made on first use
//! [sources.hv01.agent.nodes]                   # node names that do not resolve
//! HV01 = "10.0.0.5:10809"
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn default_port() -> u16 {
    10809
}

/// One source's host agent settings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentSettings {
    /// The agent's TCP port on every node (default 10809).
    #[serde(default = "default_port")]
    pub port: u16,
    /// SHA-256 fingerprint of the agents' certificate, `sha256:AB:CD:…`.
    pub fingerprint: String,
    /// PEM file with the appliance's client certificate and key (the agents pin it); default
    /// `<state-dir>/agent-client.pem`, generated on first use.
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// Node name (as WMI reports it, case-insensitive) → `HOST[:PORT]` where its agent listens,
    /// for names that do not resolve.
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
}

impl AgentSettings {
    /// Checks the settings of source `name`.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if self.port == 0 {
            return Err(format!("source `{name}`: agent.port must be 1..=65535"));
        }
        if ferry_tls::parse_fingerprint(&self.fingerprint).is_none() {
            return Err(format!(
                "source `{name}`: agent.fingerprint must be sha256:XX:XX:… (32 bytes), the agent prints it on start"
            ));
        }
        for (node, addr) in &self.nodes {
            if !valid_addr(addr) {
                return Err(format!(
                    "source `{name}`: agent.nodes.{node} = `{addr}` must be HOST[:PORT]"
                ));
            }
        }
        Ok(())
    }

    /// Where the agent of node `node` listens: its `nodes` entry, else `fallback` (the name to
    /// resolve) with `port`.
    pub fn address(&self, node: &str, fallback: &str) -> String {
        if let Some((_, a)) = self
            .nodes
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(node))
        {
            return if a.starts_with('[') && a.ends_with(']') || !a.contains(':') {
                format!("{a}:{}", self.port)
            } else {
                a.clone()
            };
        }
        if fallback.contains(':') && !fallback.starts_with('[') {
            format!("[{fallback}]:{}", self.port)
        } else {
            format!("{fallback}:{}", self.port)
        }
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn valid_addr(a: &str) -> bool {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, t)) => match t.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return false,
            },
            None => return false,
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return false,
            None => (a, None),
        }
    };
    !host.is_empty()
        && !host.contains(char::is_whitespace)
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(nodes: &[(&str, &str)]) -> AgentSettings {
        AgentSettings {
            port: 10809,
            fingerprint: format!("sha256:{}", "AB".repeat(32)),
            identity: None,
            nodes: nodes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn addresses_and_validation() {
        let a = s(&[
            ("HV01", "10.0.0.5:1"),
            ("hv02", "10.0.0.6"),
            ("V6", "[::1]"),
        ]);
        assert!(a.validate("x").is_ok());
        assert_eq!(a.address("hv01", "hv01"), "10.0.0.5:1");
        assert_eq!(a.address("HV02", "HV02"), "10.0.0.6:10809");
        assert_eq!(a.address("v6", "v6"), "[::1]:10809");
        assert_eq!(a.address("HV03", "hv03.lab"), "hv03.lab:10809");
        assert_eq!(a.address("HV03", "::1"), "[::1]:10809");
        for bad in ["", "h:0", "h:x", "[::1", "a b", "::1"] {
            assert!(s(&[("N", bad)]).validate("x").is_err(), "{bad}");
        }
        let mut b = s(&[]);
        b.fingerprint = "sha256:AB".into();
        assert!(b.validate("x").unwrap_err().contains("agent.fingerprint"));
        b = s(&[]);
        b.port = 0;
        assert!(b.validate("x").is_err());
    }
}
