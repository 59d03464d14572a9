//! Each Hyper-V disk's real controller, through the `ferry` binary against `ferry sim hyperv`:
//! the generation 1 guest `linux-web-01` boots from IDE 0:0 (its image → drive → controller
//! chain, `Parent` by `Parent`), the generation 2 guests from SCSI. The restore point records
//! `ide0:0`; a whole-VM restore to Hyper-V puts the boot disk back on an IDE controller at
//! location 0 (read back with pypsrp, `tests/hyperv_vm_probe.py`, and by `ferry vms`), to
//! vSphere on an IDE controller (pyvmomi), to Xen as device 0 (XenAPI); the disks compare
//! identical under `qemu-img compare`. A clustered source names its failover cluster in
//! `ferry vms --json`.

use ferry_hv_hyperv::cim::{Epr, Param};
use ferry_testkit::Killed;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

const PASSWORD: &str = "test password";
const GEN1: &str = "linux-web-01";
const IDE: &str = "Microsoft:Hyper-V:Emulated IDE Controller";

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;
#[path = "common/xen_probe.rs"]
mod xen_probe;

fn ferry() -> Command {
    let mut c = cli::ferry();
    c.env("FERRY_PASSWORD", PASSWORD);
    c
}

struct Lab {
    dir: tempfile::TempDir,
    info: Value,
    _sim: Killed,
}

impl Lab {
    /// `ferry sim hyperv` (with `extra` arguments) as source `lab`, `[sources.lab]` ending with
    /// `tail`, and an empty repository.
    fn start(extra: &[&str], tail: impl Fn(&Value) -> String) -> Self {
        let dir = ferry_testkit::scratch_dir();
        let (sim, info) = Killed::spawn_json_line(
            ferry()
                .args([
                    "sim",
                    "hyperv",
                    "--listen",
                    "127.0.0.1:0",
                    "--disk-mib",
                    "8",
                ])
                .args(extra)
                .arg("--dir")
                .arg(dir.path().join("host")),
        );
        let pw = dir.path().join("hv.pw");
        std::fs::write(&pw, info["password"].as_str().unwrap()).unwrap();
        let toml = format!(
            "[sources.lab]\nkind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\ntransports = [\"san\"]\n{}[sources.lab.san-paths]\n'C:\\' = \"{}\"\n",
            info["url"].as_str().unwrap(),
            info["username"].as_str().unwrap(),
            pw.display(),
            info["tls_fingerprint"].as_str().unwrap(),
            dir.path().join("state").display(),
            tail(&info),
            info["san_paths"]["C:\\"].as_str().unwrap(),
        );
        std::fs::write(dir.path().join("ferry.toml"), toml).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        hyperv_lab::init_repo(&rt, &dir.path().join("repo"), PASSWORD, Some(256 << 10));
        Self {
            dir,
            info,
            _sim: sim,
        }
    }

    /// A standalone host that restores into `C:\ClusterStorage\Volume1\Restores`.
    fn standalone() -> Self {
        Self::start(&[], |_| {
            "restore-dir = 'C:\\ClusterStorage\\Volume1\\Restores'\n".into()
        })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn run(&self, args: &[&str]) -> Output {
        let env = [
            ("FERRY_PASSWORD", PASSWORD.to_string()),
            ("FERRY_REPO", self.path("repo").display().to_string()),
            (
                "FERRY_CONFIG",
                self.path("ferry.toml").display().to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v));
        ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &env)
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        assert!(out.status.success(), "ferry {args:?} failed");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    fn json(&self, args: &[&str]) -> Value {
        let (out, err) = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"))
    }

    /// `ferry backup --source lab --vm VM`: the restore point's id.
    fn backup(&self, vm: &str) -> String {
        let v = self.json(&["backup", "--source", "lab", "--vm", vm, "--json"]);
        v[0]["snapshot"].as_str().unwrap().to_string()
    }

    /// The disk positions the restore point `id` records, in its disk order.
    fn recorded(&self, id: &str) -> Vec<String> {
        let all = self.json(&["snapshots", "--json"]);
        let m = all
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("no restore point {id}: {all}"));
        m["config"]["disks"]
            .as_array()
            .unwrap_or_else(|| panic!("no disks in the config: {m}"))
            .iter()
            .map(|d| d["controller"].as_str().unwrap_or("").to_string())
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

    /// A copy of what the guest of `vm` sees on disk `n` now.
    fn guest_disk(&self, vm: &str, n: usize) -> PathBuf {
        let v = self.info["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .unwrap();
        let to = self.path(&format!("{vm}-{n}.raw"));
        std::fs::copy(v["disks"][n]["live"].as_str().unwrap(), &to).unwrap();
        to
    }

    /// The proxy's view of host path `p` (under `C:\`).
    fn local(&self, p: &str) -> PathBuf {
        let rest = p.strip_prefix("C:\\").unwrap_or_else(|| panic!("{p}"));
        let mut out = PathBuf::from(self.info["san_paths"]["C:\\"].as_str().unwrap());
        out.extend(rest.split('\\'));
        out
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
        let id = self.info["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = hyperv_lab::sim_client(&rt, &self.info);
        let svc = Epr::new(
            "Msvm_VirtualSystemManagementService",
            &[
                ("CreationClassName", "Msvm_VirtualSystemManagementService"),
                ("Name", "vmms"),
                ("SystemCreationClassName", "Msvm_ComputerSystem"),
                ("SystemName", self.info["host"].as_str().unwrap()),
            ],
        );
        let vssd = Epr::new(
            "Msvm_VirtualSystemSettingData",
            &[("InstanceID", &format!("Microsoft:{id}"))],
        );
        let rasd = "Msvm_ResourceAllocationSettingData";
        let path = |class: &str, iid: &str| {
            format!(
                "\\\\{}\\root\\virtualization\\v2:{class}.InstanceID=\"{}\"",
                self.info["host"].as_str().unwrap(),
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
            let params = [
                Param::Ref("AffectedConfiguration".into(), vssd.clone()),
                Param::Texts("ResourceSettings".into(), vec![x]),
            ];
            let out = rt
                .block_on(client.invoke(&svc, "AddResourceSettings", &params))
                .unwrap_or_else(|e| panic!("AddResourceSettings {class}: {e}"));
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
                ("Parent", &path(rasd, &ctl)),
                ("AddressOnParent", "0"),
            ],
            &[],
        );
        add(
            "Msvm_StorageAllocationSettingData",
            &[
                ("ResourceType", "31"),
                ("ResourceSubType", "Microsoft:Hyper-V:Virtual Hard Disk"),
                ("Parent", &path(rasd, &drive)),
            ],
            &[("HostResource", &host_path)],
        );
        want
    }

    /// Appends source `name` for the simulator `sim` (its JSON line) of `kind`, with `extra`.
    fn add_source(&self, name: &str, kind: &str, sim: &Value, extra: &str) {
        let pw = self.path(&format!("{name}.pw"));
        std::fs::write(&pw, sim["password"].as_str().unwrap()).unwrap();
        let mut t = std::fs::read_to_string(self.path("ferry.toml")).unwrap();
        t.push_str(&format!(
            "[sources.{name}]\nkind = \"{kind}\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\n{extra}",
            sim["url"].as_str().unwrap(),
            sim["username"].as_str().unwrap(),
            pw.display(),
            sim["tls_fingerprint"].as_str().unwrap(),
            self.path("state").display(),
        ));
        std::fs::write(self.path("ferry.toml"), t).unwrap();
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

    let sql_id = lab.backup("win-sql-01");
    assert_eq!(lab.recorded(&sql_id), ["scsi0:0", "scsi0:1"]);

    // The generation 1 guest gets a data disk on a SCSI controller, as an administrator adds one.
    let expected = [lab.guest_disk(GEN1, 0), lab.add_scsi_disk(GEN1)];
    assert_eq!(positions(&lab.inventory(GEN1)), ["ide0:0", "scsi0:0"]);
    let id = lab.backup(GEN1);
    assert_eq!(lab.recorded(&id), ["ide0:0", "scsi0:0"]);

    // Whole VM back to Hyper-V: generation 1, the boot disk on IDE controller 0, location 0,
    // the data disk on SCSI.
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "web-copy"]);
    let p = hyperv_lab::probe_vms(&lab.info, &[GEN1, "web-copy"]);
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
    let (_vc_sim, vc) = Killed::spawn_json_line(
        ferry()
            .args(["sim", "vmware", "--listen", "127.0.0.1:0"])
            .args(["--disk-mib", "8", "--vcsim"])
            .arg(ferry_testkit::tool("vcsim"))
            .arg("--dir")
            .arg(lab.path("vc-sim")),
    );
    let mut vc_paths =
        "transports = [\"san\"]\nnbdkit-stand-in = \"file\"\n[sources.vc.san-paths]\n".to_string();
    for (ds, p) in vc["san_paths"].as_object().unwrap() {
        vc_paths.push_str(&format!("\"{ds}\" = \"{}\"\n", p.as_str().unwrap()));
    }
    lab.add_source("vc", "vmware", &vc, &vc_paths);
    let (_xen_sim, xen) = xen_probe::start_sim(ferry(), &lab.path("xen-sim"));
    lab.add_source("xen", "xen", &xen, "transports = [\"network\"]\n");

    let expected = lab.guest_disk(GEN1, 0);
    let id = lab.backup(GEN1);

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
    let lab = Lab::start(&["--cluster", "2"], |info| {
        let nodes: String = info["cluster"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                format!(
                    "{} = {{ url = \"{}\", tls-fingerprint = \"{}\" }}\n",
                    n["name"].as_str().unwrap(),
                    n["url"].as_str().unwrap(),
                    n["tls_fingerprint"].as_str().unwrap()
                )
            })
            .collect();
        format!("[sources.lab.nodes]\n{nodes}")
    });
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
