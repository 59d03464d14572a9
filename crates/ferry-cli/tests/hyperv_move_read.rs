//! A disk read that fails mid-stream after the VM moved (ADR 0180), through the `ferry` binary
//! against `ferry sim hyperv --cluster 2` whose nodes each have their own agent address (side
//! door `NodeAgent`): node A's agent dies after serving part of the disks while the VM
//! live-migrates to node B (`NodeAgentFailAfter`); the backup asks the cluster again, reopens
//! the same checkpoint's disks through node B's agent and reads the rest there (the agents'
//! counters say both served part of it), the restores match the guest's disks (`qemu-img
//! compare`) and the next backup is an RCT incremental through node B. When the agent dies
//! and the VM stays, the backup fails with the reason and no checkpoint is left on either node.

use hyperv_lab::CHUNK;
use serde_json::Value;

const DISK: u64 = 8 << 20;
const VM: &str = "win-sql-01";

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

lab_wrapper!(
    /// A two-node cluster read through each node's own agent.
);

/// What node `k`'s agent served so far: (bytes, connections, stopped).
struct Stats {
    bytes: u64,
    conns: u64,
    stopped: bool,
}

impl Lab {
    fn start() -> Self {
        let lab = Self(hyperv_lab::Lab::start(&[
            "--cluster",
            "2",
            "--disk-mib",
            "8",
        ]));
        let (a, b) = (lab.agent_of(0), lab.agent_of(1));
        lab.use_network([&a, &b]);
        lab
    }

    /// Node `k`'s own agent address.
    fn agent_of(&self, k: usize) -> String {
        let out = self.door_out("NodeAgent", &[("Node", &self.node(k).0)]);
        out.text("Address").unwrap().to_string()
    }

    fn stats(&self, k: usize) -> Stats {
        let out = self.door_out("NodeAgentStats", &[("Node", &self.node(k).0)]);
        let n = |p: &str| out.text(p).unwrap().parse::<u64>().unwrap();
        Stats {
            bytes: n("BytesServed"),
            conns: n("Connections"),
            stopped: out.text("Stopped") == Some("true"),
        }
    }

    /// Node `k`'s agent dies after serving `bytes` more bytes; the VM moves then when `moves`.
    fn kill_agent_after(&self, k: usize, bytes: u64, moves: bool) {
        let node = self.node(k).0;
        let bytes = bytes.to_string();
        let mut p = vec![("Node", node.as_str()), ("Bytes", bytes.as_str())];
        if moves {
            p.push(("VirtualSystem", VM));
        }
        self.door("NodeAgentFailAfter", &p);
    }

    fn backup_one(&self) -> (Value, String) {
        let (out, err) = self.ok(&["-v", "backup", "--source", "lab", "--json", "--vm", VM]);
        let mut v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let v = v.as_array_mut().unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        (v.remove(0), err)
    }
}

#[test]
fn a_read_cut_after_the_move_goes_on_through_the_new_nodes_agent() {
    let lab = Lab::start();
    let ((a, _), (b, _)) = (lab.node(0), lab.node(1));
    let first = lab.guest_disks(VM, "first");
    // Node A's agent dies once it has served 3 MiB of the 16; the VM moves to B then.
    lab.kill_agent_after(0, 3 << 20, true);
    let (r1, err) = lab.backup_one();
    assert!(
        err.contains(&format!("VM moved from {a} to {b} during the backup")),
        "{err}"
    );
    // Each disk reopened on B, each a WARN line.
    let reopened: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(&format!("reopening the disk on {b}")))
        .collect();
    assert!(
        !reopened.is_empty() && reopened.iter().all(|l| l.contains("WARN")),
        "{err}"
    );
    for d in r1["disks"].as_array().unwrap() {
        assert_eq!(d["transport"], "network", "{r1}");
        assert_eq!(d["mode"], "full", "{r1}");
    }
    let (sa, sb) = (lab.stats(0), lab.stats(1));
    assert!(sa.stopped, "node A's agent died");
    assert!(sa.bytes >= 3 << 20, "A served {}", sa.bytes);
    assert!(
        sb.conns > 0 && sb.bytes > 0,
        "the rest came through B's agent"
    );
    // B served the rest, not the whole: nothing read twice in bulk (TLS and NBD framing aside).
    assert!(
        sb.bytes < 2 * DISK - (2 << 20),
        "B served {} of {}",
        sb.bytes,
        2 * DISK
    );
    assert_eq!(
        lab.left_on_nodes(2),
        [(0, 0), (0, 1)],
        "no checkpoint left; the reference point is on {b}, where the VM is"
    );
    lab.assert_restores(r1["snapshot"].as_str().unwrap(), &first);

    // The next backup is an RCT incremental, read through B's agent.
    lab.guest_write(VM, "disk0", 3 * CHUNK, &[0x11; 4096]);
    lab.guest_write(VM, "disk1", 7 * CHUNK + 512, &[0x22; 512]);
    let second = lab.guest_disks(VM, "second");
    let before = lab.stats(1).bytes;
    let (r2, err) = lab.backup_one();
    assert!(!err.contains("reopening"), "{err}");
    for d in r2["disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "changed-blocks", "{r2}");
        assert_eq!(d["full_reason"], Value::Null, "{r2}");
        assert_eq!(d["transport"], "network", "{r2}");
        assert!(d["source_read_bytes"].as_u64().unwrap() < DISK / 8, "{r2}");
    }
    assert!(lab.stats(1).bytes > before, "read through B's agent");
    lab.assert_restores(r2["snapshot"].as_str().unwrap(), &second);
}

#[test]
fn an_agent_that_dies_while_the_vm_stays_fails_the_backup_and_leaves_no_checkpoint() {
    let lab = Lab::start();
    let (a, _) = lab.node(0);
    lab.kill_agent_after(0, 1 << 20, false);
    let out = lab.run(&["-v", "backup", "--source", "lab", "--vm", VM]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("the VM still runs on node {a}")),
        "{err}"
    );
    assert!(!err.contains("during the backup"), "{err}");
    assert!(lab.stats(0).stopped);
    assert_eq!(lab.stats(1).conns, 0, "nothing was read through B");
    assert_eq!(lab.left_on_nodes(2), [(0, 0), (0, 0)]);
    let (out, _) = lab.ok(&["source", "cleanup", "--source", "lab", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["snapshots"], 0, "{v}");
}
