//! The hot-add transport: the snapshot's disk files are added to the proxy VM (`proxy-vm`) as
//! `independent_nonpersistent` disks on its SCSI controller (ReconfigVM_Task, no file operation),
//! read as local block devices, and always removed again (ReconfigVM_Task `remove`, the file
//! kept). An attachment is journaled before the reconfigure, so a killed backup's leftovers are
//! detached by the next run's sweep, which also detaches any disk of another VM's folder found
//! on the proxy in that mode.
//!
//! The device of a disk at `scsiB:U` on the proxy is `<hotadd-device-dir>/scsiB:U` — on a Linux
//! proxy a udev rule names it from the SCSI address (docs/drivers.md); the simulator makes it.

use crate::driver::Inner;
use crate::model::Vm;
use crate::restore::device_change;
use crate::xml::{Body, MoRef, Node};
use ferry_hv::HvError;
use std::path::PathBuf;
use std::time::Duration;

/// Journal kind of an attachment; the id is `<proxy moref>|<datastore path>`.
pub(crate) const JOURNAL_KIND: &str = "hotadd";

/// How long a hot-added disk may take to show up as a device.
const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// The proxy VM and the SCSI controller disks are hot-added to.
#[derive(Debug, Clone)]
pub(crate) struct Proxy {
    pub(crate) vm: MoRef,
    name: String,
    controller_key: i64,
    bus: i64,
    used_units: Vec<i64>,
}

fn scsi_controller(vm: &Vm) -> Option<(i64, i64)> {
    vm.devices.as_ref()?.children.iter().find_map(|d| {
        let t = d.type_name();
        (t.contains("SCSIController")
            || t.starts_with("VirtualLsiLogic")
            || t == "VirtualBusLogicController")
            .then(|| Some((d.i64_at("key")?, d.i64_at("busNumber").unwrap_or(0))))
            .flatten()
    })
}

/// Finds the configured proxy VM and its SCSI controller.
pub(crate) async fn find_proxy(i: &Inner) -> Result<Proxy, String> {
    let name = i.cfg.proxy_vm.clone().ok_or_else(|| {
        format!(
            "no proxy-vm in source `{}`: hot-add attaches the snapshot's disks to the VM Ferry runs in",
            i.name
        )
    })?;
    let vm = i
        .find_vm(&name)
        .await
        .map_err(|e| format!("proxy VM: {e}"))?;
    let (controller_key, bus) = scsi_controller(&vm).ok_or_else(|| {
        format!("the proxy VM `{name}` has no SCSI controller to hot-add disks to")
    })?;
    let prefix = format!("scsi{bus}:");
    let used_units = vm
        .disks
        .iter()
        .filter_map(|d| d.position.strip_prefix(&prefix)?.parse().ok())
        .collect();
    Ok(Proxy {
        vm: vm.moref,
        name,
        controller_key,
        bus,
        used_units,
    })
}

pub(crate) fn journal_id(proxy: &MoRef, file: &str) -> String {
    format!("{}|{file}", proxy.value)
}

/// Adds the disk file `file` (`[ds] dir/disk.vmdk`, `capacity` bytes) to the proxy and waits
/// for its device; returns the device path.
pub(crate) async fn attach(
    i: &Inner,
    proxy: &mut Proxy,
    file: &str,
    capacity: u64,
) -> Result<PathBuf, String> {
    // 16 targets per SCSI bus; 7 is the controller's own.
    let unit = (0..16)
        .find(|u| *u != 7 && !proxy.used_units.contains(u))
        .ok_or_else(|| format!("the proxy VM `{}` has no free SCSI unit", proxy.name))?;
    let id = journal_id(&proxy.vm, file);
    i.journal(true, JOURNAL_KIND, &id);
    let dev = Body::new()
        .text("key", "-1")
        .nested(
            "backing",
            Some("VirtualDiskFlatVer2BackingInfo"),
            Body::new()
                .text("fileName", file)
                .text("diskMode", "independent_nonpersistent"),
        )
        .text("controllerKey", &proxy.controller_key.to_string())
        .text("unitNumber", &unit.to_string())
        .text("capacityInKB", &capacity.div_ceil(1024).to_string());
    let r = i
        .client
        .run_task(
            "ReconfigVM_Task",
            Body::new().moref("_this", &proxy.vm).nested(
                "spec",
                None,
                device_change("add", None, "VirtualDisk", dev),
            ),
        )
        .await;
    if let Err(e) = r {
        // Not attached (or attached and reported failed: the sweep finds it by the journal).
        if detach(i, &proxy.vm, file).await.is_ok() {
            i.journal(false, JOURNAL_KIND, &id);
        }
        return Err(format!("ReconfigVM_Task on the proxy: {e}"));
    }
    proxy.used_units.push(unit);
    let path = i
        .cfg
        .hotadd_device_dir
        .join(format!("scsi{}:{unit}", proxy.bus));
    let started = tokio::time::Instant::now();
    while !path.exists() {
        if started.elapsed() > DEVICE_WAIT {
            return Err(format!(
                "the hot-added disk did not appear as {} within {} s",
                path.display(),
                DEVICE_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::debug!(source = %i.name, proxy = %proxy.name, file, device = %path.display(), "disk hot-added");
    Ok(path)
}

/// Removes the disk backed by `file` from the proxy (the file stays); false if not attached.
pub(crate) async fn detach(i: &Inner, proxy: &MoRef, file: &str) -> Result<bool, HvError> {
    let o = i
        .client
        .retrieve_one(proxy, &["config.hardware.device"])
        .await?;
    let Some(d) = o.prop("config.hardware.device").and_then(|devs| {
        devs.children
            .iter()
            .find(|d| d.type_name() == "VirtualDisk" && d.text_at("backing/fileName") == Some(file))
    }) else {
        return Ok(false);
    };
    remove_device(i, proxy, d).await?;
    Ok(true)
}

async fn remove_device(i: &Inner, proxy: &MoRef, d: &Node) -> Result<(), HvError> {
    let mut dev = Body::new().text("key", &d.i64_at("key").unwrap_or(0).to_string());
    if let Some(c) = d.i64_at("controllerKey") {
        dev = dev.text("controllerKey", &c.to_string());
    }
    if let Some(u) = d.i64_at("unitNumber") {
        dev = dev.text("unitNumber", &u.to_string());
    }
    i.client
        .run_task(
            "ReconfigVM_Task",
            Body::new().moref("_this", proxy).nested(
                "spec",
                None,
                device_change("remove", None, "VirtualDisk", dev),
            ),
        )
        .await?;
    Ok(())
}

/// The orphan sweep: journaled attachments, then (with a proxy configured) any
/// `independent_nonpersistent` disk on the proxy whose file lies outside the proxy's own folder.
/// Returns how many were detached.
pub(crate) async fn sweep(i: &Inner, journaled: &[String], all: bool) -> Result<usize, HvError> {
    let mut n = 0;
    for id in journaled {
        if let Some((vm, file)) = id.split_once('|') {
            let proxy = MoRef::new("VirtualMachine", vm);
            match detach(i, &proxy, file).await {
                Ok(true) => {
                    tracing::warn!(source = %i.name, file, "detached a disk a killed backup left on the proxy");
                    n += 1;
                }
                Ok(false) => {}
                Err(e) if e.to_string().contains("ManagedObjectNotFound") => {}
                Err(e) => return Err(e),
            }
        }
        i.journal(false, JOURNAL_KIND, id);
    }
    // Disks no journal knows about may belong to a backup running in another process: only
    // `ferry source cleanup` (all) detaches them.
    let Some(name) = i.cfg.proxy_vm.as_deref().filter(|_| all) else {
        return Ok(n);
    };
    let Ok(proxy) = i.find_vm(name).await else {
        return Ok(n);
    };
    let own_dir = proxy
        .disks
        .iter()
        .find(|d| !d.mode.starts_with("independent"))
        .and_then(|d| d.file.rsplit_once('/').map(|(dir, _)| format!("{dir}/")));
    let Some(devs) = proxy.devices.as_ref() else {
        return Ok(n);
    };
    for d in devs.children.iter().filter(|d| {
        d.type_name() == "VirtualDisk"
            && d.text_at("backing/diskMode") == Some("independent_nonpersistent")
            && own_dir
                .as_deref()
                .is_some_and(|o| !d.text_at("backing/fileName").unwrap_or("").starts_with(o))
    }) {
        remove_device(i, &proxy.moref, d).await?;
        tracing::warn!(source = %i.name, proxy = %name, file = d.text_at("backing/fileName").unwrap_or(""),
            "detached a foreign disk left on the proxy");
        n += 1;
    }
    Ok(n)
}
