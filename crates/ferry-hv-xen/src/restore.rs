//! Whole-VM restore: create the VM from the captured XenAPI record (or the normalized
//! config), create and upload its VDIs with `PUT /import_raw_vdi`, attach VBDs and VIFs.
//! A failure removes everything created so far.

use crate::client::XenClient;
use ferry_hv::{HvError, RestorePlan, RestoredVm};
use serde_json::{Value as J, json};

/// Fields of a VM record that describe the machine (copied); the rest is identity or state.
const COPIED: &[&str] = &[
    "name_description",
    "VCPUs_max",
    "VCPUs_at_startup",
    "VCPUs_params",
    "memory_static_max",
    "memory_static_min",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "HVM_boot_policy",
    "HVM_boot_params",
    "HVM_shadow_multiplier",
    "platform",
    "domain_type",
    "PV_bootloader",
    "PV_kernel",
    "PV_ramdisk",
    "PV_args",
    "PV_bootloader_args",
    "PV_legacy_args",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
    "tags",
    "user_version",
    "recommendations",
    "xenstore_data",
    "has_vendor_device",
];

/// The VM record to create for `plan` (machine fields of the captured record, or the
/// normalized configuration) and the captured record itself.
pub(crate) fn vm_record(plan: &RestorePlan) -> (serde_json::Map<String, J>, Option<J>) {
    let mut rec = serde_json::Map::new();
    let native: Option<J> = plan
        .native
        .as_ref()
        .filter(|n| n.format == "xenapi-vm-record")
        .and_then(|n| serde_json::from_str(&n.record).ok());
    if let Some(J::Object(n)) = &native {
        for k in COPIED {
            if let Some(v) = n.get(*k) {
                rec.insert((*k).into(), v.clone());
            }
        }
    } else {
        // From another hypervisor: the normalized config, with what Xen needs to boot it.
        let cpus = plan.config.cpus.max(1);
        let firmware = match plan.config.firmware {
            ferry_core::vm::Firmware::Bios => "bios",
            _ => "uefi",
        };
        rec.insert("HVM_boot_policy".into(), json!("BIOS order"));
        rec.insert(
            "HVM_boot_params".into(),
            json!({"order": "cdn", "firmware": firmware}),
        );
        if plan.config.firmware == ferry_core::vm::Firmware::UefiSecureBoot {
            rec.insert("platform".into(), json!({"secureboot": "true"}));
        }
        for k in ["VCPUs_max", "VCPUs_at_startup"] {
            rec.insert(k.into(), json!(cpus));
        }
        for k in [
            "memory_static_max",
            "memory_static_min",
            "memory_dynamic_max",
            "memory_dynamic_min",
        ] {
            rec.insert(k.into(), json!(plan.config.memory));
        }
    }
    rec.insert("name_label".into(), json!(plan.name));
    (rec, native)
}

pub(crate) async fn restore(
    c: &XenClient,
    source: &str,
    plan: &RestorePlan,
) -> Result<RestoredVm, HvError> {
    restore_marked(c, source, plan, json!({"ferry-restored": "1"})).await
}

/// A restore whose VM carries `other_config` from its creation on.
pub(crate) async fn restore_marked(
    c: &XenClient,
    source: &str,
    plan: &RestorePlan,
    other_config: J,
) -> Result<RestoredVm, HvError> {
    let (mut rec, native) = vm_record(plan);
    rec.insert("other_config".into(), other_config);
    let vm = c.call_str("VM.create", vec![J::Object(rec)]).await?;
    let mut created_vdis = Vec::new();
    let r = fill(c, source, plan, &vm, native.as_ref(), &mut created_vdis).await;
    match r {
        Ok(()) => {
            let uuid = c.call_str("VM.get_uuid", vec![json!(vm)]).await?;
            Ok(RestoredVm {
                id: uuid,
                name: plan.name.clone(),
                transport: "import_raw_vdi".into(),
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, vm = %plan.name, "restore failed; removing the partial VM");
            let _ = c.call("VM.hard_shutdown", vec![json!(vm)]).await;
            let _ = c.call("VM.destroy", vec![json!(vm)]).await;
            for v in created_vdis {
                let _ = c.call("VDI.destroy", vec![json!(v)]).await;
            }
            Err(e)
        }
    }
}

async fn fill(
    c: &XenClient,
    source: &str,
    plan: &RestorePlan,
    vm: &str,
    native: Option<&J>,
    created: &mut Vec<String>,
) -> Result<(), HvError> {
    let sr = default_sr(c).await?;
    if plan.disks.len() != plan.config.disks.len() {
        return Err(HvError::Disk {
            source_name: source.into(),
            disk: plan.name.clone(),
            message: format!(
                "{} disk sources for {} configured disks",
                plan.disks.len(),
                plan.config.disks.len()
            ),
        });
    }
    let userdevices = userdevices(source, plan);
    for ((d, cfg), userdevice) in plan.disks.iter().zip(&plan.config.disks).zip(userdevices) {
        let size = d.source.size();
        let vdi = c
            .call_str(
                "VDI.create",
                vec![json!({"SR": sr, "name_label": format!("{} {}", plan.name, d.name), "name_description": "restored by Ferry",
                    "virtual_size": size.to_string(), "type": "user", "sharable": false, "read_only": false,
                    "other_config": {}, "xenstore_data": {}, "sm_config": {}, "tags": []})],
            )
            .await?;
        created.push(vdi.clone());
        c.import_raw(&vdi, d.source.as_ref()).await?;
        c.call(
            "VBD.create",
            vec![json!({"VM": vm, "VDI": vdi, "userdevice": userdevice, "bootable": cfg.bootable, "mode": "RW",
                "type": "Disk", "empty": false, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})],
        )
        .await?;
    }
    create_vifs(c, source, plan, vm, native).await?;
    if plan.power_on {
        c.call("VM.start", vec![json!(vm), json!(false), json!(false)])
            .await?;
    }
    Ok(())
}

/// The pool's default SR.
pub(crate) async fn default_sr(c: &XenClient) -> Result<String, HvError> {
    let pools = c.call("pool.get_all_records", vec![]).await?;
    Ok(pools
        .as_object()
        .and_then(|m| m.values().next())
        .and_then(|p| p.get("default_SR"))
        .and_then(J::as_str)
        .unwrap_or_default()
        .to_string())
}

/// The VIFs of `plan`, on the network of the same name (else the first one).
pub(crate) async fn create_vifs(
    c: &XenClient,
    source: &str,
    plan: &RestorePlan,
    vm: &str,
    native: Option<&J>,
) -> Result<(), HvError> {
    let nets = c.call("network.get_all_records", vec![]).await?;
    let nets = nets.as_object().cloned().unwrap_or_default();
    let native_vifs: Vec<J> = native
        .and_then(|n| n.get("ferry:VIFs"))
        .and_then(J::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, nic) in plan.config.nics.iter().enumerate() {
        if let (None, Some(m)) = (native, nic.model.as_deref().filter(|m| !m.is_empty())) {
            tracing::warn!(source = %source, vm = %plan.name,
                "restore: NIC {i}: model `{m}` is not kept (the pool picks the emulated model)");
        }
        let net = nets
            .iter()
            .find(|(_, n)| nic.network.as_deref() == n.get("name_label").and_then(J::as_str))
            .or_else(|| {
                let first = nets.iter().next();
                tracing::warn!(source = %source, vm = %plan.name,
                    "restore: NIC {i}: network `{}` does not exist in this pool; attached to `{}`",
                    nic.network.as_deref().unwrap_or("(none)"),
                    first.and_then(|(_, n)| n.get("name_label")).and_then(J::as_str).unwrap_or(""));
                first
            })
            .map(|(r, _)| r.clone())
            .ok_or_else(|| HvError::Disk {
                source_name: source.into(),
                disk: plan.name.clone(),
                message: "the pool has no network to attach the VIF to".into(),
            })?;
        let mtu = native_vifs
            .get(i)
            .and_then(|v| v.get("MTU"))
            .cloned()
            .unwrap_or(json!(1500));
        c.call(
            "VIF.create",
            vec![json!({"VM": vm, "network": net, "device": i.to_string(), "MAC": nic.mac.clone().unwrap_or_default(),
                "MTU": mtu, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})],
        )
        .await?;
    }
    Ok(())
}

/// The VBD `userdevice` of each disk: its own when it is a Xen device number, else the next
/// free number (a vSphere `scsi0:1` has no Xen equivalent), with a warning.
fn userdevices(source: &str, plan: &RestorePlan) -> Vec<String> {
    let own: Vec<Option<u32>> = plan
        .config
        .disks
        .iter()
        .map(|d| d.controller.as_deref().and_then(|c| c.parse().ok()))
        .collect();
    let mut taken: Vec<u32> = own.iter().flatten().copied().collect();
    plan.config
        .disks
        .iter()
        .zip(own)
        .map(|(d, o)| {
            let n = o.unwrap_or_else(|| {
                let n = (0..).find(|n| !taken.contains(n)).unwrap_or(0);
                taken.push(n);
                tracing::warn!(source = %source, vm = %plan.name,
                    "restore: disk `{}`: position `{}` does not exist on Xen; attached as device {n}",
                    d.name, d.controller.as_deref().unwrap_or("(none)"));
                n
            });
            n.to_string()
        })
        .collect()
}
