//! Whole-VM restore to Hyper-V through the `ferry` binary against `ferry sim hyperv`: a VM with
//! two disks and two NICs (static MACs, a VLAN) comes back under a new name with the same
//! processors, memory, generation and NICs (switch, MAC, VLAN) as pypsrp reads them from the
//! host (`tests/hyperv_vm_probe.py`), its VHDX files `qemu-img compare` identical to the disks
//! at backup time; a missing switch is a clear error and a failure halfway leaves nothing; and
//! across hypervisors, Hyper-V → Xen and Xen → Hyper-V (`ferry sim xen`, read with the XenAPI
//! SDK) keep the MACs and the disks.

use ferry_hv_hyperv::cim::{Epr, Param};
use hyperv_lab::PASSWORD;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/xen_probe.rs"]
mod xen_probe;
use xen_probe::macs;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

fn ferry() -> Command {
    let mut c = cli::ferry();
    c.env("FERRY_PASSWORD", PASSWORD);
    c
}

lab_wrapper!(
    /// The lab's host with source `lab` reading through `san-paths` and restoring to `restore-dir`.
);

impl Lab {
    fn start() -> Self {
        Self::with_disks("8")
    }

    /// A lab whose guests have disks of `mib` MiB.
    fn with_disks(mib: &str) -> Self {
        let lab = hyperv_lab::Lab::start(&["--disk-mib", mib]);
        lab.san_restore_config();
        Self(lab)
    }

    /// `ferry backup --source SOURCE --vm VM --json`: the restore point's id.
    fn backup_of(&self, source: &str, vm: &str) -> String {
        let (out, _) = self.ok(&["backup", "--source", source, "--vm", vm, "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0]["snapshot"].as_str().unwrap().to_string()
    }

    /// Gives VM `vm` a second network adapter: static MAC `mac` on `switch` (its id), VLAN `vlan`.
    fn add_nic(&self, vm_id: &str, mac: &str, switch_id: &str, vlan: u32) {
        let vssd = Epr::new(
            "Msvm_VirtualSystemSettingData",
            &[("InstanceID", &format!("Microsoft:{vm_id}"))],
        );
        let one = |k: &str, v: &str| {
            format!("<PROPERTY NAME=\"{k}\" TYPE=\"string\"><VALUE>{v}</VALUE></PROPERTY>")
        };
        let port = format!(
            "<INSTANCE CLASSNAME=\"Msvm_SyntheticEthernetPortSettingData\">{}{}{}{}</INSTANCE>",
            one("ResourceType", "10"),
            one(
                "ResourceSubType",
                "Microsoft:Hyper-V:Synthetic Ethernet Port"
            ),
            one("StaticMacAddress", "true"),
            one("Address", mac)
        );
        let out = self.manage(
            "AddResourceSettings",
            vec![
                Param::Ref("AffectedConfiguration".into(), vssd.clone()),
                Param::Texts("ResourceSettings".into(), vec![port]),
            ],
        );
        let port_id = out
            .reference("ResultingResourceSettings")
            .and_then(|e| e.selector("InstanceID"))
            .unwrap()
            .to_string();
        let conn = format!(
            "<INSTANCE CLASSNAME=\"Msvm_EthernetPortAllocationSettingData\">{}{}{}<PROPERTY.ARRAY NAME=\"HostResource\" TYPE=\"string\"><VALUE.ARRAY><VALUE>\\\\HV-SIM-01\\root\\virtualization\\v2:Msvm_VirtualEthernetSwitch.CreationClassName=\"Msvm_VirtualEthernetSwitch\",Name=\"{switch_id}\"</VALUE></VALUE.ARRAY></PROPERTY.ARRAY></INSTANCE>",
            one("ResourceType", "33"),
            one("ResourceSubType", "Microsoft:Hyper-V:Ethernet Connection"),
            one("Parent", &port_id),
        );
        let out = self.manage(
            "AddResourceSettings",
            vec![
                Param::Ref("AffectedConfiguration".into(), vssd),
                Param::Texts("ResourceSettings".into(), vec![conn]),
            ],
        );
        let conn_id = out
            .reference("ResultingResourceSettings")
            .and_then(|e| e.selector("InstanceID"))
            .unwrap()
            .to_string();
        let v = format!(
            "<INSTANCE CLASSNAME=\"Msvm_EthernetSwitchPortVlanSettingData\">{}{}</INSTANCE>",
            one("OperationMode", "1"),
            one("AccessVlanId", &vlan.to_string())
        );
        self.manage(
            "AddFeatureSettings",
            vec![
                Param::Ref(
                    "AffectedConfiguration".into(),
                    Epr::new(
                        "Msvm_EthernetPortAllocationSettingData",
                        &[("InstanceID", &conn_id)],
                    ),
                ),
                Param::Texts("FeatureSettings".into(), vec![v]),
            ],
        );
    }

    /// The VMs `names` as pypsrp reads them from the host's WMI (null: no such VM).
    fn probe(&self, names: &[&str]) -> Value {
        self.probe_vms(names)
    }
}

/// The parts of a VM's configuration a restore must carry over (not its id, state or files).
fn machine(vm: &Value) -> Value {
    let disks: Vec<&Value> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["at"])
        .collect();
    json!({"generation": vm["generation"], "secure_boot": vm["secure_boot"], "cpus": vm["cpus"],
        "memory_mib": vm["memory_mib"], "dynamic_memory": vm["dynamic_memory"],
        "nics": vm["nics"], "disks": disks})
}

/// The switch ids of the simulated host, by name.
fn switch_id(lab: &Lab, name: &str) -> String {
    let out = lab
        .rt
        .block_on(lab.client.enumerate("Msvm_VirtualEthernetSwitch", None))
        .unwrap();
    out.iter()
        .find(|s| s.text("ElementName") == Some(name))
        .and_then(|s| s.text("Name"))
        .unwrap()
        .to_string()
}

#[test]
fn whole_vm_restore_brings_back_nics_with_switch_mac_vlan_and_identical_disks() {
    let lab = Lab::start();
    let vm = "win-sql-01";
    lab.add_nic(
        &lab.vm_id(vm),
        "00155D0199AA",
        &switch_id(&lab, "vSwitch-DMZ"),
        20,
    );
    let expected = lab.guest_disks(vm, "backup");
    let id = lab.backup_of("lab", vm);

    let (out, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "sql-copy"]);
    let p = lab.probe(&[vm, "sql-copy"]);
    let (orig, copy) = (&p[vm], &p["sql-copy"]);
    assert!(copy.is_object(), "no restored VM: {p}\n{err}");
    assert_eq!(out.trim(), copy["id"], "{err}");
    assert_ne!(copy["id"], orig["id"]);
    assert_eq!(machine(copy), machine(orig), "{p}");
    let nics = copy["nics"].as_array().unwrap();
    assert_eq!(nics.len(), 2, "{copy}");
    assert_eq!(
        nics[1],
        json!({"mac": "00155D0199AA", "static": "true", "switch": "vSwitch-DMZ", "vlan": 20})
    );
    assert_eq!(nics[0]["switch"], "vSwitch-Prod");
    assert_eq!(nics[0]["vlan"], 10);
    assert_eq!(copy["state"], "3", "restored powered off");
    assert!(
        err.contains("via san (VHDX written through san-paths)"),
        "{err}"
    );
    // Its VHDX files, in a folder of its own under restore-dir, hold the disks at backup time.
    let disks = copy["disks"].as_array().unwrap();
    assert_eq!(disks.len(), expected.len());
    for (d, want) in disks.iter().zip(&expected) {
        let host = d["path"].as_str().unwrap();
        assert!(
            host.starts_with("C:\\ClusterStorage\\Volume1\\Restores\\sql-copy\\"),
            "{host}"
        );
        ferry_testkit::qemu_img_compare(&lab.local(host), "vhdx", want, "raw");
    }
    // The host runs it: it backs up like any VM (the simulator reads its disks).
    let again = lab.backup_of("lab", "sql-copy");
    let back = lab.path("sql-copy-disk1.raw");
    lab.ok(&[
        "restore",
        &again,
        "--disk",
        "disk1",
        "--to",
        back.to_str().unwrap(),
    ]);
    ferry_testkit::qemu_img_compare(&back, "raw", &expected[1], "raw");

    // The same name again: the new VM gets a suffix, in a folder of its own.
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "sql-copy"]);
    assert!(err.contains("the restored VM is `sql-copy (2)`"), "{err}");
    let p = lab.probe(&["sql-copy (2)"]);
    assert_eq!(machine(&p["sql-copy (2)"]), machine(orig));
    assert!(
        lab.local("C:\\ClusterStorage\\Volume1\\Restores\\sql-copy (2)")
            .is_dir()
    );
}

#[test]
fn a_missing_switch_or_a_failure_halfway_leaves_nothing() {
    let lab = Lab::start();
    let vm = "linux-web-01";
    let id = lab.backup_of("lab", vm);
    let folder = lab.local("C:\\ClusterStorage\\Volume1\\Restores");

    // A switch the host does not have: refused before anything is made.
    let o = lab.run(&[
        "restore",
        &id,
        "--to-source",
        "lab",
        "--name",
        "no-switch",
        "--network-map",
        "vSwitch-DMZ=vSwitch-Gone",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("the virtual switch `vSwitch-Gone` does not exist on this host")
            && err.contains("vSwitch-Prod, vSwitch-DMZ")
            && err.contains("--network-map"),
        "{err}"
    );
    assert!(lab.probe(&["no-switch"])["no-switch"].is_null());
    assert!(!folder.join("no-switch").exists());
    // A mapping no NIC uses is a typo.
    let o = lab.run(&[
        "restore",
        &id,
        "--to-source",
        "lab",
        "--network-map",
        "LAN=vSwitch-Prod",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no NIC of the restore point is on `LAN`"));

    // The host fails the last call (the NIC's VLAN... or its connection): the half-defined VM
    // and its written VHDX files go.
    lab.door(
        "FailNext",
        &[
            (
                "Method",
                "Msvm_VirtualSystemManagementService.AddResourceSettings",
            ),
            ("Skip", "3"),
            ("Count", "1"),
        ],
    );
    let o = lab.run(&["restore", &id, "--to-source", "lab", "--name", "halfway"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("injected by the simulator") && err.contains("removing the partial VM"),
        "{err}"
    );
    assert!(lab.probe(&["halfway"])["halfway"].is_null());
    assert!(!folder.join("halfway").exists(), "written files left");
    // The same restore then works, under that name.
    lab.ok(&[
        "restore",
        &id,
        "--to-source",
        "lab",
        "--name",
        "halfway",
        "--power-on",
    ]);
    let p = lab.probe(&[vm, "halfway"]);
    assert_eq!(machine(&p["halfway"]), machine(&p[vm]));
    assert_eq!(p["halfway"]["state"], "2", "powered on");
}

#[test]
fn hyperv_to_xen_and_xen_to_hyperv_keep_macs_and_disks() {
    let lab = Lab::start();
    let (_xen_sim, xen) = lab.with_xen();

    // Hyper-V → Xen: the disks, the MACs; what Xen cannot hold is said.
    let vm = "win-sql-01";
    let expected = lab.guest_disks(vm, "hv");
    let id = lab.backup_of("lab", vm);
    let (_, err) = lab.ok(&[
        "restore",
        &id,
        "--to-source",
        "xen",
        "--name",
        "from-hyperv",
    ]);
    let orig = lab.probe(&[vm])[vm].clone();
    let mut xp = xen_probe::Probe::start(&xen);
    let x = &xp.assert_disks("from-hyperv", &expected, lab.dir.path());
    let text = |v: &Value| v.to_string().trim_matches('"').to_string();
    assert_eq!(text(&x["VCPUs_max"]), orig["cpus"].to_string());
    assert_eq!(
        text(&x["memory_static_max"]),
        (orig["memory_mib"].as_u64().unwrap() << 20).to_string()
    );
    assert_eq!(macs(x, "vifs", "MAC"), macs(&orig, "nics", "mac"), "{x}");
    assert_eq!(x["HVM_boot_params"]["firmware"], "uefi", "{x}");
    for w in [
        "position `scsi0:0` does not exist on Xen; attached as device 0",
        "network `vSwitch-Prod` does not exist in this pool",
        "access VLAN 10 on switch `vSwitch-Prod` is not kept",
    ] {
        assert!(err.contains(w), "no warning `{w}`: {err}");
    }

    // Xen → Hyper-V: BIOS makes a generation 1 VM booting from IDE 0:0; the network is mapped
    // to a switch; the MACs are kept, static.
    let web = &xp.vm("debian-web");
    let xen_disks = xp.export_disks("debian-web", lab.dir.path(), "web");
    let xid = lab.backup_of("xen", "debian-web");
    let net = web["vifs"][0]["network"].as_str().unwrap().to_string();
    let (_, err) = lab.ok(&[
        "restore",
        &xid,
        "--to-source",
        "lab",
        "--name",
        "from-xen",
        "--network-map",
        &format!("{net}=vSwitch-Prod"),
    ]);
    let v = lab.probe(&["from-xen"])["from-xen"].clone();
    assert!(v.is_object(), "{err}");
    assert_eq!(v["cpus"].to_string(), text(&web["VCPUs_max"]), "{v}");
    assert_eq!(
        (v["memory_mib"].as_u64().unwrap() << 20).to_string(),
        text(&web["memory_static_max"])
    );
    assert_eq!(macs(&v, "nics", "mac"), macs(web, "vifs", "MAC"), "{v}");
    assert!(
        v["nics"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["switch"] == "vSwitch-Prod" && n["static"] == "true"),
        "{v}"
    );
    assert_eq!(v["generation"], "1", "{v}");
    let vdisks = v["disks"].as_array().unwrap();
    assert_eq!(vdisks.len(), xen_disks.len(), "{v}");
    assert_eq!(vdisks[0]["at"], "ide0:0", "{v}");
    for (d, want) in vdisks.iter().zip(&xen_disks) {
        ferry_testkit::qemu_img_compare(
            &lab.local(d["path"].as_str().unwrap()),
            "vhdx",
            want,
            "raw",
        );
    }
    assert!(
        err.contains("does not exist on a generation 1 Hyper-V VM; attached at ide0:0"),
        "{err}"
    );
}

/// What VMware's SDK (pyvmomi, `tests/vmware_probe.py`) reports of VM `name` on `vc`.
fn vsphere_probe(vc: &Value, name: &str) -> Value {
    hyperv_lab::vsphere_vm(vc, name)
}

/// The local file of a datastore path `[ds] dir/file.vmdk`.
fn datastore_file(vc: &Value, file: &str) -> PathBuf {
    let (ds, rel) = file
        .strip_prefix('[')
        .and_then(|r| r.split_once("] "))
        .unwrap_or_else(|| panic!("not a datastore path: {file}"));
    PathBuf::from(vc["san_paths"][ds].as_str().unwrap()).join(rel)
}

#[test]
fn hyperv_to_vsphere_and_vsphere_to_hyperv_keep_macs_and_disks() {
    let lab = Lab::start();
    let (_vc_sim, vc) = lab.with_vsphere();

    // Hyper-V → vSphere.
    let vm = "win-sql-01";
    let expected = lab.guest_disks(vm, "to-vc");
    let id = lab.backup_of("lab", vm);
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "vc", "--name", "from-hyperv"]);
    let orig = lab.probe(&[vm])[vm].clone();
    let v = vsphere_probe(&vc, "from-hyperv");
    assert!(v.is_object(), "{err}");
    assert_eq!(v["cpus"], orig["cpus"], "{v}");
    assert_eq!(v["memory_mb"], orig["memory_mib"], "{v}");
    assert_eq!(v["firmware"], "efi", "{v}");
    assert_eq!(macs(&v, "nics", "mac"), macs(&orig, "nics", "mac"), "{v}");
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{v}");
    for (i, (d, want)) in disks.iter().zip(&expected).enumerate() {
        assert_eq!(d["position"], format!("scsi0:{i}"), "{v}");
        let desc = datastore_file(&vc, d["file"].as_str().unwrap());
        ferry_testkit::qemu_img_compare(&desc, "vmdk", want, "raw");
    }
    for w in [
        "model `synthetic` does not exist on vSphere; using vmxnet3",
        "network `vSwitch-Prod` does not exist on this vCenter",
        "access VLAN 10 on switch `vSwitch-Prod` is not kept",
    ] {
        assert!(err.contains(w), "no warning `{w}`: {err}");
    }

    // vSphere → Hyper-V: positions kept, the port group mapped to a switch, MACs kept.
    let src = vc["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["disks"].as_array().unwrap().len() == 2)
        .expect("a 2-disk VM");
    let name = src["name"].as_str().unwrap().to_string();
    let before = vsphere_probe(&vc, &name);
    let mut live: Vec<(String, PathBuf)> = before["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let p = lab.path(&format!("vc-{}.raw", d["position"].as_str().unwrap()));
            // The two disks differ in size (1 MiB seeded, 8 MiB added by the simulator).
            let size = d["capacity"].as_u64();
            let l = src["disks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["capacity"].as_u64() == size)
                .unwrap()["live"]
                .as_str()
                .unwrap()
                .to_string();
            std::fs::copy(l, &p).unwrap();
            (d["position"].as_str().unwrap().to_string(), p)
        })
        .collect();
    live.sort();
    let vid = lab.backup_of("vc", &name);
    let net = before["nics"][0]["network"].as_str().unwrap().to_string();
    let (_, err) = lab.ok(&[
        "restore",
        &vid,
        "--to-source",
        "lab",
        "--name",
        "from-vsphere",
        "--network-map",
        &format!("{net}=vSwitch-DMZ"),
    ]);
    let h = lab.probe(&["from-vsphere"])["from-vsphere"].clone();
    assert!(h.is_object(), "{err}");
    assert_eq!(h["cpus"], before["cpus"], "{h}");
    assert_eq!(h["memory_mib"], before["memory_mb"], "{h}");
    assert_eq!(macs(&h, "nics", "mac"), macs(&before, "nics", "mac"), "{h}");
    assert!(
        h["nics"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["switch"] == "vSwitch-DMZ"),
        "{h}"
    );
    let hd = h["disks"].as_array().unwrap();
    assert_eq!(hd.len(), live.len(), "{h}");
    for (i, (d, (at, want))) in hd.iter().zip(&live).enumerate() {
        // A generation 1 VM boots from IDE only: the boot disk goes to IDE 0:0 (ADR 0167).
        let at = if i == 0 { "ide0:0" } else { at.as_str() };
        assert_eq!(d["at"], at, "{h}");
        ferry_testkit::qemu_img_compare(
            &lab.local(d["path"].as_str().unwrap()),
            "vhdx",
            want,
            "raw",
        );
    }
    assert!(
        err.contains("does not exist on Hyper-V; it becomes a synthetic network adapter"),
        "{err}"
    );
    assert!(err.contains("generation 1 boots from IDE only"), "{err}");
}

#[test]
fn a_restore_killed_halfway_is_removed_by_source_cleanup() {
    // Disks large enough that the kill lands while they are written.
    let lab = Lab::with_disks("64");
    let id = lab.backup_of("lab", "win-sql-01");
    let mut child = ferry()
        .args([
            "-v",
            "restore",
            &id,
            "--to-source",
            "lab",
            "--name",
            "killed",
        ])
        .envs(lab.env())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = cli::wait_for_stderr_keep(&mut child, "VM defined; writing its disks");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let seen = log.join().unwrap();
    let folder = lab.local("C:\\ClusterStorage\\Volume1\\Restores\\killed");
    assert!(lab.probe(&["killed"])["killed"].is_object(), "{seen}");
    assert!(folder.exists());
    let (out, err) = lab.ok(&["source", "cleanup", "--source", "lab", "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["partial-vms"], 1, "{report}");
    assert!(
        err.contains("destroyed the partial VM of a killed restore"),
        "{err}"
    );
    assert!(lab.probe(&["killed"])["killed"].is_null());
    assert!(!folder.exists(), "the written files are left");
}
