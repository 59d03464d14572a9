//! [`XenDriver`]: the [`HypervisorDriver`] for Citrix Hypervisor / XCP-ng.

use crate::cbt;
use crate::client::{XenClient, api_code};
use async_trait::async_trait;
use base64::Engine as _;
use ferry_core::BlockSource;
use ferry_core::vm::{DiskConfig, Firmware, NicConfig};
use ferry_hv::journal::Journal;
use ferry_hv::{
    BackupDisk, BackupOptions, BackupSession, ChangeToken, ChangeTokens, Changed, CleanupReport,
    ConsistencyLevel, CountingSource, DiskSummary, HvError, HypervisorDriver, HypervisorKind,
    NativeConfig, Outcome, PowerState, RestorePlan, RestoredVm, SourceConfig, TransportMode,
    VmConfig, VmSummary,
};
use serde_json::{Value as J, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Marker put into `other_config` of the snapshots Ferry takes.
pub const SNAPSHOT_MARKER: &str = "ferry-backup";
/// Marker beside [`SNAPSHOT_MARKER`]: the process that took the snapshot
/// ([`ferry_hv::journal::process_owner`]), so an appliance taking over a dead one's VM removes
/// that one's snapshot and no other.
pub const OWNER_MARKER: &str = "ferry-owner";
/// Marker put into `other_config` of the VBDs Ferry plugs into the proxy.
pub const VBD_MARKER: &str = "ferry-hotadd";

struct Inner {
    name: String,
    cfg: SourceConfig,
    client: XenClient,
    journal: Journal,
}

/// The Xen driver for one configured source.
#[derive(Clone)]
pub struct XenDriver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for XenDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenDriver")
            .field("source", &self.inner.name)
            .finish()
    }
}

fn s(v: &J, k: &str) -> String {
    v.get(k).and_then(J::as_str).unwrap_or_default().to_string()
}
fn b(v: &J, k: &str) -> bool {
    v.get(k).and_then(J::as_bool).unwrap_or(false)
}
fn n(v: &J, k: &str) -> u64 {
    match v.get(k) {
        Some(J::Number(x)) => x.as_u64().unwrap_or(0),
        Some(J::String(x)) => x.parse().unwrap_or(0),
        _ => 0,
    }
}
fn refs(v: &J, k: &str) -> Vec<String> {
    v.get(k)
        .and_then(J::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

impl XenDriver {
    /// Logs in to source `name`.
    pub async fn connect(name: &str, cfg: &SourceConfig) -> Result<Self, HvError> {
        let http = cfg.http_options(name)?;
        let password = cfg.password(name)?;
        let client = XenClient::login(&cfg.url, &cfg.username, &password, &http).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.into(),
                cfg: cfg.clone(),
                client,
                journal: Journal::new(&cfg.state_dir(), name),
            }),
        })
    }

    /// The API client (for tools and tests).
    pub fn client(&self) -> &XenClient {
        &self.inner.client
    }

    /// Logs out.
    pub async fn close(&self) {
        self.inner.client.logout().await;
    }
}

impl Inner {
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

    async fn records(&self, class: &str) -> Result<serde_json::Map<String, J>, HvError> {
        match self
            .client
            .call(&format!("{class}.get_all_records"), vec![])
            .await?
        {
            J::Object(m) => Ok(m),
            _ => Ok(Default::default()),
        }
    }

    /// Resolves a guest VM by uuid or name.
    async fn find_vm(
        &self,
        vms: &serde_json::Map<String, J>,
        want: &str,
    ) -> Result<String, HvError> {
        let hits: Vec<&String> = vms
            .iter()
            .filter(|(_, v)| {
                !b(v, "is_a_template") && !b(v, "is_a_snapshot") && !b(v, "is_control_domain")
            })
            .filter(|(r, v)| {
                s(v, "uuid") == want || s(v, "name_label") == want || r.as_str() == want
            })
            .map(|(r, _)| r)
            .collect();
        match hits.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(self.vm_err(want, "no such VM")),
            _ => Err(self.vm_err(
                want,
                format!("{} VMs have this name; use the uuid", hits.len()),
            )),
        }
    }

    /// Destroys a snapshot VM and its VDIs.
    async fn destroy_snapshot(&self, snap: &str) -> Result<(), HvError> {
        let vbds = match self.client.call("VM.get_VBDs", vec![json!(snap)]).await {
            Ok(v) => v.as_array().cloned().unwrap_or_default(),
            Err(e) if api_code(&e) == Some("HANDLE_INVALID") => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut vdis = Vec::new();
        for vbd in vbds {
            let vdi = self.client.call_str("VBD.get_VDI", vec![vbd]).await?;
            if vdi != "OpaqueRef:NULL" {
                vdis.push(vdi);
            }
        }
        self.client.call("VM.destroy", vec![json!(snap)]).await?;
        for vdi in vdis {
            match self.client.call("VDI.destroy", vec![json!(vdi)]).await {
                Ok(_) => {}
                Err(e) if api_code(&e) == Some("HANDLE_INVALID") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn remove_vbd(&self, vbd: &str) -> Result<(), HvError> {
        match self.client.call("VBD.unplug", vec![json!(vbd)]).await {
            Ok(_) => {}
            Err(e)
                if matches!(
                    api_code(&e),
                    Some("DEVICE_ALREADY_DETACHED" | "HANDLE_INVALID")
                ) => {}
            Err(e) => return Err(e),
        }
        match self.client.call("VBD.destroy", vec![json!(vbd)]).await {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some("HANDLE_INVALID") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Cleans up journaled objects: all of them (`ferry cleanup`), or only those of dead
    /// processes (before a backup, while other backups of this journal may be running).
    async fn recover(&self, all: bool) -> Result<CleanupReport, HvError> {
        let mut report = CleanupReport::default();
        let entries = if all {
            self.journal.entries()
        } else {
            self.journal.orphans()
        };
        let entries = entries.map_err(|e| HvError::Disk {
            source_name: self.name.clone(),
            disk: "crash journal".into(),
            message: e.to_string(),
        })?;
        // Attachments first: a plugged VBD keeps its VDI (and so the snapshot) in use.
        let mut ordered = entries.clone();
        ordered.sort_by_key(|e| match e.kind.as_str() {
            "vbd" => 0,
            "task" => 1,
            _ => 2,
        });
        for e in ordered {
            match e.kind.as_str() {
                "vbd" => {
                    self.remove_vbd(&e.id).await?;
                    report.attachments += 1;
                }
                "task" => {
                    // A killed run may have left a finished snapshot task: its result is a
                    // snapshot nobody recorded.
                    if let Ok(rec) = self.client.call("task.get_record", vec![json!(e.id)]).await {
                        if s(&rec, "status") == "pending" {
                            let _ = self.client.call("task.cancel", vec![json!(e.id)]).await;
                        }
                        let res = crate::client::unwrap_value(&s(&rec, "result"));
                        if s(&rec, "name_label") == "Async.VM.snapshot"
                            && res.starts_with("OpaqueRef:")
                        {
                            self.destroy_snapshot(&res).await?;
                            report.snapshots += 1;
                        }
                        let _ = self.client.call("task.destroy", vec![json!(e.id)]).await;
                        report.tasks += 1;
                    }
                }
                "snapshot" => {
                    self.destroy_snapshot(&e.id).await?;
                    report.snapshots += 1;
                }
                _ => {}
            }
            self.journal(false, &e.kind, &e.id);
        }
        if report != CleanupReport::default() {
            tracing::warn!(source = %self.name, snapshots = report.snapshots, attachments = report.attachments,
                tasks = report.tasks, "removed leftovers of an interrupted backup");
        }
        Ok(report)
    }
}

fn power(p: &str) -> PowerState {
    match p {
        "Running" => PowerState::Running,
        "Halted" => PowerState::Off,
        "Paused" | "Suspended" => PowerState::Suspended,
        _ => PowerState::Unknown,
    }
}

fn device_name(userdevice: &str) -> String {
    match userdevice.parse::<u8>() {
        Ok(i) if i < 26 => format!("xvd{}", (b'a' + i) as char),
        _ => format!("disk{userdevice}"),
    }
}

/// Disks of a VM: (userdevice, VBD record, VDI ref, VDI record), in userdevice order.
fn vm_disks(
    vm: &J,
    vbds: &serde_json::Map<String, J>,
    vdis: &serde_json::Map<String, J>,
) -> Vec<(String, J, String, J)> {
    let mut out: Vec<(String, J, String, J)> = refs(vm, "VBDs")
        .iter()
        .filter_map(|r| vbds.get(r))
        .filter(|vb| s(vb, "type") == "Disk" && !b(vb, "empty"))
        .filter_map(|vb| {
            let vdi = s(vb, "VDI");
            vdis.get(&vdi)
                .map(|vr| (s(vb, "userdevice"), vb.clone(), vdi, vr.clone()))
        })
        .collect();
    out.sort_by_key(|(u, ..)| u.parse::<u32>().unwrap_or(u32::MAX));
    out
}

fn vm_config(vm: &J, disks: &[(String, J, String, J)], vifs: &[(J, String)]) -> VmConfig {
    let firmware = match vm
        .get("HVM_boot_params")
        .and_then(|p| p.get("firmware"))
        .and_then(J::as_str)
    {
        Some("uefi")
            if vm
                .get("platform")
                .and_then(|p| p.get("secureboot"))
                .and_then(J::as_str)
                == Some("true") =>
        {
            Firmware::UefiSecureBoot
        }
        Some("uefi") => Firmware::Uefi,
        _ => Firmware::Bios,
    };
    VmConfig {
        cpus: n(vm, "VCPUs_max") as u32,
        memory: n(vm, "memory_static_max"),
        firmware,
        guest_os: vm
            .get("other_config")
            .and_then(|o| o.get("os-type"))
            .and_then(J::as_str)
            .map(String::from),
        disks: disks
            .iter()
            .map(|(u, vb, _, vr)| DiskConfig {
                name: device_name(u),
                size: n(vr, "virtual_size"),
                controller: Some(u.clone()),
                bootable: b(vb, "bootable"),
            })
            .collect(),
        nics: vifs
            .iter()
            .map(|(vif, net)| NicConfig {
                mac: Some(s(vif, "MAC")).filter(|m| !m.is_empty()),
                network: Some(net.clone()).filter(|m| !m.is_empty()),
                model: None,
            })
            .collect(),
    }
}

#[async_trait]
impl HypervisorDriver for XenDriver {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Xen
    }

    async fn list_vms(&self) -> Result<Vec<VmSummary>, HvError> {
        let i = &self.inner;
        let (vms, vbds, vdis, hosts, pools) = (
            i.records("VM").await?,
            i.records("VBD").await?,
            i.records("VDI").await?,
            i.records("host").await?,
            i.records("pool").await?,
        );
        let cluster = pools.values().next().map(|p| s(p, "name_label"));
        let mut out: Vec<VmSummary> = vms
            .values()
            .filter(|v| {
                !b(v, "is_a_template") && !b(v, "is_a_snapshot") && !b(v, "is_control_domain")
            })
            .map(|v| VmSummary {
                id: s(v, "uuid"),
                name: s(v, "name_label"),
                power_state: power(&s(v, "power_state")),
                host: hosts.get(&s(v, "resident_on")).map(|h| s(h, "name_label")),
                cluster: cluster.clone(),
                disks: vm_disks(v, &vbds, &vdis)
                    .into_iter()
                    .map(|(u, _, _, vr)| DiskSummary {
                        key: s(&vr, "uuid"),
                        name: s(&vr, "name_label"),
                        size: n(&vr, "virtual_size"),
                        position: Some(device_name(&u)),
                    })
                    .collect(),
                tags: refs(v, "tags"),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn disk_stores(&self, vm: &VmSummary) -> Result<BTreeMap<String, String>, HvError> {
        let (vdis, srs) = (
            self.inner.records("VDI").await?,
            self.inner.records("SR").await?,
        );
        // An SR by its name, or its uuid when it has none.
        Ok(vdis
            .values()
            .filter(|v| vm.disks.iter().any(|d| d.key == s(v, "uuid")))
            .filter_map(|v| {
                let sr = srs.get(&s(v, "SR"))?;
                let name = Some(s(sr, "name_label"))
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| s(sr, "uuid"));
                Some((s(v, "uuid"), name))
            })
            .collect())
    }

    async fn begin_backup(
        &self,
        vm: &str,
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
    ) -> Result<Box<dyn BackupSession>, HvError> {
        let i = &self.inner;
        i.recover(false).await?;
        let vms = i.records("VM").await?;
        let vm_ref = i.find_vm(&vms, vm).await?;
        let (vbds, vdis) = (i.records("VBD").await?, i.records("VDI").await?);
        let vm_rec = vms[&vm_ref].clone();
        let disks: Vec<_> = vm_disks(&vm_rec, &vbds, &vdis)
            .into_iter()
            .filter(|(u, _, _, vr)| {
                !opts.exclude_disks.iter().any(|x| {
                    *x == s(vr, "uuid") || *x == device_name(u) || *x == s(vr, "name_label")
                })
            })
            .collect();
        let mut cbt_off = BTreeMap::new();
        for (_, _, vdi, vr) in &disks {
            if !b(vr, "cbt_enabled") {
                i.client.call("VDI.enable_cbt", vec![json!(vdi)]).await?;
                tracing::info!(source = %i.name, %vm, disk = %s(vr, "uuid"), "enabled CBT on the disk; this backup reads it in full");
                cbt_off.insert(vdi.clone(), ());
            }
        }
        let snap_name = format!("ferry-{}", s(&vm_rec, "name_label"));
        let snap = i
            .client
            .call_async("VM.snapshot", vec![json!(vm_ref), json!(snap_name)], |t| {
                i.journal(true, "task", t)
            })
            .await;
        // The task is destroyed by call_async; forget it now that its result is known.
        for e in i
            .journal
            .entries()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.kind == "task")
        {
            if snap.is_ok() {
                i.journal(false, "task", &e.id);
            }
        }
        let snap = snap?;
        i.journal(true, "snapshot", &snap);
        let mut session = XenSession {
            inner: self.inner.clone(),
            vm: VmSummary {
                id: s(&vm_rec, "uuid"),
                name: s(&vm_rec, "name_label"),
                power_state: power(&s(&vm_rec, "power_state")),
                host: None,
                cluster: None,
                disks: vec![],
                tags: refs(&vm_rec, "tags"),
            },
            snapshot: snap.clone(),
            config: VmConfig::default(),
            native: NativeConfig {
                format: "xenapi-vm-record".into(),
                record: String::new(),
            },
            disks: vec![],
            vbds: vec![],
            nbd: vec![],
            snap_vdis: vec![],
            old_anchors: vec![],
            done: false,
        };
        match session
            .open(&vm_rec, &disks, opts, previous, &cbt_off)
            .await
        {
            Ok(()) => Ok(Box::new(session)),
            Err(e) => {
                if let Err(c) = session.cleanup(Outcome::Aborted).await {
                    tracing::warn!(error = %c, "cleanup after a failed start left objects behind; the next run removes them");
                }
                Err(e)
            }
        }
    }

    async fn recover(&self) -> Result<CleanupReport, HvError> {
        self.inner.recover(true).await
    }

    async fn remove_leftovers(&self, vm: &str, owner: &str) -> Result<CleanupReport, HvError> {
        let i = &self.inner;
        let mut report = CleanupReport::default();
        let vms = i.records("VM").await?;
        let Some(vm_ref) = vms
            .iter()
            .find(|(r, v)| s(v, "uuid") == vm || r.as_str() == vm)
            .map(|(r, _)| r.clone())
        else {
            return Ok(report);
        };
        let marker = |v: &J, k: &str| {
            v.get("other_config")
                .and_then(|o| o.get(k))
                .and_then(J::as_str)
                .map(str::to_string)
        };
        let vbds = i.records("VBD").await?;
        for (snap, rec) in vms
            .iter()
            .filter(|(_, v)| b(v, "is_a_snapshot") && s(v, "snapshot_of") == vm_ref)
        {
            if marker(rec, SNAPSHOT_MARKER).as_deref() != Some("in-progress")
                || marker(rec, OWNER_MARKER).as_deref() != Some(owner)
            {
                continue;
            }
            // Its disks plugged into the proxy (hot-add) first: a plugged VBD keeps the VDI.
            let disks: Vec<String> = vbds
                .values()
                .filter(|v| s(v, "VM") == *snap)
                .map(|v| s(v, "VDI"))
                .collect();
            for (vbd, _) in vbds
                .iter()
                .filter(|(_, v)| marker(v, VBD_MARKER).is_some() && disks.contains(&s(v, "VDI")))
            {
                i.remove_vbd(vbd).await?;
                report.attachments += 1;
            }
            i.destroy_snapshot(snap).await?;
            report.snapshots += 1;
            tracing::warn!(source = %i.name, %vm, %owner, "removed the snapshot of a backup whose appliance died");
        }
        Ok(report)
    }

    async fn restore_vm(&self, plan: &RestorePlan) -> Result<RestoredVm, HvError> {
        crate::restore::restore(self.client(), &self.inner.name, plan).await
    }

    fn instant(&self) -> Option<&dyn ferry_hv::InstantRecovery> {
        Some(self)
    }

    fn replica(&self) -> Option<&dyn ferry_hv::ReplicaTarget> {
        Some(self)
    }
}

/// One backup in progress.
pub struct XenSession {
    inner: Arc<Inner>,
    vm: VmSummary,
    snapshot: String,
    config: VmConfig,
    native: NativeConfig,
    disks: Vec<BackupDisk>,
    vbds: Vec<String>,
    nbd: Vec<Arc<ferry_nbd::NbdClient>>,
    /// (live VDI uuid, snapshot VDI ref, snapshot VDI uuid)
    snap_vdis: Vec<(String, String, String)>,
    /// Previous CBT anchors, destroyed once the new ones exist.
    old_anchors: Vec<String>,
    done: bool,
}

impl std::fmt::Debug for XenSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenSession")
            .field("vm", &self.vm.name)
            .field("disks", &self.disks.len())
            .finish()
    }
}

impl XenSession {
    async fn open(
        &mut self,
        vm_rec: &J,
        live_disks: &[(String, J, String, J)],
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
        cbt_off: &BTreeMap<String, ()>,
    ) -> Result<(), HvError> {
        let i = self.inner.clone();
        let c = &i.client;
        let (vbds, vdis) = (i.records("VBD").await?, i.records("VDI").await?);
        let snap_rec = c.call("VM.get_record", vec![json!(self.snapshot)]).await?;
        c.call(
            "VM.add_to_other_config",
            vec![
                json!(self.snapshot),
                json!(SNAPSHOT_MARKER),
                json!("in-progress"),
            ],
        )
        .await?;
        c.call(
            "VM.add_to_other_config",
            vec![
                json!(self.snapshot),
                json!(OWNER_MARKER),
                json!(ferry_hv::journal::process_owner()),
            ],
        )
        .await?;
        let snap_disks = vm_disks(&snap_rec, &vbds, &vdis);
        let nets = i.records("network").await?;
        let mut vifs = Vec::new();
        for v in refs(vm_rec, "VIFs") {
            let r = c.call("VIF.get_record", vec![json!(v)]).await?;
            let net = nets
                .get(&s(&r, "network"))
                .map(|n| s(n, "name_label"))
                .unwrap_or_default();
            vifs.push((r, net));
        }
        self.config = vm_config(vm_rec, live_disks, &vifs);
        let mut native = vm_rec.clone();
        if let Some(o) = native.as_object_mut() {
            o.insert(
                "ferry:VIFs".into(),
                J::Array(vifs.iter().map(|(r, _)| r.clone()).collect()),
            );
        }
        self.native.record = native.to_string();
        let srs = i.records("SR").await?;
        let proxy = match &i.cfg.proxy_vm {
            Some(p) if i.cfg.transports.contains(&TransportMode::Hotadd) => {
                let vms = i.records("VM").await?;
                Some(i.find_vm(&vms, p).await?)
            }
            _ => None,
        };
        for (u, _, live_ref, live_rec) in live_disks {
            let live_uuid = s(live_rec, "uuid");
            let Some((_, _, snap_vdi, snap_vdi_rec)) = snap_disks
                .iter()
                .find(|(_, _, _, r)| s(r, "snapshot_of") == *live_ref)
            else {
                return Err(HvError::Disk {
                    source_name: i.name.clone(),
                    disk: live_uuid,
                    message: "the snapshot holds no copy of this disk".into(),
                });
            };
            let snap_uuid = s(snap_vdi_rec, "uuid");
            self.snap_vdis
                .push((live_uuid.clone(), snap_vdi.clone(), snap_uuid.clone()));
            let label = format!("{}/{} (VDI {live_uuid})", self.vm.name, device_name(u));
            // What changed since the previous restore point?
            let prev = previous.and_then(|p| p.0.get(&live_uuid));
            let changed = if opts.force_full {
                Changed::Full {
                    reason: "a full backup was requested".into(),
                }
            } else if cbt_off.contains_key(live_ref) {
                Changed::Full {
                    reason: "CBT was not enabled on the disk before this backup".into(),
                }
            } else if let Some(tok) = prev {
                match self
                    .changed_since(&tok.0, snap_vdi, n(live_rec, "virtual_size"))
                    .await
                {
                    Ok(ext) => Changed::Since(ext),
                    Err(reason) => Changed::Full { reason },
                }
            } else {
                Changed::Full {
                    reason: "no previous restore point".into(),
                }
            };
            match &changed {
                // Asked for, a full read is no surprise worth a warning.
                Changed::Full { reason } if prev.is_some() && !opts.force_full => {
                    tracing::warn!(source = %i.name, disk = %label, %reason, "FULL backup of the disk: changed-block tracking cannot be used")
                }
                Changed::Full { reason } => {
                    tracing::info!(source = %i.name, disk = %label, %reason, "full backup of the disk")
                }
                Changed::Since(e) => {
                    tracing::info!(source = %i.name, disk = %label, changed_bytes = e.total_len(), "incremental backup of the disk (CBT)")
                }
            }
            let sr = srs.get(&s(snap_vdi_rec, "SR")).cloned().unwrap_or(J::Null);
            let (source, transport) = self
                .open_disk(&label, snap_vdi, &snap_uuid, &sr, proxy.as_deref())
                .await?;
            let counting = CountingSource::new(source);
            self.disks.push(BackupDisk {
                key: live_uuid,
                name: device_name(u),
                counters: counting.counters(),
                source: Arc::new(counting),
                changed,
                transport,
                token: ChangeToken(snap_uuid),
            });
        }
        // Once this backup commits, its snapshot VDIs are the anchors: every anchor of the
        // previous restore point goes, used or not (a CBT reset, a forced full or a disk that
        // left the VM would otherwise strand a cbt_metadata VDI on the SR forever).
        self.old_anchors = previous
            .map(|p| p.0.values().map(|t| t.0.clone()).collect())
            .unwrap_or_default();
        let _ = (vbds, snap_rec);
        Ok(())
    }

    /// Changed extents between the anchor `prev_uuid` and the new snapshot, or why not.
    async fn changed_since(
        &self,
        prev_uuid: &str,
        snap_vdi: &str,
        size: u64,
    ) -> Result<ferry_core::ExtentMap, String> {
        let c = &self.inner.client;
        let prev = c
            .call_str("VDI.get_by_uuid", vec![json!(prev_uuid)])
            .await
            .map_err(|e| format!("the previous CBT anchor VDI {prev_uuid} is gone ({e})"))?;
        let b64 = c
            .call_str("VDI.list_changed_blocks", vec![json!(prev), json!(snap_vdi)])
            .await
            .map_err(|e| format!("CBT cannot compare with VDI {prev_uuid}: CBT was disabled, reset or the disk migrated ({e})"))?;
        let bits = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("list_changed_blocks answered invalid base64: {e}"))?;
        cbt::decode(&bits, size).map_err(|e| e.to_string())
    }

    async fn open_disk(
        &mut self,
        label: &str,
        snap_vdi: &str,
        snap_uuid: &str,
        sr: &J,
        proxy: Option<&str>,
    ) -> Result<(Arc<dyn BlockSource>, TransportMode), HvError> {
        let i = self.inner.clone();
        let mut refused = Vec::new();
        for (rank, mode) in i.cfg.transports.iter().enumerate() {
            let r = match mode {
                TransportMode::San => self.open_san(snap_uuid, sr).await,
                TransportMode::Hotadd => self.open_hotadd(snap_vdi, proxy).await,
                TransportMode::Network => self.open_nbd(snap_vdi).await,
            };
            match r {
                Ok(src) => {
                    if rank > 0 {
                        tracing::warn!(source = %i.name, disk = %label, transport = %mode, refused = %refused.join("; "),
                            "using a less preferred transport");
                    } else {
                        tracing::info!(source = %i.name, disk = %label, transport = %mode, "transport chosen");
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

    async fn open_san(&self, snap_uuid: &str, sr: &J) -> Result<Arc<dyn BlockSource>, String> {
        let sr_uuid = s(sr, "uuid");
        let dir = self
            .inner
            .cfg
            .san_paths
            .get(&sr_uuid)
            .ok_or_else(|| format!("SR {sr_uuid} has no san-paths entry"))?;
        let file = match s(sr, "type").as_str() {
            "lvm" | "lvmoiscsi" | "lvmohba" => dir.join(format!("VHD-{snap_uuid}")),
            "ext" | "nfs" | "file" | "smb" => dir.join(format!("{snap_uuid}.vhd")),
            other => return Err(format!("SR type `{other}` cannot be read directly")),
        };
        let img = ferry_image::open_image(&file)
            .await
            .map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(img.source)
    }

    async fn open_hotadd(
        &mut self,
        snap_vdi: &str,
        proxy: Option<&str>,
    ) -> Result<Arc<dyn BlockSource>, String> {
        let proxy = proxy.ok_or("no proxy-vm configured")?;
        let c = &self.inner.client;
        let rec = json!({"VM": proxy, "VDI": snap_vdi, "userdevice": "autodetect", "bootable": false,
            "mode": "RO", "type": "Disk", "empty": false, "other_config": {VBD_MARKER: "1"},
            "qos_algorithm_type": "", "qos_algorithm_params": {}});
        let vbd = c
            .call_str("VBD.create", vec![rec])
            .await
            .map_err(|e| e.to_string())?;
        self.inner.journal(true, "vbd", &vbd);
        self.vbds.push(vbd.clone());
        c.call("VBD.plug", vec![json!(vbd)])
            .await
            .map_err(|e| e.to_string())?;
        let dev = c
            .call_str("VBD.get_device", vec![json!(vbd)])
            .await
            .map_err(|e| e.to_string())?;
        let path = self.inner.cfg.hotadd_device_dir.join(&dev);
        let f =
            ferry_image::FileSource::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Arc::new(f))
    }

    async fn open_nbd(&mut self, snap_vdi: &str) -> Result<Arc<dyn BlockSource>, String> {
        let c = &self.inner.client;
        let info = c
            .call("VDI.get_nbd_info", vec![json!(snap_vdi)])
            .await
            .map_err(|e| e.to_string())?;
        let Some(first) = info.as_array().and_then(|a| a.first()).cloned() else {
            return Err(
                "VDI.get_nbd_info is empty: no network has purpose `nbd` (network.add_purpose)"
                    .into(),
            );
        };
        let port = n(&first, "port") as u16;
        let mut cfg = ferry_nbd::NbdConfig::new(
            ferry_nbd::Address::Tcp {
                host: s(&first, "address"),
                port,
            },
            s(&first, "exportname"),
        );
        let cert = s(&first, "cert");
        if cert.is_empty() {
            return Err("the host offers NBD without TLS (purpose insecure_nbd); refusing to send the session over plain TCP".into());
        }
        let fp = cbt::pem_fingerprint(&cert)
            .ok_or("the NBD certificate from get_nbd_info is not valid PEM")?;
        cfg = cfg.with_tls_fingerprint(&fp).map_err(|e| e.to_string())?;
        cfg.tls_required = true;
        cfg.connections = self.inner.cfg.concurrency.clamp(1, 4);
        let client = ferry_nbd::NbdClient::connect(cfg)
            .await
            .map_err(|e| e.to_string())?;
        let client = Arc::new(client);
        self.nbd.push(client.clone());
        Ok(client)
    }

    async fn cleanup(&mut self, outcome: Outcome) -> Result<ChangeTokens, HvError> {
        self.done = true;
        let i = self.inner.clone();
        let c = &i.client;
        for n in self.nbd.drain(..) {
            n.close().await;
        }
        self.disks.clear();
        let mut first_err = None;
        for vbd in std::mem::take(&mut self.vbds) {
            match i.remove_vbd(&vbd).await {
                Ok(()) => i.journal(false, "vbd", &vbd),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove hot-add VBD; the next run retries");
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let mut tokens = ChangeTokens::default();
        match outcome {
            Outcome::Committed => {
                // Keep only CBT metadata of the snapshot: it anchors the next incremental.
                for (live, vdi, uuid) in &self.snap_vdis {
                    c.call("VDI.data_destroy", vec![json!(vdi)]).await?;
                    tokens.0.insert(live.clone(), ChangeToken(uuid.clone()));
                }
                c.call("VM.destroy", vec![json!(self.snapshot)]).await?;
                for old in std::mem::take(&mut self.old_anchors) {
                    let Ok(r) = c.call_str("VDI.get_by_uuid", vec![json!(old)]).await else {
                        continue; // already gone
                    };
                    // Tokens come from the repository: destroy only a CBT anchor, never a disk
                    // that happens to carry the uuid.
                    match c.call_str("VDI.get_type", vec![json!(r)]).await {
                        Ok(t) if t == "cbt_metadata" => {
                            if let Err(e) = c.call("VDI.destroy", vec![json!(r)]).await {
                                tracing::warn!(error = %e, anchor = %old, "cannot remove the previous CBT anchor");
                            }
                        }
                        Ok(t) => tracing::warn!(anchor = %old, vdi_type = %t,
                            "the previous change token names a VDI that is not a CBT anchor; left alone"),
                        Err(e) => {
                            tracing::warn!(error = %e, anchor = %old, "cannot check the previous CBT anchor")
                        }
                    }
                }
            }
            Outcome::Aborted => i.destroy_snapshot(&self.snapshot).await?,
        }
        i.journal(false, "snapshot", &self.snapshot);
        Ok(tokens)
    }
}

#[async_trait]
impl BackupSession for XenSession {
    fn vm(&self) -> &VmSummary {
        &self.vm
    }
    fn consistency(&self) -> ConsistencyLevel {
        // VM.snapshot without a guest agent quiesce is crash-consistent.
        ConsistencyLevel::Crash
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
    async fn finish(mut self: Box<Self>, outcome: Outcome) -> Result<ChangeTokens, HvError> {
        self.cleanup(outcome).await
    }
}

impl Drop for XenSession {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Dropped without finish (an error or Ctrl-C upstream): abort in the background; if
        // the process dies first, the journal lets the next run finish the job.
        let mut rest = XenSession {
            inner: self.inner.clone(),
            vm: self.vm.clone(),
            snapshot: std::mem::take(&mut self.snapshot),
            config: VmConfig::default(),
            native: self.native.clone(),
            disks: vec![],
            vbds: std::mem::take(&mut self.vbds),
            nbd: std::mem::take(&mut self.nbd),
            snap_vdis: vec![],
            old_anchors: vec![],
            done: true,
        };
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Err(e) = rest.cleanup(Outcome::Aborted).await {
                    tracing::warn!(error = %e, "background cleanup of a dropped backup failed; the next run retries");
                }
            });
        }
    }
}
