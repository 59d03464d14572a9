//! The Python XenAPI SDK probe (`tests/xen_probe.py`) as the CLI tests drive it: one process,
//! one session, one JSON line per request. Shared by the tests that read a Xen pool (`xen.rs`,
//! `scale_out.rs`, the replica tests, the cross-hypervisor restores of `vmware.rs` and
//! `hyperv_restore.rs`).
#![allow(dead_code)]

use ferry_testkit::Killed;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};

/// `ferry sim xen` (`ferry`: the binary with the test's environment) on a free port with 8 MiB
/// disks in `dir`; its JSON line.
pub fn start_sim(ferry: Command, dir: &Path) -> (Killed, Value) {
    start_sim_with(ferry, dir, &[])
}

/// `start_sim` with `extra` options of `ferry sim xen` (e.g. `--extra-vms N`).
pub fn start_sim_with(mut ferry: Command, dir: &Path, extra: &[&str]) -> (Killed, Value) {
    Killed::spawn_json_line(
        ferry
            .args(["sim", "xen", "--listen", "127.0.0.1:0", "--disk-mib", "8"])
            .args(extra)
            .arg("--dir")
            .arg(dir),
    )
}

/// `[sources.NAME]` for the pool `info` (password in `pw`), disks read over NBD.
pub fn source_toml(name: &str, info: &Value, pw: &Path, state: &Path) -> String {
    format!(
        "[sources.{name}]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\ntransports = [\"network\"]\n",
        info["url"].as_str().unwrap(),
        info["username"].as_str().unwrap(),
        pw.display(),
        info["tls_fingerprint"].as_str().unwrap(),
        state.display(),
    )
}

/// The Python SDK probe: one process, one session, one JSON line per request.
pub struct Probe {
    _child: Killed,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Probe {
    pub fn start(info: &Value) -> Self {
        let python = ferry_testkit::peers_dir().join("venv/bin/python");
        assert!(
            python.exists(),
            "peer `python` (venv with XenAPI) not found: run tests/peers/install.sh"
        );
        let mut child = Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/xen_probe.py"))
            .args(["url", "username", "password"].map(|k| info[k].as_str().unwrap()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self {
            _child: Killed(child),
            stdin,
            stdout,
        }
    }

    pub fn ask(&mut self, req: Value) -> Value {
        writeln!(self.stdin, "{req}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("probe answered {line:?} to {req}: {e}"));
        match v.get("ok") {
            Some(ok) => ok.clone(),
            None => panic!("probe failed on {req}: {}", v["error"]),
        }
    }

    /// The VDI uuids of VM `name`'s disks, in device order.
    pub fn disk_uuids(&mut self, name: &str) -> Vec<String> {
        self.vm(name)["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["uuid"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn vm(&mut self, name: &str) -> Value {
        self.ask(json!({"op": "vm", "name": name}))
    }

    pub fn sim(&mut self, call: &str, args: Value) -> Value {
        self.ask(json!({"op": "sim", "call": call, "args": args}))
    }

    /// The guest of the VM writes `data` at `offset` of the disk with VDI uuid `vdi`.
    pub fn guest_write(&mut self, vdi: &str, offset: u64, data: &[u8]) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.sim("guest_write", json!([vdi, offset.to_string(), b64]));
    }

    /// Saves each disk of `vm` (in userdevice order) as `dir/<label>-<n>.raw`.
    pub fn export_disks(&mut self, vm: &str, dir: &Path, label: &str) -> Vec<PathBuf> {
        let disks = self.vm(vm)["disks"].as_array().unwrap().clone();
        disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let p = dir.join(format!("{label}-{i}.raw"));
                self.ask(json!({"op": "export", "vdi": d["uuid"], "path": p}));
                p
            })
            .collect()
    }

    /// Asserts that VM `name` has one disk per `expected`, at userdevices 0, 1, …, each equal
    /// to its file (exported as `dir/<name>-<n>.raw`); the VM's record.
    pub fn assert_disks(&mut self, name: &str, expected: &[PathBuf], dir: &Path) -> Value {
        let vm = self.vm(name);
        let disks = vm["disks"].as_array().unwrap();
        assert_eq!(disks.len(), expected.len(), "{vm}");
        for (i, (d, want)) in disks.iter().zip(expected).enumerate() {
            assert_eq!(d["userdevice"], i.to_string(), "{vm}");
            let got = dir.join(format!("{name}-{i}.raw"));
            self.ask(json!({"op": "export", "vdi": d["uuid"], "path": got}));
            ferry_testkit::qemu_img_compare(&got, "raw", want, "raw");
        }
        vm
    }

    /// Asserts that the pool holds nothing a backup leaves behind, except `anchors` CBT
    /// metadata VDIs: no snapshot VM, no snapshot VDI with data, no VBD on the proxy or on a
    /// snapshot, no task.
    pub fn assert_clean(&mut self, anchors: usize, after: &str) {
        let l = self.ask(json!({"op": "leftovers"}));
        let empty = |k: &str| l[k].as_array().is_some_and(Vec::is_empty);
        for k in [
            "snapshot_vms",
            "snapshot_vdis",
            "proxy_vbds",
            "vbds_on_snapshots",
            "tasks",
        ] {
            assert!(empty(k), "after {after}: {k} left on the pool: {l}");
        }
        assert_eq!(
            l["cbt_anchors"].as_array().unwrap().len(),
            anchors,
            "after {after}: CBT anchors: {l}"
        );
    }
}

/// The MAC addresses in list `list` (key `key`) of a VM record, normalized (lower case, no
/// separators) so that records of different hypervisors compare.
pub fn macs(v: &Value, list: &str, key: &str) -> Vec<String> {
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            n[key]
                .as_str()
                .unwrap()
                .replace([':', '-'], "")
                .to_ascii_lowercase()
        })
        .collect()
}
