//! Each Hyper-V disk's real controller, through the `ferry` binary against `ferry sim hyperv`:
//! the generation 1 guest `linux-web-01` boots from IDE 0:0 (its image → drive → controller
//! chain, `Parent` by `Parent`), the generation 2 guests from SCSI. The restore point records
//! `ide0:0`; a whole-VM restore to Hyper-V puts the boot disk back on an IDE controller at
//! location 0 (read back with pypsrp, `tests/hyperv_vm_probe.py`, and by `ferry vms`), to
//! vSphere on an IDE controller (pyvmomi), to Xen as device 0 (XenAPI); the disks compare
//! identical under `qemu-img compare`. A clustered source names its failover cluster in
//! `ferry vms --json`.

use ferry_hv_hyperv::cim::{Epr, Param};
use serde_json::Value;
use std::path::PathBuf;

const GEN1: &str = "linux-web-01";
const IDE: &str = "Microsoft:Hyper-V:Emulated IDE Controller";

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;
#[path = "common/xen_probe.rs"]
mod xen_probe;

lab_wrapper!(
    /// The shared Hyper-V lab, with what these tests ask of it.
);

impl Lab {
    /// A standalone host, source `lab` reading through `san-paths` and restoring into
    /// `C:\ClusterStorage\Volume1\Restores`.
    fn standalone() -> Self {
        let lab = hyperv_lab::Lab::start(&["--disk-mib", "8"]);
        lab.config(
            "[\"san\"]",
            &format!(
                "restore-dir = 'C:\\ClusterStorage\\Volume1\\Restores'\n{}",
                lab.san_paths_table()
            ),
        );
        Self(lab)
    }

    fn json(&self, args: &[&str]) -> Value {
        let (out, err) = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
    }

    /// `ferry backup --source lab --vm VM`: the restore point's id.
    fn backup_vm(&self, vm: &str) -> String {
        let (reports, _) = self.backup(&["--vm", vm]);
        reports[0]["snapshot"].as_str().unwrap().to_string()
    }

    /// The disk positions the restore point `id` records, in its disk order.
    fn recorded(&self, id: &str) -> Vec<String> {
        self.manifest(id)
            .meta
            .config
            .disks
            .iter()
            .map(|d| d.controller.clone().unwrap_or_default())
            .collect()
    }

    /// `ferry vms --source lab --json`, VM `name`.
    fn inventory(&self, name: &str) -> Value {
        let all = self.json(&["vms", "--source", "lab", "--json"]);
        all.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no VM {name}: {all}"))
    }

    /// Gives VM `vm` a further disk as an administrator's script does: a SCSI controller, a
    /// drive at location 0 on it (`Parent` = the controller's path) and a VHDX made by qemu-img
    /// (`Parent` = the drive's path). Returns the disk's content as a raw file.
    fn add_scsi_disk(&self, vm: &str) -> PathBuf {
        let host_path = format!("C:\\ClusterStorage\\Volume1\\{vm}\\data1.vhdx");
        let bytes =
            ferry_testkit::qemu_vhdx(&self.local(&host_path), 4 << 20, &["write -P 0x5a 1M 2M"]);
        let want = self.path(&format!("{vm}-data1.raw"));
        std::fs::write(&want, bytes).unwrap();
        let vssd = Epr::new(
            "Msvm_VirtualSystemSettingData",
            &[("InstanceID", &format!("Microsoft:{}", self.vm_id(vm)))],
        );
        let host = self.info["host"].as_str().unwrap();
        let rasd = "Msvm_ResourceAllocationSettingData";
        let path = |iid: &str| {
            format!(
                "\\\\{host}\\root\\virtualization\\v2:{rasd}.InstanceID=\"{}\"",
                iid.replace('\\', "\\\\")
            )
        };
        let add = |class: &str, props: &[(&str, &str)], arrays: &[(&str, &str)]| {
            let mut x = format!("<INSTANCE CLASSNAME=\"{class}\">");
            for (k, v) in props {
                x.push_str(&format!(
                    "<PROPERTY NAME=\"{k}\" TYPE=\"string\"><VALUE>{v}</VALUE></PROPERTY>"
                ));
            }
            for (k, v) in arrays {
                x.push_str(&format!("<PROPERTY.ARRAY NAME=\"{k}\" TYPE=\"string\"><VALUE.ARRAY><VALUE>{v}</VALUE></VALUE.ARRAY></PROPERTY.ARRAY>"));
            }
            x.push_str("</INSTANCE>");
            let out = self.manage(
                "AddResourceSettings",
                vec![
                    Param::Ref("AffectedConfiguration".into(), vssd.clone()),
                    Param::Texts("ResourceSettings".into(), vec![x]),
                ],
            );
            out.reference("ResultingResourceSettings")
                .and_then(|e| e.selector("InstanceID"))
                .unwrap()
                .to_string()
        };
        let ctl = add(
            rasd,
            &[
                ("ResourceType", "6"),
                (
                    "ResourceSubType",
                    "Microsoft:Hyper-V:Synthetic SCSI Controller",
                ),
            ],
            &[],
        );
        let drive = add(
            rasd,
            &[
                ("ResourceType", "17"),
                ("ResourceSubType", "Microsoft:Hyper-V:Synthetic Disk Drive"),
                ("Parent", &path(&ctl)),
                ("AddressOnParent", "0"),
            ],
            &[],
        );
        add(
            "Msvm_StorageAllocationSettingData",
            &[
                ("ResourceType", "31"),
                ("ResourceSubType", "Microsoft:Hyper-V:Virtual Hard Disk"),
                ("Parent", &path(&drive)),
            ],
            &[("HostResource", &host_path)],
        );
        want
    }
}

fn positions(vm: &Value) -> Vec<&str> {
    vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["position"].as_str().unwrap_or(""))
        .collect()
}

#[test]
fn generation_1_boot_disk_is_captured_on_ide_and_restored_there() {
    let lab = Lab::standalone();
    // The inventory reads each disk's controller: IDE for generation 1, SCSI for generation 2.
    let web = lab.inventory(GEN1);
    assert_eq!(positions(&web), ["ide0:0"], "{web}");
    assert!(web.get("cluster").is_none(), "a standalone host: {web}");
    let sql = lab.inventory("win-sql-01");
    assert_eq!(positions(&sql), ["scsi0:0", "scsi0:1"], "{sql}");

    let sql_id = lab.backup_vm("win-sql-01");
    assert_eq!(lab.recorded(&sql_id), ["scsi0:0", "scsi0:1"]);

    // The generation 1 guest gets a data disk on a SCSI controller, as an administrator adds one.
    let expected = [
        lab.guest_disks(GEN1, "live").remove(0),
        lab.add_scsi_disk(GEN1),
    ];
    assert_eq!(positions(&lab.inventory(GEN1)), ["ide0:0", "scsi0:0"]);
    let id = lab.backup_vm(GEN1);
    assert_eq!(lab.recorded(&id), ["ide0:0", "scsi0:0"]);

    // Whole VM back to Hyper-V: generation 1, the boot disk on IDE controller 0, location 0,
    // the data disk on SCSI.
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "web-copy"]);
    let p = lab.probe_vms(&[GEN1, "web-copy"]);
    let copy = &p["web-copy"];
    assert!(copy.is_object(), "no restored VM: {p}\n{err}");
    assert_eq!(copy["generation"], "1", "{copy}");
    let disks = copy["disks"].as_array().unwrap();
    let at: Vec<&str> = disks.iter().map(|d| d["at"].as_str().unwrap()).collect();
    assert_eq!(at, ["ide0:0", "scsi0:0"], "{copy}");
    assert_eq!(disks[0]["controller"], IDE, "{copy}");
    assert_eq!(p[GEN1]["disks"][0]["at"], "ide0:0", "{p}");
    assert!(
        !err.contains("does not exist on a generation"),
        "nothing moved: {err}"
    );
    for (d, want) in disks.iter().zip(&expected) {
        ferry_testkit::qemu_img_compare(
            &lab.local(d["path"].as_str().unwrap()),
            "vhdx",
            want,
            "raw",
        );
    }
    // Ferry reads the restored VM's chain back as the host recorded it.
    assert_eq!(positions(&lab.inventory("web-copy")), ["ide0:0", "scsi0:0"]);
}

#[test]
fn a_generation_1_point_boots_from_ide_on_vsphere_and_from_device_0_on_xen() {
    let lab = Lab::standalone();
    let (_vc_sim, vc) = lab.with_vsphere();
    let (_xen_sim, xen) = lab.with_xen();

    let expected = lab.guest_disks(GEN1, "live").remove(0);
    let id = lab.backup_vm(GEN1);

    // vSphere: the disk on an IDE controller, unit 0; BIOS.
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "vc", "--name", "web-vc"]);
    let v = hyperv_lab::vsphere_vm(&vc, "web-vc");
    assert!(v.is_object(), "{err}");
    assert_eq!(v["firmware"], "bios", "{v}");
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{v}");
    assert_eq!(disks[0]["position"], "ide0:0", "{v}");
    assert!(!err.contains("position `ide0:0`"), "kept: {err}");
    let (ds, rel) = disks[0]["file"]
        .as_str()
        .unwrap()
        .strip_prefix('[')
        .and_then(|r| r.split_once("] "))
        .unwrap();
    let vmdk = PathBuf::from(vc["san_paths"][ds].as_str().unwrap()).join(rel);
    ferry_testkit::qemu_img_compare(&vmdk, "vmdk", &expected, "raw");

    // Xen: device 0, bootable.
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "xen", "--name", "web-xen"]);
    let mut probe = xen_probe::Probe::start(&xen);
    let x = probe.vm("web-xen");
    let xd = x["disks"].as_array().unwrap();
    assert_eq!(xd.len(), 1, "{x}");
    assert_eq!(xd[0]["userdevice"], "0", "{x}");
    assert!(
        err.contains("position `ide0:0` does not exist on Xen; attached as device 0"),
        "{err}"
    );
    let got = probe.export_disks("web-xen", lab.dir.path(), "web-xen");
    ferry_testkit::qemu_img_compare(&got[0], "raw", &expected, "raw");
}

#[test]
fn a_clustered_source_names_its_failover_cluster_in_the_inventory() {
    let lab = hyperv_lab::Lab::start(&["--cluster", "2", "--disk-mib", "8"]);
    lab.config(
        "[\"san\"]",
        &format!("{}{}", lab.san_paths_table(), lab.nodes_table(|k| k)),
    );
    let lab = Lab(lab);
    let cluster = lab.info["cluster"]["name"].as_str().unwrap().to_string();
    let nodes: Vec<&str> = lab.info["cluster"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    let all = lab.json(&["vms", "--source", "lab", "--json"]);
    let vms = all.as_array().unwrap();
    assert_eq!(vms.len(), 5, "{all}");
    for v in vms {
        assert_eq!(v["cluster"], cluster.as_str(), "{v}");
        assert!(nodes.contains(&v["host"].as_str().unwrap()), "{v}");
    }
    // Each node reads the disks' controllers of the VMs it runs.
    assert_eq!(positions(&lab.inventory(GEN1)), ["ide0:0"]);
    // The table shows it too.
    let (table, _) = lab.ok(&["vms", "--source", "lab"]);
    let row = table.lines().find(|l| l.starts_with(GEN1)).unwrap();
    assert!(row.contains(&cluster), "{table}");
}
