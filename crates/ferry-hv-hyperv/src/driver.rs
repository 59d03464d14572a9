//! [`HypervDriver`]: the [`HypervisorDriver`] for Hyper-V (Windows Server 2016+), over WinRM.
//!
//! A backup takes a recovery checkpoint (`CreateSnapshot`, `SnapshotType` 32768) by one of two
//! methods, chosen per VM and recorded with the reason ([`BackupMethod`]):
//! - `child-vm`: application consistent through the guest's VSS (`ConsistencyLevel` 1), the VM
//!   stays online. Only for a guest that runs, has the backup (VSS) integration service
//!   enabled and running, and keeps its checkpoints on the volume of its disks; if the guest's
//!   VSS still fails (dynamic disks, FAT volumes), the backup falls back to saved state and
//!   says why.
//! - `saved-state`: the VM is saved (`RequestStateChange` 32769), checkpointed crash consistent
//!   and resumed at once; a VM that is off is checkpointed as it is.
//!
//! The checkpoint's disks are read through a [`Transport`] (the `.avhdx` chain). Incrementals
//! ask RCT (`GetVirtualDiskChanges`) for the ranges changed since the previous backup's
//! reference point; commit converts the checkpoint into the next reference point
//! (`ConvertToReferencePoint`) and drops the previous one, abort destroys it. The change token
//! of every disk is the checkpoint's InstanceID, which its reference point keeps (ADR 0115).
//!
//! Cleanup: each checkpoint is named with a marker and this process ([`CHECKPOINT_MARKER`]),
//! journaled, and removed by `recover` after a crash; a VM this driver saved is resumed.
//! Checkpoints without the marker are never touched.

use crate::cim::Instance;
use crate::client::{Credentials, WsmanClient};
use crate::cluster::{Clusters, Node};
use crate::error::HypervError;
use crate::transport::{CheckpointDisk, SanTransport, Transport};
use crate::wmi::{self, VirtualDisk, Wmi};
use async_trait::async_trait;
use ferry_core::vm::DiskConfig;
use ferry_core::{Extent, ExtentMap};
use ferry_hv::journal::{self, Journal};
use ferry_hv::{
    BackupDisk, BackupMethod, BackupOptions, BackupSession, ChangeToken, ChangeTokens, Changed,
    CleanupReport, ConsistencyLevel, CountingSource, DiskSummary, HvError, HypervisorDriver,
    HypervisorKind, NativeConfig, Outcome, PowerState, RestorePlan, RestoredVm, SourceConfig,
    TransportMode, VmConfig, VmSummary,
};
use std::collections::BTreeMap;
use std::sync::Arc;

mod follow;
mod reopen;

pub use follow::MAX_FOLLOWS;
pub use reopen::MAX_REOPENS;

/// Start of the name of every checkpoint Ferry takes; the owning process follows in brackets.
pub const CHECKPOINT_MARKER: &str = "Ferry backup";

/// The `child-vm` method.
pub const CHILD_VM: &str = "child-vm";
/// The `saved-state` method.
pub const SAVED_STATE: &str = "saved-state";

struct Inner {
    name: String,
    cfg: SourceConfig,
    /// The host this works with: the source's `url`, or the cluster node that owns the VM.
    client: Arc<WsmanClient>,
    /// Shared by the per-node views of the source: one journal file, one lock.
    journal: Arc<Journal>,
    transports: std::sync::RwLock<Vec<Arc<dyn Transport>>>,
    /// The source's cluster nodes (ADR 0153).
    clusters: Arc<Clusters>,
    /// The cluster node `client` talks to, in a per-node view.
    node: Option<Node>,
}

/// The Hyper-V driver for one configured source.
#[derive(Clone)]
pub struct HypervDriver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HypervDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HypervDriver")
            .field("source", &self.inner.name)
            .finish()
    }
}

/// A driver error as the hypervisor interface reports it.
pub(crate) fn hv(source: &str, e: HypervError) -> HvError {
    match e {
        HypervError::Http(h) => HvError::Http(h),
        HypervError::Login { ref call, .. }
        | HypervError::Fault { ref call, .. }
        | HypervError::Wmi { ref call, .. }
        | HypervError::Protocol { ref call, .. } => HvError::Api {
            source_name: source.into(),
            call: call.clone(),
            message: e.to_string(),
            retryable: false,
        },
    }
}

fn power(state: Option<&str>) -> PowerState {
    match state {
        Some("2") => PowerState::Running,
        Some("3") => PowerState::Off,
        Some("6" | "9" | "32768" | "32769") => PowerState::Suspended,
        _ => PowerState::Unknown,
    }
}

/// The volume a host path lives on: a CSV (`C:\ClusterStorage\VolumeN`), a share
/// (`\\server\share`) or a drive (`C:`).
pub fn volume_of(path: &str) -> String {
    let p = path.replace('/', "\\").to_lowercase();
    let parts: Vec<&str> = p.split('\\').collect();
    if p.starts_with("\\\\") {
        return parts.iter().take(4).copied().collect::<Vec<_>>().join("\\");
    }
    if parts.get(1) == Some(&"clusterstorage") && parts.len() > 2 {
        return parts[..3].join("\\");
    }
    parts.first().copied().unwrap_or_default().to_string()
}

/// How a volume is named for per-datastore limits: `C:\ClusterStorage\Volume1`,
/// `\\fs01\vms`, `D:` (as written in the disk's path).
pub fn volume_label(path: &str) -> String {
    let v = volume_of(path);
    let p = path.replace('/', "\\");
    p.get(..v.len())
        .filter(|x| x.eq_ignore_ascii_case(&v))
        .map_or(v, str::to_string)
}

/// Whether the guest qualifies for the child-VM method: `Ok(why)` or `Err(why not)`.
pub fn qualify(
    vm: &Instance,
    vss: Option<&Instance>,
    settings: &Instance,
    disks: &[VirtualDisk],
) -> Result<String, String> {
    match vm.text("EnabledState") {
        Some("2") => {}
        Some("3") => return Err("the VM is off: it is checkpointed as it is (offline)".into()),
        Some(s) => {
            return Err(format!(
                "the VM is not running (EnabledState {s}): the guest's VSS cannot take part"
            ));
        }
        None => return Err("the VM's state is unknown".into()),
    }
    let Some(vss) = vss else {
        return Err("the VM has no backup (volume shadow copy) integration service".into());
    };
    if vss.text("EnabledState") != Some("2") {
        return Err(
            "the backup (volume shadow copy) integration service is disabled for the guest".into(),
        );
    }
    if vss.text("OperationalStatus") != Some("2") {
        return Err(format!(
            "the backup (volume shadow copy) integration service does not run in the guest (status {})",
            vss.text("OperationalStatus").unwrap_or("unknown")
        ));
    }
    let snaps = settings.text("SnapshotDataRoot").unwrap_or("");
    let snap_vol = volume_of(snaps);
    if let Some(d) = disks.iter().find(|d| volume_of(&d.path) != snap_vol) {
        return Err(format!(
            "its checkpoint location {snaps} is on another volume than its disk {}",
            d.path
        ));
    }
    Ok(
        "the guest runs with the backup (VSS) integration service, and its checkpoints are on the volume of its disks"
            .into(),
    )
}

/// The name of a checkpoint taken by process `owner`.
fn checkpoint_name(owner: &str) -> String {
    format!("{CHECKPOINT_MARKER} [{owner}]")
}

/// The owner in a checkpoint name, for Ferry's checkpoints.
fn checkpoint_owner(name: &str) -> Option<&str> {
    name.strip_prefix(CHECKPOINT_MARKER)?
        .trim()
        .strip_prefix('[')?
        .strip_suffix(']')
}

fn owner_host(owner: &str) -> &str {
    owner.split(' ').next().unwrap_or("")
}

fn this_host() -> String {
    owner_host(&journal::process_owner()).to_string()
}

/// Disk names within a VM: the image's file name without extension, made unique.
fn disk_names(disks: &[VirtualDisk]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let file = d.path.rsplit(['\\', '/']).next().unwrap_or(&d.path);
        let stem = file.rsplit_once('.').map_or(file, |(s, _)| s).to_string();
        let stem = if stem.is_empty() {
            format!("disk{i}")
        } else {
            stem
        };
        let name = if out.contains(&stem) {
            format!("{stem}-{i}")
        } else {
            stem
        };
        out.push(name);
    }
    out
}

/// The Kerberos settings of a source (also used for each cluster node's client).
pub(crate) fn kerberos_options(cfg: &SourceConfig) -> crate::KerberosOptions {
    crate::KerberosOptions {
        realm: cfg.realm.clone(),
        kdc: cfg.kdc.clone(),
        keytab: cfg.keytab.clone(),
    }
}

impl HypervDriver {
    /// Connects to source `name` (nothing is sent until the first call).
    pub async fn connect(name: &str, cfg: &SourceConfig) -> Result<Self, HvError> {
        let http = cfg.http_options(name)?;
        let password = cfg.password(name)?;
        let creds = Credentials {
            user: cfg.username.clone(),
            password,
        };
        let auth = match cfg.auth.unwrap_or_default() {
            ferry_hv::config::WinrmAuth::Ntlm => crate::AuthMethod::Ntlm,
            ferry_hv::config::WinrmAuth::Basic => crate::AuthMethod::Basic,
            ferry_hv::config::WinrmAuth::Kerberos => crate::AuthMethod::Kerberos,
        };
        let client = WsmanClient::new(&cfg.url, &http, creds.clone())
            .map_err(|e| hv(name, e))?
            .with_auth(auth, cfg.domain.clone())
            .with_kerberos(kerberos_options(cfg))
            .with_channel_binding(cfg.channel_binding.unwrap_or(true));
        let clusters = Arc::new(Clusters::new(name, cfg, creds, auth, cfg.domain.clone()));
        // `san-luns` (snapshot LUNs read through NTFS) take the place of `san-paths` (mounted).
        let san: Arc<dyn Transport> = if cfg.san_luns.is_empty() {
            Arc::new(SanTransport {
                paths: cfg
                    .san_paths
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
        } else {
            Arc::new(crate::transport::NtfsLunTransport {
                luns: cfg
                    .san_luns
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
        };
        let mut transports = vec![san];
        transports.extend(crate::agent::transport(name, cfg)?);
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.into(),
                cfg: cfg.clone(),
                client: Arc::new(client),
                journal: Arc::new(Journal::new(&cfg.state_dir(), name)),
                transports: std::sync::RwLock::new(transports),
                clusters,
                node: None,
            }),
        })
    }

    /// Adds (or replaces) the data path of `t.mode()`: the host agent and the NTFS volume
    /// reader plug in here.
    pub fn set_transport(&self, t: Arc<dyn Transport>) {
        let mut v = self
            .inner
            .transports
            .write()
            .unwrap_or_else(|p| p.into_inner());
        v.retain(|x| x.mode() != t.mode());
        v.push(t);
    }

    /// The WS-Man client (tools and tests).
    pub fn client(&self) -> &WsmanClient {
        &self.inner.client
    }

    /// The cluster node that runs VM `vm` (name or id) now, from `root/MSCluster`; `None`
    /// when the source is a standalone host. A backup sends its checkpoint and RCT calls to
    /// this node, and a per-node data path (the host agent) reads from [`Node::host`].
    pub async fn owner_node(&self, vm: &str) -> Result<Option<Node>, HvError> {
        let i = &self.inner;
        i.clusters.owner(&i.client, vm).await.map_err(|e| i.err(e))
    }
}

impl Inner {
    fn wmi(&self) -> Wmi<'_> {
        Wmi::new(&self.client)
    }

    /// This source as seen from `client` (a cluster node): same name, journal and data paths.
    fn on(&self, node: Node, client: Arc<WsmanClient>) -> Arc<Inner> {
        Arc::new(Inner {
            name: self.name.clone(),
            cfg: self.cfg.clone(),
            client,
            journal: self.journal.clone(),
            transports: std::sync::RwLock::new(
                self.transports
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            ),
            clusters: self.clusters.clone(),
            node: Some(node),
        })
    }

    /// The host that runs VM `vm`: its cluster node, or the standalone host.
    async fn for_vm(self: &Arc<Self>, vm: &str) -> Result<Arc<Inner>, HvError> {
        match self
            .clusters
            .owner(&self.client, vm)
            .await
            .map_err(|e| self.err(e))?
        {
            None => Ok(self.clone()),
            Some(node) => {
                tracing::info!(source = %self.name, vm, node = %node.name, "the VM runs on cluster node {}", node.name);
                let c = self
                    .clusters
                    .client(&node.name)
                    .await
                    .map_err(|e| self.err(e))?;
                Ok(self.on(node, c))
            }
        }
    }

    /// Every host of the source (each cluster node, or the standalone host) that answers, and
    /// whether some node could not be reached (logged).
    async fn hosts(&self, what: &str) -> Result<(Vec<crate::cluster::Host>, bool), HvError> {
        let (hosts, down) = self
            .clusters
            .hosts(&self.client)
            .await
            .map_err(|e| self.err(e))?;
        for d in &down {
            tracing::warn!(source = %self.name, node = %d, "{what}: skipping a cluster node that cannot be reached");
        }
        Ok((hosts, !down.is_empty()))
    }

    fn err(&self, e: HypervError) -> HvError {
        hv(&self.name, e)
    }

    fn vm_err(&self, vm: &str, m: impl Into<String>) -> HvError {
        HvError::Vm {
            source_name: self.name.clone(),
            vm: vm.into(),
            message: m.into(),
        }
    }

    fn journal(&self, add: bool, kind: &str, id: &str) {
        self.journal.note(&self.name, add, kind, id);
    }

    async fn find_vm(&self, want: &str) -> Result<Instance, HvError> {
        let vms = self.wmi().vms().await.map_err(|e| self.err(e))?;
        if let Some(n) = &self.node
            && !vms.iter().any(|v| {
                v.text("Name").is_some_and(|x| x.eq_ignore_ascii_case(want))
                    || v.text("ElementName") == Some(want)
            })
        {
            // A node answers for the VMs it runs only.
            return Err(self.vm_err(
                want,
                format!(
                    "the cluster says node `{}` runs the VM, but the host at {} does not know it (a node answers for the VMs it runs only): the VM moved meanwhile (run again), or [sources.{}.nodes] points `{}` at another host",
                    n.name, n.url, self.name, n.name
                ),
            ));
        }
        let hits: Vec<&Instance> = vms
            .iter()
            .filter(|v| {
                v.text("Name").is_some_and(|n| n.eq_ignore_ascii_case(want))
                    || v.text("ElementName") == Some(want)
            })
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(self.vm_err(want, "no such VM")),
            many => Err(self.vm_err(
                want,
                format!("{} VMs have this name; use the VM id", many.len()),
            )),
        }
    }

    /// Resumes VM `id` if it is saved (after a backup that saved it).
    async fn resume(&self, w: &Wmi<'_>, id: &str) -> Result<bool, HvError> {
        let vm = match w.vm(id).await {
            Ok(v) => v,
            Err(e) if wmi::is_gone(&e) => return Ok(false),
            Err(e) => return Err(self.err(e)),
        };
        if vm.text("EnabledState") != Some(wmi::ENABLED_SAVED) {
            return Ok(false);
        }
        w.request_state(id, wmi::STATE_RUNNING)
            .await
            .map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Cleans up journaled objects (all, or those of dead processes) and Ferry's checkpoints
    /// of dead processes of this appliance.
    async fn recover(&self, all: bool) -> Result<CleanupReport, HvError> {
        let mut report = CleanupReport::default();
        let entries = if all {
            self.journal.entries()
        } else {
            self.journal.orphans()
        }
        .map_err(|e| HvError::Disk {
            source_name: self.name.clone(),
            disk: "crash journal".into(),
            message: e.to_string(),
        })?;
        // On a cluster the object is on the node that ran the VM then: ask every node (one
        // that does not have it answers "gone").
        let (hosts, some_down) = self.hosts("cleanup").await?;
        for e in &entries {
            match e.kind.as_str() {
                // What a killed restore left (ADR 0156): on the source's own host.
                crate::restore::VM_ENTRY => {
                    if crate::restore::destroy_vm(&self.client, &self.name, &e.id).await? {
                        tracing::warn!(source = %self.name, vm = %e.id, "destroyed the partial VM of a killed restore");
                        report.partial_vms += 1;
                    }
                }
                crate::restore::FOLDER_ENTRY => {
                    // Kept journaled while it cannot be removed (an agent that is down).
                    if !crate::restore_agent::remove_folder(&self.name, &self.cfg, &e.id).await {
                        continue;
                    }
                }
                _ => {
                    for h in &hosts {
                        let w = Wmi::new(&h.client);
                        match e.kind.as_str() {
                            "checkpoint"
                                if w.checkpoint_exists(&e.id).await.map_err(|x| self.err(x))? =>
                            {
                                w.destroy_checkpoint(&e.id).await.map_err(|x| self.err(x))?;
                                report.snapshots += 1;
                            }
                            "saved-vm" if self.resume(&w, &e.id).await? => {
                                tracing::warn!(source = %self.name, vm = %e.id, "resumed a VM an interrupted backup had saved");
                            }
                            _ => {}
                        }
                    }
                }
            }
            // A node that did not answer may still hold it: the next run tries again.
            if !some_down {
                self.journal(false, &e.kind, &e.id);
            }
        }
        for h in &hosts {
            self.remove_unjournaled(&Wmi::new(&h.client), all, &entries, &mut report)
                .await?;
        }
        if report != CleanupReport::default() {
            tracing::warn!(source = %self.name, checkpoints = report.snapshots, "removed leftovers of an interrupted backup");
        }
        Ok(report)
    }

    /// Ferry's checkpoints on one host whose owner died before journaling them.
    async fn remove_unjournaled(
        &self,
        w: &Wmi<'_>,
        all: bool,
        entries: &[journal::Entry],
        report: &mut CleanupReport,
    ) -> Result<(), HvError> {
        let host = this_host();
        for c in w.recovery_checkpoints().await.map_err(|e| self.err(e))? {
            let (Some(id), Some(owner)) = (
                c.text("InstanceID"),
                c.text("ElementName").and_then(checkpoint_owner),
            ) else {
                continue;
            };
            if owner_host(owner) != host || (!all && journal::owner_alive(owner)) {
                continue;
            }
            if entries.iter().any(|e| e.id == id) {
                continue;
            }
            w.destroy_checkpoint(id).await.map_err(|e| self.err(e))?;
            report.snapshots += 1;
        }
        Ok(())
    }
}

#[async_trait]
impl HypervisorDriver for HypervDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::HyperV
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>, HvError> {
        let i = &self.inner;
        let mut out = Vec::new();
        let hosts = i.hosts("inventory").await?.0;
        // A clustered source: every VM is in the failover cluster (ADR 0153).
        let cluster = if hosts.iter().any(|h| h.node.is_some()) {
            crate::inventory::cluster_name(&i.client)
                .await
                .map_err(|e| i.err(e))?
        } else {
            None
        };
        for h in hosts {
            self.list_host_vms(&h, &mut out).await?;
        }
        for v in &mut out {
            v.cluster.clone_from(&cluster);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn disk_stores(&self, vm: &VmSummary) -> Result<BTreeMap<String, String>, HvError> {
        let i = self.inner.for_vm(&vm.id).await?;
        let all = i.wmi().all_disks().await.map_err(|e| i.err(e))?;
        // The volume each disk's image is on: a CSV, a share or a drive.
        Ok(Wmi::disks_of(&all, &format!("Microsoft:{}", vm.id))
            .into_iter()
            .filter(|d| vm.disks.is_empty() || vm.disks.iter().any(|x| x.key == d.key))
            .map(|d| (d.key, volume_label(&d.path)))
            .collect())
    }

    async fn begin_backup(
        &self,
        vm: &str,
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
    ) -> Result<Box<dyn BackupSession>, HvError> {
        self.inner.recover(false).await?;
        // On a cluster, every call of the backup goes to the node that runs the VM now.
        let node = self.inner.for_vm(vm).await?;
        self.backup_following(node, vm, opts, previous).await
    }

    async fn recover(&self) -> Result<CleanupReport, HvError> {
        self.inner.recover(true).await
    }

    async fn remove_leftovers(&self, vm: &str, owner: &str) -> Result<CleanupReport, HvError> {
        let i = &self.inner;
        let mut report = CleanupReport::default();
        for h in i.hosts("cleanup").await?.0 {
            let w = Wmi::new(&h.client);
            for c in w.recovery_checkpoints().await.map_err(|e| i.err(e))? {
                if c.text("VirtualSystemIdentifier") != Some(vm)
                    || c.text("ElementName").and_then(checkpoint_owner) != Some(owner)
                {
                    continue;
                }
                if let Some(id) = c.text("InstanceID") {
                    w.destroy_checkpoint(id).await.map_err(|e| i.err(e))?;
                    report.snapshots += 1;
                }
            }
        }
        Ok(report)
    }

    async fn restore_vm(&self, plan: &RestorePlan) -> Result<RestoredVm, HvError> {
        let i = &self.inner;
        crate::restore::restore(&i.client, &i.name, &i.cfg, &i.journal, plan).await
    }
}

impl HypervDriver {
    /// The VMs of one host, with the node they run on.
    async fn list_host_vms(
        &self,
        h: &crate::cluster::Host,
        out: &mut Vec<VmSummary>,
    ) -> Result<(), HvError> {
        let i = &self.inner;
        let w = Wmi::new(&h.client);
        let vms = w.vms().await.map_err(|e| i.err(e))?;
        let all = w.all_disks().await.map_err(|e| i.err(e))?;
        let layout = crate::controllers::Layout::read(&h.client)
            .await
            .map_err(|e| i.err(e))?;
        let host = h.node.clone().unwrap_or_else(|| h.client.url().to_string());
        for v in &vms {
            let id = v.text("Name").unwrap_or("").to_string();
            let disks = Wmi::disks_of(&all, &format!("Microsoft:{id}"));
            let places = layout.positions(&i.name, &id);
            let names = disk_names(&disks);
            let mut summaries = Vec::new();
            for (d, name) in disks.iter().zip(names) {
                let size = w.disk_size(&d.path).await.map_err(|e| i.err(e))?;
                summaries.push(DiskSummary {
                    key: d.key.clone(),
                    name,
                    size,
                    position: places.of(&d.key),
                });
            }
            out.push(VmSummary {
                id,
                name: v.text("ElementName").unwrap_or("").to_string(),
                power_state: power(v.text("EnabledState")),
                host: Some(host.clone()),
                cluster: None,
                disks: summaries,
                tags: vec![],
            });
        }
        Ok(())
    }

    /// A backup of `vm` on host `i` (the node that runs it).
    async fn backup_on(
        &self,
        i: &Arc<Inner>,
        vm: &str,
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
    ) -> Result<Box<dyn BackupSession>, HvError> {
        let w = i.wmi();
        let sys = i.find_vm(vm).await?;
        let vm_id = sys.text("Name").unwrap_or("").to_string();
        let vm_name = sys.text("ElementName").unwrap_or("").to_string();
        let settings = w
            .settings(&vm_id)
            .await
            .map_err(|e| i.err(e))?
            .ok_or_else(|| i.vm_err(vm, "the VM has no settings"))?;
        let live = Wmi::disks_of(
            &w.all_disks().await.map_err(|e| i.err(e))?,
            &format!("Microsoft:{vm_id}"),
        );
        let vss = w.vss_component(&vm_id).await.map_err(|e| i.err(e))?;
        let owner = journal::process_owner();
        let name = checkpoint_name(&owner);
        let (snap, method) = match qualify(&sys, vss.as_ref(), &settings, &live) {
            Ok(why) => {
                match w
                    .create_recovery_checkpoint(&vm_id, wmi::APPLICATION_CONSISTENT, &name)
                    .await
                {
                    Ok(s) => (
                        s,
                        BackupMethod {
                            name: CHILD_VM.into(),
                            reason: why,
                        },
                    ),
                    Err(e @ HypervError::Wmi { .. }) => {
                        let reason = format!("the application-consistent checkpoint failed: {e}");
                        tracing::warn!(source = %i.name, vm = %vm_name, %reason, "falling back to the saved-state method");
                        (
                            i.saved_state(&vm_id, &sys, &name).await?,
                            BackupMethod {
                                name: SAVED_STATE.into(),
                                reason,
                            },
                        )
                    }
                    Err(e) => return Err(i.err(e)),
                }
            }
            Err(why) => (
                i.saved_state(&vm_id, &sys, &name).await?,
                BackupMethod {
                    name: SAVED_STATE.into(),
                    reason: format!("the guest does not qualify for the child-VM method: {why}"),
                },
            ),
        };
        let snap_id = snap.selector("InstanceID").unwrap_or("").to_string();
        i.journal(true, "checkpoint", &snap_id);
        tracing::info!(source = %i.name, vm = %vm_name, method = %method.name, reason = %method.reason, "recovery checkpoint taken");
        let consistency = if method.name == CHILD_VM {
            ConsistencyLevel::Application
        } else {
            ConsistencyLevel::SavedState
        };
        let mut session = HypervSession {
            inner: i.clone(),
            vm: VmSummary {
                id: vm_id.clone(),
                name: vm_name,
                power_state: power(sys.text("EnabledState")),
                host: Some(i.client.url().to_string()),
                cluster: None,
                disks: vec![],
                tags: vec![],
            },
            checkpoint: snap_id,
            method,
            consistency,
            config: VmConfig::default(),
            native: NativeConfig {
                format: crate::config::NATIVE_FORMAT.into(),
                record: String::new(),
            },
            disks: vec![],
            old_reference: None,
            done: false,
            moves: 0,
        };
        match session
            .open_following(&settings, &live, opts, previous)
            .await
        {
            Ok(()) => Ok(Box::new(session)),
            Err(e) => {
                if let Err(c) = session.cleanup_following(Outcome::Aborted).await {
                    tracing::warn!(error = %c, "cleanup after a failed start left the checkpoint; the next run removes it");
                }
                Err(e)
            }
        }
    }
}

impl Inner {
    /// The saved-state method: save a running VM, checkpoint it crash consistent, resume it.
    async fn saved_state(
        &self,
        vm_id: &str,
        sys: &Instance,
        name: &str,
    ) -> Result<crate::cim::Epr, HvError> {
        let i = self;
        let w = i.wmi();
        let running = sys.text("EnabledState") == Some("2");
        if running {
            i.journal(true, "saved-vm", vm_id);
            w.request_state(vm_id, wmi::STATE_SAVED)
                .await
                .map_err(|e| i.err(e))?;
        }
        let snap = w
            .create_recovery_checkpoint(vm_id, wmi::CRASH_CONSISTENT, name)
            .await;
        let snap_id = snap
            .as_ref()
            .ok()
            .and_then(|s| s.selector("InstanceID"))
            .map(str::to_string);
        if let Some(id) = &snap_id {
            i.journal(true, "checkpoint", id);
        }
        if running {
            // Resume whatever the checkpoint did: the VM must not stay saved.
            if let Err(e) = w.request_state(vm_id, wmi::STATE_RUNNING).await {
                // The journal keeps `saved-vm`: the next run retries the resume. The
                // checkpoint goes now, as the backup does not go on.
                if let Some(id) = &snap_id
                    && w.destroy_checkpoint(id).await.is_ok()
                {
                    i.journal(false, "checkpoint", id);
                }
                return Err(i.err(e));
            }
            i.journal(false, "saved-vm", vm_id);
        }
        snap.map_err(|e| i.err(e))
    }
}

/// One backup in progress.
pub struct HypervSession {
    inner: Arc<Inner>,
    vm: VmSummary,
    checkpoint: String,
    method: BackupMethod,
    consistency: ConsistencyLevel,
    config: VmConfig,
    native: NativeConfig,
    disks: Vec<BackupDisk>,
    /// The previous backup's reference point, dropped once this one's exists.
    old_reference: Option<String>,
    done: bool,
    /// Cluster nodes the VM was followed to during this backup (ADR 0171).
    moves: u32,
}

impl std::fmt::Debug for HypervSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HypervSession")
            .field("vm", &self.vm.name)
            .field("checkpoint", &self.checkpoint)
            .finish()
    }
}

impl HypervSession {
    async fn open(
        &mut self,
        settings: &Instance,
        live: &[VirtualDisk],
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
    ) -> Result<(), HvError> {
        let i = self.inner.clone();
        let w = i.wmi();
        let all = w.all_disks().await.map_err(|e| i.err(e))?;
        let frozen = Wmi::disks_of(&all, &self.checkpoint);
        let places = crate::controllers::Layout::read(&i.client)
            .await
            .map_err(|e| i.err(e))?
            .positions(&i.name, &self.vm.id);
        let names = disk_names(live);
        // The node that runs the VM, for the host agent (`network`).
        let node = match i.cfg.agent {
            Some(_) => match crate::agent::owner_node(&i.client, &self.vm.id).await {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(source = %i.name, vm = %self.vm.name, error = %e, "cannot tell the VM's node: the agent is looked for at the source's host");
                    None
                }
            },
            None => None,
        };
        // The previous reference point, if the previous backup's still exists.
        let prev_id = previous
            .and_then(|p| p.0.values().next())
            .map(|t| t.0.clone());
        let prev_rp = match &prev_id {
            Some(id) => w.reference_point(id).await.map_err(|e| i.err(e))?,
            None => None,
        };
        if let Some(rp) = &prev_rp
            && rp.text("VirtualSystemIdentifier") == Some(self.vm.id.as_str())
        {
            self.old_reference = prev_id.clone();
        }
        for (d, name) in live.iter().zip(names) {
            if opts.exclude_disks.iter().any(|x| *x == d.key || *x == name) {
                continue;
            }
            let label = format!("{}/{name}", self.vm.name);
            let Some(f) = frozen.iter().find(|f| f.key == d.key) else {
                return Err(HvError::Disk {
                    source_name: i.name.clone(),
                    disk: label,
                    message: "the checkpoint holds no copy of this disk".into(),
                });
            };
            let cd = CheckpointDisk {
                vm: self.vm.id.clone(),
                key: d.key.clone(),
                host_path: f.path.clone(),
            };
            let (source, transport) = open_disk(&i, &label, &cd, node.as_ref()).await?;
            // A read that fails after the VM moved goes on through its new node (ADR 0180).
            let source = reopen::Reopening::wrap(i.clone(), cd, &label, &self.vm.name, source);
            let size = source.size();
            let changed = if opts.force_full {
                Changed::Full {
                    reason: "a full backup was requested".into(),
                }
            } else {
                match (&prev_id, &prev_rp) {
                    (None, _) => Changed::Full {
                        reason: "no previous restore point".into(),
                    },
                    (Some(id), None) => Changed::Full {
                        reason: format!(
                            "the reference point of the previous backup ({id}) is gone from the host"
                        ),
                    },
                    (Some(_), Some(rp)) => match rct_since(&w, rp, &d.key, &f.path, size).await {
                        Ok(ext) => Changed::Since(ext),
                        Err(reason) => Changed::Full { reason },
                    },
                }
            };
            match &changed {
                Changed::Full { reason } if prev_id.is_some() && !opts.force_full => {
                    tracing::warn!(source = %i.name, disk = %label, %reason, "FULL backup of the disk: RCT cannot be used")
                }
                Changed::Full { reason } => {
                    tracing::info!(source = %i.name, disk = %label, %reason, "full backup of the disk")
                }
                Changed::Since(e) => {
                    tracing::info!(source = %i.name, disk = %label, changed_bytes = e.total_len(), "incremental backup of the disk (RCT)")
                }
            }
            self.config.disks.push(DiskConfig {
                name: name.clone(),
                size,
                controller: places.of(&d.key),
                bootable: self.config.disks.is_empty(),
            });
            self.vm.disks.push(DiskSummary {
                key: d.key.clone(),
                name: name.clone(),
                size,
                position: places.of(&d.key),
            });
            let counting = CountingSource::new(source);
            self.disks.push(BackupDisk {
                key: d.key.clone(),
                name,
                counters: counting.counters(),
                source: Arc::new(counting),
                changed,
                transport,
                token: ChangeToken(self.checkpoint.clone()),
            });
        }
        crate::controllers::mark_boot(&mut self.config.disks);
        let disks = std::mem::take(&mut self.config.disks);
        let (config, native) = crate::config::capture(&i.client, &self.vm.id, settings, disks)
            .await
            .map_err(|e| i.err(e))?;
        self.config = config;
        self.native = native;
        Ok(())
    }

    async fn cleanup(&mut self, outcome: Outcome) -> Result<ChangeTokens, HvError> {
        self.done = true;
        let i = self.inner.clone();
        let w = i.wmi();
        self.disks.clear();
        let mut tokens = ChangeTokens::default();
        match outcome {
            Outcome::Committed => {
                w.convert_to_reference_point(&self.checkpoint)
                    .await
                    .map_err(|e| i.err(e))?;
                for d in &self.vm.disks {
                    tokens
                        .0
                        .insert(d.key.clone(), ChangeToken(self.checkpoint.clone()));
                }
                if let Some(old) = self.old_reference.take()
                    && old != self.checkpoint
                    && let Err(e) = w.destroy_reference_point(&old).await
                {
                    tracing::warn!(error = %e, reference_point = %old, "cannot remove the previous reference point");
                }
            }
            Outcome::Aborted => w
                .destroy_checkpoint(&self.checkpoint)
                .await
                .map_err(|e| i.err(e))?,
        }
        i.journal(false, "checkpoint", &self.checkpoint);
        Ok(tokens)
    }
}

/// Opens a checkpoint disk through the configured transports, in order.
async fn open_disk(
    i: &Inner,
    label: &str,
    cd: &CheckpointDisk,
    node: Option<&crate::agent::OwnerNode>,
) -> Result<(Arc<dyn ferry_core::BlockSource>, TransportMode), HvError> {
    let mut refused = Vec::new();
    let transports = i
        .transports
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (rank, mode) in i.cfg.transports.iter().enumerate() {
        let Some(t) = transports.iter().find(|t| t.mode() == *mode) else {
            refused.push(match mode {
                TransportMode::Network => format!(
                    "{mode}: no host agent is configured (a [sources.{}.agent] table with port and fingerprint)",
                    i.name
                ),
                _ => format!("{mode}: not available for Hyper-V"),
            });
            continue;
        };
        match t.open_on(cd, node).await {
            Ok(src) => {
                if rank > 0 {
                    tracing::warn!(source = %i.name, disk = %label, transport = %mode, refused = %refused.join("; "), "using a less preferred transport");
                }
                return Ok((src, *mode));
            }
            Err(why) => refused.push(format!("{mode}: {why}")),
        }
    }
    Err(HvError::NoTransport {
        source_name: i.name.clone(),
        disk: label.into(),
        tried: refused.join("; "),
    })
}

/// The ranges of disk `key` changed between reference point `rp` and the checkpoint image
/// `path`, or why RCT cannot say.
async fn rct_since(
    w: &Wmi<'_>,
    rp: &Instance,
    key: &str,
    path: &str,
    size: u64,
) -> Result<ExtentMap, String> {
    let disks = rp.texts("VirtualDiskIdentifiers");
    let rcts = rp.texts("ResilientChangeTrackingIdentifiers");
    let Some(at) = disks.iter().position(|d| d.eq_ignore_ascii_case(key)) else {
        return Err("the previous reference point does not cover this disk".into());
    };
    let Some(rct) = rcts.get(at).filter(|r| !r.is_empty()) else {
        return Err("the previous reference point holds no RCT id for this disk".into());
    };
    let ranges = w
        .changes(path, rct, size)
        .await
        .map_err(|e| format!("RCT cannot tell the changes since {rct}: {e}"))?;
    Ok(ExtentMap::from_extents(
        ranges.into_iter().map(|(o, l)| Extent::new(o, l)),
    ))
}

#[async_trait]
impl BackupSession for HypervSession {
    fn vm(&self) -> &VmSummary {
        &self.vm
    }
    fn consistency(&self) -> ConsistencyLevel {
        self.consistency
    }
    fn config(&self) -> &VmConfig {
        &self.config
    }
    fn native(&self) -> &NativeConfig {
        &self.native
    }
    fn disks(&self) -> &[BackupDisk] {
        &self.disks
    }
    fn method(&self) -> Option<&BackupMethod> {
        Some(&self.method)
    }
    async fn finish(mut self: Box<Self>, outcome: Outcome) -> Result<ChangeTokens, HvError> {
        self.cleanup_following(outcome).await
    }
}

impl Drop for HypervSession {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Dropped without finish: abort in the background; if the process dies first, the
        // journal (and the checkpoint's name) let the next run remove the checkpoint.
        let mut rest = HypervSession {
            inner: self.inner.clone(),
            vm: self.vm.clone(),
            checkpoint: std::mem::take(&mut self.checkpoint),
            method: self.method.clone(),
            consistency: self.consistency,
            config: VmConfig::default(),
            native: self.native.clone(),
            disks: vec![],
            old_reference: None,
            done: true,
            moves: self.moves,
        };
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Err(e) = rest.cleanup_following(Outcome::Aborted).await {
                    tracing::warn!(error = %e, "background cleanup of a dropped backup failed; the next run retries");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_and_markers() {
        assert_eq!(
            volume_of("C:\\ClusterStorage\\Volume1\\vm\\d.vhdx"),
            "c:\\clusterstorage\\volume1"
        );
        assert_eq!(volume_of("E:\\Checkpoints\\vm"), "e:");
        assert_eq!(volume_of("C:\\ProgramData\\x"), "c:");
        assert_eq!(volume_of("\\\\fs\\vms\\a\\b.vhdx"), "\\\\fs\\vms");
        let n = checkpoint_name("host pid 1 start 2");
        assert_eq!(checkpoint_owner(&n), Some("host pid 1 start 2"));
        assert_eq!(checkpoint_owner("Weekly checkpoint"), None);
        let d = |p: &str| VirtualDisk {
            key: "k".into(),
            path: p.into(),
            address: None,
        };
        assert_eq!(
            disk_names(&[d("C:\\a\\disk0.vhdx"), d("C:\\b\\disk0.vhdx"), d("x")]),
            ["disk0", "disk0-1", "x"]
        );
    }
}
