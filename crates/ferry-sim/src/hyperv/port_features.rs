//! Switch port features of the guests' network adapters (ADR 0181): VLANs in every operation
//! mode (`Msvm_EthernetSwitchPortVlanSettingData`: 1 access, 2 trunk, 3 private) and bandwidth
//! (`Msvm_EthernetSwitchPortBandwidthSettingData`). `win-file-01` is seeded with a trunk port
//! (native VLAN 5, VLANs 10, 20, 30) and a bandwidth limit, `win-dyn-01` with a private VLAN
//! (community, primary 100, secondary 101); `AddFeatureSettings` takes each of
//! them for a connection (once per class), checks it as the host does, records it as a setting
//! of the connection (what WMI reads back) and logs what it received.

use super::{guid, inst, text};
use ferry_wsman::cim::{Instance, Value};
use std::collections::BTreeMap;

const VLAN: &str = "Msvm_EthernetSwitchPortVlanSettingData";
const BANDWIDTH: &str = "Msvm_EthernetSwitchPortBandwidthSettingData";

/// The guest seeded with a trunk port and a bandwidth limit.
pub const SEEDED: &str = "win-file-01";
/// The guest seeded with a private VLAN.
pub const PRIVATE: &str = "win-dyn-01";

/// The properties `AddFeatureSettings` accepts for `class`.
pub fn known(class: &str) -> Option<&'static [&'static str]> {
    Some(match class {
        VLAN => &[
            "InstanceID",
            "ElementName",
            "OperationMode",
            "AccessVlanId",
            "NativeVlanId",
            "TrunkVlanIdArray",
            "PruneVlanIdArray",
            "PvlanMode",
            "PrimaryVlanId",
            "SecondaryVlanId",
            "SecondaryVlanIdArray",
        ],
        BANDWIDTH => &[
            "InstanceID",
            "ElementName",
            "Limit",
            "Reservation",
            "Weight",
            "BurstLimit",
            "BurstSize",
        ],
        _ => return None,
    })
}

/// The features of the seeded guest's connection `conn` (none for the other guests).
pub fn seed(name: &str, conn: &str) -> Vec<Instance> {
    if name == PRIVATE {
        return vec![inst(
            VLAN,
            &[
                ("InstanceID", text(format!("{conn}\\{}", guid("pvlan")))),
                ("ElementName", text("Ethernet Switch Port VLAN Settings")),
                ("OperationMode", text("3")),
                ("PvlanMode", text("2")),
                ("PrimaryVlanId", text("100")),
                ("SecondaryVlanId", text("101")),
            ],
        )];
    }
    if name != SEEDED {
        return vec![];
    }
    let list = |v: &[&str]| Value::Array(v.iter().map(|x| text(*x)).collect());
    vec![
        inst(
            VLAN,
            &[
                ("InstanceID", text(format!("{conn}\\{}", guid("trunk")))),
                ("ElementName", text("Ethernet Switch Port VLAN Settings")),
                ("OperationMode", text("2")),
                ("NativeVlanId", text("5")),
                ("TrunkVlanIdArray", list(&["10", "20", "30"])),
            ],
        ),
        inst(
            BANDWIDTH,
            &[
                ("InstanceID", text(format!("{conn}\\{}", guid("bandwidth")))),
                (
                    "ElementName",
                    text("Ethernet Switch Port Bandwidth Settings"),
                ),
                ("Limit", text("100000000")),
                ("Reservation", text("10000000")),
                ("Weight", text("0")),
                ("BurstLimit", text("200000000")),
                ("BurstSize", text("1048576")),
            ],
        ),
    ]
}

fn vlan_id(k: &str, v: u64) -> Result<u64, String> {
    if (1..=4094).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "Failed to add feature 'Ethernet Switch Port VLAN Settings'. The VLAN identifier {v} of {k} is not valid (1 to 4094)."
        ))
    }
}

/// The setting `AddFeatureSettings` adds to connection `conn` (InstanceID `id`) for an
/// embedded instance of `class` with `props`, or the host's refusal.
pub fn feature(
    conn: &str,
    id: &str,
    class: &str,
    props: &BTreeMap<String, Vec<String>>,
    existing: &[Instance],
) -> Result<Instance, String> {
    let get = |k: &str| {
        props
            .get(k)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
    };
    let num = |k: &str| -> Result<u64, String> {
        get(k).map_or(Ok(0), |v| {
            v.parse().map_err(|_| {
                format!("The value '{v}' of property '{k}' of class '{class}' is not valid.")
            })
        })
    };
    let prefix = format!("{conn}\\");
    if existing
        .iter()
        .any(|i| i.text("InstanceID").is_some_and(|x| x.starts_with(&prefix)))
    {
        return Err(format!(
            "The connection has {} already; modify them.",
            if class == VLAN {
                "VLAN settings"
            } else {
                "bandwidth settings"
            }
        ));
    }
    let mut out: Vec<(&str, Value)> = vec![("InstanceID", text(id))];
    let copy = |k: &'static str, out: &mut Vec<(&str, Value)>| match props.get(k) {
        Some(v) if v.len() != 1 || k.ends_with("Array") => {
            out.push((k, Value::Array(v.iter().map(text).collect())));
        }
        Some(v) => out.push((k, text(&v[0]))),
        None => {}
    };
    match class {
        VLAN => {
            out.push(("ElementName", text("Ethernet Switch Port VLAN Settings")));
            match num("OperationMode")? {
                1 => {
                    vlan_id("AccessVlanId", num("AccessVlanId")?)?;
                }
                2 => {
                    vlan_id("NativeVlanId", num("NativeVlanId")?)?;
                    let trunk = props.get("TrunkVlanIdArray").cloned().unwrap_or_default();
                    if trunk.is_empty() {
                        return Err("A trunk port needs TrunkVlanIdArray.".into());
                    }
                    for t in &trunk {
                        vlan_id("TrunkVlanIdArray", t.parse().unwrap_or(0))?;
                    }
                }
                3 => {
                    if !(1..=3).contains(&num("PvlanMode")?) {
                        return Err(
                            "PvlanMode must be 1 (isolated), 2 (community) or 3 (promiscuous)."
                                .into(),
                        );
                    }
                    vlan_id("PrimaryVlanId", num("PrimaryVlanId")?)?;
                }
                m => {
                    return Err(format!(
                        "The VLAN operation mode {m} is not valid (1 access, 2 trunk, 3 private)."
                    ));
                }
            }
            for k in [
                "OperationMode",
                "AccessVlanId",
                "NativeVlanId",
                "TrunkVlanIdArray",
                "PvlanMode",
                "PrimaryVlanId",
                "SecondaryVlanId",
                "SecondaryVlanIdArray",
            ] {
                copy(k, &mut out);
            }
        }
        BANDWIDTH => {
            out.push((
                "ElementName",
                text("Ethernet Switch Port Bandwidth Settings"),
            ));
            let (limit, reservation) = (num("Limit")?, num("Reservation")?);
            if limit != 0 && reservation > limit {
                return Err(format!(
                    "The bandwidth reservation {reservation} exceeds the limit {limit}."
                ));
            }
            num("Weight")?;
            num("BurstLimit")?;
            num("BurstSize")?;
            for k in ["Limit", "Reservation", "Weight", "BurstLimit", "BurstSize"] {
                copy(k, &mut out);
            }
        }
        other => {
            return Err(format!(
                "The feature {other} is not supported by this simulator."
            ));
        }
    }
    let i = inst(class, &out);
    tracing::info!(connection = conn, class, settings = ?i.props, "AddFeatureSettings received");
    Ok(i)
}
