//! The VM's configuration at backup time, from WMI: processors (`Msvm_ProcessorSettingData`),
//! memory, static or dynamic (`Msvm_MemorySettingData`), generation and secure boot (the
//! VSSD), disks with their controller position, and network adapters
//! (`Msvm_SyntheticEthernetPortSettingData`) with their switch (`Msvm_EthernetPortAllocationSettingData`
//! → `Msvm_VirtualEthernetSwitch`), VLAN (`Msvm_EthernetSwitchPortVlanSettingData`) and MAC.
//! What the normalized [`VmConfig`] cannot hold (dynamic memory, VLANs, static MACs) travels in the
//! native record (`msvm-vm-config+json`) for a restore to Hyper-V.

use crate::cim::Instance;
use crate::client::WsmanClient;
use crate::error::HypervError;
use ferry_core::vm::{DiskConfig, Firmware, NativeConfig, NicConfig, VmConfig};
use serde_json::{Map, Value as J, json};

/// The native record's format.
pub const NATIVE_FORMAT: &str = "msvm-vm-config+json";

fn owned_by<'a>(all: &'a [Instance], prefix: &str) -> Vec<&'a Instance> {
    let p = prefix.to_lowercase();
    all.iter()
        .filter(|i| {
            i.text("InstanceID")
                .is_some_and(|id| id.to_lowercase().starts_with(&p))
        })
        .collect()
}

fn props(i: &Instance) -> J {
    let mut m = Map::new();
    for k in i.props.keys() {
        let v = i.texts(k);
        m.insert(
            k.clone(),
            match v.as_slice() {
                [] => J::Null,
                [one] => J::String(one.to_string()),
                many => J::Array(many.iter().map(|s| J::String(s.to_string())).collect()),
            },
        );
    }
    J::Object(m)
}

/// `00155D0A0B0C` → `00:15:5d:0a:0b:0c`.
pub fn mac(address: &str) -> Option<String> {
    let a = address.replace([':', '-'], "");
    if a.len() != 12 || !a.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(
        a.to_lowercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// The switch id in a port's `HostResource` (`…Msvm_VirtualEthernetSwitch…,Name="<id>"`).
fn switch_id(host_resource: &str) -> Option<&str> {
    let at = host_resource.rfind(",Name=\"")? + 7;
    let rest = &host_resource[at..];
    Some(&rest[..rest.find('"')?])
}

/// Reads the configuration of VM `vm` (id) whose settings are `vssd` and whose disks are
/// `disks`.
pub async fn capture(
    c: &WsmanClient,
    vm: &str,
    vssd: &Instance,
    disks: Vec<DiskConfig>,
) -> Result<(VmConfig, NativeConfig), HypervError> {
    let mine = format!("Microsoft:{vm}\\");
    let get = |class: &'static str| async move { c.enumerate(class, None).await };
    let cpus = get("Msvm_ProcessorSettingData").await?;
    let mem = get("Msvm_MemorySettingData").await?;
    let ports = get("Msvm_SyntheticEthernetPortSettingData").await?;
    let conns = get("Msvm_EthernetPortAllocationSettingData").await?;
    let vlans = get(crate::port::VLAN_CLASS).await?;
    let bandwidths = get(crate::port::BANDWIDTH_CLASS).await?;
    let switches = get("Msvm_VirtualEthernetSwitch").await?;
    let cpu = owned_by(&cpus, &mine).into_iter().next();
    let mem = owned_by(&mem, &mine).into_iter().next();
    let gen2 = vssd.text("VirtualSystemSubType") == Some("Microsoft:Hyper-V:SubType:2");
    let firmware = match (gen2, vssd.bool("SecureBootEnabled")) {
        (true, Some(true)) => Firmware::UefiSecureBoot,
        (true, _) => Firmware::Uefi,
        _ => Firmware::Bios,
    };
    let mut nics = Vec::new();
    let mut native_nics = Vec::new();
    for p in owned_by(&ports, &mine) {
        let id = p.text("InstanceID").unwrap_or("");
        let conn = owned_by(&conns, &format!("{id}\\")).into_iter().next();
        let switch = conn
            .and_then(|c| c.texts("HostResource").first().copied())
            .and_then(switch_id)
            .and_then(|sid| {
                switches
                    .iter()
                    .find(|s| s.text("Name").is_some_and(|n| n.eq_ignore_ascii_case(sid)))
            })
            .and_then(|s| s.text("ElementName"))
            .map(str::to_string);
        let vlan = conn.and_then(|c| {
            let cid = c.text("InstanceID").unwrap_or("");
            owned_by(&vlans, &format!("{cid}\\"))
                .into_iter()
                .next()
                .and_then(|v| v.u64("AccessVlanId"))
                .filter(|v| *v != 0)
        });
        // Trunk/private VLANs and bandwidth (ADR 0181).
        let port = conn.map(|c| {
            let under = format!("{}\\", c.text("InstanceID").unwrap_or(""));
            crate::port::PortFeatures::from_wmi(
                owned_by(&vlans, &under).into_iter().next(),
                owned_by(&bandwidths, &under).into_iter().next(),
            )
        });
        let m = p.text("Address").and_then(mac);
        nics.push(NicConfig {
            mac: m.clone(),
            network: switch.clone(),
            model: Some("synthetic".into()),
        });
        native_nics.push(json!({
            "name": p.text("ElementName"),
            "mac": m,
            "static_mac": p.bool("StaticMacAddress").unwrap_or(false),
            "switch": switch,
            "vlan": vlan,
            "port": port.map_or(J::Null, |p| p.to_json()),
        }));
    }
    let mib = |i: Option<&Instance>, k: &str| i.and_then(|i| i.u64(k));
    let cfg = VmConfig {
        cpus: cpu.and_then(|c| c.u64("VirtualQuantity")).unwrap_or(1) as u32,
        memory: mib(mem, "VirtualQuantity").unwrap_or(0) << 20,
        firmware,
        guest_os: None,
        disks,
        nics,
    };
    let dynamic = mem
        .and_then(|m| m.bool("DynamicMemoryEnabled"))
        .unwrap_or(false);
    let record = json!({
        "generation": if gen2 { 2 } else { 1 },
        "secure_boot": vssd.bool("SecureBootEnabled").unwrap_or(false),
        "memory": {
            "startup_mib": mib(mem, "VirtualQuantity"),
            "dynamic": dynamic,
            "minimum_mib": if dynamic { mib(mem, "Reservation") } else { None },
            "maximum_mib": if dynamic { mib(mem, "Limit") } else { None },
        },
        "processors": cfg.cpus,
        "nics": native_nics,
        "settings": props(vssd),
    });
    Ok((
        cfg,
        NativeConfig {
            format: NATIVE_FORMAT.into(),
            record: record.to_string(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_switch_ids() {
        assert_eq!(mac("00155D0A0B0C").as_deref(), Some("00:15:5d:0a:0b:0c"));
        assert_eq!(mac("00155D0A0B"), None);
        assert_eq!(mac("00155D0A0B0G"), None);
        assert_eq!(
            switch_id(
                r#"\\H\root\virtualization\v2:Msvm_VirtualEthernetSwitch.CreationClassName="Msvm_VirtualEthernetSwitch",Name="AB-12""#
            ),
            Some("AB-12")
        );
    }
}
