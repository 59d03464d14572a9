//! Replica targets on a Xen pool (ADRs 0130–0131): the standby VM is an ordinary restore
//! marked in `other_config`; changed extents go into its VDIs as a VHD of the changed blocks
//! (`PUT /import_raw_vdi?format=vhd`, as instant recovery's `finish`); recovery points are
//! `VM.snapshot`s, reverted with `VM.revert` (which replaces the VM's VDIs by clones: VDIs
//! are found by device order every time, never kept); a test copy is `VM.clone` of a point
//! with its VIFs moved to an internal network made for it.

use crate::XenDriver;
use crate::client::{XenClient, api_code};
use crate::instant::{apply_changes, shutdown};
use async_trait::async_trait;
use ferry_core::{BlockSource, ExtentMap};
use ferry_hv::{
    HvError, PowerState, RecoveryPoint, ReplicaRole, ReplicaTarget, ReplicaVm, RestorePlan,
};
use serde_json::{Value as J, json};

/// `other_config` key naming the replica job whose standby a VM is.
pub const REPLICA_MARKER: &str = "ferry-replica";
/// `other_config` key naming the replica job whose test copy a VM is.
pub const TEST_MARKER: &str = "ferry-replica-test";
/// `other_config` key of the isolated network a test copy's VIFs were moved to.
const ISOLATED_MARKER: &str = "ferry-replica-isolated";

fn marker(role: ReplicaRole) -> &'static str {
    match role {
        ReplicaRole::Standby => REPLICA_MARKER,
        ReplicaRole::Test => TEST_MARKER,
    }
}

fn power(rec: &J) -> PowerState {
    match rec.get("power_state").and_then(J::as_str) {
        Some("Running") => PowerState::Running,
        Some("Halted") => PowerState::Off,
        Some("Paused" | "Suspended") => PowerState::Suspended,
        _ => PowerState::Unknown,
    }
}

fn replica_of(rec: &J) -> ReplicaVm {
    ReplicaVm {
        id: rec["uuid"].as_str().unwrap_or_default().into(),
        name: rec["name_label"].as_str().unwrap_or_default().into(),
        power_state: power(rec),
    }
}

fn other(rec: &J, key: &str) -> Option<String> {
    rec.get("other_config")?
        .get(key)?
        .as_str()
        .map(String::from)
}

async fn vm_ref(c: &XenClient, vm: &str) -> Result<String, HvError> {
    if vm.starts_with("OpaqueRef:") {
        return Ok(vm.into());
    }
    c.call_str("VM.get_by_uuid", vec![json!(vm)]).await
}

/// The disk VDIs (refs) of VM `r` in device order.
async fn disk_vdis(c: &XenClient, r: &str) -> Result<Vec<String>, HvError> {
    let mut disks = Vec::new();
    for b in c
        .call("VM.get_VBDs", vec![json!(r)])
        .await?
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let rec = c.call("VBD.get_record", vec![b]).await?;
        let vdi = rec["VDI"].as_str().unwrap_or_default();
        if rec["type"] == "Disk" && vdi != "OpaqueRef:NULL" && !vdi.is_empty() {
            let dev: u32 = rec["userdevice"]
                .as_str()
                .and_then(|d| d.parse().ok())
                .unwrap_or(u32::MAX);
            disks.push((dev, vdi.to_string()));
        }
    }
    disks.sort();
    Ok(disks.into_iter().map(|(_, v)| v).collect())
}

/// Destroys VM `r` (halted first) and its disk VDIs.
async fn destroy_with_disks(c: &XenClient, r: &str) -> Result<(), HvError> {
    shutdown(c, r).await?;
    let vdis = disk_vdis(c, r).await?;
    c.call("VM.destroy", vec![json!(r)]).await?;
    for v in vdis {
        if let Err(e) = c.call("VDI.destroy", vec![json!(v)]).await {
            if api_code(&e) != Some("HANDLE_INVALID") {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[async_trait]
impl ReplicaTarget for XenDriver {
    async fn replica_create(&self, plan: &RestorePlan, job: &str) -> Result<ReplicaVm, HvError> {
        let c = self.client();
        let plan = ferry_hv::standby_plan(plan);
        let vm =
            crate::restore::restore_marked(c, c.source(), &plan, json!({ REPLICA_MARKER: job }))
                .await?;
        Ok(ReplicaVm::standby(vm))
    }

    async fn replica_marked(
        &self,
        job: &str,
        role: ReplicaRole,
    ) -> Result<Vec<ReplicaVm>, HvError> {
        let all = self.client().call("VM.get_all_records", vec![]).await?;
        Ok(all
            .as_object()
            .map(|m| {
                m.values()
                    .filter(|v| v["is_a_snapshot"] != true && v["is_a_template"] != true)
                    .filter(|v| other(v, marker(role)).as_deref() == Some(job))
                    .map(replica_of)
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn replica_vm(&self, vm: &str) -> Result<Option<ReplicaVm>, HvError> {
        let c = self.client();
        match vm_ref(c, vm).await {
            Ok(r) => Ok(Some(replica_of(
                &c.call("VM.get_record", vec![json!(r)]).await?,
            ))),
            Err(e) if matches!(api_code(&e), Some("UUID_INVALID" | "HANDLE_INVALID")) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn replica_write(
        &self,
        vm: &str,
        index: usize,
        source: &dyn BlockSource,
        extents: &ExtentMap,
    ) -> Result<u64, HvError> {
        let c = self.client();
        let r = vm_ref(c, vm).await?;
        let vdis = disk_vdis(c, &r).await?;
        let vdi = vdis.get(index).ok_or_else(|| HvError::Disk {
            source_name: c.source().into(),
            disk: format!("{index} of VM {vm}"),
            message: format!("the VM has {} disks", vdis.len()),
        })?;
        if extents.is_empty() {
            return Ok(0);
        }
        let uuid = c.call_str("VDI.get_uuid", vec![json!(vdi)]).await?;
        apply_changes(c, &uuid, source, extents).await
    }

    async fn point_create(&self, vm: &str, name: &str) -> Result<RecoveryPoint, HvError> {
        let c = self.client();
        let r = vm_ref(c, vm).await?;
        let snap = c
            .call_str("VM.snapshot", vec![json!(r), json!(name), json!([])])
            .await?;
        Ok(RecoveryPoint {
            id: c.call_str("VM.get_uuid", vec![json!(snap)]).await?,
            name: name.into(),
        })
    }

    async fn points(&self, vm: &str) -> Result<Vec<RecoveryPoint>, HvError> {
        let c = self.client();
        let r = vm_ref(c, vm).await?;
        let mut out = Vec::new();
        for s in c
            .call("VM.get_snapshots", vec![json!(r)])
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let rec = c.call("VM.get_record", vec![s]).await?;
            let time = rec["snapshot_time"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            out.push((
                time,
                RecoveryPoint {
                    id: rec["uuid"].as_str().unwrap_or_default().into(),
                    name: rec["name_label"].as_str().unwrap_or_default().into(),
                },
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out.into_iter().map(|(_, p)| p).collect())
    }

    async fn point_revert(&self, vm: &str, point: &str) -> Result<(), HvError> {
        let c = self.client();
        shutdown(c, &vm_ref(c, vm).await?).await?;
        let p = vm_ref(c, point).await?;
        c.call("VM.revert", vec![json!(p)]).await?;
        Ok(())
    }

    async fn point_delete(&self, point: &str) -> Result<(), HvError> {
        let c = self.client();
        match vm_ref(c, point).await {
            Ok(p) => destroy_with_disks(c, &p).await,
            Err(e) if api_code(&e) == Some("UUID_INVALID") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn power(&self, vm: &str, on: bool) -> Result<(), HvError> {
        let c = self.client();
        let r = vm_ref(c, vm).await?;
        if !on {
            return shutdown(c, &r).await;
        }
        if c.call_str("VM.get_power_state", vec![json!(r)]).await? != "Running" {
            c.call("VM.start", vec![json!(r), json!(false), json!(false)])
                .await?;
        }
        Ok(())
    }

    async fn replica_mark(&self, vm: &str, job: Option<&str>) -> Result<(), HvError> {
        let c = self.client();
        let r = vm_ref(c, vm).await?;
        c.call(
            "VM.remove_from_other_config",
            vec![json!(r), json!(REPLICA_MARKER)],
        )
        .await?;
        if let Some(job) = job {
            c.call(
                "VM.add_to_other_config",
                vec![json!(r), json!(REPLICA_MARKER), json!(job)],
            )
            .await?;
        }
        Ok(())
    }

    async fn test_copy(&self, point: &str, name: &str, job: &str) -> Result<ReplicaVm, HvError> {
        let c = self.client();
        let p = vm_ref(c, point).await?;
        // The clone of a snapshot is a template: make it a VM, then mark it before anything
        // else can fail, so a killed run finds it.
        let vm = c.call_str("VM.clone", vec![json!(p), json!(name)]).await?;
        let made = async {
            c.call("VM.set_is_a_template", vec![json!(vm), json!(false)])
                .await?;
            let mut oc = c
                .call("VM.get_other_config", vec![json!(vm)])
                .await?
                .as_object()
                .cloned()
                .unwrap_or_default();
            oc.remove(REPLICA_MARKER);
            oc.insert(TEST_MARKER.into(), json!(job));
            let net = c
                .call_str(
                    "network.create",
                    vec![json!({"name_label": format!("{name} (isolated)"),
                        "name_description": "Ferry test failover: no uplink", "MTU": 1500,
                        "other_config": {}, "tags": []})],
                )
                .await?;
            let net_uuid = c.call_str("network.get_uuid", vec![json!(net)]).await?;
            oc.insert(ISOLATED_MARKER.into(), json!(net_uuid));
            c.call("VM.set_other_config", vec![json!(vm), J::Object(oc)])
                .await?;
            for vif in c
                .call("VM.get_VIFs", vec![json!(vm)])
                .await?
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                c.call("VIF.move", vec![vif, json!(net)]).await?;
            }
            let rec = c.call("VM.get_record", vec![json!(vm)]).await?;
            Ok::<_, HvError>(replica_of(&rec))
        }
        .await;
        if made.is_err() {
            let _ = self.replica_remove(&vm).await;
        }
        made
    }

    async fn replica_remove(&self, vm: &str) -> Result<(), HvError> {
        let c = self.client();
        let r = match vm_ref(c, vm).await {
            Ok(r) => r,
            Err(e) if api_code(&e) == Some("UUID_INVALID") => return Ok(()),
            Err(e) => return Err(e),
        };
        let rec = c.call("VM.get_record", vec![json!(r)]).await?;
        destroy_with_disks(c, &r).await?;
        if let Some(net) = other(&rec, ISOLATED_MARKER) {
            if let Ok(n) = c.call_str("network.get_by_uuid", vec![json!(net)]).await {
                c.call("network.destroy", vec![json!(n)]).await?;
            }
        }
        Ok(())
    }
}
