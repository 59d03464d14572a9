//! Replica targets on vSphere (ADR 0165), the vSphere side of ADRs 0130–0131: the standby VM is
//! a whole-VM restore (`CreateVM_Task`, powered off) marked in its `config.extraConfig` from its
//! creation on; changed extents go into its disks through the restore's NBD write path;
//! recovery points are snapshots without memory or quiescing, reverted with
//! `RevertToSnapshot_Task`; a test copy is a `CloneVM_Task` of a point with its NICs on a port
//! group of a new vSwitch without uplinks, both removed with the copy.

use crate::driver::{Inner, NbdTarget, PAGE, VmwareDriver, power as power_state, start_nbdkit};
use crate::error::{FaultKind, VimError};
use crate::xml::{Body, MoRef, Node};
use async_trait::async_trait;
use ferry_core::{BlockSource, ExtentMap};
use ferry_hv::{HvError, RecoveryPoint, ReplicaRole, ReplicaTarget, ReplicaVm, RestorePlan};
use std::time::{Duration, Instant};

/// `extraConfig` key: the replica job a VM belongs to.
pub const JOB_KEY: &str = "ferry.replica.job";
/// `extraConfig` key: its role in the job, `standby` or `test`.
pub const ROLE_KEY: &str = "ferry.replica.role";
/// `extraConfig` key of a test copy: `host moref|vSwitch|port group` of its isolated network.
pub const ISOLATED_KEY: &str = "ferry.replica.isolated";
/// Bytes per NBD write.
const PIECE: u64 = 1 << 20;
/// How long a clean guest shutdown may take before the VM is powered off.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(120);
/// The properties of a VM the replica calls read.
const PATHS: &[&str] = &[
    "name",
    "config.uuid",
    "config.template",
    "runtime.powerState",
    "config.extraConfig",
];

fn role_name(r: ReplicaRole) -> &'static str {
    match r {
        ReplicaRole::Standby => "standby",
        ReplicaRole::Test => "test",
    }
}

/// One `OptionValue` of `extraConfig` (a string value).
pub(crate) fn option(key: &str, value: &str) -> Body {
    Body::new()
        .text("key", key)
        .typed_text("value", "xsd:string", value)
}

/// The value of `extraConfig` key `key`; empty is unset. vCenter keeps one option per key and
/// drops one set to "" — vcsim appends every update, so the last one counts.
fn extra(config: Option<&Node>, key: &str) -> Option<String> {
    config?
        .children
        .iter()
        .rfind(|o| o.text_at("key") == Some(key))
        .and_then(|o| o.text_at("value"))
        .filter(|v| !v.is_empty())
        .map(String::from)
}

/// A VM as the replica calls see it.
struct Found {
    moref: MoRef,
    /// `config.uuid` (the id the driver lists VMs by), else the moref.
    id: String,
    name: String,
    power: String,
    extra: Option<Node>,
}

impl Found {
    fn replica(&self) -> ReplicaVm {
        ReplicaVm {
            id: self.id.clone(),
            name: self.name.clone(),
            power_state: power_state(&self.power),
        }
    }

    fn mark(&self, key: &str) -> Option<String> {
        extra(self.extra.as_ref(), key)
    }
}

async fn all_vms(i: &Inner) -> Result<Vec<Found>, HvError> {
    Ok(i.client
        .retrieve_all("VirtualMachine", PATHS, PAGE)
        .await?
        .into_iter()
        .filter(|o| o.text("config.template") != Some("true"))
        .filter_map(|o| {
            let moref = o.obj.clone()?;
            let uuid = o.text("config.uuid").unwrap_or("");
            Some(Found {
                id: if uuid.is_empty() {
                    moref.value.clone()
                } else {
                    uuid.to_string()
                },
                name: o.text("name").unwrap_or(&moref.value).to_string(),
                power: o.text("runtime.powerState").unwrap_or("").to_string(),
                extra: o.prop("config.extraConfig").cloned(),
                moref,
            })
        })
        .collect())
}

/// The VM whose id (or moref) is `vm`, if it exists.
async fn find(i: &Inner, vm: &str) -> Result<Option<Found>, HvError> {
    Ok(all_vms(i)
        .await?
        .into_iter()
        .find(|v| v.id == vm || v.moref.value == vm))
}

async fn get(i: &Inner, vm: &str) -> Result<Found, HvError> {
    find(i, vm).await?.ok_or_else(|| i.vm_err(vm, "no such VM"))
}

fn not_found(e: &VimError) -> bool {
    e.fault() == Some(&FaultKind::NotFound)
}

/// The call may or may not have run: the connection broke (directly, or between vCenter and
/// its host, `HostCommunication`).
fn broken(e: &VimError) -> bool {
    e.is_transport_retryable() || fault_named(e, "HostCommunication")
}

fn fault_named(e: &VimError, name: &str) -> bool {
    e.fault().is_some_and(|k| k.name() == name)
}

async fn power_of(i: &Inner, vm: &MoRef) -> Result<String, HvError> {
    Ok(i.client
        .retrieve_one(vm, &["runtime.powerState"])
        .await?
        .text("runtime.powerState")
        .unwrap_or("")
        .to_string())
}

/// Powers `vm` off (hard) unless it is off already.
async fn power_off(i: &Inner, vm: &MoRef) -> Result<(), HvError> {
    if power_of(i, vm).await? == "poweredOff" {
        return Ok(());
    }
    match i
        .client
        .run_task("PowerOffVM_Task", Body::new().moref("_this", vm))
        .await
    {
        Ok(_) => Ok(()),
        // Off meanwhile (a guest shutdown that finished late).
        Err(e)
            if matches!(e.fault(), Some(FaultKind::InvalidState(_)))
                && power_of(i, vm).await? == "poweredOff" =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// A clean guest shutdown (`ShutdownGuest`, VMware Tools), the VM powered off when the guest
/// refuses or takes longer than [`SHUTDOWN_WAIT`].
async fn shutdown(i: &Inner, vm: &MoRef, name: &str) -> Result<(), HvError> {
    if power_of(i, vm).await? != "poweredOn" {
        return power_off(i, vm).await;
    }
    match i
        .client
        .call("ShutdownGuest", Body::new().moref("_this", vm))
        .await
    {
        Ok(_) => {
            let started = Instant::now();
            while started.elapsed() < SHUTDOWN_WAIT {
                if power_of(i, vm).await? == "poweredOff" {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            tracing::warn!(source = %i.name, vm = %name, "the guest did not shut down in time; powering it off");
        }
        Err(e) => {
            tracing::warn!(source = %i.name, vm = %name, error = %e, "clean guest shutdown refused; powering the VM off");
        }
    }
    power_off(i, vm).await
}

/// `extraConfig` options in a `ReconfigVM_Task`.
async fn set_extra(i: &Inner, vm: &MoRef, opts: &[(&str, &str)]) -> Result<(), HvError> {
    let mut spec = Body::new();
    for (k, v) in opts {
        spec = spec.nested("extraConfig", Some("OptionValue"), option(k, v));
    }
    i.client
        .run_task(
            "ReconfigVM_Task",
            Body::new().moref("_this", vm).nested("spec", None, spec),
        )
        .await?;
    Ok(())
}

/// Writes the `extents` of `src` (clipped to its size) through `nbd`, zero pieces as
/// WRITE_ZEROES; returns the data bytes sent.
async fn write_extents(
    src: &dyn BlockSource,
    nbd: &ferry_nbd::NbdClient,
    extents: &ExtentMap,
) -> Result<u64, String> {
    let size = src.size();
    let mut buf = vec![0u8; PIECE as usize];
    let mut sent = 0;
    for e in extents.iter() {
        let mut pos = e.offset;
        let end = (e.offset + e.length).min(size);
        while pos < end {
            let n = (end - pos).min(PIECE) as usize;
            src.read_at(pos, &mut buf[..n])
                .await
                .map_err(|e| format!("read at {pos}: {e}"))?;
            if buf[..n].iter().all(|b| *b == 0) {
                // No payload; a thin disk stays thin where the server can.
                nbd.write_zeroes(pos, n as u64)
                    .await
                    .map_err(|e| format!("NBD write zeroes at {pos}: {e}"))?;
            } else {
                nbd.write(pos, &buf[..n])
                    .await
                    .map_err(|e| format!("NBD write at {pos}: {e}"))?;
                sent += n as u64;
            }
            pos += n as u64;
        }
    }
    nbd.flush().await.map_err(|e| format!("NBD flush: {e}"))?;
    Ok(sent)
}

/// The host's `HostNetworkSystem`.
async fn network_system(i: &Inner, host: &MoRef) -> Result<MoRef, HvError> {
    i.client
        .retrieve_one(host, &["configManager.networkSystem"])
        .await?
        .prop("configManager.networkSystem")
        .and_then(Node::moref)
        .ok_or_else(|| HvError::Api {
            source_name: i.name.clone(),
            call: "AddPortGroup".into(),
            message: format!("host {} has no network system", host.value),
            retryable: false,
        })
}

/// The vSwitch of job `job`'s test copies (vSwitch names are short).
fn vswitch_name(job: &str) -> String {
    let mut n = format!("ferry-test-{job}");
    n.truncate(31);
    n
}

/// A vSwitch without uplinks and port group `pg` on it: a network nothing leaves. Made before
/// (a killed run) is no error.
async fn isolated_network(i: &Inner, host: &MoRef, vswitch: &str, pg: &str) -> Result<(), HvError> {
    let ns = network_system(i, host).await?;
    let c = &i.client;
    let r = c
        .call(
            "AddVirtualSwitch",
            Body::new()
                .moref("_this", &ns)
                .text("vswitchName", vswitch)
                .nested("spec", None, Body::new().text("numPorts", "128")),
        )
        .await;
    match r {
        Err(e) if !fault_named(&e, "AlreadyExists") => return Err(e.into()),
        _ => {}
    }
    let r = c
        .call(
            "AddPortGroup",
            Body::new().moref("_this", &ns).nested(
                "portgrp",
                None,
                Body::new()
                    .text("name", pg)
                    .text("vlanId", "0")
                    .text("vswitchName", vswitch)
                    .nested("policy", None, Body::new()),
            ),
        )
        .await;
    match r {
        Err(e) if !fault_named(&e, "AlreadyExists") => Err(e.into()),
        _ => Ok(()),
    }
}

/// Removes what [`isolated_network`] made (`mark`: the [`ISOLATED_KEY`] value); gone is no error.
async fn remove_isolated(i: &Inner, mark: &str) -> Result<(), HvError> {
    let mut parts = mark.splitn(3, '|');
    let (Some(host), Some(vswitch), Some(pg)) = (parts.next(), parts.next(), parts.next()) else {
        tracing::warn!(source = %i.name, mark = %mark, "unreadable isolated-network mark; nothing removed");
        return Ok(());
    };
    let ns = match network_system(i, &MoRef::new("HostSystem", host)).await {
        Ok(ns) => ns,
        Err(HvError::Api { ref message, .. }) if message.starts_with("ManagedObjectNotFound") => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let c = &i.client;
    for (method, body) in [
        (
            "RemovePortGroup",
            Body::new().moref("_this", &ns).text("pgName", pg),
        ),
        (
            "RemoveVirtualSwitch",
            Body::new().moref("_this", &ns).text("vswitchName", vswitch),
        ),
    ] {
        match c.call(method, body).await {
            Err(e) if !not_found(&e) => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

impl VmwareDriver {
    /// `RemoveSnapshot_Task` of `snap`; gone (before or because of it) is success. When the
    /// connection breaks meanwhile, whether the snapshot is gone decides, and one still there is
    /// removed again. (vcsim drops the connection when it removes the current snapshot while
    /// that one has children but no parent — after a revert to a point whose older points were
    /// pruned — without removing it; the second try succeeds.)
    async fn remove_point(&self, snap: &MoRef) -> Result<(), HvError> {
        let i = self.inner();
        let mut attempt = 1;
        loop {
            match i.client.remove_snapshot(snap).await {
                Ok(()) => return Ok(()),
                Err(e) if not_found(&e) => return Ok(()),
                Err(e) if broken(&e) && attempt < 3 => {
                    tracing::warn!(source = %i.name, snapshot = %snap.value, error = %e,
                        "the connection broke while removing a recovery point; checking whether it is gone");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    match i.client.retrieve_one(snap, &["vm"]).await {
                        Err(e) if not_found(&e) => return Ok(()),
                        Ok(o) if o.prop("vm").is_none() => return Ok(()),
                        Ok(_) => {}
                        Err(e) => return Err(e.into()),
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Flattens a snapshot tree into (tree id, point).
fn flatten(t: &Node, out: &mut Vec<(i64, RecoveryPoint)>) {
    if let Some(m) = t.child("snapshot").and_then(Node::moref) {
        out.push((
            t.i64_at("id").unwrap_or(i64::MAX),
            RecoveryPoint {
                id: m.value,
                name: t.text_at("name").unwrap_or("").to_string(),
            },
        ));
    }
    for c in t.all("childSnapshotList") {
        flatten(c, out);
    }
}

#[async_trait]
impl ReplicaTarget for VmwareDriver {
    async fn replica_create(&self, plan: &RestorePlan, job: &str) -> Result<ReplicaVm, HvError> {
        let vm = crate::restore::restore_marked(
            self.inner(),
            &ferry_hv::standby_plan(plan),
            &[(JOB_KEY, job), (ROLE_KEY, role_name(ReplicaRole::Standby))],
        )
        .await?;
        Ok(ReplicaVm::standby(vm))
    }

    async fn replica_marked(
        &self,
        job: &str,
        role: ReplicaRole,
    ) -> Result<Vec<ReplicaVm>, HvError> {
        Ok(all_vms(self.inner())
            .await?
            .iter()
            .filter(|v| {
                v.mark(JOB_KEY).as_deref() == Some(job)
                    && v.mark(ROLE_KEY).as_deref() == Some(role_name(role))
            })
            .map(Found::replica)
            .collect())
    }

    async fn replica_vm(&self, vm: &str) -> Result<Option<ReplicaVm>, HvError> {
        Ok(find(self.inner(), vm).await?.map(|v| v.replica()))
    }

    async fn replica_write(
        &self,
        vm: &str,
        index: usize,
        source: &dyn BlockSource,
        extents: &ExtentMap,
    ) -> Result<u64, HvError> {
        let i = self.inner();
        let v = i.find_vm(vm).await?;
        // Device order, as a backup of this VM lists its disks.
        let disks: Vec<_> = v.disks.iter().filter(|d| d.skip.is_none()).collect();
        let disk_err = |m: String| HvError::Disk {
            source_name: i.name.clone(),
            disk: format!("{index} of VM `{}`", v.name),
            message: m,
        };
        let disk = disks
            .get(index)
            .ok_or_else(|| disk_err(format!("the VM has {} disks", disks.len())))?;
        if extents.is_empty() {
            return Ok(0);
        }
        if disk.capacity < source.size() {
            return Err(disk_err(format!(
                "{} has {} bytes, the restore point's disk {}",
                disk.position,
                disk.capacity,
                source.size()
            )));
        }
        let target = NbdTarget {
            vm: &v.moref,
            snapshot: None,
            file: &disk.file,
            capacity: disk.capacity,
            writable: true,
        };
        let (nbd, nbdkit, how) = start_nbdkit(i, &target)
            .await
            .map_err(|m| disk_err(format!("network write path: {m}")))?;
        let sent = write_extents(source, &nbd, extents).await;
        nbd.close().await;
        drop(nbdkit);
        let sent = sent.map_err(disk_err)?;
        tracing::debug!(source = %i.name, vm = %v.name, disk = %disk.position, bytes = sent, transport = %how, "replica disk written");
        Ok(sent)
    }

    async fn point_create(&self, vm: &str, name: &str) -> Result<RecoveryPoint, HvError> {
        let i = self.inner();
        let v = get(i, vm).await?;
        let snap = i
            .client
            .create_snapshot(
                &v.moref,
                name,
                "Ferry replica recovery point: removed by Ferry when it is pruned.",
                false,
            )
            .await?;
        Ok(RecoveryPoint {
            id: snap.value,
            name: name.into(),
        })
    }

    async fn points(&self, vm: &str) -> Result<Vec<RecoveryPoint>, HvError> {
        let i = self.inner();
        let v = get(i, vm).await?;
        let o = i.client.retrieve_one(&v.moref, &["snapshot"]).await?;
        let mut out = Vec::new();
        if let Some(s) = o.prop("snapshot") {
            for t in s.all("rootSnapshotList") {
                flatten(t, &mut out);
            }
        }
        // Tree ids grow with every snapshot of the VM: oldest first.
        out.sort_by_key(|(id, _)| *id);
        Ok(out.into_iter().map(|(_, p)| p).collect())
    }

    async fn point_revert(&self, vm: &str, point: &str) -> Result<(), HvError> {
        let i = self.inner();
        let v = get(i, vm).await?;
        let snap = MoRef::new("VirtualMachineSnapshot", point);
        let owner = i
            .client
            .retrieve_one(&snap, &["vm"])
            .await?
            .prop("vm")
            .and_then(Node::moref);
        if owner.as_ref() != Some(&v.moref) {
            return Err(i.vm_err(
                &v.name,
                format!("recovery point {point} is not a snapshot of this VM"),
            ));
        }
        power_off(i, &v.moref).await?;
        i.client
            .run_task(
                "RevertToSnapshot_Task",
                Body::new()
                    .moref("_this", &snap)
                    .text("suppressPowerOn", "true"),
            )
            .await?;
        Ok(())
    }

    async fn point_delete(&self, point: &str) -> Result<(), HvError> {
        self.remove_point(&MoRef::new("VirtualMachineSnapshot", point))
            .await
    }

    async fn power(&self, vm: &str, on: bool) -> Result<(), HvError> {
        let i = self.inner();
        let v = get(i, vm).await?;
        if !on {
            return shutdown(i, &v.moref, &v.name).await;
        }
        if v.power != "poweredOn" {
            i.client
                .run_task("PowerOnVM_Task", Body::new().moref("_this", &v.moref))
                .await?;
        }
        Ok(())
    }

    async fn replica_mark(&self, vm: &str, job: Option<&str>) -> Result<(), HvError> {
        let i = self.inner();
        let v = get(i, vm).await?;
        let (job, role) = match job {
            Some(j) => (j, role_name(ReplicaRole::Standby)),
            None => ("", ""),
        };
        set_extra(i, &v.moref, &[(JOB_KEY, job), (ROLE_KEY, role)]).await
    }

    async fn test_copy(&self, point: &str, name: &str, job: &str) -> Result<ReplicaVm, HvError> {
        let i = self.inner();
        let c = &i.client;
        let snap = MoRef::new("VirtualMachineSnapshot", point);
        let src = c
            .retrieve_one(&snap, &["vm"])
            .await?
            .prop("vm")
            .and_then(Node::moref)
            .ok_or_else(|| i.vm_err(point, "the recovery point belongs to no VM"))?;
        let o = c.retrieve_one(&src, &["parent", "runtime.host"]).await?;
        let (Some(folder), Some(host)) = (
            o.prop("parent").and_then(Node::moref),
            o.prop("runtime.host").and_then(Node::moref),
        ) else {
            return Err(i.vm_err(
                &src.value,
                "the standby has no folder or host to put a test copy in",
            ));
        };
        let vswitch = vswitch_name(job);
        let pg = format!("{name} (isolated)");
        let isolated = format!("{}|{vswitch}|{pg}", host.value);
        // Marked in the clone's own spec, so a run killed right after finds it.
        let mut config = Body::new();
        for (k, v) in [
            (JOB_KEY, job),
            (ROLE_KEY, role_name(ReplicaRole::Test)),
            (ISOLATED_KEY, isolated.as_str()),
        ] {
            config = config.nested("extraConfig", Some("OptionValue"), option(k, v));
        }
        let spec = Body::new()
            .nested("location", None, Body::new())
            .text("template", "false")
            .nested("config", None, config)
            .text("powerOn", "false")
            .moref("snapshot", &snap);
        let made = c
            .run_task(
                "CloneVM_Task",
                Body::new()
                    .moref("_this", &src)
                    .moref("folder", &folder)
                    .text("name", name)
                    .nested("spec", None, spec),
            )
            .await?
            .as_ref()
            .and_then(Node::moref)
            .ok_or_else(|| HvError::Api {
                source_name: i.name.clone(),
                call: "CloneVM_Task".into(),
                message: "the task returned no VM".into(),
                retryable: false,
            })?;
        let r = async {
            isolated_network(i, &host, &vswitch, &pg).await?;
            let mut o = c.retrieve_one(&made, crate::model::VM_PATHS).await?;
            o.obj = Some(made.clone());
            let copy = crate::model::Vm::from_object(&o)
                .ok_or_else(|| i.vm_err(name, "the test copy cannot be read back"))?;
            let mut changes = Body::new();
            for (idx, n) in copy.nics.iter().enumerate() {
                let kind = crate::restore::nic_type(&n.model).unwrap_or("VirtualVmxnet3");
                // vcsim's edit needs `deviceInfo`; vCenter takes it as given.
                let label = format!("Network adapter {}", idx + 1);
                let dev = crate::restore::nic_device(
                    n.device_key,
                    Some((&label, &pg)),
                    "VirtualEthernetCardNetworkBackingInfo",
                    Body::new().text("deviceName", &pg),
                    n.mac.as_deref(),
                );
                changes = changes.append(crate::restore::device_change("edit", None, kind, dev));
            }
            if !copy.nics.is_empty() {
                c.run_task(
                    "ReconfigVM_Task",
                    Body::new()
                        .moref("_this", &made)
                        .nested("spec", None, changes),
                )
                .await?;
            }
            let f = get(i, &made.value).await?;
            Ok::<_, HvError>(f.replica())
        }
        .await;
        if r.is_err() {
            if let Err(e) = self.replica_remove(&made.value).await {
                tracing::warn!(source = %i.name, vm = %name, error = %e, "cannot remove a half-made test copy; the next test or cleanup will");
            }
        }
        r
    }

    async fn replica_remove(&self, vm: &str) -> Result<(), HvError> {
        let i = self.inner();
        let Some(v) = find(i, vm).await? else {
            return Ok(());
        };
        crate::restore::destroy(i, &v.moref).await?;
        if let Some(mark) = v.mark(ISOLATED_KEY) {
            remove_isolated(i, &mark).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_extra_config_value_counts_and_empty_is_unset() {
        let n = crate::xml::parse(
            br#"<val><OptionValue><key>ferry.replica.job</key><value>web</value></OptionValue><OptionValue><key>other</key><value>x</value></OptionValue><OptionValue><key>ferry.replica.job</key><value></value></OptionValue></val>"#,
        )
        .unwrap();
        assert_eq!(extra(Some(&n), JOB_KEY), None);
        assert_eq!(extra(Some(&n), "other").as_deref(), Some("x"));
        assert_eq!(extra(None, "other"), None);
        assert_eq!(
            vswitch_name("a-very-long-replica-job-name-indeed").len(),
            31
        );
    }

    #[test]
    fn points_are_flattened_oldest_first() {
        let n = crate::xml::parse(
            br#"<val><rootSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-3</snapshot><name>a</name><id>1</id><childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-9</snapshot><name>c</name><id>3</id></childSnapshotList><childSnapshotList><snapshot type="VirtualMachineSnapshot">snapshot-5</snapshot><name>b</name><id>2</id></childSnapshotList></rootSnapshotList></val>"#,
        )
        .unwrap();
        let mut out = Vec::new();
        for t in n.all("rootSnapshotList") {
            flatten(t, &mut out);
        }
        out.sort_by_key(|(id, _)| *id);
        let names: Vec<&str> = out.iter().map(|(_, p)| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(out[2].1.id, "snapshot-9");
    }
}
