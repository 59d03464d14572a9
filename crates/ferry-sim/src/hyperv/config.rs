//! The guests' virtual hardware as WMI shows it: processors, memory (static or dynamic), network
//! adapters with their switch port, VLAN and MAC, and the host's virtual switches — what a
//! backup captures so a restore brings the VM back as it was.

use super::{guid, inst, text};
use ferry_wsman::cim::{Instance, Value};

/// The host's virtual switches: (name, id).
pub fn switches() -> Vec<(&'static str, String)> {
    ["vSwitch-Prod", "vSwitch-DMZ"]
        .into_iter()
        .map(|n| (n, guid(n)))
        .collect()
}

/// Whether guest `name` is a Linux guest (generation 1, no secure boot, on the DMZ switch).
pub fn is_linux(name: &str) -> bool {
    name.starts_with("linux")
}

/// The hardware settings of guest number `n`, named `name`, with id `vm`.
pub fn hardware(n: usize, name: &str, vm: &str, host: &str) -> Vec<Instance> {
    let linux = is_linux(name);
    let dynamic = n != 0;
    let sw_id = switches()[usize::from(linux)].1.clone();
    let nic = guid(&format!("{name}/nic0"));
    let port = format!("Microsoft:{vm}\\{nic}");
    let mut out = vec![
        inst(
            "Msvm_ProcessorSettingData",
            &[
                (
                    "InstanceID",
                    text(format!("Microsoft:{vm}\\{}\\0", guid("cpu"))),
                ),
                ("ResourceType", text("3")),
                ("VirtualQuantity", text((2 + 2 * (n % 2)).to_string())),
            ],
        ),
        inst(
            "Msvm_MemorySettingData",
            &[
                (
                    "InstanceID",
                    text(format!("Microsoft:{vm}\\{}", guid("memory"))),
                ),
                ("ResourceType", text("4")),
                ("AllocationUnits", text("byte * 2^20")),
                (
                    "VirtualQuantity",
                    text(if dynamic { "2048" } else { "4096" }),
                ),
                ("DynamicMemoryEnabled", text(dynamic.to_string())),
                ("Reservation", text(if dynamic { "512" } else { "4096" })),
                ("Limit", text(if dynamic { "8192" } else { "4096" })),
            ],
        ),
        inst(
            "Msvm_SyntheticEthernetPortSettingData",
            &[
                ("InstanceID", text(&port)),
                ("ElementName", text("Network Adapter")),
                (
                    "ResourceSubType",
                    text("Microsoft:Hyper-V:Synthetic Ethernet Port"),
                ),
                ("Address", text(format!("00155D01{n:02X}{:02X}", 0x10 + n))),
                ("StaticMacAddress", text("true")),
            ],
        ),
        inst(
            "Msvm_EthernetPortAllocationSettingData",
            &[
                ("InstanceID", text(format!("{port}\\C"))),
                ("ElementName", text("Dynamic Ethernet Switch Port")),
                ("Parent", text(&port)),
                (
                    "HostResource",
                    Value::Array(vec![text(format!(
                        "\\\\{host}\\root\\virtualization\\v2:Msvm_VirtualEthernetSwitch.CreationClassName=\"Msvm_VirtualEthernetSwitch\",Name=\"{sw_id}\""
                    ))]),
                ),
            ],
        ),
    ];
    let seeded = super::port_features::seed(name, &format!("{port}\\C"));
    if !linux && seeded.is_empty() {
        out.push(inst(
            "Msvm_EthernetSwitchPortVlanSettingData",
            &[
                ("InstanceID", text(format!("{port}\\C\\{}", guid("vlan")))),
                ("OperationMode", text("1")),
                ("AccessVlanId", text("10")),
            ],
        ));
    }
    out.extend(seeded);
    out
}
