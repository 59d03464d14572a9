//! Hyper-V data paths through the `ferry` binary against `ferry sim hyperv`: the host agent
//! (`network`: the simulator serves `ferry-agent` in-process, pinned both ways; the appliance's
//! client certificate comes from `ferry source agent-pin` and is registered through the side
//! door) and snapshot LUNs (`san` with `san-luns`: NTFS volume images the simulator rebuilds
//! with ntfs-3g at each checkpoint). For each: a full backup, guest writes, an RCT incremental
//! that reads only what changed, restores compared by `qemu-img compare` with the guest's disks
//! at checkpoint time, and no checkpoint left. Plus: an unreachable agent falls back to the
//! next transport with the reason logged, and a wrong agent fingerprint is a clear error that
//! leaves no checkpoint.

use hyperv_lab::{CHUNK, disk};
use serde_json::Value;

const DISK: u64 = 8 << 20;
const VM: &str = "win-sql-01";

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

/// How the source reaches the checkpoint's disks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// `transports = ["network"]`, the agent at the source's host.
    Network,
    /// `transports = ["san"]` with `san-luns`.
    Lun,
}

lab_wrapper!(
    /// The lab's host (`luns`: with snapshot LUNs); the config is written per test.
);

impl Lab {
    fn start(luns: bool) -> Self {
        let mib = (DISK >> 20).to_string();
        let mut args = vec!["--disk-mib", mib.as_str()];
        if luns {
            args.push("--san-luns");
        }
        Self(hyperv_lab::Lab::start(&args))
    }

    /// The `[sources.lab.agent]` table pinning the simulator's agent (or `fingerprint`).
    fn agent_table(&self, fingerprint: Option<&str>, nodes: &str) -> String {
        format!(
            "[sources.lab.agent]\nport = {}\nfingerprint = \"{}\"\n{nodes}",
            self.info["agent"]["port"],
            fingerprint.unwrap_or(self.info["agent"]["fingerprint"].as_str().unwrap()),
        )
    }

    /// `[sources.lab.san-luns]`: each VM folder → its LUN image.
    fn luns_table(&self) -> String {
        let mut t = String::from("[sources.lab.san-luns]\n");
        for (folder, img) in self.info["san_luns"].as_object().unwrap() {
            t.push_str(&format!("'{folder}' = \"{}\"\n", img.as_str().unwrap()));
        }
        t
    }

    /// Configures the source for `path`; for the agent, makes the appliance's client
    /// certificate (`ferry source agent-pin`) and pairs the simulated host with it.
    fn configure(&self, path: Path) {
        match path {
            Path::Network => {
                self.config("[\"network\"]", &self.agent_table(None, ""));
                self.pair();
            }
            Path::Lun => self.config("[\"san\"]", &self.luns_table()),
        }
    }

    /// `ferry source agent-pin lab`, registered with the host's agent through the side door.
    fn pair(&self) -> String {
        self.pair_made(true)
    }

    /// [`Self::pair`]; `made`: whether this call is the one that makes the certificate.
    fn pair_made(&self, made: bool) -> String {
        let (out, _) = self.ok(&["source", "agent-pin", "lab", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["created"], made, "{v}");
        assert!(std::path::Path::new(v["identity"].as_str().unwrap()).exists());
        let fp = v["fingerprint"].as_str().unwrap().to_string();
        // The second call reuses the certificate.
        let (again, _) = self.ok(&["source", "agent-pin", "lab"]);
        assert_eq!(again.trim(), fp);
        self.door("AgentPin", &[("Fingerprint", &fp)]);
        fp
    }

    /// `ferry backup --source lab --vm VM --json`: the report, and stderr.
    fn backup_one(&self) -> (Value, String) {
        let (mut v, err) = self.backup(&["--vm", VM]);
        (v.remove(0), err)
    }

    /// `ferry source cleanup`: what it removed (nothing, after clean runs).
    fn leftovers(&self) -> u64 {
        let (out, _) = self.ok(&["source", "cleanup", "--source", "lab", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["snapshots"].as_u64().unwrap()
    }
}

fn full_then_incremental(path: Path, transport: &str) {
    let lab = Lab::start(path == Path::Lun);
    lab.configure(path);
    let first = lab.guest_disks(VM, "first");
    let (r1, _) = lab.backup_one();
    for d in ["disk0", "disk1"] {
        assert_eq!(disk(&r1, d)["transport"], transport, "{r1}");
        assert_eq!(disk(&r1, d)["full_reason"], "no previous restore point");
    }
    let id1 = r1["snapshot"].as_str().unwrap().to_string();
    assert_eq!(lab.leftovers(), 0, "the first backup left a checkpoint");

    lab.guest_write(VM, "disk1", 5 * CHUNK + 512, &[0x5A; 4096]);
    lab.guest_write(VM, "disk1", 20 * CHUNK, &[0xA5; 512]);
    lab.guest_write(VM, "disk0", 7 * CHUNK, &[0x11; 1024]);
    let second = lab.guest_disks(VM, "second");
    let (r2, _) = lab.backup_one();
    let id2 = r2["snapshot"].as_str().unwrap().to_string();
    let mut read = 0;
    for d in ["disk0", "disk1"] {
        let x = disk(&r2, d);
        assert_eq!(x["transport"], transport, "{r2}");
        assert_eq!(x["mode"], "changed-blocks", "{r2}");
        assert!(x["full_reason"].is_null(), "{r2}");
        read += x["source_read_bytes"].as_u64().unwrap();
    }
    // Three small writes: a few chunks and the verification samples, not two disks.
    assert!(
        read > 0 && read * 8 < 2 * DISK,
        "the incremental read {read} bytes of {}",
        2 * DISK
    );
    let m = lab.manifest(&id2);
    assert!(
        m.meta.transport.as_deref().unwrap().starts_with(transport),
        "{:?}",
        m.meta.transport
    );
    for d in &m.disks {
        // Only the chunks the writes touched are new; the rest comes from the full backup.
        assert!(d.new_chunks <= 2 && d.reused_chunks > 0, "{d:?}");
        assert_eq!(
            m.meta.labels[&format!("ferry.disk.{}.token", d.name)],
            *d.change_token.as_ref().unwrap()
        );
    }
    assert_eq!(lab.leftovers(), 0, "the incremental left a checkpoint");
    lab.assert_restores(&id1, &first);
    lab.assert_restores(&id2, &second);
}

#[test]
fn network_full_then_rct_incremental_through_the_host_agent() {
    full_then_incremental(Path::Network, "network");
}

#[test]
fn san_lun_full_then_rct_incremental_through_ntfs() {
    full_then_incremental(Path::Lun, "san");
}

#[test]
fn unreachable_agent_falls_back_to_the_next_transport_and_says_why() {
    let lab = Lab::start(false);
    // The host's node name maps to a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let host = lab.info["host"].as_str().unwrap().to_string();
    lab.config(
        "[\"network\", \"san\"]",
        &format!(
            "{}[sources.lab.agent.nodes]\n'{}' = \"{dead}\"\n[sources.lab.san-paths]\n'C:\\' = \"{}\"\n",
            lab.agent_table(None, ""),
            host.to_lowercase(),
            lab.info["san_paths"]["C:\\"].as_str().unwrap()
        ),
    );
    lab.pair();
    let expect = lab.guest_disks(VM, "now");
    let (r, err) = lab.backup_one();
    assert_eq!(disk(&r, "disk0")["transport"], "san", "{r}");
    assert!(err.contains("using a less preferred transport"), "{err}");
    assert!(
        err.contains(&format!("the agent of node {host} at {dead}")),
        "{err}"
    );
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expect);
    assert_eq!(lab.leftovers(), 0);
}

#[test]
fn unpaired_appliance_or_wrong_agent_fingerprint_is_a_clear_error_and_leaves_no_checkpoint() {
    let lab = Lab::start(false);
    // Not paired yet: the agent refuses the appliance's certificate (made at first use).
    lab.config("[\"network\"]", &lab.agent_table(None, ""));
    let out = lab.run(&["backup", "--source", "lab", "--vm", VM]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused this appliance's client certificate"),
        "{err}"
    );
    assert_eq!(lab.leftovers(), 0, "the refused backup left a checkpoint");
    lab.pair_made(false);

    let wrong = format!("sha256:{}", ["AB"; 32].join(":"));
    lab.config("[\"network\"]", &lab.agent_table(Some(&wrong), ""));
    let out = lab.run(&["backup", "--source", "lab", "--vm", VM]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("which does not match the pinned {wrong}"))
            && err.contains(lab.info["agent"]["fingerprint"].as_str().unwrap()),
        "{err}"
    );
    assert_eq!(lab.leftovers(), 0, "the failed backup left a checkpoint");

    // Bad agent settings are refused with the key named, before anything is contacted.
    for (table, needle) in [
        (
            "[sources.lab.agent]\nfingerprint = \"sha256:AB\"\n",
            "agent.fingerprint",
        ),
        (
            &*format!(
                "{}[sources.lab.agent.nodes]\nHV = \"a b:1\"\n",
                lab.agent_table(None, "")
            ),
            "agent.nodes.HV",
        ),
        (
            &*format!("{}colour = 1\n", lab.agent_table(None, "")),
            "colour",
        ),
    ] {
        lab.config("[\"network\"]", table);
        let out = lab.run(&["vms", "--source", "lab"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{needle}: {err}");
    }
}
