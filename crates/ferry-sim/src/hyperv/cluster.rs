//! A simulated failover cluster of Hyper-V nodes (`ferry sim hyperv --cluster N`, ADR 0153).
//!
//! Every node has its own WinRM listener (its own certificate, the same user) in front of one
//! shared model: the disks live on the shared volume `C:\ClusterStorage\Volume1` (the CSV), and
//! each VM is owned by one node. A node's `root/virtualization/v2` answers for its own VMs only,
//! as Hyper-V does: another node's VM, its settings, checkpoints and reference points are not
//! there (a Get is `w:InvalidSelectors`, `CreateSnapshot` of it returns 32773). Every node
//! answers the failover cluster namespace `root/MSCluster`: `MSCluster_Cluster`,
//! `MSCluster_Node`, one `MSCluster_ResourceGroup` per VM role and one `MSCluster_Resource` of
//! type `Virtual Machine` per VM (`Name` `Virtual Machine <vm>`, `OwnerGroup` `<vm>`,
//! `OwnerNode`), plus the CSV's `Physical Disk` resource.
//!
//! Side door (`FerrySim_SideDoor`): `LiveMigrate(VirtualSystem, DestinationNode)` moves a VM to
//! another node and keeps its RCT (the VHDX files on the CSV stay the same);
//! `FailedMigrate(VirtualSystem, DestinationNode)` moves it as a failed live migration that
//! ended with the VM restarted on the other node (or a storage migration) does: the owner
//! changes and every disk's RCT is reset, so earlier RCT ids are refused.

use super::{Fault, HypervSim, State, fault, set_rv, text};
use ferry_wsman::cim::{Instance, Value};
use ferry_wsman::xml::Node;
use std::collections::BTreeMap;

/// Resource URI prefix of the failover cluster namespace `root/MSCluster`.
pub const MSCLUSTER: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/mscluster/";

/// Which node a listener is (none: a standalone host).
#[derive(Debug, Clone)]
pub struct Viewer(pub Option<String>);

/// The cluster's state.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// The cluster's name.
    pub name: String,
    /// Node names, in order.
    pub nodes: Vec<String>,
    /// VM id → the node that owns it.
    pub owners: BTreeMap<String, String>,
}

/// One node's listener, for the JSON line.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its HTTPS endpoint.
    pub url: String,
    /// Its certificate's fingerprint.
    pub tls_fingerprint: String,
}

/// `n` node names from the first one: `HV-SIM-01` → `HV-SIM-01`, `HV-SIM-02`, …
pub fn node_names(first: &str, n: usize) -> Vec<String> {
    let digits = first.len() - first.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let stem = &first[..first.len() - digits];
    let start: usize = first[first.len() - digits..].parse().unwrap_or(1);
    (0..n)
        .map(|k| {
            if k == 0 {
                first.to_string()
            } else if digits > 0 {
                format!("{stem}{:0digits$}", start + k)
            } else {
                format!("{first}-{}", k + 1)
            }
        })
        .collect()
}

fn inst(class: &str, props: Vec<(&str, Value)>) -> Instance {
    Instance {
        class: class.into(),
        props: props.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

impl State {
    /// Turns the seeded standalone host (`nodes[0]`) into cluster `name`: the other nodes get
    /// their host system and services, VMs are spread over the nodes in turn, and the
    /// `root/MSCluster` objects appear.
    pub(super) fn seed_cluster(&mut self, name: &str, nodes: &[String]) {
        let first = &nodes[0];
        // The other nodes' host system and services, as the first node's.
        let mut extra = Vec::new();
        for (class, list) in &self.objects {
            for i in list {
                let host_cs = class == "Msvm_ComputerSystem" && i.text("Name") == Some(first);
                let service = i.text("SystemName") == Some(first);
                if !(host_cs || service) {
                    continue;
                }
                for node in &nodes[1..] {
                    let mut c = i.clone();
                    for k in ["Name", "ElementName", "SystemName"] {
                        if c.text(k) == Some(first) {
                            c.props.insert(k.into(), text(node));
                        }
                    }
                    extra.push(c);
                }
            }
        }
        for i in extra {
            self.objects.entry(i.class.clone()).or_default().push(i);
        }
        let vms: Vec<(String, String)> = self
            .guests()
            .map(|i| {
                (
                    i.text("Name").unwrap_or("").to_string(),
                    i.text("ElementName").unwrap_or("").to_string(),
                )
            })
            .collect();
        let mut c = Cluster {
            name: name.into(),
            nodes: nodes.to_vec(),
            owners: BTreeMap::new(),
        };
        let mut add = |i: Instance| self.objects.entry(i.class.clone()).or_default().push(i);
        add(inst(
            "MSCluster_Cluster",
            vec![
                ("Name", text(name)),
                ("Fqdn", text(format!("{name}.lab.local"))),
                ("Id", text(super::guid(name))),
            ],
        ));
        for (k, n) in nodes.iter().enumerate() {
            add(inst(
                "MSCluster_Node",
                vec![
                    ("Name", text(n)),
                    ("Id", text((k + 1).to_string())),
                    ("NodeInstanceID", text(super::guid(n))),
                    // 0 = Up.
                    ("State", text("0")),
                ],
            ));
        }
        add(inst(
            "MSCluster_Resource",
            vec![
                ("Name", text("Cluster Disk 1")),
                ("Id", text(super::guid("Cluster Disk 1"))),
                ("Type", text("Physical Disk")),
                ("IsClusterSharedVolume", text("true")),
                ("OwnerGroup", text("Available Storage")),
                ("OwnerNode", text(first)),
                // 2 = Online.
                ("State", text("2")),
            ],
        ));
        for (k, (id, vm)) in vms.iter().enumerate() {
            let owner = nodes[k % nodes.len()].clone();
            add(inst(
                "MSCluster_ResourceGroup",
                vec![
                    ("Name", text(vm)),
                    ("Id", text(super::guid(&format!("group {id}")))),
                    // 111 = a virtual machine role.
                    ("GroupType", text("111")),
                    ("OwnerNode", text(&owner)),
                    ("State", text("0")),
                ],
            ));
            add(inst(
                "MSCluster_Resource",
                vec![
                    ("Name", text(format!("Virtual Machine {vm}"))),
                    ("Id", text(super::guid(&format!("resource {id}")))),
                    ("Type", text("Virtual Machine")),
                    ("OwnerGroup", text(vm)),
                    ("OwnerNode", text(&owner)),
                    ("State", text("2")),
                ],
            ));
            c.owners.insert(id.clone(), owner);
        }
        self.cluster = Some(c);
    }

    /// The VM (id) an instance belongs to, if any.
    fn vm_of(&self, i: &Instance) -> Option<String> {
        let c = self.cluster.as_ref()?;
        if let Some(v) = i.text("VirtualSystemIdentifier") {
            return Some(v.to_string());
        }
        if i.class == "Msvm_ComputerSystem" {
            return i
                .text("Name")
                .filter(|n| c.owners.contains_key(*n))
                .map(str::to_string);
        }
        if let Some(s) = i.text("SystemName").filter(|s| c.owners.contains_key(*s)) {
            return Some(s.to_string());
        }
        let id = i.text("InstanceID").or_else(|| i.text("DeviceID"))?;
        let guid = id.strip_prefix("Microsoft:")?.split('\\').next()?;
        if c.owners.contains_key(guid) {
            return Some(guid.to_string());
        }
        // A checkpoint's disks: `Microsoft:<checkpoint>\…`.
        let settings = format!("Microsoft:{guid}");
        self.objects
            .get("Msvm_VirtualSystemSettingData")?
            .iter()
            .find(|s| s.text("InstanceID") == Some(settings.as_str()))?
            .text("VirtualSystemIdentifier")
            .map(str::to_string)
    }

    /// Whether the node serving this request sees `i`: its own host system and services, its
    /// own VMs and their objects, and everything not tied to a host or VM.
    pub(super) fn visible(&self, i: &Instance) -> bool {
        let (Some(c), Some(me)) = (&self.cluster, &self.viewer) else {
            return true;
        };
        if i.class.starts_with("MSCluster_") {
            return true;
        }
        if let Some(vm) = self.vm_of(i) {
            return c.owners.get(&vm).is_none_or(|o| o == me);
        }
        let host = if i.class == "Msvm_ComputerSystem" {
            i.text("Name")
        } else {
            i.text("SystemName")
        };
        match host {
            Some(h) if c.nodes.iter().any(|n| n == h) => h == me,
            _ => true,
        }
    }

    /// Whether this node may open image `path`: on a cluster, the images of a VM another node
    /// runs are held open by that node (a sharing violation, as on a CSV).
    pub(super) fn image_reachable(&self, path: &str) -> Result<(), String> {
        let (Some(c), Some(me), Some(s)) = (&self.cluster, &self.viewer, &self.storage) else {
            return Ok(());
        };
        let disk = s
            .disks
            .iter()
            .find(|d| d.host_path.eq_ignore_ascii_case(path))
            .or_else(|| {
                let f = s
                    .frozen
                    .values()
                    .flatten()
                    .find(|f| f.host_path.eq_ignore_ascii_case(path))?;
                s.disks.iter().find(|d| d.id == f.disk_id)
            });
        match disk.and_then(|d| c.owners.get(&d.vm_id)) {
            Some(owner) if owner != me => Err(format!(
                "The process cannot access the file '{path}' because it is being used by another process."
            )),
            _ => Ok(()),
        }
    }

    /// The class a `root/MSCluster` resource URI names, on a cluster (else the namespace does
    /// not exist on the host).
    pub(super) fn cluster_class<'r>(&self, resource: &'r str) -> Option<&'r str> {
        self.cluster.as_ref()?;
        let lower = resource.to_ascii_lowercase();
        lower
            .starts_with(MSCLUSTER)
            .then(|| &resource[MSCLUSTER.len()..])
    }

    /// The guests' `Msvm_ComputerSystem`s.
    fn guests(&self) -> impl Iterator<Item = &Instance> {
        self.objects
            .get("Msvm_ComputerSystem")
            .into_iter()
            .flatten()
            .filter(|i| i.text("Caption") == Some("Virtual Machine"))
    }

    fn vm_id(&self, vm: &str) -> Result<String, String> {
        self.guests()
            .find(|i| i.text("Name") == Some(vm) || i.text("ElementName") == Some(vm))
            .and_then(|i| i.text("Name"))
            .map(str::to_string)
            .ok_or_else(|| format!("no VM `{vm}`"))
    }

    /// Moves VM `vm` (name or id) to node `to`; `keep_rct` false resets every disk's RCT.
    pub(super) fn migrate(&mut self, vm: &str, to: &str, keep_rct: bool) -> Result<(), String> {
        let id = self.vm_id(vm)?;
        let c = self
            .cluster
            .as_mut()
            .ok_or("the host is not a cluster node")?;
        let Some(node) = c.nodes.iter().find(|n| n.eq_ignore_ascii_case(to)).cloned() else {
            return Err(format!(
                "no cluster node `{to}` (nodes: {})",
                c.nodes.join(", ")
            ));
        };
        let from = c.owners.get(&id).cloned().unwrap_or_default();
        if from == node {
            return Err(format!("VM `{vm}` already runs on node `{node}`"));
        }
        c.owners.insert(id.clone(), node.clone());
        let name = self
            .objects
            .get("Msvm_ComputerSystem")
            .and_then(|v| v.iter().find(|i| i.text("Name") == Some(id.as_str())))
            .and_then(|i| i.text("ElementName"))
            .unwrap_or("")
            .to_string();
        for class in ["MSCluster_Resource", "MSCluster_ResourceGroup"] {
            for r in self.objects.get_mut(class).into_iter().flatten() {
                let group = r.text("OwnerGroup").or_else(|| r.text("Name"));
                if group == Some(name.as_str()) {
                    r.props.insert("OwnerNode".into(), text(&node));
                }
            }
        }
        if !keep_rct {
            let s = self.storage.as_mut().ok_or("no storage")?;
            let mine: Vec<usize> = (0..s.disks.len())
                .filter(|k| s.disks[*k].vm_id == id)
                .collect();
            for k in mine {
                s.break_rct(k);
            }
        }
        Ok(())
    }
}

/// The cluster's side-door methods, or `None` for the others.
pub(super) fn sidedoor(
    st: &mut State,
    method: &str,
    body: &Node,
) -> Option<Result<Instance, Fault>> {
    let keep_rct = match method {
        "LiveMigrate" => true,
        "FailedMigrate" => false,
        _ => return None,
    };
    let arg = |k: &str| {
        body.text_at(k).map(str::to_string).ok_or_else(|| {
            fault(
                "InvalidParameter",
                format!("FerrySim_SideDoor.{method} needs {k}."),
            )
        })
    };
    let r = (|| {
        st.migrate(&arg("VirtualSystem")?, &arg("DestinationNode")?, keep_rct)
            .map_err(|m| fault("InvalidParameter", m))?;
        let mut out = Instance::default();
        set_rv(&mut out, 0);
        Ok(out)
    })();
    Some(r)
}

impl HypervSim {
    /// The cluster's nodes (one, the host itself, when it is not a cluster).
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// The node that owns VM `vm` (name or id) now, on a cluster.
    pub fn owner_of(&self, vm: &str) -> Option<String> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let id = st.vm_id(vm).ok()?;
        st.cluster.as_ref()?.owners.get(&id).cloned()
    }

    /// Live-migrates VM `vm` to node `to`: RCT stays valid.
    pub fn live_migrate(&self, vm: &str, to: &str) -> Result<(), String> {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.migrate(vm, to, true)
    }

    /// Moves VM `vm` to node `to` as a failed or storage migration does: RCT is reset.
    pub fn failed_migrate(&self, vm: &str, to: &str) -> Result<(), String> {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.migrate(vm, to, false)
    }
}

/// The `cluster` member of the JSON line, with each VM's owner.
pub(super) fn info(st: &State, nodes: &[NodeInfo]) -> Option<serde_json::Value> {
    let c = st.cluster.as_ref()?;
    let nodes: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n.name,
                "url": n.url,
                "tls_fingerprint": n.tls_fingerprint,
            })
        })
        .collect();
    Some(serde_json::json!({
        "name": c.name,
        "nodes": nodes,
        "owners": c.owners,
    }))
}

/// Starts the listeners of nodes `names[1..]` (HTTPS, each with its own certificate) on `ip`;
/// the first node is the simulator's own listener at `first_url`.
pub(super) async fn start_nodes(
    shared: &std::sync::Arc<super::Shared>,
    names: &[String],
    ip: std::net::IpAddr,
    first_url: &str,
    first_fingerprint: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Vec<NodeInfo>, super::HypervSimError> {
    use super::HypervSimError;
    use axum::extract::Extension;
    let mut out = vec![NodeInfo {
        name: names[0].clone(),
        url: first_url.into(),
        tls_fingerprint: first_fingerprint.into(),
    }];
    for name in &names[1..] {
        let cert = ferry_tls::SelfSigned::generate(&["localhost", "127.0.0.1", name.as_str()])
            .map_err(|e| HypervSimError::Other(e.to_string()))?;
        let tls = cert
            .server_config()
            .map_err(|e| HypervSimError::Other(e.to_string()))?;
        shared
            .auth
            .cbt_listener(&cert.cert_der)
            .map_err(HypervSimError::Other)?;
        let l = tokio::net::TcpListener::bind((ip, 0))
            .await
            .map_err(|source| HypervSimError::Io {
                what: format!("bind {ip}:0 for node {name}"),
                source,
            })?;
        let addr = l.local_addr().map_err(|source| HypervSimError::Io {
            what: "local address".into(),
            source,
        })?;
        let app = axum::Router::new()
            .route("/wsman", axum::routing::post(super::handle))
            .with_state(shared.clone())
            .layer(Extension(Viewer(Some(name.clone()))))
            .layer(Extension(super::auth::Channel::Tls));
        let server = ferry_http::Server::new(l)
            .tls(tls)
            .grace(std::time::Duration::ZERO);
        tokio::spawn(server.run(app, shutdown.clone()));
        out.push(NodeInfo {
            name: name.clone(),
            url: format!("https://{addr}/wsman"),
            tls_fingerprint: cert.fingerprint(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::node_names;

    #[test]
    fn node_names_count_on_from_the_first() {
        assert_eq!(
            node_names("HV-SIM-01", 3),
            ["HV-SIM-01", "HV-SIM-02", "HV-SIM-03"]
        );
        assert_eq!(node_names("HV9", 2), ["HV9", "HV10"]);
        assert_eq!(node_names("host", 2), ["host", "host-2"]);
        assert_eq!(node_names("HV-SIM-01", 1), ["HV-SIM-01"]);
    }
}
