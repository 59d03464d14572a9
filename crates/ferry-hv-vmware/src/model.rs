//! VMs, disks and NICs as Ferry sees them, read from `VirtualMachine` properties (sans I/O).

use crate::client::ObjectContent;
use crate::xml::{MoRef, Node};
use ferry_core::vm::{DiskConfig, Firmware, NicConfig, VmConfig};
use std::collections::BTreeMap;

/// The `VirtualMachine` properties the driver reads, in one PropertyCollector pass.
pub const VM_PATHS: &[&str] = &[
    "name",
    "config.uuid",
    "config.template",
    "config.guestId",
    "config.firmware",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.changeTrackingEnabled",
    "runtime.powerState",
    "runtime.host",
    "snapshot",
];

/// Why a disk cannot be in a VADP backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSkip {
    /// A physical-mode raw device mapping: snapshots do not cover it.
    PhysicalRdm,
    /// An independent disk (`independent_persistent` / `independent_nonpersistent`): excluded
    /// from snapshots by definition.
    Independent(String),
}

impl std::fmt::Display for DiskSkip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PhysicalRdm => f.write_str(
                "physical-mode RDM: vSphere snapshots do not include it, so VADP cannot back it up",
            ),
            Self::Independent(m) => write!(
                f,
                "independent disk ({m}): vSphere snapshots exclude it, so VADP cannot back it up"
            ),
        }
    }
}

/// One virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    /// `key` of the device (2000, 2001, …): QueryChangedDiskAreas' `deviceKey`.
    pub device_key: i32,
    /// Position, `scsi0:1`, `ide0:0`, `sata0:0`, `nvme0:0`.
    pub position: String,
    /// Label (`Hard disk 1`).
    pub label: String,
    /// Bytes.
    pub capacity: u64,
    /// Backing file, `[datastore1] vm/vm.vmdk` (the top of the chain).
    pub file: String,
    /// Backing chain from the top, through `parent`, to the base.
    pub chain: Vec<String>,
    /// The backing's `uuid` (stable across snapshots).
    pub uuid: String,
    /// The backing's `changeId`, when CBT is on.
    pub change_id: Option<String>,
    /// The datastore of the backing.
    pub datastore: Option<MoRef>,
    /// `diskMode`.
    pub mode: String,
    /// Why it cannot be backed up, if it cannot.
    pub skip: Option<DiskSkip>,
}

impl VmDisk {
    /// The stable key Ferry files change tokens under: device key and backing uuid.
    pub fn key(&self) -> String {
        if self.uuid.is_empty() {
            self.device_key.to_string()
        } else {
            format!("{}:{}", self.device_key, self.uuid)
        }
    }
}

/// One network adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNic {
    /// Device key.
    pub device_key: i32,
    /// Model, from the device type (`vmxnet3`, `e1000e`, …).
    pub model: String,
    /// MAC address.
    pub mac: Option<String>,
    /// Network name (a standard port group's name, or a distributed port group's key until
    /// resolved with [`Vm::resolve_networks`]).
    pub network: Option<String>,
}

/// One VM.
#[derive(Debug, Clone)]
pub struct Vm {
    /// Its managed object reference.
    pub moref: MoRef,
    /// Display name.
    pub name: String,
    /// `config.uuid` (BIOS uuid).
    pub uuid: String,
    /// Whether it is a template.
    pub template: bool,
    /// `config.guestId`.
    pub guest_id: Option<String>,
    /// `bios` / `efi`.
    pub firmware: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory MiB.
    pub memory_mb: u64,
    /// `poweredOn` / `poweredOff` / `suspended`.
    pub power_state: String,
    /// The host it runs on.
    pub host: Option<MoRef>,
    /// The cluster of that host (`None`: a standalone host, or not read).
    pub cluster: Option<String>,
    /// `config.changeTrackingEnabled`.
    pub cbt_enabled: bool,
    /// Disks in device order.
    pub disks: Vec<VmDisk>,
    /// NICs in device order.
    pub nics: Vec<VmNic>,
    /// Snapshots as (moref, name), flattened from the snapshot tree.
    pub snapshots: Vec<(MoRef, String)>,
    /// The raw `config.hardware.device` element (native config).
    pub devices: Option<Node>,
}

impl Vm {
    /// Reads a VM from its properties ([`VM_PATHS`]); `None` without an object reference.
    pub fn from_object(o: &ObjectContent) -> Option<Self> {
        let moref = o.obj.clone()?;
        let devices = o.prop("config.hardware.device");
        let (disks, nics) = devices.map(parse_devices).unwrap_or_default();
        let mut snapshots = Vec::new();
        if let Some(s) = o.prop("snapshot") {
            for t in s.all("rootSnapshotList") {
                flatten_snapshots(t, &mut snapshots);
            }
        }
        Some(Self {
            name: o.text("name").unwrap_or(&moref.value).to_string(),
            uuid: o.text("config.uuid").unwrap_or("").to_string(),
            template: o.text("config.template") == Some("true"),
            guest_id: o.text("config.guestId").map(String::from),
            firmware: o.text("config.firmware").unwrap_or("bios").to_string(),
            cpus: o
                .text("config.hardware.numCPU")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
            memory_mb: o
                .text("config.hardware.memoryMB")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
            power_state: o.text("runtime.powerState").unwrap_or("").to_string(),
            host: o.prop("runtime.host").and_then(Node::moref),
            cluster: None,
            cbt_enabled: o.text("config.changeTrackingEnabled") == Some("true"),
            disks,
            nics,
            snapshots,
            devices: devices.cloned(),
            moref,
        })
    }

    /// Replaces distributed port group keys by names (`networks`: moref value → name).
    pub fn resolve_networks(&mut self, networks: &BTreeMap<String, String>) {
        for n in &mut self.nics {
            if let Some(name) = n.network.as_ref().and_then(|k| networks.get(k)) {
                n.network = Some(name.clone());
            }
        }
    }

    /// The normalized configuration (disks that can be backed up only).
    pub fn config(&self) -> VmConfig {
        VmConfig {
            cpus: self.cpus,
            memory: self.memory_mb << 20,
            firmware: if self.firmware == "efi" {
                Firmware::Uefi
            } else {
                Firmware::Bios
            },
            guest_os: self.guest_id.clone(),
            disks: self
                .disks
                .iter()
                .filter(|d| d.skip.is_none())
                .enumerate()
                .map(|(i, d)| DiskConfig {
                    name: d.position.clone(),
                    size: d.capacity,
                    controller: Some(d.position.clone()),
                    bootable: i == 0,
                })
                .collect(),
            nics: self
                .nics
                .iter()
                .map(|n| NicConfig {
                    mac: n.mac.clone(),
                    network: n.network.clone(),
                    model: Some(n.model.clone()),
                })
                .collect(),
        }
    }
}

fn flatten_snapshots(t: &Node, out: &mut Vec<(MoRef, String)>) {
    if let Some(m) = t.child("snapshot").and_then(Node::moref) {
        out.push((m, t.text_at("name").unwrap_or("").to_string()));
    }
    for c in t.all("childSnapshotList") {
        flatten_snapshots(c, out);
    }
}

/// Controller device types → the prefix of a disk position.
fn controller_prefix(t: &str) -> Option<&'static str> {
    match t {
        "VirtualIDEController" => Some("ide"),
        "VirtualAHCIController" | "VirtualSATAController" => Some("sata"),
        "VirtualNVMEController" => Some("nvme"),
        t if t.contains("SCSIController")
            || t.starts_with("VirtualLsiLogic")
            || t == "VirtualBusLogicController" =>
        {
            Some("scsi")
        }
        _ => None,
    }
}

fn nic_model(t: &str) -> Option<&'static str> {
    Some(match t {
        "VirtualVmxnet3" => "vmxnet3",
        "VirtualVmxnet3Vrdma" => "vmxnet3vrdma",
        "VirtualVmxnet2" => "vmxnet2",
        "VirtualVmxnet" => "vmxnet",
        "VirtualE1000" => "e1000",
        "VirtualE1000e" => "e1000e",
        "VirtualPCNet32" => "pcnet32",
        "VirtualSriovEthernetCard" => "sriov",
        _ => return None,
    })
}

/// Disks and NICs of a `config.hardware.device` array.
pub fn parse_devices(devices: &Node) -> (Vec<VmDisk>, Vec<VmNic>) {
    let mut controllers: BTreeMap<i64, String> = BTreeMap::new();
    for d in &devices.children {
        if let (Some(prefix), Some(key)) = (controller_prefix(d.type_name()), d.i64_at("key")) {
            let bus = d.i64_at("busNumber").unwrap_or(0);
            controllers.insert(key, format!("{prefix}{bus}"));
        }
    }
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    for d in &devices.children {
        let t = d.type_name();
        let key = d.i64_at("key").unwrap_or(0) as i32;
        if t == "VirtualDisk" {
            let ctl = d
                .i64_at("controllerKey")
                .and_then(|k| controllers.get(&k).cloned())
                .unwrap_or_else(|| "disk".into());
            let unit = d.i64_at("unitNumber").unwrap_or(0);
            let capacity = d
                .i64_at("capacityInBytes")
                .filter(|b| *b > 0)
                .or_else(|| d.i64_at("capacityInKB").map(|k| k * 1024))
                .unwrap_or(0)
                .max(0) as u64;
            let b = d.child("backing");
            let btype = b.map(Node::type_name).unwrap_or("");
            let text = |f: &str| b.and_then(|b| b.text_at(f)).unwrap_or("").to_string();
            let mode = text("diskMode");
            let mut chain = Vec::new();
            let mut cur = b;
            while let Some(n) = cur {
                if let Some(f) = n.text_at("fileName").filter(|f| !f.is_empty()) {
                    chain.push(f.to_string());
                }
                cur = n.child("parent");
                if chain.len() > 255 {
                    break;
                }
            }
            let skip = if btype.contains("RawDiskMapping")
                && text("compatibilityMode") == "physicalMode"
            {
                Some(DiskSkip::PhysicalRdm)
            } else if mode.starts_with("independent") {
                Some(DiskSkip::Independent(mode.clone()))
            } else {
                None
            };
            disks.push(VmDisk {
                device_key: key,
                position: format!("{ctl}:{unit}"),
                label: d.text_at("deviceInfo/label").unwrap_or("").to_string(),
                capacity,
                file: text("fileName"),
                chain,
                uuid: text("uuid"),
                change_id: b
                    .and_then(|b| b.text_at("changeId"))
                    .filter(|c| !c.is_empty())
                    .map(String::from),
                datastore: b.and_then(|b| b.child("datastore")).and_then(Node::moref),
                mode,
                skip,
            });
        } else if let Some(model) = nic_model(t) {
            let b = d.child("backing");
            let network = b.and_then(|b| {
                b.text_at("deviceName")
                    .filter(|s| !s.is_empty())
                    .or_else(|| b.text_at("port/portgroupKey"))
                    .or_else(|| b.child("network").map(|n| n.text.trim()))
                    .map(String::from)
            });
            nics.push(VmNic {
                device_key: key,
                model: model.into(),
                mac: d
                    .text_at("macAddress")
                    .filter(|m| !m.is_empty())
                    .map(str::to_ascii_lowercase),
                network,
            });
        }
    }
    (disks, nics)
}

/// The datastore path `[ds] dir/file.vmdk` split into (`ds`, `dir/file.vmdk`).
pub fn split_datastore_path(p: &str) -> Option<(&str, &str)> {
    let rest = p.strip_prefix('[')?;
    let (ds, path) = rest.split_once(']')?;
    Some((ds, path.trim_start()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::parse;

    #[test]
    fn devices_become_disks_and_nics() {
        let x = br#"<val xmlns:xsi="x"><VirtualDevice xsi:type="ParaVirtualSCSIController"><key>1000</key><busNumber>0</busNumber></VirtualDevice>
<VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] vm/vm-000001.vmdk</fileName><datastore type="Datastore">datastore-1</datastore><diskMode>persistent</diskMode><uuid>6000C29a</uuid><changeId>52 aa/7</changeId><parent xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] vm/vm.vmdk</fileName></parent></backing><controllerKey>1000</controllerKey><unitNumber>1</unitNumber><capacityInKB>1024</capacityInKB><capacityInBytes>1048576</capacityInBytes></VirtualDevice>
<VirtualDevice xsi:type="VirtualDisk"><key>2001</key><backing xsi:type="VirtualDiskRawDiskMappingVer1BackingInfo"><fileName>[ds1] vm/rdm.vmdk</fileName><compatibilityMode>physicalMode</compatibilityMode><diskMode>independent_persistent</diskMode></backing><controllerKey>1000</controllerKey><unitNumber>2</unitNumber><capacityInKB>2048</capacityInKB></VirtualDevice>
<VirtualDevice xsi:type="VirtualVmxnet3"><key>4000</key><backing xsi:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName></backing><macAddress>00:50:56:AA:BB:CC</macAddress></VirtualDevice></val>"#;
        let (disks, nics) = parse_devices(&parse(x).unwrap());
        assert_eq!(disks.len(), 2);
        let d = &disks[0];
        assert_eq!(d.position, "scsi0:1");
        assert_eq!(d.capacity, 1 << 20);
        assert_eq!(d.chain, vec!["[ds1] vm/vm-000001.vmdk", "[ds1] vm/vm.vmdk"]);
        assert_eq!(d.change_id.as_deref(), Some("52 aa/7"));
        assert_eq!(d.key(), "2000:6000C29a");
        assert_eq!(d.datastore, Some(MoRef::new("Datastore", "datastore-1")));
        assert_eq!(disks[1].skip, Some(DiskSkip::PhysicalRdm));
        assert_eq!(disks[1].capacity, 2 << 20);
        assert_eq!(nics[0].mac.as_deref(), Some("00:50:56:aa:bb:cc"));
        assert_eq!(nics[0].network.as_deref(), Some("VM Network"));
        assert_eq!(nics[0].model, "vmxnet3");
        assert_eq!(
            split_datastore_path("[ds1] vm/x.vmdk"),
            Some(("ds1", "vm/x.vmdk"))
        );
        assert_eq!(split_datastore_path("vm/x.vmdk"), None);
    }
}
