//! What the vSphere tests share (`vmware.rs`, `replica_cross.rs`, `replica_vsphere.rs`): a
//! `ferry sim vmware` and its `[sources.NAME]` table, the simulator's side door (guest writes,
//! snapshot count, sent with curl), VMware's own SDK (pyvmomi, `tests/vmware_probe.py`) as the
//! test's eyes, and a VM's disks copied off the simulator's datastore directories.
#![allow(dead_code)]

use ferry_testkit::Killed;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `ferry sim vmware` (`ferry`: the binary with the test's environment) with 8 MiB second
/// disks and 1 MiB CBT windows in `dir`; its JSON line.
pub fn start_sim(mut ferry: Command, dir: &Path) -> (Killed, Value) {
    Killed::spawn_json_line(
        ferry
            .args(["sim", "vmware", "--listen", "127.0.0.1:0"])
            .args(["--disk-mib", "8", "--cbt-page-kib", "1024", "--vcsim"])
            .arg(ferry_testkit::tool("vcsim"))
            .arg("--dir")
            .arg(dir),
    )
}

/// `[sources.NAME]` for the simulator `vc` (password in `pw`): SAN reads off its datastore
/// directories, nbdkit's file plugin standing in for the vddk plugin on writes.
pub fn source_toml(name: &str, vc: &Value, pw: &Path, state: &Path) -> String {
    source_toml_with(
        name,
        vc,
        pw,
        state,
        "[\"san\"]",
        "nbdkit-stand-in = \"file\"",
    )
}

/// `[sources.NAME]` for the simulator `vc` with `transports` (a TOML array) and `extra` lines
/// before its `san-paths` table.
pub fn source_toml_with(
    name: &str,
    vc: &Value,
    pw: &Path,
    state: &Path,
    transports: &str,
    extra: &str,
) -> String {
    let mut t = format!(
        "[sources.{name}]\nkind = \"vmware\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\ntransports = {transports}\n{extra}\n[sources.{name}.san-paths]\n",
        vc["url"].as_str().unwrap(),
        vc["username"].as_str().unwrap(),
        pw.display(),
        vc["tls_fingerprint"].as_str().unwrap(),
        state.display(),
    );
    for (ds, p) in vc["san_paths"].as_object().unwrap() {
        t.push_str(&format!("\"{ds}\" = \"{}\"\n", p.as_str().unwrap()));
    }
    t
}

/// A vim25 call of the simulator's side door, with curl (loopback: TLS not checked).
pub fn side_door(vc: &Value, method: &str, body: &str) -> String {
    let env = format!(
        "<?xml version=\"1.0\"?><soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\"><soapenv:Body><{method} xmlns=\"urn:vim25\">{body}</{method}></soapenv:Body></soapenv:Envelope>"
    );
    let out = Command::new(ferry_testkit::tool("curl"))
        .args([
            "-sS",
            "-k",
            "--noproxy",
            "*",
            "-H",
            "Content-Type: text/xml",
        ])
        .args([
            "-H",
            "Cookie: vmware_soap_session=side-door",
            "--data-binary",
            "@-",
        ])
        .arg(vc["url"].as_str().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(env.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !s.contains("Fault"),
        "{method}: {s}"
    );
    s
}

/// The guest of VM `moref` writes `data` at `offset` of its disk `key`.
pub fn guest_write(vc: &Value, moref: &str, key: i64, offset: u64, data: &[u8]) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(data);
    side_door(
        vc,
        "FerrySimGuestWrite",
        &format!(
            "<vm>{moref}</vm><deviceKey>{key}</deviceKey><offset>{offset}</offset><data>{b64}</data>"
        ),
    );
}

/// Snapshots on the simulator (taken through its front and not removed).
pub fn snapshot_count(vc: &Value) -> u64 {
    let s = side_door(vc, "FerrySimSnapshotCount", "");
    s.split("<returnval>")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{s}"))
}

/// What pyvmomi answers for `args` (`tests/vmware_probe.py`: VM names, or `--inventory`).
pub fn probe(vc: &Value, args: &[&str]) -> Value {
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv with pyvmomi) not found: run tests/peers/install.sh"
    );
    let url = vc["url"].as_str().unwrap();
    let (host, port) = url
        .trim_start_matches("https://")
        .trim_end_matches("/sdk")
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in {url}"));
    let out = ferry_testkit::run_ok(
        Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/vmware_probe.py"
            ))
            .args([host, port])
            .args(["username", "password"].map(|k| vc[k].as_str().unwrap()))
            .args(args)
            .env("no_proxy", "*"),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// VM `name` as pyvmomi sees it (null: no such VM).
pub fn vm(vc: &Value, name: &str) -> Value {
    probe(vc, &[name])[name].clone()
}

/// The local flat extent of datastore path `[ds] dir/disk.vmdk` (`dir/disk-flat.vmdk`).
pub fn flat_file(vc: &Value, file: &str) -> PathBuf {
    let desc = datastore_file(vc, file);
    let stem = desc.file_stem().unwrap().to_string_lossy().into_owned();
    desc.with_file_name(format!("{stem}-flat.vmdk"))
}

/// The local file of datastore path `[ds] rel` through the simulator's datastore directories.
pub fn datastore_file(vc: &Value, file: &str) -> PathBuf {
    let (ds, rel) = file
        .strip_prefix('[')
        .and_then(|r| r.split_once("] "))
        .unwrap_or_else(|| panic!("not a datastore path: {file}"));
    PathBuf::from(vc["san_paths"][ds].as_str().unwrap()).join(rel)
}

/// Copies of the disks of VM `name` (made through the API, so its disks are flat extents on
/// the datastore) as `dir/<label>-<n>.raw`, in device order.
pub fn api_vm_disks(vc: &Value, name: &str, dir: &Path, label: &str) -> Vec<PathBuf> {
    let v = vm(vc, name);
    assert!(!v.is_null(), "no VM `{name}` on vCenter");
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let to = dir.join(format!("{label}-{i}.raw"));
            std::fs::copy(flat_file(vc, d["file"].as_str().unwrap()), &to).unwrap();
            to
        })
        .collect()
}

/// Copies of the live disk files `disks` (as `two_disk_vm` lists them) as `dir/<label>-<n>.raw`.
pub fn copy_live_disks(disks: &[(i64, PathBuf)], dir: &Path, label: &str) -> Vec<PathBuf> {
    disks
        .iter()
        .enumerate()
        .map(|(i, (_, live))| {
            let p = dir.join(format!("{label}-{i}.raw"));
            std::fs::copy(live, &p).unwrap();
            p
        })
        .collect()
}

/// The simulator's seeded VM with two disks: (name, moref, [(device key, live file)]), the
/// smaller disk (scsi0:0) first.
pub fn two_disk_vm(vc: &Value) -> (String, String, Vec<(i64, PathBuf)>) {
    let vm = vc["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["disks"].as_array().unwrap().len() == 2)
        .expect("a 2-disk VM");
    let mut disks: Vec<(u64, i64, PathBuf)> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["capacity"].as_u64().unwrap(),
                d["key"].as_i64().unwrap(),
                PathBuf::from(d["live"].as_str().unwrap()),
            )
        })
        .collect();
    disks.sort();
    (
        vm["name"].as_str().unwrap().into(),
        vm["moref"].as_str().unwrap().into(),
        disks.into_iter().map(|(_, k, p)| (k, p)).collect(),
    )
}
