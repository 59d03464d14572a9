//! A Hyper-V VM that live-migrates *during* a backup (ADR 0171), through the `ferry` binary
//! against `ferry sim hyperv --cluster 2`: the backup follows the VM to its new node and stays
//! an RCT incremental whose restores match the guest's disks (`qemu-img compare`), whether the
//! move lands right after the checkpoint (side door `MigrateAfter`) or while the disks are read
//! (`LiveMigrate`); through the host agent, the reads go to the new node's agent (the old one's
//! cannot be reached); no checkpoint is left on either node (pypsrp, `tests/hyperv_probe.py`) and
//! `ferry source cleanup` finds nothing; a backup SIGKILLed after the move leaves its
//! checkpoint on the new node, where cleanup finds and removes it; a VM that keeps moving is
//! followed a bounded number of times, then the backup fails with the host's error.

use hyperv_lab::{CHUNK, PASSWORD};
use serde_json::Value;
use std::process::Stdio;

const RCT_BLOCK: u64 = 64 << 10;
const DISK: u64 = 8 << 20;
const VM: &str = "win-sql-01";
const CREATE_SNAPSHOT: &str = "Msvm_VirtualSystemSnapshotService.CreateSnapshot";

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

lab_wrapper!(
    /// A two-node cluster; `san` reads the CSV through `san-paths`.
);

impl Lab {
    fn start() -> Self {
        let lab = hyperv_lab::Lab::start(&["--cluster", "2", "--disk-mib", "8"]);
        lab.config(
            "[\"san\"]",
            &format!("{}{}", lab.san_paths_table(), lab.nodes_table(|k| k)),
        );
        Self(lab)
    }

    /// `ferry -v backup --source lab --json --vm VM` (and more `args`), in the background.
    fn spawn_backup(&self, args: &[&str]) -> std::process::Child {
        let mut c = cli::ferry();
        c.env("FERRY_PASSWORD", PASSWORD);
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c.args(["-v", "backup", "--source", "lab", "--json", "--vm", VM])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `ferry -v backup --source lab --json --vm VM`: the report and stderr.
    fn backup_one(&self) -> (Value, String) {
        let (out, err) = self.ok(&["-v", "backup", "--source", "lab", "--json", "--vm", VM]);
        (report(&out), err)
    }

    /// The VM moves to the other node right after `calls` more calls of `method`, `times` times.
    fn migrate_after(&self, method: Option<&str>, calls: u64, times: u64) {
        let (calls, times) = (calls.to_string(), times.to_string());
        let mut p = vec![
            ("VirtualSystem", VM),
            ("Calls", calls.as_str()),
            ("Times", times.as_str()),
        ];
        if let Some(m) = method {
            p.push(("Method", m));
        }
        self.door("MigrateAfter", &p);
    }

    /// (recovery checkpoints, reference points) on each node, as pypsrp sees them.
    fn left(&self) -> Vec<(usize, u64)> {
        self.left_on_nodes(2)
    }

    /// `ferry source cleanup`: how many checkpoints it removed.
    fn cleanup(&self) -> u64 {
        let (out, _) = self.ok(&["source", "cleanup", "--source", "lab", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["snapshots"].as_u64().unwrap()
    }
}

fn report(out: &str) -> Value {
    let mut v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let v = v.as_array_mut().unwrap();
    assert_eq!(v.len(), 1, "{v:?}");
    v.remove(0)
}

/// Both disks are RCT incrementals of one changed block each, read in a small part.
fn assert_incremental(r: &Value) {
    for d in r["disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "changed-blocks", "{r}");
        assert_eq!(d["full_reason"], Value::Null, "{r}");
        assert_eq!(d["cbt_changed_bytes"], RCT_BLOCK, "{r}");
        let read = d["source_read_bytes"].as_u64().unwrap();
        assert!(read < DISK / 8, "read {read} of {DISK}: {r}");
    }
}

#[test]
fn a_vm_that_moves_during_an_incremental_is_followed_and_stays_incremental() {
    let lab = Lab::start();
    let ((a, _), (b, _)) = (lab.node(0), lab.node(1));
    let (r1, _) = lab.backup_one();
    assert_eq!(
        lab.left(),
        [(0, 1), (0, 0)],
        "the reference point is on {a}"
    );

    // The move lands right after the checkpoint: RCT, the reads and the commit follow it.
    lab.guest_write(VM, "disk0", 3 * CHUNK, &[0x11; 4096]);
    lab.guest_write(VM, "disk1", 7 * CHUNK + 512, &[0x22; 512]);
    let second = lab.guest_disks(VM, "second");
    lab.migrate_after(Some(CREATE_SNAPSHOT), 1, 1);
    let (r2, err) = lab.backup_one();
    assert!(
        err.contains(&format!("VM moved from {a} to {b} during the backup")),
        "{err}"
    );
    assert_incremental(&r2);
    assert_eq!(
        lab.left(),
        [(0, 0), (0, 1)],
        "no checkpoint on either node; the reference point is on {b}, where the VM is"
    );
    assert_eq!(lab.cleanup(), 0, "cleanup finds nothing");

    // The move lands while the disks are read (a full read, slowed down): the reference point
    // is made on the node the VM went to, and the next backup is incremental from there.
    lab.guest_write(VM, "disk0", 12 * CHUNK, &[0x33; 1024]);
    let third = lab.guest_disks(VM, "third");
    let mut child = lab.spawn_backup(&["--full", "--limit-rate", "4M"]);
    let err = cli::wait_for_stderr_keep(&mut child, "backing up disk");
    lab.door(
        "LiveMigrate",
        &[("VirtualSystem", VM), ("DestinationNode", &a)],
    );
    let out = child.wait_with_output().unwrap();
    let err = err.join().unwrap();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("VM moved from {b} to {a} during the backup")),
        "{err}"
    );
    let r3 = report(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(lab.left(), [(0, 1), (0, 0)]);
    assert_eq!(lab.cleanup(), 0);

    lab.guest_write(VM, "disk0", 5 * CHUNK, &[0x44; 4096]);
    lab.guest_write(VM, "disk1", 2 * CHUNK, &[0x55; 4096]);
    let fourth = lab.guest_disks(VM, "fourth");
    let (r4, _) = lab.backup_one();
    assert_incremental(&r4);
    assert_eq!(lab.left(), [(0, 1), (0, 0)]);

    lab.assert_restores(r2["snapshot"].as_str().unwrap(), &second);
    lab.assert_restores(r3["snapshot"].as_str().unwrap(), &third);
    lab.assert_restores(r4["snapshot"].as_str().unwrap(), &fourth);
    assert_ne!(r1["snapshot"], r2["snapshot"]);
}

#[test]
fn network_reads_follow_the_vm_to_the_agent_of_its_new_node() {
    let lab = Lab::start();
    let ((a, _), (b, _)) = (lab.node(0), lab.node(1));
    let agent = lab.info["agent"]["address"].as_str().unwrap().to_string();
    lab.use_network([&agent, &agent]);
    let (r1, _) = lab.backup_one();
    assert_eq!(r1["disks"][0]["transport"], "network", "{r1}");
    // From now on node A's agent cannot be reached: the reads must go to node B's.
    lab.use_network(["127.0.0.1:1", &agent]);
    lab.guest_write(VM, "disk0", 3 * CHUNK, &[0x66; 4096]);
    lab.guest_write(VM, "disk1", 9 * CHUNK, &[0x77; 4096]);
    let second = lab.guest_disks(VM, "second");
    lab.migrate_after(Some(CREATE_SNAPSHOT), 1, 1);
    let (r2, err) = lab.backup_one();
    assert!(
        err.contains(&format!("VM moved from {a} to {b} during the backup")),
        "{err}"
    );
    assert_incremental(&r2);
    for d in r2["disks"].as_array().unwrap() {
        assert_eq!(d["transport"], "network", "{r2}");
    }
    assert_eq!(lab.left(), [(0, 0), (0, 1)]);
    lab.assert_restores(r2["snapshot"].as_str().unwrap(), &second);
}

#[test]
fn a_backup_killed_after_the_move_is_cleaned_up_on_the_new_node() {
    let lab = Lab::start();
    let ((a, _), (b, _)) = (lab.node(0), lab.node(1));
    lab.migrate_after(Some(CREATE_SNAPSHOT), 1, 1);
    let mut child = lab.spawn_backup(&["--limit-rate", "1M"]);
    let err = cli::wait_for_stderr_keep(&mut child, "backing up disk");
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let err = err.join().unwrap();
    assert!(
        err.contains(&format!("VM moved from {a} to {b} during the backup")),
        "{err}"
    );
    assert_eq!(
        lab.left(),
        [(0, 0), (1, 0)],
        "the checkpoint moved with the VM to {b}"
    );
    assert_eq!(lab.cleanup(), 1);
    assert_eq!(lab.left(), [(0, 0), (0, 0)]);
    let expected = lab.guest_disks(VM, "after-kill");
    let (r, _) = lab.backup_one();
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
}

#[test]
fn a_vm_that_keeps_moving_fails_the_backup_after_a_bounded_number_of_moves() {
    let lab = Lab::start();
    lab.backup_one();
    // Every second RCT call (the second disk's) is followed by a move: the backup cannot
    // settle anywhere.
    lab.migrate_after(
        Some("Msvm_ImageManagementService.GetVirtualDiskChanges"),
        2,
        1000,
    );
    lab.guest_write(VM, "disk0", 0, &[0x55; 512]);
    let out = lab.run(&["-v", "backup", "--source", "lab", "--vm", VM]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    // Three moves while reading, then the host's error; the checkpoint's removal at the end
    // follows the VM once more.
    let moves = err.matches("during the backup").count() as u32;
    assert!(
        moves > ferry_hv_hyperv::driver::MAX_FOLLOWS,
        "{moves}: {err}"
    );
    assert!(err.contains("not following it further"), "{err}");
    // Nothing is left behind on either node.
    assert_eq!(lab.cleanup(), 0);
    let left = lab.left();
    assert_eq!(left.iter().map(|l| l.0).sum::<usize>(), 0, "{left:?}");
}
