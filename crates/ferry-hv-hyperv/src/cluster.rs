//! Hyper-V failover clusters (ADR 0153): which node owns a VM now, and a WinRM client per node.
//!
//! A source's `url` may name the cluster or any node. Before each backup the driver asks the
//! failover cluster namespace `root/MSCluster` for the VM's current owner: the
//! `MSCluster_Resource` of `Type` `Virtual Machine` named `Virtual Machine <vm>` (or whose
//! `OwnerGroup`, the VM role, is the VM's name) gives `OwnerNode`. A VM named by its id, or a
//! resource renamed by the administrator, is found by asking each node (`MSCluster_Node`)'s
//! Hyper-V whether it runs the VM. The checkpoint, RCT and reference point calls then go to
//! that node: each node's `root/virtualization/v2` only knows the VMs it runs, and a VM keeps
//! its id (and, after a live migration, its RCT ids) across nodes.
//!
//! A node is reached at its `[sources.NAME.nodes]` entry (URL and optional certificate pin),
//! else at the source's URL with the node's name as host (`https://HV02:5986/wsman`) and the
//! source's TLS trust. A host without the cluster namespace is a standalone host: everything
//! goes to `url`.

use crate::auth::AuthMethod;
use crate::client::{Credentials, WsmanClient};
use crate::error::{FaultKind, HypervError};
use crate::wmi::Wmi;
use ferry_hv::SourceConfig;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Resource URI prefix of the failover cluster namespace `root/MSCluster`.
pub const MSCLUSTER: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/mscluster/";

/// A cluster node that owns a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The node's name as the cluster reports it (`HV02`).
    pub name: String,
    /// Its WinRM endpoint (`https://hv02.lab:5986/wsman`).
    pub url: String,
}

impl Node {
    /// The host part of the node's endpoint: where its other services (the host agent) are.
    pub fn host(&self) -> String {
        url::Url::parse(&self.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| self.name.clone())
    }
}

/// A host to talk to: a cluster node (`node` set) or the standalone host.
#[derive(Debug, Clone)]
pub struct Host {
    /// The node's name; `None` for a standalone host.
    pub node: Option<String>,
    /// Its WinRM client.
    pub client: Arc<WsmanClient>,
}

/// What the driver knows of the source's cluster.
#[derive(Debug)]
pub struct Clusters {
    source: String,
    cfg: SourceConfig,
    creds: Credentials,
    auth: AuthMethod,
    domain: Option<String>,
    /// Node name (upper case) → its client.
    clients: Mutex<BTreeMap<String, Arc<WsmanClient>>>,
}

/// Whether `e` says the host has no failover cluster namespace (a standalone host).
pub(crate) fn no_cluster(e: &HypervError) -> bool {
    match e {
        HypervError::Fault { kind, fault, .. } => {
            matches!(kind, FaultKind::NotSupported | FaultKind::NotFound)
                || format!("{fault}").to_lowercase().contains("namespace")
        }
        _ => false,
    }
}

/// Whether `vm` is a VM id (a GUID) rather than a name.
fn is_vm_id(vm: &str) -> bool {
    vm.len() == 36
        && vm.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Clusters {
    /// For source `source` (its settings and login).
    pub fn new(
        source: &str,
        cfg: &SourceConfig,
        creds: Credentials,
        auth: AuthMethod,
        domain: Option<String>,
    ) -> Self {
        Self {
            source: source.into(),
            cfg: cfg.clone(),
            creds,
            auth,
            domain,
            clients: Mutex::new(BTreeMap::new()),
        }
    }

    fn protocol(&self, call: &str, m: impl Into<String>) -> HypervError {
        HypervError::protocol(&self.source, call, m)
    }

    /// Where node `name` is reached: its `nodes` entry, else the source's URL with the
    /// node's name as host.
    pub fn endpoint(&self, name: &str) -> Result<(String, Option<String>), HypervError> {
        if let Some((_, n)) = self
            .cfg
            .nodes
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            return Ok((n.url().to_string(), n.tls_fingerprint().map(str::to_string)));
        }
        let mut u = url::Url::parse(&self.cfg.url)
            .map_err(|e| self.protocol("connect", format!("bad url `{}`: {e}", self.cfg.url)))?;
        u.set_host(Some(name)).map_err(|e| {
            self.protocol(
                "connect",
                format!(
                    "cluster node `{name}` is not a host name ({e}); add it to [sources.{}.nodes]",
                    self.source
                ),
            )
        })?;
        Ok((u.to_string(), None))
    }

    /// The client of node `name`, once the host it reaches says it is that node (a wrong
    /// `nodes` entry must not send one node's VMs to another).
    pub async fn client(&self, name: &str) -> Result<Arc<WsmanClient>, HypervError> {
        let key = name.to_uppercase();
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(c.clone());
        }
        let c = self.make_client(name)?;
        let q = "SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Hosting Computer System'";
        let host = c.enumerate("Msvm_ComputerSystem", Some(q)).await?;
        let names: Vec<&str> = host.iter().filter_map(|h| h.text("Name")).collect();
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(self.protocol(
                "connect",
                format!(
                    "cluster node `{name}` is reached at {}, but that host is `{}`: fix [sources.{}.nodes]",
                    c.url(),
                    names.join(", "),
                    self.source
                ),
            ));
        }
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, c.clone());
        Ok(c)
    }

    fn make_client(&self, name: &str) -> Result<Arc<WsmanClient>, HypervError> {
        let (url, pin) = self.endpoint(name)?;
        let mut opts = self
            .cfg
            .http_options(&self.source)
            .map_err(|e| self.protocol("connect", e.to_string()))?;
        if let Some(p) = pin {
            let fp = ferry_tls::parse_fingerprint(&p).ok_or_else(|| {
                self.protocol("connect", format!("node `{name}`: bad tls-fingerprint"))
            })?;
            opts.trust = ferry_tls::Trust::Fingerprint(fp);
        }
        Ok(Arc::new(
            WsmanClient::new(&url, &opts, self.creds.clone())?
                .with_auth(self.auth, self.domain.clone())
                .with_kerberos(crate::driver::kerberos_options(&self.cfg))
                .with_channel_binding(self.cfg.channel_binding.unwrap_or(true)),
        ))
    }

    /// The cluster's node names, or `None` when `c` is a standalone host.
    pub async fn node_names(&self, c: &WsmanClient) -> Result<Option<Vec<String>>, HypervError> {
        match c.enumerate_in(MSCLUSTER, "MSCluster_Node", None).await {
            Ok(nodes) => Ok(Some(
                nodes
                    .iter()
                    .filter_map(|n| n.text("Name").map(str::to_string))
                    .collect(),
            )),
            Err(e) if no_cluster(&e) && self.cfg.nodes.is_empty() => Ok(None),
            Err(e) if no_cluster(&e) => Err(self.protocol(
                "owner node",
                format!(
                    "[sources.{}.nodes] is set, but {} has no failover cluster namespace root/MSCluster ({e})",
                    self.source,
                    c.url()
                ),
            )),
            Err(e) => Err(e),
        }
    }

    /// Every host of the source: each cluster node, or the standalone host behind `c`; and
    /// the nodes that cannot be reached now (`name: why`), which callers skip with a warning.
    pub async fn hosts(
        &self,
        c: &Arc<WsmanClient>,
    ) -> Result<(Vec<Host>, Vec<String>), HypervError> {
        let Some(names) = self.node_names(c).await? else {
            return Ok((
                vec![Host {
                    node: None,
                    client: c.clone(),
                }],
                vec![],
            ));
        };
        let (mut out, mut down) = (Vec::new(), Vec::new());
        for n in names {
            match self.client(&n).await {
                Ok(client) => out.push(Host {
                    client,
                    node: Some(n),
                }),
                // A node that is down (or drained and off) must not stop the others.
                Err(HypervError::Http(e)) => down.push(format!("{n}: {e}")),
                Err(e) => return Err(e),
            }
        }
        Ok((out, down))
    }

    /// The node that runs VM `vm` (name or id) now; `None` on a standalone host.
    pub async fn owner(&self, c: &WsmanClient, vm: &str) -> Result<Option<Node>, HypervError> {
        let Some(names) = self.node_names(c).await? else {
            return Ok(None);
        };
        // The resources carry the VM's name; its id only inside `PrivateProperties` (an
        // embedded object): a VM given by id is looked up on the nodes at once.
        if is_vm_id(vm) {
            let name = self.probe(&names, vm).await?;
            let (url, _) = self.endpoint(&name)?;
            return Ok(Some(Node { name, url }));
        }
        let q = "SELECT * FROM MSCluster_Resource WHERE Type = 'Virtual Machine'";
        let resources = c
            .enumerate_in(MSCLUSTER, "MSCluster_Resource", Some(q))
            .await?;
        let by_name = format!("Virtual Machine {vm}");
        let hits: Vec<&str> = resources
            .iter()
            .filter(|r| {
                r.text("Name")
                    .is_some_and(|n| n.eq_ignore_ascii_case(&by_name))
                    || r.text("OwnerGroup")
                        .is_some_and(|g| g.eq_ignore_ascii_case(vm))
            })
            .filter_map(|r| r.text("OwnerNode"))
            .collect();
        let name = match hits.as_slice() {
            [one] => one.to_string(),
            _ => self.probe(&names, vm).await?,
        };
        let (url, _) = self.endpoint(&name)?;
        tracing::debug!(source = %self.source, vm, node = %name, "owner node");
        Ok(Some(Node { name, url }))
    }

    /// Asks every node's Hyper-V whether it runs VM `vm` (an id, or a name the cluster's
    /// resources do not carry).
    async fn probe(&self, names: &[String], vm: &str) -> Result<String, HypervError> {
        let mut found = Vec::new();
        for n in names {
            let c = self.client(n).await?;
            let vms = Wmi::new(&c).vms().await?;
            if vms.iter().any(|v| {
                v.text("Name").is_some_and(|x| x.eq_ignore_ascii_case(vm))
                    || v.text("ElementName") == Some(vm)
            }) {
                found.push(n.clone());
            }
        }
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(self.protocol(
                "owner node",
                format!(
                    "no node of the cluster ({}) runs a VM `{vm}`",
                    names.join(", ")
                ),
            )),
            many => Err(self.protocol(
                "owner node",
                format!(
                    "VMs named `{vm}` run on nodes {}; use the VM id",
                    many.join(", ")
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::Secret;

    fn clusters(extra: &str) -> Clusters {
        let toml = format!(
            "[sources.c]\nkind = \"hyperv\"\nurl = \"https://hvc.lab:5986/wsman\"\nusername = \"LAB\\\\b\"\ntls-insecure = true\n{extra}"
        );
        let cfg = ferry_hv::FerryConfig::parse(&toml, std::path::Path::new("ferry.toml")).unwrap();
        let s = cfg.source("c").unwrap().clone();
        Clusters::new(
            "c",
            &s,
            Credentials {
                user: "LAB\\b".into(),
                password: Secret::new("pw"),
            },
            AuthMethod::Ntlm,
            None,
        )
    }

    #[test]
    fn node_endpoints_come_from_the_map_or_the_node_name() {
        let fp = format!("sha256:{}", ["AB"; 32].join(":"));
        let c = clusters(&format!(
            "[sources.c.nodes]\nHV01 = \"https://10.0.0.11:5986/wsman\"\nhv02 = {{ url = \"https://10.0.0.12:5986/wsman\", tls-fingerprint = \"{fp}\" }}\n"
        ));
        assert_eq!(
            c.endpoint("hv01").unwrap(),
            ("https://10.0.0.11:5986/wsman".to_string(), None)
        );
        assert_eq!(
            c.endpoint("HV02").unwrap(),
            ("https://10.0.0.12:5986/wsman".to_string(), Some(fp.clone()))
        );
        assert_eq!(
            c.endpoint("HV03").unwrap().0,
            "https://hv03:5986/wsman",
            "a node not listed is reached by its name"
        );
        let n = Node {
            name: "HV02".into(),
            url: "https://10.0.0.12:5986/wsman".into(),
        };
        assert_eq!(n.host(), "10.0.0.12");
        assert!(c.make_client("HV02").is_ok());
        assert!(is_vm_id("5C24A79E-A869-48F4-845C-D10A296AAEA2"));
        assert!(!is_vm_id("win-sql-01"));
    }
}
