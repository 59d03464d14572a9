//! The Hyper-V driver through the `ferry` binary against `ferry sim hyperv`: full and RCT
//! incremental backups in `san` mode with restores compared by `qemu-img` against the guest's
//! disk at checkpoint time, the method chosen per guest with its reason (summary, `--json` and
//! restore point), SIGKILLed backups that leave no checkpoint, and RCT that broke. The tests
//! act as the guest and break RCT through the simulator's WMI side door (`FerrySim_SideDoor`),
//! and check what is left on the host with pypsrp (`tests/hyperv_probe.py`).

use base64::Engine as _;
use hyperv_lab::{CHUNK, PASSWORD, disk};
use serde_json::Value;
use std::process::Command;

const RCT_BLOCK: u64 = 64 << 10;

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

fn ferry() -> Command {
    let mut c = cli::ferry();
    c.env("FERRY_PASSWORD", PASSWORD);
    c
}

lab_wrapper!(
    /// The lab's host with source `lab` reading through `san-paths`.
);

impl Lab {
    fn start() -> Self {
        let lab = hyperv_lab::Lab::start(&["--disk-mib", "8"]);
        lab.config("[\"san\"]", &lab.san_paths_table());
        Self(lab)
    }

    fn backup_vm(&self, vm: &str) -> (Value, String) {
        let (mut v, err) = self.backup(&["--vm", vm]);
        assert_eq!(v.len(), 1, "{v:?}");
        (v.remove(0), err)
    }

    /// What the vendor-side client (pypsrp, `tests/hyperv_probe.py`) sees on the host.
    fn probe(&self) -> Value {
        self.probe_with("hyperv_probe.py", self.info["url"].as_str().unwrap(), &[])
    }

    /// Recovery checkpoints left on the host.
    fn checkpoints(&self) -> usize {
        self.probe()["checkpoints"].as_array().unwrap().len()
    }

    fn reference_points(&self) -> u64 {
        self.probe()["reference_points"].as_u64().unwrap()
    }

    fn running(&self, vm: &str) -> bool {
        self.probe()["running"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == vm)
    }

    /// The labels of restore point `id`.
    fn labels(&self, id: &str) -> std::collections::BTreeMap<String, String> {
        self.manifest(id).meta.labels
    }
}

#[test]
fn full_then_rct_incremental_restore_byte_identical_with_the_method_recorded() {
    let lab = Lab::start();
    let vm = "win-sql-01";
    let first = lab.guest_disks(vm, "first");
    let (r, _) = lab.backup_vm(vm);
    assert_eq!(r["method"]["name"], "child-vm", "{r}");
    assert_eq!(r["consistency"], "application", "{r}");
    assert_eq!(
        disk(&r, "disk0")["full_reason"],
        "no previous restore point"
    );
    assert_eq!(
        lab.checkpoints(),
        0,
        "the checkpoint became a reference point"
    );
    assert_eq!(lab.reference_points(), 1);
    let id1 = r["snapshot"].as_str().unwrap().to_string();
    let labels = lab.labels(&id1);
    assert_eq!(labels["ferry.backup.method"], "child-vm");
    assert!(
        labels["ferry.backup.method-reason"].contains("VSS"),
        "{labels:?}"
    );

    lab.guest_write(vm, "disk1", 5 * CHUNK + 512, &[0x5A; 4096]);
    lab.guest_write(vm, "disk1", 20 * CHUNK, &[0xA5; 512]);
    let second = lab.guest_disks(vm, "second");
    let (_, err) = lab.ok(&["backup", "--source", "lab", "--vm", vm]);
    assert!(err.contains("method child-vm: the guest runs"), "{err}");
    assert_eq!(lab.checkpoints(), 0);
    assert_eq!(lab.reference_points(), 1);
    let (snaps, _) = lab.ok(&["snapshots", "--json"]);
    let snaps: Value = serde_json::from_str(&snaps).unwrap();
    let ids: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .filter(|id| *id != id1)
        .collect();
    let [id2] = ids.as_slice() else {
        panic!("two restore points expected: {snaps}")
    };
    lab.assert_restores(&id1, &first);
    lab.assert_restores(id2, &second);
    // One more write, one more incremental: RCT reports exactly the touched block.
    lab.guest_write(vm, "disk0", 7 * CHUNK, &[0x11; 1024]);
    let third = lab.guest_disks(vm, "third");
    let (r3, _) = lab.backup_vm(vm);
    assert_eq!(disk(&r3, "disk0")["mode"], "changed-blocks", "{r3}");
    assert_eq!(disk(&r3, "disk0")["cbt_changed_bytes"], RCT_BLOCK, "{r3}");
    assert_eq!(disk(&r3, "disk1")["cbt_changed_bytes"], 0, "{r3}");
    lab.assert_restores(r3["snapshot"].as_str().unwrap(), &third);
}

#[test]
fn the_method_per_guest_matches_its_qualification() {
    let lab = Lab::start();
    let vms = [
        "--vm",
        "win-sql-01",
        "--vm",
        "win-file-01",
        "--vm",
        "linux-web-01",
        "--vm",
        "win-dyn-01",
        "--vm",
        "win-split-01",
    ];
    let (out, _) = lab.ok(&["vms", "--source", "lab", "--json"]);
    let inventory: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inventory.as_array().unwrap().len(), 5, "{inventory}");
    let (reports, _) = lab.backup(&vms);
    let want = [
        ("win-sql-01", "child-vm", "application", "VSS"),
        ("win-file-01", "saved-state", "saved-state", "the VM is off"),
        (
            "linux-web-01",
            "saved-state",
            "saved-state",
            "integration service is disabled",
        ),
        ("win-dyn-01", "saved-state", "saved-state", "dynamic disks"),
        (
            "win-split-01",
            "saved-state",
            "saved-state",
            "on another volume",
        ),
    ];
    assert_eq!(reports.len(), want.len());
    for (vm, method, consistency, why) in want {
        let r = reports
            .iter()
            .find(|r| r["vm_name"] == vm)
            .unwrap_or_else(|| panic!("no report of {vm}"));
        assert_eq!(r["method"]["name"], method, "{vm}: {r}");
        assert_eq!(r["consistency"], consistency, "{vm}: {r}");
        let reason = r["method"]["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{vm}: {reason}");
    }
    assert_eq!(lab.checkpoints(), 0);
    for vm in ["win-sql-01", "linux-web-01", "win-dyn-01", "win-split-01"] {
        assert!(lab.running(vm), "{vm} must run again after its backup");
    }
    assert!(!lab.running("win-file-01"), "an off VM stays off");
}

#[test]
fn sigkill_mid_backup_leaves_no_checkpoint_after_the_next_run_or_cleanup() {
    let lab = Lab::start();
    let vm = "linux-web-01";
    let mut child = lab.throttled_backup_reading(vm, &["--full"]);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(lab.checkpoints(), 1, "the kill should land mid-backup");
    assert!(
        lab.running(vm),
        "the saved-state guest was resumed before the read"
    );
    // The next backup removes the leftover first.
    let expected = lab.guest_disks(vm, "after-kill");
    let (r, err) = lab.backup_vm(vm);
    assert!(
        err.contains("removed leftovers of an interrupted backup"),
        "{err}"
    );
    assert_eq!(lab.checkpoints(), 0);
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
    // Killed again: `ferry source cleanup` removes it; the administrator's own checkpoints stay.
    let mut child = lab.throttled_backup_reading(vm, &["--full"]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(lab.checkpoints(), 1);
    let (out, _) = lab.ok(&["source", "cleanup", "--source", "lab", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["snapshots"], 1, "{v}");
    assert_eq!(lab.checkpoints(), 0);
    // The next incremental still works from the reference point of the first backup.
    lab.guest_write(vm, "disk0", 3 * CHUNK, &[0x77; 2048]);
    let (r, _) = lab.backup_vm(vm);
    assert_eq!(disk(&r, "disk0")["mode"], "changed-blocks", "{r}");
}

#[test]
fn broken_rct_is_a_full_read_with_the_reason() {
    let lab = Lab::start();
    let vm = "win-split-01";
    lab.backup_vm(vm);
    lab.guest_write(vm, "disk0", 2 * CHUNK, &[0x42; 8192]);
    lab.door("BreakRct", &[("VirtualSystem", vm), ("Disk", "disk0")]);
    let expected = lab.guest_disks(vm, "broken");
    let (r, _) = lab.backup_vm(vm);
    let reason = disk(&r, "disk0")["full_reason"].as_str().unwrap();
    assert!(
        reason.contains("RCT") && reason.contains("reset"),
        "{reason}"
    );
    assert_eq!(r["method"]["name"], "saved-state");
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
    assert_eq!(lab.checkpoints(), 0);
}

#[test]
fn demo_hyperv_runs_green() {
    let dir = ferry_testkit::scratch_dir();
    let out = ferry()
        .args(["demo", "--hypervisor", "hyperv", "--size-mib", "8", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    assert_eq!(
        stdout
            .matches("identical to the disks at checkpoint time")
            .count(),
        4,
        "{stdout}"
    );
    assert!(
        stdout.contains("`win-sql-01` (2 disks, 16.0 MiB): method child-vm"),
        "{stdout}"
    );
    assert!(
        stdout.contains("`linux-web-01` (1 disks, 8.0 MiB): method saved-state"),
        "{stdout}"
    );
    assert!(
        stdout.contains("left on the host: 0 checkpoint(s), 2 reference point(s)"),
        "{stdout}"
    );
}

#[test]
fn rct_that_misses_a_write_is_caught_by_verification() {
    let lab = Lab::start();
    let vm = "win-dyn-01";
    lab.backup_vm(vm);
    lab.guest_write(vm, "disk0", 0, &[0x01; 512]);
    // A write RCT misses (a host bug): verifying every unchanged chunk must catch it.
    lab.door(
        "UntrackedWrite",
        &[
            ("VirtualSystem", vm),
            ("Disk", "disk0"),
            ("Offset", &(10 * CHUNK).to_string()),
            (
                "Data",
                &base64::engine::general_purpose::STANDARD.encode([0x99u8; 4096]),
            ),
        ],
    );
    let expected = lab.guest_disks(vm, "missed");
    let (r, err) = lab.backup(&["--vm", vm, "--verify-sample", "100"]);
    let r = &r[0];
    assert_eq!(r["cbt_mismatch"], true, "{r}");
    assert_eq!(disk(r, "disk0")["mode"], "full-cbt-distrusted", "{r}");
    assert!(err.contains("CHANGE TRACKING IS BROKEN"), "{err}");
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
    assert_eq!(lab.checkpoints(), 0);
}
