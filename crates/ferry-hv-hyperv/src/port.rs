//! A network adapter's switch port features (ADR 0181): its VLAN in every operation mode
//! (`Msvm_EthernetSwitchPortVlanSettingData`: 1 access, 2 trunk with `NativeVlanId` and
//! `TrunkVlanIdArray`, 3 private with `PvlanMode`, `PrimaryVlanId`, `SecondaryVlanId`,
//! `SecondaryVlanIdArray`) and its bandwidth (`Msvm_EthernetSwitchPortBandwidthSettingData`:
//! `Limit`, `Reservation`, `Weight`, `BurstLimit`, `BurstSize`, as the host stores them). Read
//! at backup time into the native record's NIC (`"port"`), given back to the restored
//! connection through `AddFeatureSettings`, and named in WARN lines where another hypervisor
//! cannot take them.

use crate::cim::Instance;
use serde_json::{Value as J, json};

/// The VLAN settings class.
pub const VLAN_CLASS: &str = "Msvm_EthernetSwitchPortVlanSettingData";
/// The bandwidth settings class.
pub const BANDWIDTH_CLASS: &str = "Msvm_EthernetSwitchPortBandwidthSettingData";

/// A port's VLAN, by operation mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vlan {
    /// Mode 1: untagged frames on one VLAN.
    Access(u64),
    /// Mode 2: the VLANs the guest tags, and the one its untagged frames go to.
    Trunk {
        /// `NativeVlanId`.
        native: u64,
        /// `TrunkVlanIdArray`.
        allowed: Vec<u64>,
    },
    /// Mode 3: a private VLAN.
    Private {
        /// `PvlanMode`: 1 isolated, 2 community, 3 promiscuous.
        mode: u64,
        /// `PrimaryVlanId`.
        primary: u64,
        /// `SecondaryVlanId` (isolated, community).
        secondary: u64,
        /// `SecondaryVlanIdArray` (promiscuous).
        secondaries: Vec<u64>,
    },
}

/// A port's bandwidth settings, as the host stores them (`Limit`, `Reservation`, `BurstLimit`
/// in bits per second, `BurstSize` in bytes, `Weight` relative).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// `Limit`.
    pub limit: u64,
    /// `Reservation`.
    pub reservation: u64,
    /// `Weight`.
    pub weight: u64,
    /// `BurstLimit`.
    pub burst_limit: u64,
    /// `BurstSize`.
    pub burst_size: u64,
}

/// The features of one switch port that a restore gives back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortFeatures {
    /// Its VLAN (none: untagged).
    pub vlan: Option<Vlan>,
    /// Its bandwidth settings (none: the switch's defaults).
    pub bandwidth: Option<Bandwidth>,
}

fn nums(i: &Instance, k: &str) -> Vec<u64> {
    i.texts(k)
        .iter()
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

fn list(v: &J) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(J::as_u64).collect())
        .unwrap_or_default()
}

impl PortFeatures {
    /// From the connection's VLAN and bandwidth settings (either may be absent).
    pub fn from_wmi(vlan: Option<&Instance>, bandwidth: Option<&Instance>) -> Self {
        let n = |i: &Instance, k: &str| i.u64(k).unwrap_or(0);
        let vlan = vlan.and_then(|v| match n(v, "OperationMode") {
            1 => Some(Vlan::Access(n(v, "AccessVlanId"))).filter(|_| n(v, "AccessVlanId") != 0),
            2 => Some(Vlan::Trunk {
                native: n(v, "NativeVlanId"),
                allowed: nums(v, "TrunkVlanIdArray"),
            }),
            3 => Some(Vlan::Private {
                mode: n(v, "PvlanMode"),
                primary: n(v, "PrimaryVlanId"),
                secondary: n(v, "SecondaryVlanId"),
                secondaries: nums(v, "SecondaryVlanIdArray"),
            }),
            _ => None,
        });
        let bandwidth = bandwidth
            .map(|b| Bandwidth {
                limit: n(b, "Limit"),
                reservation: n(b, "Reservation"),
                weight: n(b, "Weight"),
                burst_limit: n(b, "BurstLimit"),
                burst_size: n(b, "BurstSize"),
            })
            .filter(|b| *b != Bandwidth::default());
        Self { vlan, bandwidth }
    }

    /// The native record's `"port"` member (null when the port has no such features).
    pub fn to_json(&self) -> J {
        if *self == Self::default() {
            return J::Null;
        }
        let vlan = match &self.vlan {
            None => J::Null,
            Some(Vlan::Access(id)) => json!({"mode": "access", "access": id}),
            Some(Vlan::Trunk { native, allowed }) => {
                json!({"mode": "trunk", "native": native, "allowed": allowed})
            }
            Some(Vlan::Private {
                mode,
                primary,
                secondary,
                secondaries,
            }) => json!({
                "mode": "private", "pvlan_mode": mode, "primary": primary,
                "secondary": secondary, "secondaries": secondaries,
            }),
        };
        let bandwidth = self.bandwidth.as_ref().map_or(J::Null, |b| {
            json!({
                "limit": b.limit, "reservation": b.reservation, "weight": b.weight,
                "burst_limit": b.burst_limit, "burst_size": b.burst_size,
            })
        });
        json!({"vlan": vlan, "bandwidth": bandwidth})
    }

    /// From a native record's NIC: its `"port"`, else (records before ADR 0181) its access
    /// `"vlan"`.
    pub fn from_json(nic: &J) -> Self {
        let port = &nic["port"];
        let v = &port["vlan"];
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let vlan = match v["mode"].as_str() {
            Some("access") => Some(Vlan::Access(n("access"))),
            Some("trunk") => Some(Vlan::Trunk {
                native: n("native"),
                allowed: list(&v["allowed"]),
            }),
            Some("private") => Some(Vlan::Private {
                mode: n("pvlan_mode"),
                primary: n("primary"),
                secondary: n("secondary"),
                secondaries: list(&v["secondaries"]),
            }),
            _ => nic["vlan"].as_u64().filter(|v| *v != 0).map(Vlan::Access),
        };
        let b = &port["bandwidth"];
        let bandwidth = b.is_object().then(|| {
            let n = |k: &str| b[k].as_u64().unwrap_or(0);
            Bandwidth {
                limit: n("limit"),
                reservation: n("reservation"),
                weight: n("weight"),
                burst_limit: n("burst_limit"),
                burst_size: n("burst_size"),
            }
        });
        Self { vlan, bandwidth }
    }

    /// The embedded instances `AddFeatureSettings` takes for this port, made by `embed`
    /// (`(class, [(property, CIM type, values)], array properties)`).
    pub fn settings(&self) -> Vec<FeatureSetting> {
        let one = |k: &'static str, ty: &'static str, v: u64| (k, ty, vec![v.to_string()]);
        let many =
            |k: &'static str, v: &[u64]| (k, "uint16", v.iter().map(u64::to_string).collect());
        let mut out = Vec::new();
        match &self.vlan {
            None => {}
            Some(Vlan::Access(id)) => out.push(FeatureSetting {
                class: VLAN_CLASS,
                props: vec![
                    one("OperationMode", "uint32", 1),
                    one("AccessVlanId", "uint16", *id),
                ],
                arrays: vec![],
            }),
            Some(Vlan::Trunk { native, allowed }) => out.push(FeatureSetting {
                class: VLAN_CLASS,
                props: vec![
                    one("OperationMode", "uint32", 2),
                    one("NativeVlanId", "uint16", *native),
                    many("TrunkVlanIdArray", allowed),
                ],
                arrays: vec!["TrunkVlanIdArray"],
            }),
            Some(Vlan::Private {
                mode,
                primary,
                secondary,
                secondaries,
            }) => out.push(FeatureSetting {
                class: VLAN_CLASS,
                props: vec![
                    one("OperationMode", "uint32", 3),
                    one("PvlanMode", "uint32", *mode),
                    one("PrimaryVlanId", "uint16", *primary),
                    one("SecondaryVlanId", "uint16", *secondary),
                    many("SecondaryVlanIdArray", secondaries),
                ],
                arrays: vec!["SecondaryVlanIdArray"],
            }),
        }
        if let Some(b) = &self.bandwidth {
            out.push(FeatureSetting {
                class: BANDWIDTH_CLASS,
                props: vec![
                    one("Limit", "uint64", b.limit),
                    one("Reservation", "uint64", b.reservation),
                    one("Weight", "uint64", b.weight),
                    one("BurstLimit", "uint64", b.burst_limit),
                    one("BurstSize", "uint64", b.burst_size),
                ],
                arrays: vec![],
            });
        }
        out
    }

    /// What a restore to another hypervisor loses of NIC `i` on switch `switch`: one line each.
    pub fn lost(&self, i: usize, switch: &str) -> Vec<String> {
        let mut out = Vec::new();
        match &self.vlan {
            None => {}
            Some(Vlan::Access(v)) => out.push(format!(
                "NIC {i}: access VLAN {v} on switch `{switch}` is not kept: attach the NIC to a network that carries it"
            )),
            Some(Vlan::Trunk { native, allowed }) => out.push(format!(
                "NIC {i}: trunk port on switch `{switch}` (native VLAN {native}, allowed {allowed:?}) is not kept: the guest's tagged VLANs need a trunk network on the target"
            )),
            Some(Vlan::Private {
                mode,
                primary,
                secondary,
                ..
            }) => out.push(format!(
                "NIC {i}: private VLAN on switch `{switch}` (primary {primary}, secondary {secondary}, mode {mode}) is not kept: attach the NIC to a network that carries it"
            )),
        }
        if let Some(b) = &self.bandwidth {
            out.push(format!(
                "NIC {i}: bandwidth settings on switch `{switch}` (limit {} bit/s, reservation {} bit/s, burst {} bit/s for {} bytes, weight {}) are not kept",
                b.limit, b.reservation, b.burst_limit, b.burst_size, b.weight
            ));
        }
        out
    }
}

/// One `AddFeatureSettings` instance: its class, properties (`(name, CIM type, values)`) and
/// which of them are arrays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureSetting {
    /// The feature's class.
    pub class: &'static str,
    /// Its properties.
    pub props: Vec<(&'static str, &'static str, Vec<String>)>,
    /// The array properties among them.
    pub arrays: Vec<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_wsman::cim::Value;

    fn inst(props: &[(&str, Value)]) -> Instance {
        let mut i = Instance::default();
        for (k, v) in props {
            i.props.insert((*k).into(), v.clone());
        }
        i
    }

    #[test]
    fn trunk_private_and_bandwidth_round_trip_through_the_record() {
        let t = |s: &str| Value::Text(s.into());
        let trunk = inst(&[
            ("OperationMode", t("2")),
            ("NativeVlanId", t("5")),
            (
                "TrunkVlanIdArray",
                Value::Array(vec![t("10"), t("20"), t("30")]),
            ),
        ]);
        let bw = inst(&[
            ("Limit", t("100000000")),
            ("Reservation", t("10000000")),
            ("BurstLimit", t("200000000")),
            ("BurstSize", t("1048576")),
        ]);
        let p = PortFeatures::from_wmi(Some(&trunk), Some(&bw));
        assert_eq!(
            p.vlan,
            Some(Vlan::Trunk {
                native: 5,
                allowed: vec![10, 20, 30]
            })
        );
        let back = PortFeatures::from_json(&json!({ "port": p.to_json() }));
        assert_eq!(back, p);
        let s = back.settings();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].arrays, ["TrunkVlanIdArray"]);
        assert_eq!(s[1].class, BANDWIDTH_CLASS);
        let lost = back.lost(0, "vSwitch-Prod");
        assert!(lost[0].contains("trunk port") && lost[1].contains("limit 100000000"));

        let pv = inst(&[
            ("OperationMode", t("3")),
            ("PvlanMode", t("2")),
            ("PrimaryVlanId", t("100")),
            ("SecondaryVlanId", t("101")),
        ]);
        let p = PortFeatures::from_wmi(Some(&pv), None);
        assert_eq!(PortFeatures::from_json(&json!({ "port": p.to_json() })), p);
        // A record before the port features: its access VLAN.
        assert_eq!(
            PortFeatures::from_json(&json!({"vlan": 10})).vlan,
            Some(Vlan::Access(10))
        );
        assert_eq!(PortFeatures::from_wmi(None, None).to_json(), J::Null);
    }
}
