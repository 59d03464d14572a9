//! Cross-hypervisor replicas through the `ferry` binary (docs/replication.md, ADR 0162): the
//! 2-disk VM of `ferry sim vmware` (vcsim behind Ferry's front) replicated to a `ferry sim xen`
//! pool. The tests act as the vSphere guest through the simulator's side door
//! (`FerrySimGuestWrite`, sent with curl) and look at the pool through the XenAPI SDK
//! (`tests/xen_probe.py`); disks are compared byte for byte with `qemu-img compare`.

use ferry_core::Secret;
use ferry_testkit::Killed;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[path = "common/replica_lab.rs"]
mod replica_lab;
#[path = "common/vsphere_lab.rs"]
mod vsphere_lab;
#[path = "common/xen_probe.rs"]
mod xen_probe;
use replica_lab::{Ferry, LabDir, PASSWORD, assert_same_disks, ferry, init_repo, password_file};
use xen_probe::Probe;

/// vCenter `vc` (the primary's side) and Xen pool `dr`, a repository, `ferry.toml`, state.
struct Lab {
    dir: tempfile::TempDir,
    vc: Value,
    dr: Probe,
    /// The 2-disk VM: name, moref, [(device key, live flat file)] in scsi0:0, scsi0:1 order.
    vm: (String, String, Vec<(i64, PathBuf)>),
    _sims: (Killed, Killed),
}

impl LabDir for Lab {
    fn lab_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Lab {
    fn start() -> Self {
        let dir = ferry_testkit::scratch_dir();
        let (vc_sim, vc) = vsphere_lab::start_sim(ferry(), &dir.path().join("vc-sim"));
        let (xen_sim, xen) = xen_probe::start_sim(ferry(), &dir.path().join("dr-sim"));
        let state = dir.path().join("state");
        let pw = |name: &str, info: &Value| password_file(dir.path(), name, info);
        let mut t = vsphere_lab::source_toml("vc", &vc, &pw("vc", &vc), &state);
        t.push_str(&xen_probe::source_toml("dr", &xen, &pw("dr", &xen), &state));
        std::fs::write(dir.path().join("ferry.toml"), t).unwrap();
        init_repo(&dir.path().join("repo"), PASSWORD);
        let vm = vsphere_lab::two_disk_vm(&vc);
        Self {
            dr: Probe::start(&xen),
            dir,
            vc,
            vm,
            _sims: (vc_sim, xen_sim),
        }
    }

    fn standby(&self) -> String {
        format!("{} (replica)", self.vm.0)
    }

    /// The disks of VM `name` on the pool, exported as raw files.
    fn xen_disks(&mut self, name: &str, label: &str) -> Vec<PathBuf> {
        let dir = self.dir.path().to_path_buf();
        self.dr.export_disks(name, &dir, label)
    }

    /// The vSphere VM's disks as they are now (copies of the simulator's flat files).
    fn vc_disks(&self, label: &str) -> Vec<PathBuf> {
        vsphere_lab::copy_live_disks(&self.vm.2, self.dir.path(), label)
    }

    /// Every disk of restore point `rp`, restored to files.
    fn restored(&self, rp: &str) -> Vec<PathBuf> {
        Ferry::in_dir(self.dir.path(), PASSWORD).restored(
            self.dir.path(),
            rp,
            &["scsi0:0", "scsi0:1"],
        )
    }

    /// The guest writes a recognizable pattern into both disks.
    fn guest_writes(&self, seed: u8) {
        let (_, moref, disks) = &self.vm;
        vc_guest_write(&self.vc, moref, disks[0].0, 300 << 10, &[seed; 70_000]);
        vc_guest_write(
            &self.vc,
            moref,
            disks[1].0,
            5 << 20,
            &[seed.wrapping_add(1); 4096],
        );
    }
}

fn vc_guest_write(vc: &Value, moref: &str, key: i64, offset: u64, data: &[u8]) {
    vsphere_lab::guest_write(vc, moref, key, offset, data);
}

fn vc_snapshots(vc: &Value) -> u64 {
    vsphere_lab::snapshot_count(vc)
}

#[test]
fn vsphere_to_xen_replica_follows_writes_and_fails_over_to_a_chosen_point() {
    let mut lab = Lab::start();
    let vm = lab.vm.0.clone();
    let standby = lab.standby();
    let out = lab.run(&[
        "replica",
        "create",
        "web",
        "--source",
        "vc",
        "--vm",
        &vm,
        "--to-source",
        "dr",
        "--keep",
        "3",
    ]);
    assert!(out.status.success());
    // vSphere holds replicas too: the way back is possible, nothing to warn about.
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("cannot hold replicas"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The first cycle is a whole-VM restore across hypervisors: a halted Xen VM whose disks
    // are the restore point's, in device order.
    let t = std::time::Instant::now();
    lab.ok(&["replica", "sync", "web"]);
    eprintln!(
        "vSphere → Xen first cycle (whole-VM restore): {:?}",
        t.elapsed()
    );
    let first = lab.replica_status("web");
    let rp1 = first["applied"].as_str().unwrap().to_string();
    let x = lab.dr.vm(&standby);
    assert_eq!(x["power_state"], "Halted", "{x}");
    assert_eq!(x["disks"].as_array().unwrap().len(), 2, "{x}");
    let at1 = lab.restored(&rp1);
    assert_same_disks(&lab.xen_disks(&standby, "dr-1"), &at1);
    assert_same_disks(&at1, &lab.vc_disks("vc-1"));
    assert_eq!(vc_snapshots(&lab.vc), 0, "the cycle's snapshot is removed");

    // Guest writes on both vSphere disks reach the Xen standby in one cycle, as changed blocks.
    lab.guest_writes(0x5a);
    let t = std::time::Instant::now();
    lab.ok(&["replica", "sync", "web"]);
    eprintln!("vSphere → Xen incremental cycle: {:?}", t.elapsed());
    let second = lab.replica_status("web");
    let rp2 = second["applied"].as_str().unwrap().to_string();
    assert_ne!(rp1, rp2);
    let now = lab.vc_disks("vc-2");
    let dr2 = lab.xen_disks(&standby, "dr-2");
    assert_same_disks(&dr2, &lab.restored(&rp2));
    assert_same_disks(&dr2, &now);
    let bytes = second["health"]["last-bytes"].as_u64().unwrap();
    let size: u64 = now
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    // One changed 2 MiB VHD block per disk, not the disks.
    assert!(bytes > 0 && bytes <= 2 * (2 << 20), "{second}");
    assert!(bytes < size, "{bytes} of {size}");
    eprintln!("vSphere → Xen incremental cycle wrote {bytes} of {size} bytes");
    assert_eq!(second["points"].as_array().unwrap().len(), 2, "{second}");

    // A test failover runs a copy of the newest point on an isolated network and leaves the
    // pool as it was after its cleanup.
    let vdis = lab.dr.ask(json!({"op": "vdis"}));
    let nets = lab.dr.ask(json!({"op": "networks"}));
    let names = lab.dr.ask(json!({"op": "vm_names"}));
    lab.ok(&["replica", "test", "web"]);
    let copy_name = format!("{vm} (test failover)");
    let copy = lab.dr.vm(&copy_name);
    assert_eq!(copy["power_state"], "Running", "{copy}");
    for v in copy["vifs"].as_array().unwrap() {
        assert_eq!(
            v["network"],
            format!("{copy_name} (isolated)").as_str(),
            "{copy}"
        );
    }
    assert_same_disks(&lab.xen_disks(&copy_name, "copy"), &dr2);
    assert_eq!(lab.dr.vm(&standby)["power_state"], "Halted");
    lab.ok(&["replica", "test", "web", "--cleanup"]);
    assert_eq!(lab.dr.ask(json!({"op": "vdis"})), vdis);
    assert_eq!(lab.dr.ask(json!({"op": "networks"})), nets);
    assert_eq!(lab.dr.ask(json!({"op": "vm_names"})), names);

    // Unplanned failover to the older point: the Xen VM runs with exactly that point's disks.
    lab.guest_writes(0x77);
    lab.ok(&["replica", "sync", "web"]);
    lab.ok(&["replica", "failover", "web", "--unplanned", "--point", &rp2]);
    assert_eq!(lab.dr.vm(&standby)["power_state"], "Running");
    assert_same_disks(&lab.xen_disks(&standby, "dr-failed-over"), &dr2);
    let s = lab.replica_status("web");
    assert_eq!(s["state"]["kind"], "failed-over", "{s}");
    // Reverse (vSphere holds replicas, ADR 0165): the Xen VM is the primary now, the
    // vSphere VM its standby, shut down.
    lab.ok(&["replica", "reverse", "web"]);
    let s = lab.replica_status("web");
    assert_eq!(s["state"]["kind"], "replicating", "{s}");
    assert_eq!(
        (&s["source"], &s["target"]),
        (&json!("dr"), &json!("vc")),
        "{s}"
    );
    let old = vsphere_lab::vm(&lab.vc, &vm);
    assert_eq!(old["power"], "poweredOff", "{old}");
    assert_eq!(old["extra"]["ferry.replica.role"], "standby", "{old}");

    // Cancel: the recovery points go, the running VM stays, nothing is left on vCenter.
    lab.ok(&["replica", "cancel", "web"]);
    let l = lab.dr.ask(json!({"op": "leftovers"}));
    assert!(l["snapshot_vms"].as_array().unwrap().is_empty(), "{l}");
    assert_eq!(lab.dr.vm(&standby)["power_state"], "Running");
    assert_eq!(vc_snapshots(&lab.vc), 0);
    assert!(!lab.path("state/replicas/web.json").exists());
}

/// `ferry sim hyperv` (the 2-disk guest `win-sql-01`) as source `hv`, a `ferry sim xen` pool
/// as `dr`; the guest writes through the simulator's WMI side door.
#[test]
fn hyperv_to_xen_replica_follows_writes_and_fails_over_planned_and_back() {
    use base64::Engine as _;
    use ferry_hv_hyperv::cim::{Epr, Param};
    const VM: &str = "win-sql-01";
    let dir = ferry_testkit::scratch_dir();
    let d = dir.path();
    let (_hv_sim, hv) = Killed::spawn_json_line(
        ferry()
            .args([
                "sim",
                "hyperv",
                "--listen",
                "127.0.0.1:0",
                "--disk-mib",
                "8",
            ])
            .arg("--dir")
            .arg(d.join("host")),
    );
    let (_xen_sim, xen) = xen_probe::start_sim(ferry(), &d.join("dr-sim"));
    let pw = |name: &str, info: &Value| {
        let p = d.join(format!("{name}.pw"));
        std::fs::write(&p, info["password"].as_str().unwrap()).unwrap();
        p
    };
    let toml = format!(
        "[sources.hv]\nkind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\ntransports = [\"san\"]\n[sources.hv.san-paths]\n'C:\\' = \"{}\"\n[sources.dr]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\ntransports = [\"network\"]\n",
        hv["url"].as_str().unwrap(),
        hv["username"].as_str().unwrap(),
        pw("hv", &hv).display(),
        hv["tls_fingerprint"].as_str().unwrap(),
        d.join("state").display(),
        hv["san_paths"]["C:\\"].as_str().unwrap(),
        xen["url"].as_str().unwrap(),
        xen["username"].as_str().unwrap(),
        pw("dr", &xen).display(),
        xen["tls_fingerprint"].as_str().unwrap(),
        d.join("state").display(),
    );
    std::fs::write(d.join("ferry.toml"), toml).unwrap();
    init_repo(&d.join("repo"), PASSWORD);
    let lab = Ferry::in_dir(d, PASSWORD);
    let ok = |args: &[&str]| lab.ok(args);
    let status = || -> Value {
        serde_json::from_str::<Value>(&ok(&["replica", "status", "web", "--json"])).unwrap()[0]
            .clone()
    };
    // What the guest sees on its disks now (copies of the simulator's live images).
    let guest_disks = |tag: &str| -> Vec<PathBuf> {
        let v = hv["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == VM)
            .unwrap()
            .clone();
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                let to = d.join(format!("hv-{}-{tag}.raw", x["name"].as_str().unwrap()));
                std::fs::copy(x["live"].as_str().unwrap(), &to).unwrap();
                to
            })
            .collect()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pin = ferry_tls::parse_fingerprint(hv["tls_fingerprint"].as_str().unwrap()).unwrap();
    let mut o = ferry_http::ClientOptions::new("hv", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    let client = {
        let _g = rt.enter();
        ferry_hv_hyperv::WsmanClient::new(
            hv["url"].as_str().unwrap(),
            &o,
            ferry_hv_hyperv::Credentials {
                user: hv["username"].as_str().unwrap().into(),
                password: Secret::new(hv["password"].as_str().unwrap()),
            },
        )
        .unwrap()
    };
    let guest_write = |disk: &str, offset: u64, data: &[u8]| {
        let p = [
            ("VirtualSystem", VM.to_string()),
            ("Disk", disk.to_string()),
            ("Offset", offset.to_string()),
            (
                "Data",
                base64::engine::general_purpose::STANDARD.encode(data),
            ),
        ]
        .map(|(k, v)| Param::Text(k.into(), v));
        rt.block_on(client.invoke(
            &Epr::new("FerrySim_SideDoor", &[("Name", "sidedoor")]),
            "GuestWrite",
            &p,
        ))
        .unwrap();
    };
    let mut dr = Probe::start(&xen);
    let standby = format!("{VM} (replica)");

    ok(&[
        "replica",
        "create",
        "web",
        "--source",
        "hv",
        "--vm",
        VM,
        "--to-source",
        "dr",
    ]);
    let t = std::time::Instant::now();
    ok(&["replica", "sync", "web"]);
    eprintln!(
        "Hyper-V → Xen first cycle (whole-VM restore): {:?}",
        t.elapsed()
    );
    let x = dr.vm(&standby);
    assert_eq!(x["power_state"], "Halted", "{x}");
    assert_same_disks(&dr.export_disks(&standby, d, "dr-1"), &guest_disks("1"));

    // Guest writes on both disks reach the Xen standby in one cycle, as changed blocks.
    guest_write("disk0", 3 << 20, &[0x5a; 136 * 512]);
    guest_write("disk1", 5 << 20, &[0xa5; 4096]);
    let t = std::time::Instant::now();
    ok(&["replica", "sync", "web"]);
    eprintln!("Hyper-V → Xen incremental cycle: {:?}", t.elapsed());
    let s = status();
    let now = guest_disks("2");
    let dr2 = dr.export_disks(&standby, d, "dr-2");
    assert_same_disks(&dr2, &now);
    let bytes = s["health"]["last-bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes <= 2 * (2 << 20), "{s}");
    let size: u64 = now
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    eprintln!("Hyper-V → Xen incremental cycle wrote {bytes} of {size} bytes");

    // Hyper-V holds replicas (ADR 0175): a planned failover turns the Hyper-V VM off, sends
    // its last changes, starts the Xen VM and reverses the direction; the next cycle writes the
    // Xen guest's disks into the Hyper-V VM's current VHDX files in place.
    ok(&["replica", "failover", "web", "--planned"]);
    assert_eq!(dr.vm(&standby)["power_state"], "Running");
    assert_same_disks(
        &dr.export_disks(&standby, d, "dr-planned"),
        &guest_disks("3"),
    );
    let s = status();
    assert_eq!(s["source"], "dr", "{s}");
    assert_eq!(s["target"], "hv", "{s}");
    let disks = dr.disk_uuids(&standby);
    dr.guest_write(&disks[0], 2 << 20, &[0x33; 8192]);
    ok(&["replica", "sync", "web"]);
    let vm_id = hv["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == VM)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sasds = rt
        .block_on(client.enumerate("Msvm_StorageAllocationSettingData", None))
        .unwrap();
    let mut current: Vec<String> = sasds
        .iter()
        .filter(|i| {
            i.text("InstanceID")
                .is_some_and(|x| x.starts_with(&format!("Microsoft:{vm_id}\\")))
        })
        .map(|i| i.texts("HostResource")[0].to_string())
        .collect();
    current.sort();
    let hv_now: Vec<PathBuf> = current
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let mut src = PathBuf::from(hv["san_paths"]["C:\\"].as_str().unwrap());
            src.extend(p.strip_prefix("C:\\").unwrap().split('\\'));
            lab.image_to_raw(&src, &d.join(format!("hv-reversed-{k}.raw")))
        })
        .collect();
    assert_same_disks(&hv_now, &dr.export_disks(&standby, d, "dr-reversed"));
    ok(&["replica", "cancel", "web"]);
    let l = dr.ask(json!({"op": "leftovers"}));
    assert!(l["snapshot_vms"].as_array().unwrap().is_empty(), "{l}");
}
