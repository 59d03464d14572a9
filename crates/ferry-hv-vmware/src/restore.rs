//! Whole-VM restore to vSphere: `CreateVM_Task` from the restore point's configuration (CPUs,
//! memory, firmware, controllers, thin disks at their controller and unit, NICs on their network
//! with their MAC), then every disk written through the NBD write path (nbdkit's vddk plugin, or
//! the file plugin stand-in in labs), then `PowerOnVM_Task` if asked. Any failure destroys the
//! partial VM (`Destroy_Task`), which deletes its files too.

use crate::driver::{Inner, NbdTarget, start_nbdkit};
use crate::model::{Vm, split_datastore_path};
use crate::xml::{Body, MoRef, Node};
use ferry_core::BlockSource;
use ferry_core::vm::{Firmware, VmConfig};
use ferry_hv::{HvError, RestorePlan, RestoredVm};
use std::collections::BTreeMap;

/// Bytes written per NBD request.
const PIECE: u64 = 1 << 20;

/// A disk position on a vSphere VM: controller kind, bus, unit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// `scsi`, `sata`, `nvme` or `ide`.
    pub bus: &'static str,
    /// Controller number.
    pub number: u32,
    /// Unit on the controller.
    pub unit: u32,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}:{}", self.bus, self.number, self.unit)
    }
}

/// `scsi0:1`, `sata0:0`, `nvme1:2`, `ide0:1` → a position; anything else (a Xen `xvda`, a
/// number) → `None`.
pub fn parse_position(s: &str) -> Option<Position> {
    let (ctl, unit) = s.split_once(':')?;
    let bus = ["scsi", "sata", "nvme", "ide"]
        .into_iter()
        .find(|b| ctl.starts_with(b))?;
    Some(Position {
        bus,
        number: ctl[bus.len()..].parse().ok()?,
        unit: unit.parse().ok()?,
    })
}

/// The positions of `config`'s disks on a vSphere VM: their own where they name one, otherwise
/// the next free unit of `scsi0` (unit 7 is the controller's own). Returns the positions and a
/// warning per disk that moved.
pub fn place_disks(config: &VmConfig) -> (Vec<Position>, Vec<String>) {
    let mut warnings = Vec::new();
    let own: Vec<Option<Position>> = config
        .disks
        .iter()
        .map(|d| d.controller.as_deref().and_then(parse_position))
        .collect();
    let mut taken: Vec<Position> = own.iter().flatten().cloned().collect();
    let mut out = Vec::new();
    for (d, p) in config.disks.iter().zip(own) {
        let p = match p {
            Some(p) => p,
            None => {
                let unit = (0..)
                    .filter(|u| *u != 7)
                    .find(|u| {
                        !taken
                            .iter()
                            .any(|t| t.bus == "scsi" && t.number == 0 && t.unit == *u)
                    })
                    .unwrap_or(0);
                let p = Position {
                    bus: "scsi",
                    number: 0,
                    unit,
                };
                warnings.push(format!(
                    "disk `{}`: position `{}` does not exist on vSphere; attached at {p}",
                    d.name,
                    d.controller.as_deref().unwrap_or("(none)")
                ));
                taken.push(p.clone());
                p
            }
        };
        out.push(p);
    }
    (out, warnings)
}

/// The vim25 device type of a NIC model (`vmxnet3` → `VirtualVmxnet3`).
pub(crate) fn nic_type(model: &str) -> Option<&'static str> {
    Some(match model {
        "vmxnet3" => "VirtualVmxnet3",
        "vmxnet2" => "VirtualVmxnet2",
        "vmxnet" => "VirtualVmxnet",
        "e1000" => "VirtualE1000",
        "e1000e" => "VirtualE1000e",
        "pcnet32" => "VirtualPCNet32",
        _ => return None,
    })
}

fn controller(bus: &str, number: u32) -> (&'static str, i32) {
    // Temporary (negative) keys; vSphere assigns real ones and rewrites the disks' references.
    match bus {
        "sata" => ("VirtualAHCIController", -300 - number as i32),
        "nvme" => ("VirtualNVMEController", -400 - number as i32),
        _ => ("ParaVirtualSCSIController", -100 - number as i32),
    }
}

/// One `deviceChange` of a `VirtualMachineConfigSpec`: `operation`, `fileOperation` (none:
/// attach or detach an existing file, never create or delete one), the device of type `kind`.
pub(crate) fn device_change(
    operation: &str,
    file_operation: Option<&str>,
    kind: &str,
    device: Body,
) -> Body {
    let mut c = Body::new().text("operation", operation);
    if let Some(f) = file_operation {
        c = c.text("fileOperation", f);
    }
    Body::new().nested("deviceChange", None, c.nested("device", Some(kind), device))
}

/// A NIC device (fields in WSDL order): `key`, the `deviceInfo` label and summary when given,
/// the backing of type `btype`, connected at power-on, its MAC kept (`manual`) or generated.
pub(crate) fn nic_device(
    key: i32,
    info: Option<(&str, &str)>,
    btype: &str,
    backing: Body,
    mac: Option<&str>,
) -> Body {
    let mut dev = Body::new().text("key", &key.to_string());
    if let Some((label, summary)) = info {
        dev = dev.nested(
            "deviceInfo",
            None,
            Body::new().text("label", label).text("summary", summary),
        );
    }
    dev = dev.nested("backing", Some(btype), backing).nested(
        "connectable",
        None,
        Body::new()
            .text("startConnected", "true")
            .text("allowGuestControl", "true")
            .text("connected", "false"),
    );
    match mac {
        Some(mac) => dev.text("addressType", "manual").text("macAddress", mac),
        None => dev.text("addressType", "generated"),
    }
}

/// Where the new VM goes: folder, pool, datastore and the networks by name.
struct Placement {
    folder: MoRef,
    pool: MoRef,
    datastore: String,
    /// Name → backing: a standard port group by name, or a distributed port group by switch
    /// uuid and port group key.
    networks: Vec<(String, NetBacking)>,
}

#[derive(Debug, Clone)]
enum NetBacking {
    Standard,
    Distributed { switch_uuid: String, key: String },
}

async fn placement(i: &Inner, plan: &RestorePlan) -> Result<Placement, HvError> {
    let c = &i.client;
    let none = |what: &str| HvError::Api {
        source_name: i.name.clone(),
        call: "CreateVM_Task".into(),
        message: format!("the inventory has no {what} to create the VM in"),
        retryable: false,
    };
    let dcs = c.retrieve_all("Datacenter", &["vmFolder"], 100).await?;
    let folder = dcs
        .iter()
        .find_map(|o| o.prop("vmFolder").and_then(Node::moref))
        .ok_or_else(|| none("datacenter"))?;
    let pools = c.retrieve_all("ResourcePool", &["name"], 100).await?;
    let pool = pools
        .iter()
        .find_map(|o| o.obj.clone())
        .ok_or_else(|| none("resource pool"))?;
    let mut stores: Vec<(String, i64)> = c
        .retrieve_all(
            "Datastore",
            &["name", "summary.freeSpace", "summary.accessible"],
            100,
        )
        .await?
        .iter()
        .filter(|o| o.text("summary.accessible") != Some("false"))
        .filter_map(|o| {
            Some((
                o.text("name")?.to_string(),
                o.text("summary.freeSpace")
                    .and_then(|f| f.parse().ok())
                    .unwrap_or(0),
            ))
        })
        .collect();
    // The original datastore when it still exists (same vCenter), else the one with most room.
    let original = plan
        .native
        .as_ref()
        .and_then(|n| serde_json::from_str::<serde_json::Value>(&n.record).ok())
        .and_then(|r| {
            r["disks"][0]["fileName"]
                .as_str()
                .and_then(|f| split_datastore_path(f).map(|(d, _)| d.to_string()))
        });
    stores.sort_by_key(|(_, free)| std::cmp::Reverse(*free));
    let datastore = original
        .filter(|o| stores.iter().any(|(n, _)| n == o))
        .or_else(|| stores.first().map(|(n, _)| n.clone()))
        .ok_or_else(|| none("datastore"))?;
    let mut networks: Vec<(String, NetBacking)> = c
        .retrieve_all("Network", &["name"], 500)
        .await?
        .iter()
        .filter(|o| o.obj.as_ref().is_some_and(|m| m.kind == "Network"))
        .filter_map(|o| Some((o.text("name")?.to_string(), NetBacking::Standard)))
        .collect();
    let mut switches: BTreeMap<String, String> = BTreeMap::new();
    for pg in c
        .retrieve_all(
            "DistributedVirtualPortgroup",
            &["name", "key", "config.distributedVirtualSwitch"],
            500,
        )
        .await?
    {
        let (Some(name), Some(key), Some(dvs)) = (
            pg.text("name"),
            pg.text("key"),
            pg.prop("config.distributedVirtualSwitch")
                .and_then(Node::moref),
        ) else {
            continue;
        };
        if !switches.contains_key(&dvs.value) {
            let u = c.retrieve_one(&dvs, &["uuid"]).await?;
            switches.insert(dvs.value.clone(), u.text("uuid").unwrap_or("").to_string());
        }
        networks.push((
            name.to_string(),
            NetBacking::Distributed {
                switch_uuid: switches[&dvs.value].clone(),
                key: key.to_string(),
            },
        ));
    }
    Ok(Placement {
        folder,
        pool,
        datastore,
        networks,
    })
}

/// The `VirtualMachineConfigSpec` of the new VM (fields in WSDL order), with `extra` as
/// `extraConfig` options, and the mapping warnings.
fn config_spec(plan: &RestorePlan, at: &Placement, extra: &[(&str, &str)]) -> (Body, Vec<String>) {
    let cfg = &plan.config;
    let mut warnings = Vec::new();
    let native: Option<serde_json::Value> = plan
        .native
        .as_ref()
        .and_then(|n| serde_json::from_str(&n.record).ok());
    // A vSphere guestId only comes from a vSphere restore point; others get a generic one.
    let guest_id = native
        .as_ref()
        .and_then(|n| n["guestId"].as_str().map(String::from))
        .unwrap_or_else(|| {
            if let Some(g) = &cfg.guest_os {
                warnings.push(format!(
                    "guest OS `{g}` has no vSphere guestId mapping; using otherGuest64"
                ));
            }
            "otherGuest64".into()
        });
    let (positions, moved) = place_disks(cfg);
    warnings.extend(moved);
    let mut changes = Body::new();
    let mut controllers: BTreeMap<(&str, u32), i32> = BTreeMap::new();
    for p in &positions {
        if p.bus == "ide" || controllers.contains_key(&(p.bus, p.number)) {
            continue;
        }
        let (kind, key) = controller(p.bus, p.number);
        controllers.insert((p.bus, p.number), key);
        let mut dev = Body::new()
            .text("key", &key.to_string())
            .text("busNumber", &p.number.to_string());
        if p.bus == "scsi" {
            dev = dev.text("sharedBus", "noSharing");
        }
        changes = changes.append(device_change("add", None, kind, dev));
    }
    for (n, (d, p)) in cfg.disks.iter().zip(&positions).enumerate() {
        // IDE controllers 200/201 exist on every new VM.
        let ctl = if p.bus == "ide" {
            200 + p.number as i32
        } else {
            controllers[&(p.bus, p.number)]
        };
        let backing = Body::new()
            .text("fileName", &format!("[{}]", at.datastore))
            .text("diskMode", "persistent")
            .text("thinProvisioned", "true");
        let dev = Body::new()
            .text("key", &(-1000 - n as i32).to_string())
            .nested("backing", Some("VirtualDiskFlatVer2BackingInfo"), backing)
            .text("controllerKey", &ctl.to_string())
            .text("unitNumber", &p.unit.to_string())
            .text("capacityInKB", &d.size.div_ceil(1024).to_string())
            .text("capacityInBytes", &d.size.to_string());
        changes = changes.append(device_change("add", Some("create"), "VirtualDisk", dev));
    }
    for (n, nic) in cfg.nics.iter().enumerate() {
        let model = nic.model.as_deref().unwrap_or("");
        let kind = nic_type(model).unwrap_or_else(|| {
            warnings.push(format!(
                "NIC {n}: model `{}` does not exist on vSphere; using vmxnet3",
                if model.is_empty() { "(none)" } else { model }
            ));
            "VirtualVmxnet3"
        });
        let want = nic.network.as_deref().unwrap_or("");
        let (network, backing) = match at.networks.iter().find(|(x, _)| x == want) {
            Some(found) => found.clone(),
            None => {
                let fallback = at
                    .networks
                    .first()
                    .cloned()
                    .unwrap_or((String::new(), NetBacking::Standard));
                warnings.push(format!(
                    "NIC {n}: network `{want}` does not exist on this vCenter; attached to `{}`",
                    fallback.0
                ));
                fallback
            }
        };
        let (btype, backing) = match backing {
            NetBacking::Standard => (
                "VirtualEthernetCardNetworkBackingInfo",
                Body::new().text("deviceName", &network),
            ),
            NetBacking::Distributed { switch_uuid, key } => (
                "VirtualEthernetCardDistributedVirtualPortBackingInfo",
                Body::new().nested(
                    "port",
                    None,
                    Body::new()
                        .text("switchUuid", &switch_uuid)
                        .text("portgroupKey", &key),
                ),
            ),
        };
        let dev = nic_device(-2000 - n as i32, None, btype, backing, nic.mac.as_deref());
        changes = changes.append(device_change("add", None, kind, dev));
    }
    let mut spec = Body::new()
        .text("name", &plan.name)
        .text("guestId", &guest_id)
        .nested(
            "files",
            None,
            Body::new().text("vmPathName", &format!("[{}]", at.datastore)),
        )
        .text("numCPUs", &cfg.cpus.max(1).to_string())
        .text("memoryMB", &cfg.memory.div_ceil(1 << 20).max(4).to_string());
    spec = spec.append(changes);
    for (k, v) in extra {
        spec = spec.nested(
            "extraConfig",
            Some("OptionValue"),
            crate::replica::option(k, v),
        );
    }
    if cfg.firmware == Firmware::UefiSecureBoot {
        spec = spec.nested(
            "bootOptions",
            None,
            Body::new().text("efiSecureBootEnabled", "true"),
        );
    }
    spec = spec.text(
        "firmware",
        if cfg.firmware == Firmware::Bios {
            "bios"
        } else {
            "efi"
        },
    );
    (spec, warnings)
}

pub(crate) async fn restore(i: &Inner, plan: &RestorePlan) -> Result<RestoredVm, HvError> {
    restore_marked(i, plan, &[]).await
}

/// [`restore`] with `extra` in the new VM's `extraConfig` from its creation on (replica marks,
/// so a run killed while the disks are written finds the VM).
pub(crate) async fn restore_marked(
    i: &Inner,
    plan: &RestorePlan,
    extra: &[(&str, &str)],
) -> Result<RestoredVm, HvError> {
    if plan.disks.len() != plan.config.disks.len() {
        return Err(HvError::Disk {
            source_name: i.name.clone(),
            disk: plan.name.clone(),
            message: format!(
                "{} disk sources for {} configured disks",
                plan.disks.len(),
                plan.config.disks.len()
            ),
        });
    }
    if i.vms().await?.iter().any(|v| v.name == plan.name) {
        return Err(i.vm_err(
            &plan.name,
            "a VM of this name exists already; pick another with --name",
        ));
    }
    let at = placement(i, plan).await?;
    let (spec, warnings) = config_spec(plan, &at, extra);
    for w in &warnings {
        tracing::warn!(source = %i.name, vm = %plan.name, "restore: {w}");
    }
    let c = &i.client;
    let r = c
        .run_task(
            "CreateVM_Task",
            Body::new()
                .moref("_this", &at.folder)
                .nested("config", None, spec)
                .moref("pool", &at.pool),
        )
        .await?;
    let vm = r
        .as_ref()
        .and_then(Node::moref)
        .ok_or_else(|| HvError::Api {
            source_name: i.name.clone(),
            call: "CreateVM_Task".into(),
            message: "the task returned no VM".into(),
            retryable: false,
        })?;
    i.journal(true, "restore-vm", &vm.value);
    tracing::info!(source = %i.name, vm = %plan.name, moref = %vm.value, datastore = %at.datastore, "VM created; writing its disks");
    match fill(i, plan, &vm).await {
        Ok((uuid, how)) => {
            i.journal(false, "restore-vm", &vm.value);
            Ok(RestoredVm {
                id: uuid,
                name: plan.name.clone(),
                transport: how,
            })
        }
        Err(e) => {
            tracing::warn!(source = %i.name, vm = %plan.name, error = %e, "restore failed; destroying the partial VM");
            if let Err(e2) = destroy(i, &vm).await {
                tracing::warn!(source = %i.name, vm = %plan.name, error = %e2, "cannot destroy the partial VM");
            } else {
                i.journal(false, "restore-vm", &vm.value);
            }
            Err(e)
        }
    }
}

/// Powers a VM off if it runs and destroys it with its files.
pub(crate) async fn destroy(i: &Inner, vm: &MoRef) -> Result<(), HvError> {
    let c = &i.client;
    let st = c.retrieve_one(vm, &["runtime.powerState"]).await?;
    if st.text("runtime.powerState") == Some("poweredOn") {
        c.run_task("PowerOffVM_Task", Body::new().moref("_this", vm))
            .await?;
    }
    c.run_task("Destroy_Task", Body::new().moref("_this", vm))
        .await?;
    Ok(())
}

/// Writes the disks of the created VM `vm`, powers it on if asked; returns its uuid and how
/// the disks travelled.
async fn fill(i: &Inner, plan: &RestorePlan, vm: &MoRef) -> Result<(String, String), HvError> {
    let c = &i.client;
    let mut o = c.retrieve_one(vm, crate::model::VM_PATHS).await?;
    o.obj = Some(vm.clone());
    let created = Vm::from_object(&o)
        .ok_or_else(|| i.vm_err(&plan.name, "the created VM cannot be read back"))?;
    let (positions, _) = place_disks(&plan.config);
    let mut how = String::new();
    for (d, p) in plan.disks.iter().zip(&positions) {
        let pos = p.to_string();
        let disk = created
            .disks
            .iter()
            .find(|x| x.position == pos)
            .ok_or_else(|| HvError::Disk {
                source_name: i.name.clone(),
                disk: pos.clone(),
                message: format!("the created VM `{}` has no disk at {pos}", plan.name),
            })?;
        let disk_err = |m: String| HvError::Disk {
            source_name: i.name.clone(),
            disk: format!("{pos} of `{}`", plan.name),
            message: m,
        };
        if disk.capacity < d.source.size() {
            return Err(disk_err(format!(
                "created with {} bytes, the restore point's disk has {}",
                disk.capacity,
                d.source.size()
            )));
        }
        let target = NbdTarget {
            vm,
            snapshot: None,
            file: &disk.file,
            capacity: disk.capacity,
            writable: true,
        };
        let (nbd, nbdkit, h) = start_nbdkit(i, &target)
            .await
            .map_err(|m| disk_err(format!("network write path: {m}")))?;
        let written = write_disk(d.source.as_ref(), &nbd).await;
        nbd.close().await;
        drop(nbdkit);
        let written = written.map_err(disk_err)?;
        tracing::info!(source = %i.name, vm = %plan.name, disk = %pos, bytes = written, transport = %h, "disk written");
        how = h;
    }
    if plan.power_on {
        c.run_task("PowerOnVM_Task", Body::new().moref("_this", vm))
            .await?;
    }
    Ok((
        if created.uuid.is_empty() {
            vm.value.clone()
        } else {
            created.uuid.clone()
        },
        how,
    ))
}

/// Copies the allocated, non-zero parts of `src` onto a fresh (zeroed, thin) disk; returns
/// the bytes written.
async fn write_disk(src: &dyn BlockSource, nbd: &ferry_nbd::NbdClient) -> Result<u64, String> {
    let size = src.size();
    let alloc = src
        .allocated(0..size)
        .await
        .map_err(|e| format!("allocation map: {e}"))?;
    let mut written = 0;
    let mut buf = vec![0u8; PIECE as usize];
    for e in alloc.iter() {
        let mut pos = e.offset;
        let end = e.offset + e.length;
        while pos < end {
            let n = (end - pos).min(PIECE) as usize;
            src.read_at(pos, &mut buf[..n])
                .await
                .map_err(|e| format!("read at {pos}: {e}"))?;
            if buf[..n].iter().any(|b| *b != 0) {
                nbd.write(pos, &buf[..n])
                    .await
                    .map_err(|e| format!("NBD write at {pos}: {e}"))?;
                written += n as u64;
            }
            pos += n as u64;
        }
    }
    nbd.flush().await.map_err(|e| format!("NBD flush: {e}"))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::vm::DiskConfig;

    #[test]
    fn positions_are_kept_or_placed_on_scsi0() {
        assert_eq!(
            parse_position("nvme1:2"),
            Some(Position {
                bus: "nvme",
                number: 1,
                unit: 2
            })
        );
        assert_eq!(parse_position("xvda"), None);
        assert_eq!(parse_position("scsi:1"), None);
        let disk = |c: &str| DiskConfig {
            name: c.into(),
            size: 1 << 20,
            controller: Some(c.into()),
            bootable: false,
        };
        let cfg = VmConfig {
            disks: vec![disk("scsi0:0"), disk("xvdb"), disk("3"), disk("sata0:1")],
            ..Default::default()
        };
        let (p, w) = place_disks(&cfg);
        let p: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(p, ["scsi0:0", "scsi0:1", "scsi0:2", "sata0:1"]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("xvdb") && w[0].contains("scsi0:1"), "{w:?}");
    }
}
