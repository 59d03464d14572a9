//! Hyper-V as a replica target (ADR 0175), the Hyper-V side of ADRs 0130–0131.
//!
//! - The standby is the whole-VM restore ([`crate::restore`]), powered off, named by the
//!   caller, its `Notes` carrying the marks `ferry.replica.job=<job>` and
//!   `ferry.replica.role=standby|test` (one per line) from `DefineSystem` on, so a killed run
//!   finds it (`replica_marked`).
//! - Changed extents are written in place into each disk's *current* file (the drive's
//!   `HostResource`: after the first recovery point, the newest checkpoint's `.avhdx`), whole
//!   VHDX blocks at a time with `ferry-image`'s updater (data, fsync, BAT entry, fsync), through
//!   `san-paths` or the host agent's `update:vhdx` request (ADR 0176), in the source's
//!   `transports` order. The point a checkpoint holds is never written.
//! - Recovery points are standard checkpoints (`Msvm_VirtualSystemSnapshotService`:
//!   `CreateSnapshot` with `SnapshotType` 2, `ApplySnapshot`, `DestroySnapshot` — the host
//!   merges), listed oldest first by `CreationTime`.
//! - A test copy is a whole-VM restore of the point's content (its checkpoint's images read
//!   through `san-paths`), marked `role=test`, its network adapters on a new private switch
//!   `<copy> (isolated)` ([`crate::isolated`]) removed with it.
//! - Power is `RequestStateChange` (2 on; off after a clean guest shutdown, [`crate::shutdown`]), marks are `ModifySystemSettings` of `Notes`,
//!   removal is `DestroySystem` plus the VM's folder (through `san-paths`).

use crate::cim::{self, Epr, Instance, Param};
use crate::driver::{HypervDriver, hv, power as power_state};
use crate::restore::destroy_vm;
use crate::wmi::{self, Wmi};
use async_trait::async_trait;
use ferry_core::{BlockSource, ExtentMap};
use ferry_hv::TransportMode;
use ferry_hv::{
    HvError, PowerState, RecoveryPoint, ReplicaRole, ReplicaTarget, ReplicaVm, RestorePlan,
};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// The `Notes` line naming the job a VM belongs to.
pub const JOB_KEY: &str = "ferry.replica.job";
/// The `Notes` line naming its role in the job, `standby` or `test`.
pub const ROLE_KEY: &str = "ferry.replica.role";
/// `VirtualSystemType` of a standard checkpoint.
pub const STANDARD_CHECKPOINT: &str = "Microsoft:Hyper-V:Snapshot:Realized";
/// `CreateSnapshot`'s `SnapshotType` of a standard checkpoint.
const STANDARD_SNAPSHOT: &str = "2";
const SNAPSHOT_SERVICE: &str = "Msvm_VirtualSystemSnapshotService";
const VSSD: &str = "Msvm_VirtualSystemSettingData";

fn role_name(r: ReplicaRole) -> &'static str {
    match r {
        ReplicaRole::Standby => "standby",
        ReplicaRole::Test => "test",
    }
}

/// The value of mark `key` in `notes` (the last line `key=value` counts).
pub fn mark(notes: &str, key: &str) -> Option<String> {
    notes
        .lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .next_back()
        .filter(|v| !v.is_empty())
}

/// `notes` without Ferry's replica marks, then `marks` (`key=value` lines) if any.
pub fn with_marks(notes: &str, marks: &[(&str, &str)]) -> String {
    let mut out: Vec<String> = notes
        .lines()
        .filter(|l| {
            !l.trim()
                .split_once('=')
                .is_some_and(|(k, _)| k.trim() == JOB_KEY || k.trim() == ROLE_KEY)
        })
        .map(str::to_string)
        .collect();
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out.extend(marks.iter().map(|(k, v)| format!("{k}={v}")));
    out.join("\n")
}

/// The lines `restore_noted` appends to a restored VM's notes.
fn mark_lines(job: &str, role: ReplicaRole) -> String {
    format!("\n{JOB_KEY}={job}\n{ROLE_KEY}={}", role_name(role))
}

impl HypervDriver {
    fn api(&self, call: &str, message: impl Into<String>) -> HvError {
        HvError::Api {
            source_name: self.parts().1.into(),
            call: call.into(),
            message: message.into(),
            retryable: false,
        }
    }

    fn err(&self, e: crate::HypervError) -> HvError {
        hv(self.parts().1, e)
    }

    /// The VM `id`, `None` when the host has none.
    async fn vm_now(&self, id: &str) -> Result<Option<Instance>, HvError> {
        match Wmi::new(self.parts().0).vm(id).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if wmi::is_gone(&e) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn vm_must(&self, id: &str) -> Result<Instance, HvError> {
        self.vm_now(id).await?.ok_or_else(|| HvError::Vm {
            source_name: self.parts().1.into(),
            vm: id.into(),
            message: "no such VM on the host".into(),
        })
    }

    /// The VM's realized settings.
    async fn vssd(&self, id: &str) -> Result<Instance, HvError> {
        Wmi::new(self.parts().0)
            .settings(id)
            .await
            .map_err(|e| self.err(e))?
            .ok_or_else(|| {
                self.api(
                    "Msvm_VirtualSystemSettingData",
                    format!("VM {id} has no settings"),
                )
            })
    }

    async fn snapshot_service(&self) -> Result<Epr, HvError> {
        Wmi::new(self.parts().0)
            .service(SNAPSHOT_SERVICE)
            .await
            .map_err(|e| self.err(e))
    }

    /// Turns `id` off unless it is off.
    async fn off(&self, v: &Instance) -> Result<(), HvError> {
        if v.text("EnabledState") != Some("3") {
            let id = v.text("Name").unwrap_or("");
            Wmi::new(self.parts().0)
                .request_state(id, "3")
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Rewrites the `Notes` of VM `id` with `marks`.
    async fn set_marks(&self, id: &str, marks: &[(&str, &str)]) -> Result<(), HvError> {
        let (c, ..) = self.parts();
        let s = self.vssd(id).await?;
        let notes = with_marks(s.text("Notes").unwrap_or(""), marks);
        let iid = s.text("InstanceID").unwrap_or("").to_string();
        let svc = Wmi::new(c)
            .service("Msvm_VirtualSystemManagementService")
            .await
            .map_err(|e| self.err(e))?;
        c.invoke(
            &svc,
            "ModifySystemSettings",
            &[Param::Embedded(
                "SystemSettings".into(),
                // `Notes` is `string Notes[]` in root/virtualization/v2.
                crate::restore::embedded(
                    VSSD,
                    &[
                        ("InstanceID", "string", vec![iid]),
                        ("Notes", "string", vec![notes]),
                    ],
                    &["Notes"],
                ),
            )],
        )
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The standard checkpoint `point` (its settings).
    async fn checkpoint(&self, point: &str) -> Result<Option<Instance>, HvError> {
        match self.parts().0.get(&Wmi::settings_epr(point)).await {
            Ok(i) if i.text("VirtualSystemType") == Some(STANDARD_CHECKPOINT) => Ok(Some(i)),
            Ok(_) => Ok(None),
            Err(e) if wmi::is_gone(&e) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }
}

fn replica_vm(v: &Instance) -> ReplicaVm {
    ReplicaVm {
        id: v.text("Name").unwrap_or("").into(),
        name: v.text("ElementName").unwrap_or("").into(),
        power_state: power_state(v.text("EnabledState")),
    }
}

/// Writes the whole VHDX blocks of the file at `path` that `extents` touch, from `src` (the
/// part of a block past `src`'s end is zeros); the payload bytes written.
async fn write_blocks(
    path: PathBuf,
    src: &dyn BlockSource,
    extents: &ExtentMap,
) -> Result<u64, String> {
    let join = |e: tokio::task::JoinError| format!("writer task: {e}");
    let shown = path.display().to_string();
    let mut u = tokio::task::spawn_blocking(move || ferry_image::VhdxUpdater::open(&path))
        .await
        .map_err(join)?
        .map_err(|e| e.to_string())?;
    let size = src.size();
    if size > u.size() {
        return Err(format!(
            "{shown} has {} bytes, the restore point's disk {size}",
            u.size()
        ));
    }
    let bs = u.block_size();
    let mut blocks = BTreeSet::new();
    for e in extents.iter() {
        let end = e.end().min(size);
        if e.offset < end {
            blocks.extend(e.offset / bs..=(end - 1) / bs);
        }
    }
    let mut sent = 0;
    for b in blocks {
        let len = u.block_len(b);
        let mut buf = vec![0u8; len as usize];
        let start = b * bs;
        let n = size.saturating_sub(start).min(len) as usize;
        src.read_at(start, &mut buf[..n])
            .await
            .map_err(|e| format!("read at {start}: {e}"))?;
        let (back, r) = tokio::task::spawn_blocking(move || {
            let r = u.write_block(b, &buf);
            (u, r)
        })
        .await
        .map_err(join)?;
        u = back;
        sent += r.map_err(|e| e.to_string())?;
    }
    tokio::task::spawn_blocking(move || u.finish())
        .await
        .map_err(join)?
        .map_err(|e| e.to_string())?;
    Ok(sent)
}

#[async_trait]
impl ReplicaTarget for HypervDriver {
    async fn replica_create(&self, plan: &RestorePlan, job: &str) -> Result<ReplicaVm, HvError> {
        let (c, name, cfg, journal) = self.parts();
        let mut plan = ferry_hv::standby_plan(plan);
        // A standby is off until a failover: a NIC whose switch this host lacks is added
        // unconnected (said in a WARN) rather than refusing the replica.
        let switches: Vec<String> = c
            .enumerate("Msvm_VirtualEthernetSwitch", None)
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .filter_map(|s| s.text("ElementName").map(str::to_string))
            .collect();
        for (i, n) in plan.config.nics.iter_mut().enumerate() {
            if let Some(net) = n.network.clone()
                && !switches.iter().any(|s| s.eq_ignore_ascii_case(&net))
            {
                tracing::warn!(source = %name, vm = %plan.name, "replica: NIC {i}: the host has no virtual switch `{net}` (its switches: {}); the standby's adapter is left unconnected: connect it before a failover", switches.join(", "));
                n.network = None;
            }
        }
        let vm = crate::restore::restore_noted(
            c,
            name,
            cfg,
            journal,
            &plan,
            &mark_lines(job, ReplicaRole::Standby),
        )
        .await?;
        Ok(ReplicaVm::standby(vm))
    }

    async fn replica_marked(
        &self,
        job: &str,
        role: ReplicaRole,
    ) -> Result<Vec<ReplicaVm>, HvError> {
        let (c, ..) = self.parts();
        let q = format!(
            "SELECT * FROM {VSSD} WHERE VirtualSystemType = '{}'",
            wmi::REALIZED
        );
        let all = c.enumerate(VSSD, Some(&q)).await.map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for s in all {
            let notes = s.text("Notes").unwrap_or("");
            if mark(notes, JOB_KEY).as_deref() != Some(job)
                || mark(notes, ROLE_KEY).as_deref() != Some(role_name(role))
            {
                continue;
            }
            if let Some(id) = s.text("VirtualSystemIdentifier")
                && let Some(v) = self.vm_now(id).await?
            {
                out.push(replica_vm(&v));
            }
        }
        Ok(out)
    }

    async fn replica_vm(&self, vm: &str) -> Result<Option<ReplicaVm>, HvError> {
        Ok(self.vm_now(vm).await?.map(|v| replica_vm(&v)))
    }

    async fn replica_write(
        &self,
        vm: &str,
        index: usize,
        source: &dyn BlockSource,
        extents: &ExtentMap,
    ) -> Result<u64, HvError> {
        let (c, name, cfg, _) = self.parts();
        let w = Wmi::new(c);
        let all = w.all_disks().await.map_err(|e| self.err(e))?;
        // Device order, as a backup of this VM lists its disks.
        let disks = Wmi::disks_of(&all, &format!("Microsoft:{vm}"));
        let disk_err = |m: String| HvError::Disk {
            source_name: name.into(),
            disk: format!("{index} of VM {vm}"),
            message: m,
        };
        let disk = disks
            .get(index)
            .ok_or_else(|| disk_err(format!("the VM has {} disks", disks.len())))?;
        if extents.is_empty() {
            return Ok(0);
        }
        // The source's transports in order: `san` writes the file through san-paths, `network`
        // through the host agent (ADR 0176).
        let mut why = Vec::new();
        for mode in &cfg.transports {
            match mode {
                TransportMode::San => {
                    let Some(local) = crate::transport::map_host_path(&cfg.san_paths, &disk.path)
                    else {
                        why.push("san: no san-paths entry covers the disk's folder".to_string());
                        continue;
                    };
                    let sent = write_blocks(local, source, extents)
                        .await
                        .map_err(|m| disk_err(format!("writing {}: {m}", disk.path)))?;
                    tracing::debug!(source = %name, vm = %vm, disk = %disk.path, bytes = sent, "replica disk written (san-paths)");
                    return Ok(sent);
                }
                TransportMode::Network if cfg.agent.is_some() => {
                    let (client, node) = crate::restore_agent::agent_client(c, name, cfg)
                        .await
                        .map_err(|m| disk_err(format!("network: {m}")))?;
                    let sent = client
                        .update_vhdx(&disk.path, source, extents)
                        .await
                        .map_err(|e| {
                            disk_err(format!(
                                "writing {} through the agent of node {node}: {e}",
                                disk.path
                            ))
                        })?;
                    tracing::debug!(source = %name, vm = %vm, disk = %disk.path, bytes = sent, "replica disk written (host agent)");
                    return Ok(sent);
                }
                TransportMode::Network => why.push(format!(
                    "network: source `{name}` has no [sources.{name}.agent] table"
                )),
                other => why.push(format!("{other}: cannot write a replica's disk")),
            }
        }
        Err(HvError::NoTransport {
            source_name: name.into(),
            disk: disk.path.clone(),
            tried: why.join("; "),
        })
    }

    async fn point_create(&self, vm: &str, name: &str) -> Result<RecoveryPoint, HvError> {
        let (c, ..) = self.parts();
        self.vm_must(vm).await?;
        let svc = self.snapshot_service().await?;
        let settings = cim::embedded_instance(
            "Msvm_VirtualSystemSnapshotSettingData",
            &[("ElementName", "string", name)],
        );
        let out = c
            .invoke(
                &svc,
                "CreateSnapshot",
                &[
                    Param::Ref("AffectedSystem".into(), Wmi::vm_epr(vm)),
                    Param::Embedded("SnapshotSettings".into(), settings),
                    Param::Text("SnapshotType".into(), STANDARD_SNAPSHOT.into()),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        let id = out
            .reference("ResultingSnapshot")
            .and_then(|e| e.selector("InstanceID"))
            .ok_or_else(|| self.api("CreateSnapshot", "the host returned no checkpoint"))?;
        Ok(RecoveryPoint {
            id: id.to_string(),
            name: name.into(),
        })
    }

    async fn points(&self, vm: &str) -> Result<Vec<RecoveryPoint>, HvError> {
        let (c, ..) = self.parts();
        let q = format!(
            "SELECT * FROM {VSSD} WHERE VirtualSystemIdentifier = '{}' AND VirtualSystemType = '{STANDARD_CHECKPOINT}'",
            vm.replace('\'', "''")
        );
        let mut all: Vec<(String, RecoveryPoint)> = c
            .enumerate(VSSD, Some(&q))
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .filter_map(|s| {
                Some((
                    s.text("CreationTime").unwrap_or("").to_string(),
                    RecoveryPoint {
                        id: s.text("InstanceID")?.to_string(),
                        name: s.text("ElementName").unwrap_or("").to_string(),
                    },
                ))
            })
            .collect();
        // CIM datetimes of one zone sort as text: oldest first.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all.into_iter().map(|(_, p)| p).collect())
    }

    async fn point_revert(&self, vm: &str, point: &str) -> Result<(), HvError> {
        let (c, name, ..) = self.parts();
        let v = self.vm_must(vm).await?;
        let snap = self.checkpoint(point).await?;
        if snap
            .as_ref()
            .and_then(|s| s.text("VirtualSystemIdentifier"))
            .is_none_or(|o| !o.eq_ignore_ascii_case(vm))
        {
            return Err(HvError::Vm {
                source_name: name.into(),
                vm: vm.into(),
                message: format!("recovery point {point} is not a checkpoint of this VM"),
            });
        }
        self.off(&v).await?;
        let svc = self.snapshot_service().await?;
        c.invoke(
            &svc,
            "ApplySnapshot",
            &[Param::Ref("Snapshot".into(), Wmi::settings_epr(point))],
        )
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn point_delete(&self, point: &str) -> Result<(), HvError> {
        if self.checkpoint(point).await?.is_none() {
            return Ok(());
        }
        Wmi::new(self.parts().0)
            .destroy_checkpoint(point)
            .await
            .map_err(|e| self.err(e))
    }

    async fn power(&self, vm: &str, on: bool) -> Result<(), HvError> {
        let v = self.vm_must(vm).await?;
        if !on {
            // A clean guest shutdown, forced when refused (ADR 0187).
            return self.shut_down(&v).await;
        }
        if power_state(v.text("EnabledState")) != PowerState::Running {
            Wmi::new(self.parts().0)
                .request_state(vm, wmi::STATE_RUNNING)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    async fn replica_mark(&self, vm: &str, job: Option<&str>) -> Result<(), HvError> {
        match job {
            Some(j) => {
                self.set_marks(
                    vm,
                    &[(JOB_KEY, j), (ROLE_KEY, role_name(ReplicaRole::Standby))],
                )
                .await
            }
            None => self.set_marks(vm, &[]).await,
        }
    }

    async fn test_copy(&self, point: &str, name: &str, job: &str) -> Result<ReplicaVm, HvError> {
        let (c, src, cfg, journal) = self.parts();
        let gone = |m: &str| HvError::Vm {
            source_name: src.into(),
            vm: point.into(),
            message: m.into(),
        };
        let snap = self
            .checkpoint(point)
            .await?
            .ok_or_else(|| gone("no such recovery point (standard checkpoint) on the host"))?;
        let vm = snap
            .text("VirtualSystemIdentifier")
            .ok_or_else(|| gone("the checkpoint names no VM"))?
            .to_string();
        let vssd = self.vssd(&vm).await?;
        let w = Wmi::new(c);
        let all = w.all_disks().await.map_err(|e| self.err(e))?;
        let live = Wmi::disks_of(&all, &format!("Microsoft:{vm}"));
        let frozen = Wmi::disks_of(&all, point);
        let places = crate::controllers::Layout::read(c)
            .await
            .map_err(|e| self.err(e))?
            .positions(src, &vm);
        // The copy's disks are the point's content, read through san-paths and written as new
        // VHDX files by the restore (a full copy, not differencing disks on the point).
        let mut disks = Vec::new();
        let mut sources = Vec::new();
        for (k, d) in live.iter().enumerate() {
            let f = frozen
                .iter()
                .find(|f| f.key.eq_ignore_ascii_case(&d.key))
                .ok_or_else(|| gone(&format!("the checkpoint holds no copy of disk {k}")))?;
            let local =
                crate::transport::map_host_path(&cfg.san_paths, &f.path).ok_or_else(|| {
                    HvError::NoTransport {
                        source_name: src.into(),
                        disk: f.path.clone(),
                        tried: "san: no san-paths entry covers the checkpoint's image".into(),
                    }
                })?;
            let img = ferry_image::open_image(&local)
                .await
                .map_err(|e| HvError::Disk {
                    source_name: src.into(),
                    disk: f.path.clone(),
                    message: e.to_string(),
                })?;
            let disk = format!("disk{k}");
            disks.push(ferry_core::vm::DiskConfig {
                name: disk.clone(),
                size: img.source.size(),
                controller: places.of(&d.key),
                bootable: false,
            });
            sources.push(ferry_hv::RestoreDisk {
                name: disk,
                source: img.source,
            });
        }
        crate::controllers::mark_boot(&mut disks);
        let (mut config, _) = crate::config::capture(c, &vm, &vssd, disks)
            .await
            .map_err(|e| self.err(e))?;
        // Isolated: the copy's adapters (MACs kept) are on a new private switch (ADR 0187).
        let isolated = self.isolated_switch(name).await?;
        for n in &mut config.nics {
            n.network = Some(isolated.clone());
        }
        let plan = RestorePlan {
            name: name.into(),
            config,
            native: None,
            disks: sources,
            power_on: false,
        };
        let r = crate::restore::restore_noted(
            c,
            src,
            cfg,
            journal,
            &plan,
            &mark_lines(job, ReplicaRole::Test),
        )
        .await?;
        Ok(ReplicaVm {
            id: r.id,
            name: r.name,
            power_state: PowerState::Off,
        })
    }

    async fn replica_remove(&self, vm: &str) -> Result<(), HvError> {
        let (c, name, cfg, _) = self.parts();
        if self.vm_now(vm).await?.is_none() {
            return Ok(());
        }
        let settings = self.vssd(vm).await?;
        let folder = settings.text("ConfigurationDataRoot").map(str::to_string);
        destroy_vm(c, name, vm).await?;
        // A test copy's private switch goes with it (ADR 0187).
        if let Some(n) = settings.text("ElementName") {
            self.remove_isolated_switch(n).await;
        }
        // Like Hyper-V, DestroySystem leaves the files: the VM's own folder goes.
        if let Some(local) = folder
            .as_deref()
            .and_then(|f| crate::transport::map_host_path(&cfg.san_paths, f))
        {
            match std::fs::remove_dir_all(&local) {
                Ok(()) => {
                    tracing::info!(source = %name, vm = %vm, folder = %local.display(), "replica VM and its files removed")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(source = %name, vm = %vm, folder = %local.display(), error = %e, "cannot remove the VM's folder")
                }
            }
        } else if let (Some(f), Some(_)) = (folder.as_deref(), cfg.agent.as_ref()) {
            // Through the agent: the files restores and updates wrote in its marked folder.
            let r = match crate::restore_agent::agent_client(c, name, cfg).await {
                Ok((client, _)) => client.delete(f).await.map_err(|e| e.to_string()),
                Err(m) => Err(m),
            };
            if let Err(e) = r {
                tracing::warn!(source = %name, vm = %vm, folder = %f, error = %e, "cannot remove the VM's folder through the agent: its files stay");
            }
        } else {
            tracing::warn!(source = %name, vm = %vm, folder = ?folder, "the removed VM's folder is neither under san-paths nor reachable through an agent: its files stay");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_lines_of_the_notes() {
        let n = with_marks("Debian 12\n", &[(JOB_KEY, "web"), (ROLE_KEY, "standby")]);
        assert_eq!(
            n,
            "Debian 12\nferry.replica.job=web\nferry.replica.role=standby"
        );
        assert_eq!(mark(&n, JOB_KEY).as_deref(), Some("web"));
        assert_eq!(mark(&n, ROLE_KEY).as_deref(), Some("standby"));
        let cleared = with_marks(&n, &[]);
        assert_eq!(cleared, "Debian 12");
        assert_eq!(mark(&cleared, JOB_KEY), None);
        assert_eq!(mark("a=b\nferry.replica.job=\n", JOB_KEY), None);
        assert_eq!(
            mark_lines("j", ReplicaRole::Test),
            "\nferry.replica.job=j\nferry.replica.role=test"
        );
    }
}
