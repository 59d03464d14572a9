//! Hyper-V failover clusters through the `ferry` binary against `ferry sim hyperv --cluster 2`
//! (two nodes, each its own WinRM listener and certificate, the disks on a shared CSV): a VM
//! live-migrated between backups stays incremental, read through its new node; a failed
//! migration (RCT reset) is a full read with the reason; restores match the guest's disk by
//! `qemu-img compare`; no checkpoint is left on either node (seen through pypsrp,
//! `tests/hyperv_probe.py`), and every node tells pypsrp the new owner in `root/MSCluster`
//! (`tests/hyperv_cluster_probe.py`); a node map that points a node at the wrong host gives a
//! clear error; a backup SIGKILLed on the second node is cleaned up from the first.

use hyperv_lab::{CHUNK, disk};
use serde_json::Value;

const RCT_BLOCK: u64 = 64 << 10;
const DISK: u64 = 8 << 20;

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

lab_wrapper!(
    /// A two-node cluster with source `lab` reading through `san-paths`.
);

impl Lab {
    /// A two-node cluster whose `[sources.lab.nodes]` sends node `k` to the endpoint (URL and
    /// pin) of node `reach(k)`.
    fn start(reach: fn(usize) -> usize) -> Self {
        let lab = hyperv_lab::Lab::start(&["--cluster", "2", "--disk-mib", "8"]);
        lab.config(
            "[\"san\"]",
            &format!("{}{}", lab.san_paths_table(), lab.nodes_table(reach)),
        );
        Self(lab)
    }

    /// `ferry -v backup --source lab --json --vm VM`: the report and stderr.
    fn backup_vm(&self, vm: &str) -> (Value, String) {
        let (mut v, err) = self.backup(&["-v", "--vm", vm]);
        assert_eq!(v.len(), 1, "{v:?}");
        (v.remove(0), err)
    }

    fn migrate(&self, how: &str, vm: &str, to: &str) {
        self.door(how, &[("VirtualSystem", vm), ("DestinationNode", to)]);
    }

    /// (recovery checkpoints, reference points) on each node.
    fn left(&self) -> Vec<(usize, u64)> {
        self.left_on_nodes(2)
    }
}

#[test]
fn a_live_migrated_vm_stays_incremental_read_from_its_new_node() {
    let lab = Lab::start(|k| k);
    let vm = "win-sql-01";
    let ((a, _), (b, _)) = (lab.node(0), lab.node(1));
    let owner = |v: &Value| {
        v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == vm)
            .unwrap()["owner"]
            .clone()
    };
    assert_eq!(owner(&lab.info), a.as_str(), "{}", lab.info);
    let first = lab.guest_disks(vm, "first");
    let (r1, err) = lab.backup_vm(vm);
    assert!(err.contains(&format!("runs on cluster node {a}")), "{err}");
    assert_eq!(r1["method"]["name"], "child-vm", "{r1}");
    assert_eq!(
        lab.left(),
        [(0, 1), (0, 0)],
        "the reference point is on node A"
    );

    lab.migrate("LiveMigrate", vm, &b);
    // Every node tells the vendor's client the new owner.
    for k in 0..2 {
        let c = lab.probe_with("hyperv_cluster_probe.py", &lab.node(k).1, &[]);
        assert_eq!(c["nodes"], serde_json::json!([a, b]), "{c}");
        assert_eq!(c["owners"][vm], b.as_str(), "{c}");
        assert_eq!(c["owners"]["win-file-01"], b.as_str(), "{c}");
        assert_eq!(c["owners"]["linux-web-01"], a.as_str(), "{c}");
    }
    lab.guest_write(vm, "disk1", 5 * CHUNK + 512, &[0x5A; 4096]);
    lab.guest_write(vm, "disk0", 20 * CHUNK, &[0xA5; 512]);
    let second = lab.guest_disks(vm, "second");
    let (r2, err) = lab.backup_vm(vm);
    assert!(err.contains(&format!("runs on cluster node {b}")), "{err}");
    for (d, changed) in [("disk0", RCT_BLOCK), ("disk1", RCT_BLOCK)] {
        let rep = disk(&r2, d);
        assert_eq!(rep["mode"], "changed-blocks", "{r2}");
        assert_eq!(rep["full_reason"], Value::Null, "{r2}");
        assert_eq!(rep["cbt_changed_bytes"], changed, "{r2}");
        let read = rep["source_read_bytes"].as_u64().unwrap();
        assert!(read < DISK / 8, "{d}: read {read} of {DISK}");
    }
    assert_eq!(
        lab.left(),
        [(0, 0), (0, 1)],
        "no checkpoint on either node; the reference point moved with the VM to node B"
    );
    lab.assert_restores(r1["snapshot"].as_str().unwrap(), &first);
    lab.assert_restores(r2["snapshot"].as_str().unwrap(), &second);
    // Back to node A: still incremental.
    lab.migrate("LiveMigrate", vm, &a);
    lab.guest_write(vm, "disk0", 9 * CHUNK, &[0x33; 1024]);
    let third = lab.guest_disks(vm, "third");
    let (r3, _) = lab.backup_vm(vm);
    assert_eq!(disk(&r3, "disk0")["cbt_changed_bytes"], RCT_BLOCK, "{r3}");
    assert_eq!(disk(&r3, "disk1")["cbt_changed_bytes"], 0, "{r3}");
    lab.assert_restores(r3["snapshot"].as_str().unwrap(), &third);
    assert_eq!(lab.left(), [(0, 1), (0, 0)]);
}

#[test]
fn a_failed_migration_is_a_full_read_with_the_reason() {
    let lab = Lab::start(|k| k);
    let vm = "linux-web-01";
    let (b, _) = lab.node(1);
    lab.backup_vm(vm);
    lab.migrate("FailedMigrate", vm, &b);
    lab.guest_write(vm, "disk0", 2 * CHUNK, &[0x42; 8192]);
    let expected = lab.guest_disks(vm, "after");
    let (r, err) = lab.backup_vm(vm);
    let reason = disk(&r, "disk0")["full_reason"].as_str().unwrap();
    assert!(
        reason.contains("RCT") && reason.contains("reset"),
        "{reason}"
    );
    assert!(err.contains("FULL backup of the disk"), "{err}");
    assert!(disk(&r, "disk0")["source_read_bytes"].as_u64().unwrap() >= DISK / 2);
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
    assert_eq!(lab.left(), [(0, 0), (0, 1)]);
    // The next one is incremental again, from node B.
    lab.guest_write(vm, "disk0", 4 * CHUNK, &[0x24; 512]);
    let (r, _) = lab.backup_vm(vm);
    assert_eq!(disk(&r, "disk0")["cbt_changed_bytes"], RCT_BLOCK, "{r}");
}

#[test]
fn a_node_map_pointing_at_the_wrong_host_is_a_clear_error() {
    // Both node names lead to node A's listener: node B's VMs are not there.
    let lab = Lab::start(|_| 0);
    let ((a, _), (b, _)) = (lab.node(0), lab.node(1));
    let out = lab.run(&["backup", "--source", "lab", "--vm", "win-file-01"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cluster node `{b}` is reached at"))
            && err.contains(&format!("but that host is `{a}`"))
            && err.contains("fix [sources.lab.nodes]"),
        "{err}"
    );
    assert_eq!(lab.left(), [(0, 0), (0, 0)], "nothing was left behind");
}

#[test]
fn a_backup_killed_on_the_second_node_leaves_nothing_after_cleanup() {
    let lab = Lab::start(|k| k);
    let vm = "win-file-01";
    let (b, _) = lab.node(1);
    let mut child = lab.throttled_backup_reading(vm, &[]);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        lab.left(),
        [(0, 0), (1, 0)],
        "the kill lands mid-backup on node {b}"
    );
    // Cleanup asks every node; the administrator's config points at node A.
    let (out, _) = lab.ok(&["source", "cleanup", "--source", "lab", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["snapshots"], 1, "{v}");
    assert_eq!(lab.left(), [(0, 0), (0, 0)]);
    let expected = lab.guest_disks(vm, "after-kill");
    let (r, _) = lab.backup_vm(vm);
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
    assert_eq!(lab.left(), [(0, 0), (0, 1)]);
}
