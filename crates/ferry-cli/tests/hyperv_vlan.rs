//! A network adapter's switch port features through backup and whole-VM restore (ADR 0181),
//! through the `ferry` binary against `ferry sim hyperv`: `win-file-01`'s port is a trunk
//! (native VLAN 5, VLANs 10, 20, 30) with a bandwidth limit, `win-dyn-01`'s a private VLAN; the
//! restore point's native record holds them, the restored VM's port has the same settings as
//! pypsrp reads them from the host's WMI (`tests/hyperv_port_probe.py`), and a restore to Xen
//! names what it cannot keep.

use serde_json::{Value, json};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

const VM: &str = "win-file-01";

lab_wrapper!(
    /// The lab's host with source `lab` reading through `san-paths` and restoring to `restore-dir`.
);

impl Lab {
    fn start() -> Self {
        let lab = hyperv_lab::Lab::start(&["--disk-mib", "4"]);
        lab.san_restore_config();
        Self(lab)
    }

    fn backup(&self) -> String {
        self.backup_of(VM)
    }

    fn backup_of(&self, vm: &str) -> String {
        let (out, _) = self.ok(&["backup", "--source", "lab", "--vm", vm, "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0]["snapshot"].as_str().unwrap().to_string()
    }

    /// The port features of the VMs `names`, as pypsrp reads them.
    fn ports(&self, names: &[&str]) -> Value {
        self.probe_with(
            "hyperv_port_probe.py",
            self.info["url"].as_str().unwrap(),
            names,
        )
    }
}

#[test]
fn trunk_vlans_and_bandwidth_come_back_on_the_restored_port() {
    let lab = Lab::start();
    let id = lab.backup();
    let m = lab.manifest(&id);
    let native = m.meta.native_config.as_ref().expect("a native record");
    let rec: Value = serde_json::from_str(&native.record).unwrap();
    assert_eq!(
        rec["nics"][0]["port"],
        json!({
            "vlan": {"mode": "trunk", "native": 5, "allowed": [10, 20, 30]},
            "bandwidth": {"limit": 100_000_000u64, "reservation": 10_000_000u64, "weight": 0,
                "burst_limit": 200_000_000u64, "burst_size": 1_048_576u64},
        }),
        "{rec}"
    );

    let (_, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "file-copy"]);
    let p = lab.ports(&[VM, "file-copy"]);
    let copy = &p["file-copy"];
    assert!(copy.is_array(), "no restored VM: {p}\n{err}");
    assert_eq!(copy, &p[VM], "{p}");
    assert_eq!(
        copy[0]["vlan"],
        json!({"OperationMode": 2, "AccessVlanId": 0, "NativeVlanId": 5, "PvlanMode": 0,
            "PrimaryVlanId": 0, "SecondaryVlanId": 0, "TrunkVlanIdArray": [10, 20, 30],
            "SecondaryVlanIdArray": []}),
        "{p}"
    );
    assert_eq!(
        copy[0]["bandwidth"],
        json!({"Limit": 100_000_000u64, "Reservation": 10_000_000u64, "Weight": 0,
            "BurstLimit": 200_000_000u64, "BurstSize": 1_048_576u64}),
        "{p}"
    );
    assert!(!err.contains("is not kept"), "{err}");
}

#[test]
fn a_restore_to_xen_says_the_trunk_and_bandwidth_are_not_kept() {
    let lab = Lab::start();
    let (_xen_sim, _xen) = lab.with_xen();
    let id = lab.backup();
    let (_, err) = lab.ok(&[
        "restore",
        &id,
        "--to-source",
        "xen",
        "--name",
        "file-on-xen",
    ]);
    for w in [
        "warning: restore: NIC 0: trunk port on switch `vSwitch-Prod` (native VLAN 5, allowed [10, 20, 30]) is not kept",
        "warning: restore: NIC 0: bandwidth settings on switch `vSwitch-Prod` (limit 100000000 bit/s, reservation 10000000 bit/s",
    ] {
        assert!(err.contains(w), "no warning `{w}`: {err}");
    }
}

#[test]
fn a_private_vlan_comes_back_on_the_restored_port() {
    let lab = Lab::start();
    let vm = "win-dyn-01";
    let id = lab.backup_of(vm);
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "dyn-copy"]);
    let p = lab.ports(&[vm, "dyn-copy"]);
    assert!(p["dyn-copy"].is_array(), "no restored VM: {p}\n{err}");
    assert_eq!(p["dyn-copy"], p[vm], "{p}");
    assert_eq!(
        p["dyn-copy"][0]["vlan"],
        json!({"OperationMode": 3, "AccessVlanId": 0, "NativeVlanId": 0, "PvlanMode": 2,
            "PrimaryVlanId": 100, "SecondaryVlanId": 101, "TrunkVlanIdArray": [],
            "SecondaryVlanIdArray": []}),
        "{p}"
    );
    assert!(p["dyn-copy"][0]["bandwidth"].is_null(), "{p}");
}
