//! The hypervisor-neutral description of a VM that every restore point carries, so a VM backed up
//! from one hypervisor can be recreated on another. The hypervisor's own record travels beside it
//! untouched ([`NativeConfig`]).

use serde::{Deserialize, Serialize};

/// Which kind of hypervisor a VM came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum HypervisorKind {
    /// Citrix Hypervisor / XCP-ng (XenAPI).
    Xen,
    /// VMware vSphere / ESXi.
    Vmware,
    /// Microsoft Hyper-V.
    HyperV,
    /// QEMU/KVM or a plain disk source (file, block device, NBD export) with no hypervisor API.
    Generic,
}

/// How consistent the data of a restore point is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ConsistencyLevel {
    /// Applications inside the guest flushed and paused (VSS, quiesced snapshot).
    Application,
    /// File systems quiesced but applications not (e.g. a Linux guest agent freeze).
    FileSystem,
    /// As if the power had been cut.
    Crash,
    /// The VM was put into saved state (Hyper-V without in-guest VSS).
    SavedState,
    /// Disks plus memory (a checkpoint with RAM).
    MemoryCheckpoint,
    /// Nobody can tell (a disk image read from a file).
    Unknown,
}

/// Firmware a VM boots with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// Legacy BIOS.
    #[default]
    Bios,
    /// UEFI.
    Uefi,
    /// UEFI with secure boot.
    UefiSecureBoot,
}

/// One virtual disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskConfig {
    /// The disk's name within the restore point (e.g. `disk0`, `scsi0:1`, a VDI name).
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bus and position, e.g. `scsi0:0`, `ide0:1`, `xvda`; free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// Whether the VM boots from this disk.
    #[serde(default)]
    pub bootable: bool,
}

/// One network adapter of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NicConfig {
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Name of the network or port group it attaches to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Adapter model, e.g. `vmxnet3`, `e1000`, `netvsc`; free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// The normalized VM configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct VmConfig {
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// Guest OS as the hypervisor reports it, free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_os: Option<String>,
    /// Disks, in the hypervisor's order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Network adapters.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
}

/// The hypervisor's own record of the VM, kept verbatim for same-hypervisor restores
/// (a `.vmx`/ConfigSpec, a XenAPI VM record, a Hyper-V VSSD).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NativeConfig {
    /// What the record is, e.g. `xenapi-vm-record`, `vim25-config-info`, `msvm-vssd`.
    pub format: String,
    /// The record itself (JSON, XML or text as the hypervisor gives it).
    pub record: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_json() {
        let cfg = VmConfig {
            cpus: 2,
            memory: 4 << 30,
            firmware: Firmware::Uefi,
            guest_os: Some("debian12".into()),
            disks: vec![DiskConfig {
                name: "disk0".into(),
                size: 16 << 30,
                controller: Some("scsi0:0".into()),
                bootable: true,
            }],
            nics: vec![NicConfig {
                mac: Some("00:16:3e:00:00:01".into()),
                network: Some("lan".into()),
                model: None,
            }],
        };
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains("\"firmware\":\"uefi\""), "{json}");
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(
            serde_json::to_string(&ConsistencyLevel::SavedState).unwrap(),
            "\"saved-state\""
        );
    }
}
