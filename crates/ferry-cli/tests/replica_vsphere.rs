//! vSphere as a replica target through the `ferry` binary (docs/replication.md, ADR 0165): the
//! 2-disk VM `debian-web` of a `ferry sim xen` pool (`prod`) replicated to a `ferry sim vmware`
//! vCenter (`vc`, vcsim behind Ferry's front), and the simulator's own 2-disk VM replicated
//! between two vCenters. The tests write as the guests through the simulators' side doors,
//! read the vSphere side with VMware's SDK (pyvmomi, `tests/vmware_probe.py`) and the Xen side
//! with the XenAPI SDK, and compare disks byte for byte (`qemu-img compare`).

use ferry_testkit::Killed;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/replica_lab.rs"]
mod replica_lab;
#[path = "common/vsphere_lab.rs"]
mod vsphere_lab;
#[path = "common/xen_probe.rs"]
mod xen_probe;
use replica_lab::{Ferry, LabDir, PASSWORD, assert_same_disks, ferry, init_repo, password_file};
use xen_probe::Probe;

const VM: &str = "debian-web";
const STANDBY: &str = "debian-web (replica)";
const COPY: &str = "debian-web (test failover)";

/// Xen pool `prod` with `debian-web`, vCenter `vc`, a repository, `ferry.toml`, state.
struct Lab {
    dir: tempfile::TempDir,
    prod: Probe,
    vc: Value,
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
        let d = dir.path();
        let (a, xen) = xen_probe::start_sim(ferry(), &d.join("prod-sim"));
        let (b, vc) = vsphere_lab::start_sim(ferry(), &d.join("vc-sim"));
        let state = d.join("state");
        let mut t = xen_probe::source_toml("prod", &xen, &password_file(d, "prod", &xen), &state);
        t.push_str(&vsphere_lab::source_toml(
            "vc",
            &vc,
            &password_file(d, "vc", &vc),
            &state,
        ));
        std::fs::write(d.join("ferry.toml"), t).unwrap();
        init_repo(&d.join("repo"), PASSWORD);
        Self {
            prod: Probe::start(&xen),
            vc,
            dir,
            _sims: (a, b),
        }
    }

    fn create(&self, keep: &str) {
        let out = self.run(&[
            "replica",
            "create",
            "web",
            "--source",
            "prod",
            "--vm",
            VM,
            "--to-source",
            "vc",
            "--keep",
            keep,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        // vSphere holds replicas: no warning about the way back.
        assert!(!err.contains("cannot hold replicas"), "{err}");
    }

    fn xen_disks(&mut self, name: &str, label: &str) -> Vec<PathBuf> {
        let dir = self.dir.path().to_path_buf();
        self.prod.export_disks(name, &dir, label)
    }

    fn vc_disks(&self, name: &str, label: &str) -> Vec<PathBuf> {
        vsphere_lab::api_vm_disks(&self.vc, name, self.dir.path(), label)
    }

    /// Every disk of restore point `rp`, restored to files.
    fn restored(&self, rp: &str) -> Vec<PathBuf> {
        Ferry::in_dir(self.dir.path(), PASSWORD).restored(self.dir.path(), rp, &["xvda", "xvdb"])
    }
}

/// The guest of Xen VM `vm` writes a recognizable pattern into both its disks.
fn xen_guest_writes(p: &mut Probe, vm: &str, seed: u8) {
    let disks = p.disk_uuids(vm);
    p.guest_write(&disks[0], 1 << 20, &[seed; 70_000]);
    p.guest_write(&disks[1], 3 << 20, &[seed.wrapping_add(1); 4096]);
}

/// The guest of vSphere VM `name` writes into both its disks.
fn vc_guest_writes(vc: &Value, name: &str, seed: u8) {
    let v = vsphere_lab::vm(vc, name);
    let moref = v["moref"].as_str().unwrap();
    let disks = v["disks"].as_array().unwrap();
    let key = |i: usize| disks[i]["key"].as_i64().unwrap();
    vsphere_lab::guest_write(vc, moref, key(0), 2 << 20, &[seed; 5000]);
    vsphere_lab::guest_write(vc, moref, key(1), (3 << 20) + 8192, &[seed ^ 0xff; 4096]);
}

fn seconds(t: Instant) -> String {
    format!("{:.2} s", t.elapsed().as_secs_f64())
}

#[test]
fn xen_to_vsphere_replica_follows_writes_and_fails_over_to_an_older_point() {
    let mut lab = Lab::start();
    lab.create("3");

    // The first cycle is a whole-VM restore onto vCenter: powered off, marked, the restore
    // point's disks.
    let t = Instant::now();
    lab.ok(&["replica", "sync", "web"]);
    eprintln!(
        "Xen → vSphere first cycle (whole-VM restore): {}",
        seconds(t)
    );
    let first = lab.replica_status("web");
    let rp1 = first["applied"].as_str().unwrap().to_string();
    let v = vsphere_lab::vm(&lab.vc, STANDBY);
    assert_eq!(v["power"], "poweredOff", "{v}");
    assert_eq!(v["extra"]["ferry.replica.job"], "web", "{v}");
    assert_eq!(v["extra"]["ferry.replica.role"], "standby", "{v}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(first["standby"], v["uuid"], "{first}");
    let at1 = lab.restored(&rp1);
    assert_same_disks(&lab.vc_disks(STANDBY, "vc-1"), &at1);
    assert_same_disks(&at1, &lab.xen_disks(VM, "prod-1"));
    let size: u64 = at1
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    eprintln!(
        "Xen → vSphere first cycle wrote {} of {size} bytes",
        first["health"]["last-bytes"]
    );

    // Guest writes on both disks reach the standby in one cycle, as changed chunks only.
    xen_guest_writes(&mut lab.prod, VM, 0x5a);
    let t = Instant::now();
    lab.ok(&["replica", "sync", "web"]);
    eprintln!("Xen → vSphere incremental cycle: {}", seconds(t));
    let second = lab.replica_status("web");
    let rp2 = second["applied"].as_str().unwrap().to_string();
    let at2 = lab.restored(&rp2);
    let vc2 = lab.vc_disks(STANDBY, "vc-2");
    assert_same_disks(&vc2, &at2);
    assert_same_disks(&at2, &lab.xen_disks(VM, "prod-2"));
    let bytes = second["health"]["last-bytes"].as_u64().unwrap();
    eprintln!("Xen → vSphere incremental cycle wrote {bytes} of {size} bytes");
    // One changed 256 KiB chunk per disk (70,000 bytes may straddle two).
    assert!(bytes > 0 && bytes <= 3 * (256 << 10), "{second}");

    // A third cycle, the chunk of the first write zeroed (written as zeroes, not as data);
    // the points are the standby's snapshots, oldest first.
    xen_guest_writes(&mut lab.prod, VM, 0x77);
    let d0 = lab.prod.disk_uuids(VM)[0].clone();
    lab.prod.guest_write(&d0, 1 << 20, &[0; 256 << 10]);
    lab.ok(&["replica", "sync", "web"]);
    let third = lab.replica_status("web");
    let rp3 = third["applied"].as_str().unwrap().to_string();
    assert_same_disks(&lab.vc_disks(STANDBY, "vc-3"), &lab.restored(&rp3));
    // Disk 2's changed chunk only: the zeroed chunk of disk 1 carried no payload.
    assert_eq!(third["health"]["last-bytes"], 256 << 10, "{third}");
    let snaps: Vec<String> = vsphere_lab::vm(&lab.vc, STANDBY)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = third["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("ferry-replica web {}", p["restore-point"].as_str().unwrap()))
        .collect();
    assert_eq!(snaps, want, "{third}");

    // Unplanned failover to the middle point: running, with exactly that point's disks
    // (the newer point's writes are reverted).
    lab.ok(&["replica", "failover", "web", "--unplanned", "--point", &rp2]);
    assert_eq!(vsphere_lab::vm(&lab.vc, STANDBY)["power"], "poweredOn");
    assert_same_disks(&lab.vc_disks(STANDBY, "vc-failed-over"), &at2);
    assert_eq!(lab.replica_status("web")["state"]["kind"], "failed-over");

    // Reverse: the replica on vCenter is the primary now, the Xen VM its standby, fully
    // resynchronized by the next cycle; the old direction's points are gone.
    vc_guest_writes(&lab.vc, STANDBY, 0x33);
    lab.ok(&["replica", "reverse", "web"]);
    assert_eq!(lab.prod.vm(VM)["power_state"], "Halted");
    let v = vsphere_lab::vm(&lab.vc, STANDBY);
    assert!(v["snapshots"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["extra"].get("ferry.replica.job").is_none(), "{v}");
    lab.ok(&["replica", "sync", "web"]);
    let s = lab.replica_status("web");
    assert_eq!(s["source"], "vc", "{s}");
    assert_eq!(s["target"], "prod", "{s}");
    assert_same_disks(
        &lab.xen_disks(VM, "prod-reversed"),
        &lab.vc_disks(STANDBY, "vc-now"),
    );
    assert_eq!(vsphere_lab::snapshot_count(&lab.vc), 0);
    lab.ok(&["replica", "cancel", "web"]);
    let l = lab.prod.ask(json!({"op": "leftovers"}));
    assert!(l["snapshot_vms"].as_array().unwrap().is_empty(), "{l}");
}

#[test]
fn test_failover_on_vsphere_runs_an_isolated_copy_and_cleanup_leaves_nothing() {
    let mut lab = Lab::start();
    lab.create("3");
    lab.ok(&["replica", "sync", "web"]);
    let rp1 = lab.replica_status("web")["applied"]
        .as_str()
        .unwrap()
        .to_string();
    xen_guest_writes(&mut lab.prod, VM, 0x21);
    lab.ok(&["replica", "sync", "web"]);
    let before = vsphere_lab::probe(&lab.vc, &["--inventory"]);
    let standby_disks = lab.vc_disks(STANDBY, "standby");

    // A copy that cannot be isolated is removed, with the vSwitch made for it.
    vsphere_lab::side_door(
        &lab.vc,
        "FerrySimFailNext",
        "<method>AddPortGroup</method><fault>PlatformConfigFault</fault><count>1</count>",
    );
    let o = lab.run(&["replica", "test", "web", "--point", &rp1]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("cannot make the test copy") && err.contains("AddPortGroup"),
        "{err}"
    );
    assert_eq!(vsphere_lab::probe(&lab.vc, &["--inventory"]), before);

    // A copy of the older point (the failed test, run again): a new VM on a port group of its
    // own, running; the standby is untouched (off, same disks, same points).
    lab.ok(&["replica", "test", "web", "--point", &rp1]);
    let copy = vsphere_lab::vm(&lab.vc, COPY);
    assert_eq!(copy["power"], "poweredOn", "{copy}");
    assert_eq!(copy["extra"]["ferry.replica.role"], "test", "{copy}");
    let nics = copy["nics"].as_array().unwrap();
    assert!(!nics.is_empty(), "{copy}");
    for n in nics {
        assert_eq!(
            n["network"],
            format!("{COPY} (isolated)").as_str(),
            "{copy}"
        );
    }
    assert_same_disks(&lab.vc_disks(COPY, "copy"), &lab.restored(&rp1));
    let s = vsphere_lab::vm(&lab.vc, STANDBY);
    assert_eq!(s["power"], "poweredOff", "{s}");
    assert_eq!(s["snapshots"].as_array().unwrap().len(), 2, "{s}");
    assert_same_disks(&lab.vc_disks(STANDBY, "standby-during"), &standby_disks);
    // One test at a time.
    let o = lab.run(&["replica", "test", "web"]);
    assert!(!o.status.success());

    // Replication goes on while the copy runs.
    xen_guest_writes(&mut lab.prod, VM, 0x42);
    lab.ok(&["replica", "sync", "web"]);
    assert_same_disks(
        &lab.vc_disks(STANDBY, "standby-2"),
        &lab.xen_disks(VM, "prod-2"),
    );
    assert_eq!(vsphere_lab::vm(&lab.vc, COPY)["power"], "poweredOn");

    // Cleanup: the copy, its disks, its port group are gone; the VMs and networks of vCenter
    // are what they were.
    lab.ok(&["replica", "test", "web", "--cleanup"]);
    assert_eq!(vsphere_lab::probe(&lab.vc, &["--inventory"]), before);
    assert_eq!(lab.replica_status("web")["test-vm"], Value::Null);
    assert_eq!(
        lab.replica_status("web")["points"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn planned_failover_to_vsphere_killed_halfway_completes_and_replicates_back() {
    let mut lab = Lab::start();
    lab.create("2");
    lab.ok(&["replica", "sync", "web"]);
    xen_guest_writes(&mut lab.prod, VM, 0x61);
    // The final cycle's snapshot task on the Xen primary is slow: the failover is SIGKILLed
    // with the primary shut down while its last backup waits.
    lab.prod.sim("set_task_delay", json!(["3000"]));
    replica_lab::kill_planned_failover_in_final_cycle(
        "web",
        &Ferry::in_dir(lab.dir.path(), PASSWORD).env,
        &lab.path("state"),
    );
    assert_eq!(lab.prod.vm(VM)["power_state"], "Halted");
    assert_eq!(vsphere_lab::vm(&lab.vc, STANDBY)["power"], "poweredOff");
    lab.prod.sim("set_task_delay", json!(["0"]));
    std::thread::sleep(Duration::from_secs(3));

    // Running it again completes it: the replica runs on vCenter with the primary's last
    // disks, the direction is reversed, no snapshot is left on either side — also when the
    // connection breaks while the old points are removed (the answer lost after the removal,
    // then the call lost before it).
    for phase in ["response", "request"] {
        vsphere_lab::side_door(
            &lab.vc,
            "FerrySimDropNext",
            &format!("<method>RemoveSnapshot_Task</method><phase>{phase}</phase><count>1</count>"),
        );
    }
    let t = Instant::now();
    let o = lab.run(&["replica", "failover", "web", "--planned"]);
    eprintln!("planned failover to vSphere, completed: {}", seconds(t));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        err.matches("checking whether it is gone").count(),
        2,
        "{err}"
    );
    assert_eq!(vsphere_lab::vm(&lab.vc, STANDBY)["power"], "poweredOn");
    assert_same_disks(&lab.vc_disks(STANDBY, "vc"), &lab.xen_disks(VM, "prod"));
    let s = lab.replica_status("web");
    assert_eq!(s["source"], "vc", "{s}");
    assert_eq!(s["target"], "prod", "{s}");
    assert_eq!(s["state"]["kind"], "replicating", "{s}");
    assert_eq!(s["op"], Value::Null, "{s}");
    assert_eq!(vsphere_lab::snapshot_count(&lab.vc), 0);
    let l = lab.prod.ask(json!({"op": "leftovers"}));
    assert!(l["snapshot_vms"].as_array().unwrap().is_empty(), "{l}");

    // vSphere is the primary now: its guest's writes reach the Xen VM in one cycle.
    vc_guest_writes(&lab.vc, STANDBY, 0x19);
    lab.ok(&["replica", "sync", "web"]);
    assert_same_disks(
        &lab.xen_disks(VM, "prod-after"),
        &lab.vc_disks(STANDBY, "vc-after"),
    );
    assert_eq!(vsphere_lab::snapshot_count(&lab.vc), 0);
}

/// Two vCenters (`vc1` with the simulator's 2-disk VM, `vc2` for its replica): a planned
/// failover runs the replica on `vc2` with the primary's last disks and makes the old primary
/// its standby.
#[test]
fn vsphere_to_vsphere_planned_failover_swaps_the_roles() {
    let dir = ferry_testkit::scratch_dir();
    let d = dir.path();
    let (_a, vc1) = vsphere_lab::start_sim(ferry(), &d.join("vc1-sim"));
    let (_b, vc2) = vsphere_lab::start_sim(ferry(), &d.join("vc2-sim"));
    let mut t = String::new();
    for (name, vc) in [("vc1", &vc1), ("vc2", &vc2)] {
        t.push_str(&vsphere_lab::source_toml(
            name,
            vc,
            &password_file(d, name, vc),
            &d.join("state"),
        ));
    }
    std::fs::write(d.join("ferry.toml"), t).unwrap();
    init_repo(&d.join("repo"), PASSWORD);
    let lab = Ferry::in_dir(d, PASSWORD);
    let (vm, moref, disks) = vsphere_lab::two_disk_vm(&vc1);
    let standby = format!("{vm} (replica)");
    let primary_disks = |label: &str| -> Vec<PathBuf> {
        disks
            .iter()
            .enumerate()
            .map(|(i, (_, live))| {
                let p = d.join(format!("{label}-{i}.raw"));
                std::fs::copy(live, &p).unwrap();
                p
            })
            .collect()
    };
    lab.ok(&[
        "replica",
        "create",
        "web",
        "--source",
        "vc1",
        "--vm",
        &vm,
        "--to-source",
        "vc2",
    ]);
    lab.ok(&["replica", "sync", "web"]);
    assert_same_disks(
        &vsphere_lab::api_vm_disks(&vc2, &standby, d, "vc2-1"),
        &primary_disks("vc1-1"),
    );
    for (key, _) in &disks {
        vsphere_lab::guest_write(&vc1, &moref, *key, 512 << 10, &[0x3c; 10_000]);
    }
    let t = Instant::now();
    lab.ok(&["replica", "failover", "web", "--planned"]);
    eprintln!("vSphere → vSphere planned failover: {}", seconds(t));
    let r = vsphere_lab::vm(&vc2, &standby);
    assert_eq!(r["power"], "poweredOn", "{r}");
    assert_same_disks(
        &vsphere_lab::api_vm_disks(&vc2, &standby, d, "vc2-2"),
        &primary_disks("vc1-2"),
    );
    let old = vsphere_lab::vm(&vc1, &vm);
    assert_eq!(old["power"], "poweredOff", "{old}");
    assert_eq!(old["extra"]["ferry.replica.job"], "web", "{old}");
    assert_eq!(old["extra"]["ferry.replica.role"], "standby", "{old}");
    let s: Value = serde_json::from_str(&lab.ok(&["replica", "status", "web", "--json"])).unwrap();
    assert_eq!(s[0]["source"], "vc2", "{s}");
    assert_eq!(s[0]["target"], "vc1", "{s}");
    assert_eq!(s[0]["op"], Value::Null, "{s}");
    assert_eq!(vsphere_lab::snapshot_count(&vc1), 0);
    assert_eq!(vsphere_lab::snapshot_count(&vc2), 0);
}
