//! A Hyper-V VM that live-migrates *during* a backup (ADR 0171), through the `ferry` binary
//! against `ferry sim hyperv --cluster 2`: the backup follows the VM to its new node and stays
//! an RCT incremental whose restores match the guest's disks (`qemu-img compare`), whether the
//! move lands right after the checkpoint (side door `MigrateAfter`) or while the disks are read
//! (`LiveMigrate`); through the host agent, the reads go to the new node's agent (the old one's
//! cannot be reached); no checkpoint is left on either node (pypsrp, `tests/hyperv_probe.py`) and
//! `ferry source cleanup` finds nothing; a backup SIGKILLed after the move leaves its
//! checkpoint on the new node, where cleanup finds and removes it; a VM that keeps moving is
//! followed a bounded number of times, then the backup fails with the host's error.

use ferry_hv_hyperv::WsmanClient;
use ferry_testkit::Killed;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Output, Stdio};

const PASSWORD: &str = "test password";
const CHUNK: u64 = 256 << 10;
const RCT_BLOCK: u64 = 64 << 10;
const DISK: u64 = 8 << 20;
const VM: &str = "win-sql-01";
const CREATE_SNAPSHOT: &str = "Msvm_VirtualSystemSnapshotService.CreateSnapshot";

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

struct Lab {
    dir: tempfile::TempDir,
    info: Value,
    rt: tokio::runtime::Runtime,
    client: WsmanClient,
    _sim: Killed,
}

impl Lab {
    /// A two-node cluster; `san` reads the CSV through `san-paths`.
    fn start() -> Self {
        let dir = ferry_testkit::scratch_dir();
        let mut c = cli::ferry();
        c.args([
            "sim",
            "hyperv",
            "--cluster",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--disk-mib",
            "8",
            "--dir",
        ])
        .arg(dir.path().join("host"));
        let (sim, info) = Killed::spawn_json_line(&mut c);
        let pw = dir.path().join("hv.pw");
        std::fs::write(&pw, info["password"].as_str().unwrap()).unwrap();
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
        let toml = format!(
            "[sources.lab]\nkind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\ntransports = [\"san\"]\n[sources.lab.san-paths]\n'C:\\' = \"{}\"\n[sources.lab.nodes]\n{nodes}",
            info["url"].as_str().unwrap(),
            info["username"].as_str().unwrap(),
            pw.display(),
            info["tls_fingerprint"].as_str().unwrap(),
            dir.path().join("state").display(),
            info["san_paths"]["C:\\"].as_str().unwrap(),
        );
        std::fs::write(dir.path().join("ferry.toml"), &toml).unwrap();
        std::fs::write(dir.path().join("ferry.base.toml"), toml).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        hyperv_lab::init_repo(&rt, &dir.path().join("repo"), PASSWORD, Some(CHUNK as u32));
        let client = hyperv_lab::sim_client(&rt, &info);
        Self {
            dir,
            info,
            rt,
            client,
            _sim: sim,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn node(&self, k: usize) -> (String, String) {
        let n = &self.info["cluster"]["nodes"][k];
        (
            n["name"].as_str().unwrap().to_string(),
            n["url"].as_str().unwrap().to_string(),
        )
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("FERRY_PASSWORD", PASSWORD.to_string()),
            ("FERRY_REPO", self.path("repo").display().to_string()),
            (
                "FERRY_CONFIG",
                self.path("ferry.toml").display().to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec()
    }

    fn run(&self, args: &[&str]) -> Output {
        ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &self.env())
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        assert!(out.status.success(), "ferry {args:?} failed");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    /// `ferry -v backup --source lab --json --vm VM` (and more `args`), in the background.
    fn spawn_backup(&self, args: &[&str]) -> std::process::Child {
        let mut c = cli::ferry();
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
    fn backup(&self) -> (Value, String) {
        let (out, err) = self.ok(&["-v", "backup", "--source", "lab", "--json", "--vm", VM]);
        (report(&out), err)
    }

    /// Reads through the host agent (`network` only), node `k`'s agent at `agents[k]`; pairs
    /// the appliance with the simulated agent.
    fn use_network(&self, agents: [&str; 2]) {
        let base = std::fs::read_to_string(self.path("ferry.base.toml")).unwrap();
        let mut toml = base.replace("transports = [\"san\"]", "transports = [\"network\"]");
        toml.push_str(&format!(
            "[sources.lab.agent]\nport = {}\nfingerprint = \"{}\"\n[sources.lab.agent.nodes]\n",
            self.info["agent"]["port"],
            self.info["agent"]["fingerprint"].as_str().unwrap()
        ));
        for (k, addr) in agents.iter().enumerate() {
            toml.push_str(&format!("'{}' = \"{addr}\"\n", self.node(k).0));
        }
        std::fs::write(self.path("ferry.toml"), toml).unwrap();
        let (out, _) = self.ok(&["source", "agent-pin", "lab", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        self.door(
            "AgentPin",
            &[("Fingerprint", v["fingerprint"].as_str().unwrap().into())],
        );
    }

    fn door(&self, method: &str, params: &[(&str, String)]) {
        hyperv_lab::side_door(&self.rt, &self.client, method, params);
    }

    fn guest_write(&self, disk: &str, offset: u64, data: &[u8]) {
        use base64::Engine as _;
        self.door(
            "GuestWrite",
            &[
                ("VirtualSystem", VM.into()),
                ("Disk", disk.into()),
                ("Offset", offset.to_string()),
                (
                    "Data",
                    base64::engine::general_purpose::STANDARD.encode(data),
                ),
            ],
        );
    }

    /// The VM moves to the other node right after `calls` more calls of `method`, `times` times.
    fn migrate_after(&self, method: Option<&str>, calls: u64, times: u64) {
        let mut p = vec![
            ("VirtualSystem", VM.to_string()),
            ("Calls", calls.to_string()),
            ("Times", times.to_string()),
        ];
        if let Some(m) = method {
            p.push(("Method", m.to_string()));
        }
        self.door("MigrateAfter", &p);
    }

    /// (recovery checkpoints, reference points) on each node, as pypsrp sees them.
    fn left(&self) -> Vec<(usize, u64)> {
        (0..2)
            .map(|k| {
                let p = hyperv_lab::pypsrp_probe(&self.info, "hyperv_probe.py", &self.node(k).1);
                (
                    p["checkpoints"].as_array().unwrap().len(),
                    p["reference_points"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// `ferry source cleanup`: how many checkpoints it removed.
    fn cleanup(&self) -> u64 {
        let (out, _) = self.ok(&["source", "cleanup", "--source", "lab", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["snapshots"].as_u64().unwrap()
    }

    /// Copies of what the guest sees on its disks now.
    fn guest_disks(&self, tag: &str) -> Vec<PathBuf> {
        hyperv_lab::guest_disks(&self.info, VM, self.dir.path(), tag)
    }

    /// Restores disk `diskN` of `snapshot` and compares it with `expected[N]`.
    fn assert_restores(&self, snapshot: &str, expected: &[PathBuf]) {
        hyperv_lab::assert_restores(&self.env(), self.dir.path(), snapshot, expected);
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
    let (r1, _) = lab.backup();
    assert_eq!(
        lab.left(),
        [(0, 1), (0, 0)],
        "the reference point is on {a}"
    );

    // The move lands right after the checkpoint: RCT, the reads and the commit follow it.
    lab.guest_write("disk0", 3 * CHUNK, &[0x11; 4096]);
    lab.guest_write("disk1", 7 * CHUNK + 512, &[0x22; 512]);
    let second = lab.guest_disks("second");
    lab.migrate_after(Some(CREATE_SNAPSHOT), 1, 1);
    let (r2, err) = lab.backup();
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
    lab.guest_write("disk0", 12 * CHUNK, &[0x33; 1024]);
    let third = lab.guest_disks("third");
    let mut child = lab.spawn_backup(&["--full", "--limit-rate", "4M"]);
    let err = cli::wait_for_stderr_keep(&mut child, "backing up disk");
    lab.door(
        "LiveMigrate",
        &[("VirtualSystem", VM.into()), ("DestinationNode", a.clone())],
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

    lab.guest_write("disk0", 5 * CHUNK, &[0x44; 4096]);
    lab.guest_write("disk1", 2 * CHUNK, &[0x55; 4096]);
    let fourth = lab.guest_disks("fourth");
    let (r4, _) = lab.backup();
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
    let (r1, _) = lab.backup();
    assert_eq!(r1["disks"][0]["transport"], "network", "{r1}");
    // From now on node A's agent cannot be reached: the reads must go to node B's.
    lab.use_network(["127.0.0.1:1", &agent]);
    lab.guest_write("disk0", 3 * CHUNK, &[0x66; 4096]);
    lab.guest_write("disk1", 9 * CHUNK, &[0x77; 4096]);
    let second = lab.guest_disks("second");
    lab.migrate_after(Some(CREATE_SNAPSHOT), 1, 1);
    let (r2, err) = lab.backup();
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
    let expected = lab.guest_disks("after-kill");
    let (r, _) = lab.backup();
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
}

#[test]
fn a_vm_that_keeps_moving_fails_the_backup_after_a_bounded_number_of_moves() {
    let lab = Lab::start();
    lab.backup();
    // Every second RCT call (the second disk's) is followed by a move: the backup cannot
    // settle anywhere.
    lab.migrate_after(
        Some("Msvm_ImageManagementService.GetVirtualDiskChanges"),
        2,
        1000,
    );
    lab.guest_write("disk0", 0, &[0x55; 512]);
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
