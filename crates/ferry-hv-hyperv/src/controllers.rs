//! Where each virtual hard disk of a VM sits: `ide0:0`, `ide1:1`, `scsi0:3`, `scsi1:0` (ADR 0166).
//!
//! Hyper-V links a disk to its place through `Parent`: the image's
//! `Msvm_StorageAllocationSettingData` (ResourceType 31) names its drive, a
//! `Msvm_ResourceAllocationSettingData` (ResourceType 17, `Synthetic Disk Drive`) whose
//! `AddressOnParent` is the location and whose `Parent` names the controller: ResourceType 5
//! (`Emulated IDE Controller`, generation 1 only, `Address` 0 or 1) or 6 (`Synthetic SCSI
//! Controller`). Controllers of a kind are numbered as Hyper-V does: IDE by `Address`, SCSI in
//! the order the host reports them. [`positions`] is the pure part; [`Layout::read`] fetches.
//!
//! A disk whose drive or controller cannot be found keeps the old guess `scsi0:<the image's
//! AddressOnParent>` with a warning, so an odd host never stops a backup or the inventory.

use crate::cim::Instance;
use crate::client::WsmanClient;
use crate::error::HypervError;
use ferry_core::vm::DiskConfig;
use std::collections::BTreeMap;

/// `ResourceSubType` of a generation 1 VM's IDE controllers.
pub const IDE_CONTROLLER: &str = "Microsoft:Hyper-V:Emulated IDE Controller";
/// `ResourceSubType` of a SCSI controller.
pub const SCSI_CONTROLLER: &str = "Microsoft:Hyper-V:Synthetic SCSI Controller";

/// The InstanceID a `Parent` names. Hyper-V writes a WMI object path
/// (`\\HOST\root\virtualization\v2:Msvm_ResourceAllocationSettingData.InstanceID="Microsoft:…\\…"`,
/// backslashes and quotes escaped); a bare InstanceID is taken as it is.
pub fn parent_id(parent: &str) -> String {
    let Some(at) = parent.find("InstanceID=\"") else {
        return parent.to_string();
    };
    let rest = &parent[at + 12..];
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '"' => break,
            c => out.push(c),
        }
    }
    out
}

/// Whether controller RASD `c` is IDE (`Some(true)`), SCSI (`Some(false)`) or neither.
fn bus(c: &Instance) -> Option<bool> {
    match (c.text("ResourceType"), c.text("ResourceSubType")) {
        (Some("5"), _) | (_, Some(IDE_CONTROLLER)) => Some(true),
        (Some("6"), _) | (_, Some(SCSI_CONTROLLER)) => Some(false),
        _ => None,
    }
}

fn owned(i: &Instance, prefix: &str) -> bool {
    i.text("InstanceID")
        .is_some_and(|id| id.to_lowercase().starts_with(prefix))
}

/// Where the disks of one VM sit: disk key (lower case) → position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    /// Disk key (the device segment of the image's InstanceID, lower case) → position.
    pub by_key: BTreeMap<String, String>,
    /// Disks placed by the `scsi0:N` guess, and why.
    pub warnings: Vec<String>,
}

impl Positions {
    /// The position of disk `key`, if known.
    pub fn of(&self, key: &str) -> Option<String> {
        self.by_key.get(&key.to_lowercase()).cloned()
    }
}

/// The positions of the disks of VM `vm` (its id), from the host's images (`sasds`) and its
/// drives and controllers (`rasds`; other devices and other VMs' are ignored).
pub fn positions(vm: &str, sasds: &[Instance], rasds: &[Instance]) -> Positions {
    let prefix = format!("microsoft:{}\\", vm.to_lowercase());
    let by_id: BTreeMap<String, &Instance> = rasds
        .iter()
        .filter(|r| owned(r, &prefix))
        .filter_map(|r| Some((r.text("InstanceID")?.to_lowercase(), r)))
        .collect();
    // The VM's controllers of each kind, numbered as Hyper-V numbers them.
    let mut ide: Vec<(u64, usize, String)> = Vec::new();
    let mut scsi: Vec<String> = Vec::new();
    for (n, r) in rasds.iter().enumerate().filter(|(_, r)| owned(r, &prefix)) {
        let id = r.text("InstanceID").unwrap_or("").to_lowercase();
        match bus(r) {
            Some(true) => ide.push((r.u64("Address").unwrap_or(u64::MAX), n, id)),
            Some(false) => scsi.push(id),
            None => {}
        }
    }
    ide.sort();
    let number = |ctl: &str| -> Option<String> {
        if let Some(k) = ide.iter().position(|(_, _, id)| id == ctl) {
            return Some(format!("ide{k}"));
        }
        scsi.iter()
            .position(|id| id == ctl)
            .map(|k| format!("scsi{k}"))
    };
    let mut out = Positions::default();
    for d in sasds.iter().filter(|d| owned(d, &prefix)) {
        let Some(key) = d
            .text("InstanceID")
            .and_then(|id| id.split('\\').nth(1))
            .map(str::to_lowercase)
        else {
            continue;
        };
        let drive = d
            .text("Parent")
            .and_then(|p| by_id.get(&parent_id(p).to_lowercase()));
        let found = drive.and_then(|drv| {
            let ctl = parent_id(drv.text("Parent")?).to_lowercase();
            let loc = drv.u64("AddressOnParent").or(d.u64("AddressOnParent"))?;
            Some(format!("{}:{loc}", number(&ctl)?))
        });
        let pos = match found {
            Some(p) => Some(p),
            None => {
                let why = if drive.is_none() {
                    "its drive (the image's Parent) is not among the VM's devices"
                } else {
                    "its drive's controller is not among the VM's IDE or SCSI controllers"
                };
                let guess = d.u64("AddressOnParent").map(|a| format!("scsi0:{a}"));
                out.warnings.push(format!(
                    "disk {key}: {why}; position taken as {}",
                    guess.as_deref().unwrap_or("unknown")
                ));
                guess
            }
        };
        if let Some(p) = pos {
            out.by_key.insert(key, p);
        }
    }
    out
}

/// Marks the disk on `ide0:0`, if any, as the one the VM boots from (a generation 1 VM's BIOS
/// boots from IDE 0:0, whatever order the host lists the disks in); else the first stays so.
pub fn mark_boot(disks: &mut [DiskConfig]) {
    if disks
        .iter()
        .any(|d| d.controller.as_deref() == Some("ide0:0"))
    {
        for d in disks {
            d.bootable = d.controller.as_deref() == Some("ide0:0");
        }
    }
}

/// A host's images, drives and controllers, read once for all its VMs.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    sasds: Vec<Instance>,
    rasds: Vec<Instance>,
}

impl Layout {
    /// Reads them from the host behind `c` (virtual hard disks, disk drives, IDE and SCSI
    /// controllers: four filtered enumerations).
    pub async fn read(c: &WsmanClient) -> Result<Self, HypervError> {
        let q = |class: &str, t: u8| format!("SELECT * FROM {class} WHERE ResourceType = {t}");
        let sasd = "Msvm_StorageAllocationSettingData";
        let rasd = "Msvm_ResourceAllocationSettingData";
        let sasds = c.enumerate(sasd, Some(&q(sasd, 31))).await?;
        let mut rasds = Vec::new();
        // Drives, IDE controllers, SCSI controllers.
        for t in [17, 5, 6] {
            rasds.extend(c.enumerate(rasd, Some(&q(rasd, t))).await?);
        }
        Ok(Self { sasds, rasds })
    }

    /// The positions of VM `vm`'s disks; a disk placed by guess is logged.
    pub fn positions(&self, source: &str, vm: &str) -> Positions {
        let p = positions(vm, &self.sasds, &self.rasds);
        for w in &p.warnings {
            tracing::warn!(source, vm, "{w}");
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cim::Value;

    fn inst(class: &str, props: &[(&str, &str)]) -> Instance {
        Instance {
            class: class.into(),
            props: props
                .iter()
                .map(|(k, v)| (k.to_string(), Value::Text(v.to_string())))
                .collect(),
        }
    }

    fn path(id: &str) -> String {
        format!(
            "\\\\HV01\\root\\virtualization\\v2:Msvm_ResourceAllocationSettingData.InstanceID=\"{}\"",
            id.replace('\\', "\\\\")
        )
    }

    fn ctl(id: &str, rt: &str, sub: &str, addr: Option<&str>) -> Instance {
        let mut p = vec![
            ("InstanceID", id),
            ("ResourceType", rt),
            ("ResourceSubType", sub),
        ];
        if let Some(a) = addr {
            p.push(("Address", a));
        }
        inst("Msvm_ResourceAllocationSettingData", &p)
    }

    fn drive(id: &str, parent: &str, loc: &str) -> Instance {
        inst(
            "Msvm_ResourceAllocationSettingData",
            &[
                ("InstanceID", id),
                ("ResourceType", "17"),
                ("Parent", &path(parent)),
                ("AddressOnParent", loc),
            ],
        )
    }

    fn vhd(vm: &str, key: &str, parent: Option<&str>, addr: &str) -> Instance {
        let id = format!("Microsoft:{vm}\\{key}\\0\\0\\L");
        let pp = parent.map(path);
        let mut p = vec![
            ("InstanceID", id.as_str()),
            ("ResourceType", "31"),
            ("AddressOnParent", addr),
        ];
        if let Some(x) = &pp {
            p.push(("Parent", x));
        }
        inst("Msvm_StorageAllocationSettingData", &p)
    }

    #[test]
    fn the_disk_on_ide_0_0_is_the_boot_disk() {
        let d = |at: &str, bootable: bool| DiskConfig {
            name: at.into(),
            size: 1,
            controller: Some(at.into()),
            bootable,
        };
        let mut disks = [d("scsi0:0", true), d("ide0:0", false)];
        mark_boot(&mut disks);
        assert_eq!(disks.map(|d| d.bootable), [false, true]);
        let mut disks = [d("scsi0:0", true), d("scsi0:1", false)];
        mark_boot(&mut disks);
        assert_eq!(disks.map(|d| d.bootable), [true, false]);
    }

    #[test]
    fn parent_paths_name_their_instance() {
        assert_eq!(parent_id(&path("Microsoft:A\\B\\0")), "Microsoft:A\\B\\0");
        assert_eq!(parent_id("Microsoft:A\\B"), "Microsoft:A\\B");
        assert_eq!(parent_id("x.InstanceID=\"a\\\"b\""), "a\"b");
    }

    #[test]
    fn generation_1_disks_sit_on_ide_and_scsi() {
        let vm = "VM1";
        // Reported out of order: IDE 1 first, two SCSI controllers.
        let rasds = vec![
            ctl("Microsoft:VM1\\IDE\\1", "5", IDE_CONTROLLER, Some("1")),
            ctl("Microsoft:VM1\\IDE\\0", "5", IDE_CONTROLLER, Some("0")),
            ctl("Microsoft:VM1\\S-A", "6", SCSI_CONTROLLER, None),
            ctl("Microsoft:VM1\\S-B", "6", SCSI_CONTROLLER, None),
            drive("Microsoft:VM1\\IDE\\0\\0\\D", "Microsoft:VM1\\IDE\\0", "0"),
            drive("Microsoft:VM1\\IDE\\1\\1\\D", "Microsoft:VM1\\IDE\\1", "1"),
            drive("Microsoft:VM1\\S-A\\3\\D", "Microsoft:VM1\\S-A", "3"),
            drive("Microsoft:VM1\\S-B\\0\\D", "Microsoft:VM1\\S-B", "0"),
            // Another VM's controller, same shape: never counted.
            ctl("Microsoft:VM2\\IDE\\0", "5", IDE_CONTROLLER, Some("0")),
        ];
        let sasds = vec![
            vhd(vm, "boot", Some("Microsoft:VM1\\IDE\\0\\0\\D"), "0"),
            vhd(vm, "Data", Some("Microsoft:VM1\\IDE\\1\\1\\D"), "1"),
            vhd(vm, "logs", Some("Microsoft:VM1\\S-A\\3\\D"), "3"),
            vhd(vm, "more", Some("Microsoft:vm1\\s-b\\0\\d"), "0"),
            vhd("VM2", "other", None, "0"),
        ];
        let p = positions(vm, &sasds, &rasds);
        assert_eq!(p.of("boot").as_deref(), Some("ide0:0"));
        assert_eq!(p.of("data").as_deref(), Some("ide1:1"));
        assert_eq!(p.of("logs").as_deref(), Some("scsi0:3"));
        assert_eq!(p.of("MORE").as_deref(), Some("scsi1:0"));
        assert_eq!(p.of("other"), None);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn a_disk_without_its_controller_keeps_the_old_guess_with_a_warning() {
        let vm = "VM1";
        let rasds = vec![drive("Microsoft:VM1\\X\\0\\D", "Microsoft:VM1\\gone", "0")];
        let sasds = vec![
            vhd(vm, "a", Some("Microsoft:VM1\\X\\0\\D"), "2"),
            vhd(vm, "b", None, "5"),
            vhd(vm, "c", Some("not a path"), ""),
        ];
        let p = positions(vm, &sasds, &rasds);
        assert_eq!(p.of("a").as_deref(), Some("scsi0:2"));
        assert_eq!(p.of("b").as_deref(), Some("scsi0:5"));
        assert_eq!(p.of("c"), None);
        assert_eq!(p.warnings.len(), 3);
        assert!(p.warnings[0].contains("controller"), "{:?}", p.warnings);
        assert!(p.warnings[1].contains("drive"), "{:?}", p.warnings);
    }
}
