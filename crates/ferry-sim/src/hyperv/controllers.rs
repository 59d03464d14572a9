//! The guests' storage controllers and disk drives, as Hyper-V has them (ADR 0166): a
//! generation 1 VM has two emulated IDE controllers (`Address` 0 and 1) with its boot disk on
//! IDE 0, location 0, and further disks on SCSI controller 0; a generation 2 VM has SCSI
//! controllers only. Each image's `Msvm_StorageAllocationSettingData.Parent` is the WMI path of
//! its drive (ResourceType 17), whose `Parent` is the path of its controller and whose
//! `AddressOnParent` is the location — the chain a backup follows to each disk's position.

use super::{State, inst, text};
use ferry_wsman::cim::Instance;

/// `ResourceSubType` of a SCSI controller.
pub(super) const SCSI: &str = "Microsoft:Hyper-V:Synthetic SCSI Controller";
/// … of a generation 1 VM's IDE controllers.
pub(super) const IDE: &str = "Microsoft:Hyper-V:Emulated IDE Controller";
/// … of a disk drive.
pub(super) const DRIVE: &str = "Microsoft:Hyper-V:Synthetic Disk Drive";
/// Device-class segments of the controllers' InstanceIDs, as Hyper-V writes them.
const SCSI_CLASS: &str = "D422512D-2BF2-4752-809D-7B82B5FCB1B4";
const IDE_CLASS: &str = "83F8638B-8DCA-4152-9EDA-2CA8B33039B4";
/// The class of controllers and drives.
pub(super) const RASD: &str = "Msvm_ResourceAllocationSettingData";

/// The WMI object path of the setting `id` of `class` on `host`: what `Parent` holds.
pub(super) fn path(host: &str, class: &str, id: &str) -> String {
    format!(
        "\\\\{host}\\root\\virtualization\\v2:{class}.InstanceID=\"{}\"",
        id.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

/// The name of the host answering now (the cluster node serving the request).
pub(super) fn host_name(st: &State) -> String {
    if let Some(v) = &st.viewer {
        return v.clone();
    }
    st.objects
        .get("Msvm_ComputerSystem")
        .into_iter()
        .flatten()
        .find(|i| i.text("Caption") == Some("Hosting Computer System"))
        .and_then(|i| i.text("Name"))
        .unwrap_or("localhost")
        .to_string()
}

/// The two IDE controllers every generation 1 VM has.
pub(super) fn ide_controllers(vm: &str) -> Vec<Instance> {
    (0..2)
        .map(|n| {
            inst(
                RASD,
                &[
                    (
                        "InstanceID",
                        text(format!("Microsoft:{vm}\\{IDE_CLASS}\\{n}")),
                    ),
                    ("ResourceType", text("5")),
                    ("ResourceSubType", text(IDE)),
                    ("ElementName", text("IDE Controller")),
                    ("Address", text(n.to_string())),
                ],
            )
        })
        .collect()
}

/// SCSI controller number `n` of VM `vm`.
pub(super) fn scsi_controller(vm: &str, n: usize) -> Instance {
    inst(
        RASD,
        &[
            (
                "InstanceID",
                text(format!("Microsoft:{vm}\\{SCSI_CLASS}\\{n}")),
            ),
            ("ResourceType", text("6")),
            ("ResourceSubType", text(SCSI)),
            ("ElementName", text("SCSI Controller")),
            ("Address", text(n.to_string())),
        ],
    )
}

/// A disk drive at `location` of controller `ctl` (its InstanceID) on `host`.
pub(super) fn drive(host: &str, ctl: &str, location: u64) -> Instance {
    inst(
        RASD,
        &[
            ("InstanceID", text(format!("{ctl}\\{location}\\D"))),
            ("ResourceType", text("17")),
            ("ResourceSubType", text(DRIVE)),
            ("ElementName", text("Hard Drive")),
            ("Parent", text(path(host, RASD, ctl))),
            ("AddressOnParent", text(location.to_string())),
        ],
    )
}

/// A seeded guest's controllers and drives on `host`; for each of its `disks`, in order, the
/// `Parent` (its drive's path) and location its image gets.
pub(super) fn seed(
    vm: &str,
    host: &str,
    generation_1: bool,
    disks: u32,
) -> (Vec<Instance>, Vec<(String, u64)>) {
    let mut out = if generation_1 {
        ide_controllers(vm)
    } else {
        Vec::new()
    };
    let scsi_disks = if generation_1 {
        disks.saturating_sub(1)
    } else {
        disks
    };
    if scsi_disks > 0 || !generation_1 {
        out.push(scsi_controller(vm, 0));
    }
    let mut places = Vec::new();
    for k in 0..u64::from(disks) {
        // Generation 1 boots from IDE 0:0; the rest (and every disk of generation 2) on SCSI 0.
        let (ctl, location) = match (generation_1, k) {
            (true, 0) => (format!("Microsoft:{vm}\\{IDE_CLASS}\\0"), 0),
            (true, k) => (format!("Microsoft:{vm}\\{SCSI_CLASS}\\0"), k - 1),
            (false, k) => (format!("Microsoft:{vm}\\{SCSI_CLASS}\\0"), k),
        };
        let d = drive(host, &ctl, location);
        let id = d.text("InstanceID").unwrap_or("").to_string();
        places.push((path(host, RASD, &id), location));
        out.push(d);
    }
    (out, places)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_1_boots_from_ide_and_adds_scsi_for_more_disks() {
        let (devs, places) = seed("VM", "HV01", true, 3);
        let subtypes: Vec<&str> = devs
            .iter()
            .filter_map(|d| d.text("ResourceSubType"))
            .collect();
        assert_eq!(subtypes, [IDE, IDE, SCSI, DRIVE, DRIVE, DRIVE]);
        assert!(places[0].0.contains(IDE_CLASS) && places[0].1 == 0);
        assert!(places[1].0.contains(SCSI_CLASS) && places[1].1 == 0);
        assert!(places[2].0.contains(SCSI_CLASS) && places[2].1 == 1);
        let (devs, places) = seed("VM", "HV01", true, 1);
        assert_eq!(devs.len(), 3, "two IDE controllers and one drive, no SCSI");
        assert!(
            places[0]
                .0
                .starts_with("\\\\HV01\\root\\virtualization\\v2:")
        );
        let (devs, places) = seed("VM", "HV01", false, 2);
        assert_eq!(devs.len(), 3);
        assert_eq!(places[1].1, 1);
        assert!(devs.iter().all(|d| d.text("ResourceSubType") != Some(IDE)));
    }
}
