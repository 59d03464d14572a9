//! Backing up one VM of a hypervisor source: the wiring between a driver's
//! [`BackupSession`](ferry_hv::BackupSession) and [`ferry_engine::backup`]. Used by
//! `ferry backup --source` and by `ferry demo`.
//!
//! Change tokens live in the restore point (ADR 0054): each disk's stable key and the driver's
//! token are labels (`ferry.disk.<name>.key`, `ferry.disk.<name>.token`), and the token is also
//! the disk's `change_token`, which the engine replaces by its distrust marker when change
//! tracking fails verification. The next backup of the VM turns those labels back into
//! [`ChangeTokens`] for the driver.

use anyhow::Context;
use ferry_core::ExtentMap;
use ferry_engine::{BackupMode, BackupOptions, BackupReport, UNTRUSTED_TOKEN};
use ferry_hv::{
    BackupOptions as HvOptions, ChangeToken, ChangeTokens, Changed, HypervisorDriver,
    HypervisorKind, Outcome, TransportMode, VmSummary,
};
use ferry_repo::{Manifest, Repository, SnapshotMeta, VmIdentity};
use serde::Serialize;
use std::collections::BTreeMap;

/// Label holding the stable key of disk `name`.
pub fn key_label(name: &str) -> String {
    format!("ferry.disk.{name}.key")
}

/// Label holding the driver's change token of disk `name`.
pub fn token_label(name: &str) -> String {
    format!("ferry.disk.{name}.token")
}

/// How one disk of a source backup was read, beside the engine's report.
#[derive(Debug, Clone, Serialize)]
pub struct SourceDisk {
    /// Disk name in the restore point.
    pub name: String,
    /// The hypervisor's stable key of the disk.
    pub key: String,
    /// Transport used.
    pub transport: TransportMode,
    /// Why the disk was read in full (`None`: changed blocks only).
    pub full_reason: Option<String>,
    /// Bytes change tracking reported changed (changed-block backups).
    pub cbt_changed_bytes: Option<u64>,
    /// `read_at` calls made on the hypervisor's source.
    pub source_reads: u64,
    /// Bytes read from the hypervisor's source.
    pub source_read_bytes: u64,
    /// The change token stored for the next backup.
    pub token: String,
}

/// What backing up one VM did.
#[derive(Debug, Clone)]
pub struct VmBackup {
    /// The engine's report.
    pub report: BackupReport,
    /// The VM's display name.
    pub vm_name: String,
    /// The configured source.
    pub source: String,
    /// How the data travelled, e.g. `network (nbd+tls)`.
    pub transport: String,
    /// Consistency reached.
    pub consistency: ferry_core::vm::ConsistencyLevel,
    /// How the snapshot was taken and why (Hyper-V's child-VM or saved-state method).
    pub method: Option<ferry_hv::BackupMethod>,
    /// Per disk.
    pub disks: Vec<SourceDisk>,
}

impl VmBackup {
    /// The engine report with the driver's view merged into each disk, as `--json` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.report).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("vm_name".into(), self.vm_name.clone().into());
            o.insert("source".into(), self.source.clone().into());
            o.insert("transport".into(), self.transport.clone().into());
            o.insert(
                "consistency".into(),
                serde_json::to_value(self.consistency).unwrap_or_default(),
            );
            if let Some(m) = &self.method {
                o.insert("method".into(), serde_json::to_value(m).unwrap_or_default());
            }
            if let Some(disks) = o.get_mut("disks").and_then(|d| d.as_array_mut()) {
                for d in disks {
                    let name = d["name"].as_str().unwrap_or_default().to_string();
                    let Some(extra) = self.disks.iter().find(|x| x.name == name) else {
                        continue;
                    };
                    if let (Some(d), serde_json::Value::Object(e)) = (
                        d.as_object_mut(),
                        serde_json::to_value(extra).unwrap_or_default(),
                    ) {
                        for (k, val) in e {
                            if k != "name" {
                                d.insert(k, val);
                            }
                        }
                    }
                }
            }
        }
        v
    }

    /// Lines for the human summary (after the engine's).
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "  VM {} from source `{}`: {} snapshot, {}\n",
            self.vm_name,
            self.source,
            serde_json::to_value(self.consistency)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            self.transport
        );
        if let Some(m) = &self.method {
            let _ = writeln!(s, "    method {}: {}", m.name, m.reason);
        }
        for d in &self.disks {
            let how = match (&d.full_reason, d.cbt_changed_bytes) {
                (Some(r), _) => format!("full read ({r})"),
                (None, Some(b)) => format!(
                    "changed blocks: {} changed per CBT",
                    ferry_core::size::human_bytes(b)
                ),
                (None, None) => "changed blocks".into(),
            };
            let _ = writeln!(
                s,
                "    {} via {}: {how}; {} read from the source",
                d.name,
                d.transport,
                ferry_core::size::human_bytes(d.source_read_bytes)
            );
        }
        s
    }
}

/// How a transport mode moves data on this kind of hypervisor, for the restore point.
pub fn transport_label(kind: HypervisorKind, mode: TransportMode) -> String {
    match (kind, mode) {
        (HypervisorKind::Xen, TransportMode::Network) => "network (nbd+tls)".into(),
        (HypervisorKind::Xen, TransportMode::Hotadd) => "hotadd (vbd on the proxy)".into(),
        (HypervisorKind::Xen, TransportMode::San) => "san (vhd chain)".into(),
        (HypervisorKind::HyperV, TransportMode::San) => "san (vhdx chain)".into(),
        (HypervisorKind::HyperV, TransportMode::Network) => "network (host agent, nbd+tls)".into(),
        (_, m) => m.to_string(),
    }
}

/// Resolves `want` (id or name) in the inventory.
pub fn find_vm<'a>(vms: &'a [VmSummary], want: &str) -> anyhow::Result<&'a VmSummary> {
    if let Some(v) = vms.iter().find(|v| v.id == want) {
        return Ok(v);
    }
    let hits: Vec<&VmSummary> = vms.iter().filter(|v| v.name == want).collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => anyhow::bail!(
            "no VM `{want}` on this source (VMs: {})",
            vms.iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        many => anyhow::bail!(
            "{} VMs are named `{want}`; use the id ({})",
            many.len(),
            many.iter()
                .map(|v| v.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The latest restore point of VM `id`: the same one the engine takes as previous.
async fn previous_restore_point(repo: &Repository, id: &str) -> anyhow::Result<Option<Manifest>> {
    for sid in repo.snapshot_ids().await?.into_iter().rev() {
        match repo.load_manifest(&sid).await {
            Ok(m) if m.meta.vm.id == id => return Ok(Some(m)),
            Ok(_) => {}
            Err(e) => tracing::warn!(snapshot = %sid, error = %e, "skipping unreadable manifest"),
        }
    }
    Ok(None)
}

/// The previous restore point's disks: key → (name, token).
#[derive(Debug, Default)]
struct Previous {
    id: String,
    disks: BTreeMap<String, (String, String)>,
    /// Disk names whose change tracking the engine distrusted last time.
    untrusted: Vec<String>,
}

impl Previous {
    fn from_manifest(m: &Manifest, source: &str, kind: HypervisorKind) -> Option<Self> {
        if m.meta.hypervisor != kind || m.meta.source != source {
            tracing::warn!(previous = %m.id, previous_source = %m.meta.source, source,
                "the previous restore point of this VM came from another source; its change tokens do not apply: reading every disk in full");
            return None;
        }
        let mut disks = BTreeMap::new();
        let untrusted = m
            .disks
            .iter()
            .filter(|d| d.change_token.as_deref() == Some(UNTRUSTED_TOKEN))
            .map(|d| d.name.clone())
            .collect();
        for d in &m.disks {
            let (Some(key), Some(token)) = (
                m.meta.labels.get(&key_label(&d.name)),
                m.meta.labels.get(&token_label(&d.name)),
            ) else {
                continue;
            };
            disks.insert(key.clone(), (d.name.clone(), token.clone()));
        }
        Some(Self {
            id: m.id.clone(),
            disks,
            untrusted,
        })
    }

    fn tokens(&self) -> ChangeTokens {
        ChangeTokens(
            self.disks
                .iter()
                .map(|(k, (_, t))| (k.clone(), ChangeToken(t.clone())))
                .collect(),
        )
    }
}

/// Options of one VM backup.
#[derive(Debug, Clone, Default)]
pub struct VmBackupOptions {
    /// Engine tuning, cancellation and progress.
    pub engine: BackupOptions,
    /// Read every disk in full.
    pub force_full: bool,
    /// Disks to leave out (key or name).
    pub exclude_disks: Vec<String>,
}

/// Backs up `vm` of `driver` (configured as `source`) into `repo`: snapshot, read, commit, and
/// the session ends either way — committed after the restore point is written, aborted on any
/// error or cancellation (the error is returned).
pub async fn backup_vm(
    driver: &dyn HypervisorDriver,
    source: &str,
    repo: &Repository,
    vm: &VmSummary,
    opts: &VmBackupOptions,
) -> anyhow::Result<VmBackup> {
    let kind = driver.kind();
    let prev = previous_restore_point(repo, &vm.id)
        .await?
        .and_then(|m| Previous::from_manifest(&m, source, kind));
    let tokens = prev.as_ref().map(Previous::tokens);
    if let Some(p) = &prev {
        tracing::info!(vm = %vm.name, previous = %p.id, tokens = p.disks.len(), "changes are asked since the previous restore point");
    }
    let hv_opts = HvOptions {
        force_full: opts.force_full,
        exclude_disks: opts.exclude_disks.clone(),
    };
    let session = driver
        .begin_backup(&vm.id, &hv_opts, tokens.as_ref())
        .await
        .with_context(|| format!("cannot start the backup of VM `{}`", vm.name))?;

    let mut disks = Vec::new();
    let mut info = Vec::new();
    let mut counters = Vec::new();
    let mut labels = BTreeMap::new();
    let mut modes: Vec<String> = Vec::new();
    for d in session.disks() {
        let (changed, full_reason): (Option<ExtentMap>, Option<String>) = match &d.changed {
            Changed::Since(e) => match prev.as_ref().and_then(|p| p.disks.get(&d.key)) {
                Some((name, _)) if *name == d.name => (Some(e.clone()), None),
                // The previous index of this name belongs to another disk: changed blocks
                // against it would restore a mix of two disks.
                Some((name, _)) => {
                    let why = format!(
                        "the disk was `{name}` in the previous restore point and is `{}` now",
                        d.name
                    );
                    tracing::warn!(vm = %vm.name, disk = %d.name, reason = %why, "FULL read of the disk");
                    (None, Some(why))
                }
                None => (
                    None,
                    Some("the previous restore point holds no token for this disk".into()),
                ),
            },
            Changed::Full { reason } => (None, Some(reason.clone())),
        };
        // The engine reads such a disk in full itself; say so here too, with the reason.
        let prev_untrusted =
            changed.is_some() && prev.as_ref().is_some_and(|p| p.untrusted.contains(&d.name));
        if prev_untrusted {
            tracing::warn!(vm = %vm.name, disk = %d.name,
                "FULL read of the disk: its change tracking failed verification in the previous restore point");
        }
        let mode = transport_label(kind, d.transport);
        if !modes.contains(&mode) {
            modes.push(mode);
        }
        labels.insert(key_label(&d.name), d.key.clone());
        labels.insert(token_label(&d.name), d.token.0.clone());
        counters.push(d.counters.clone());
        info.push(SourceDisk {
            name: d.name.clone(),
            key: d.key.clone(),
            transport: d.transport,
            full_reason: if prev_untrusted {
                Some("change tracking failed verification in the previous restore point".into())
            } else {
                full_reason
            },
            cbt_changed_bytes: changed.as_ref().map(ExtentMap::total_len),
            source_reads: 0,
            source_read_bytes: 0,
            token: d.token.0.clone(),
        });
        disks.push(ferry_engine::BackupDisk {
            name: d.name.clone(),
            source: d.source.clone(),
            changed,
            change_token: Some(d.token.0.clone()),
        });
    }
    let transport = modes.join(", ");
    let method = session.method().cloned();
    if let Some(m) = &method {
        labels.insert(ferry_hv::METHOD_LABEL.into(), m.name.clone());
        labels.insert(ferry_hv::METHOD_REASON_LABEL.into(), m.reason.clone());
    }
    let meta = SnapshotMeta {
        vm: VmIdentity {
            id: session.vm().id.clone(),
            name: session.vm().name.clone(),
        },
        source: source.to_string(),
        hypervisor: kind,
        consistency: session.consistency(),
        config: session.config().clone(),
        native_config: Some(session.native().clone()),
        transport: Some(transport.clone()),
        labels,
    };
    let consistency = session.consistency();
    let r = ferry_engine::backup(repo, meta, disks, &opts.engine).await;
    for (i, c) in info.iter_mut().zip(&counters) {
        i.source_reads = c.reads();
        i.source_read_bytes = c.bytes();
    }
    let report = match r {
        Ok(report) => report,
        Err(e) => {
            if let Err(c) = session.finish(Outcome::Aborted).await {
                tracing::warn!(vm = %vm.name, error = %c, "cannot remove the snapshot after a failed backup; the next run of this source removes it");
            }
            return Err(anyhow::Error::new(e).context(format!(
                "backup of VM `{}` failed; no restore point was written",
                vm.name
            )));
        }
    };
    let kept = session.finish(Outcome::Committed).await.with_context(|| {
        format!(
            "restore point {} of VM `{}` was written, but the snapshot on the source could not be turned into change anchors (the next run removes what is left; its backup may read every disk)",
            report.snapshot, vm.name
        )
    })?;
    // The engine may still have read a disk in full (no usable previous index, or a
    // verification mismatch just now): the report then says why, like the driver's fulls.
    for d in &mut info {
        let Some(r) = report.disks.iter().find(|r| r.name == d.name) else {
            continue;
        };
        if d.full_reason.is_none() && r.mode != BackupMode::ChangedBlocks {
            d.full_reason = Some(
                if r.verify
                    .as_ref()
                    .is_some_and(|v| !v.mismatched_offsets.is_empty())
                {
                    "change tracking failed verification (sampled unchanged chunks differ)"
                } else {
                    "the previous restore point has no index of this disk with the same size"
                }
                .into(),
            );
        }
    }
    for d in &info {
        if kept.0.values().all(|t| t.0 != d.token) {
            tracing::warn!(vm = %vm.name, disk = %d.name, "the driver kept no anchor for the token this restore point stores; the next backup of the disk will be full");
        }
    }
    Ok(VmBackup {
        report,
        vm_name: vm.name.clone(),
        source: source.to_string(),
        transport,
        consistency,
        method,
        disks: info,
    })
}
