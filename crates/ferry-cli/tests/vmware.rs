//! The vSphere driver through the `ferry` binary against `ferry sim vmware` (govmomi's vcsim
//! behind Ferry's front): `vms`, full and CBT-incremental `backup --source` of a 2-disk VM in
//! san and network (nbdkit) mode with restores compared by `qemu-img`, reads limited to the
//! changed areas, a CBT reset read in full with the reason shown, a SIGKILLed backup whose
//! snapshot the next run removes, and a clear error when VDDK is missing. The tests act as the
//! guest through the simulator's side door (`FerrySimGuestWrite`, sent with curl).

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use ferry_testkit::Killed;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "test password";
const CHUNK: u64 = 256 << 10;
const BLOCK: u64 = 64 << 10;

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("RUST_LOG").env("FERRY_PASSWORD", PASSWORD);
    c
}

struct Lab {
    dir: tempfile::TempDir,
    info: Value,
    _sim: Killed,
}

impl Lab {
    fn start(transports: &str, extra: &str) -> Self {
        let dir = ferry_testkit::scratch_dir();
        let mut child = ferry()
            .args([
                "sim",
                "vmware",
                "--listen",
                "127.0.0.1:0",
                "--disk-mib",
                "8",
            ])
            .args(["--cbt-page-kib", "1024", "--vcsim"])
            .arg(ferry_testkit::tool("vcsim"))
            .arg("--dir")
            .arg(dir.path().join("sim"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let sim = Killed(child);
        let info: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let pw = dir.path().join("vc.pw");
        std::fs::write(&pw, info["password"].as_str().unwrap()).unwrap();
        let mut t = format!(
            "[sources.lab]\nkind = \"vmware\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\ntransports = {transports}\n{extra}\n[sources.lab.san-paths]\n",
            info["url"].as_str().unwrap(),
            info["username"].as_str().unwrap(),
            pw.display(),
            info["tls_fingerprint"].as_str().unwrap(),
            dir.path().join("state").display(),
        );
        for (ds, p) in info["san_paths"].as_object().unwrap() {
            t.push_str(&format!("\"{ds}\" = \"{}\"\n", p.as_str().unwrap()));
        }
        std::fs::write(dir.path().join("ferry.toml"), t).unwrap();
        init_repo(&dir.path().join("repo"));
        Self {
            dir,
            info,
            _sim: sim,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
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

    /// The simulator's VM with two disks: (name, moref, [(device key, live file)]).
    fn vm(&self) -> (String, String, Vec<(i64, PathBuf)>) {
        let vm = self.info["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["disks"].as_array().unwrap().len() == 2)
            .expect("a 2-disk VM");
        // In scsi0:0, scsi0:1 order: the seeded 1 MiB disk, then the 8 MiB one the simulator added.
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
        let disks = disks.into_iter().map(|(_, k, p)| (k, p)).collect();
        (
            vm["name"].as_str().unwrap().into(),
            vm["moref"].as_str().unwrap().into(),
            disks,
        )
    }

    /// A vim25 call of the simulator's side door, with curl (TLS not checked: loopback test).
    fn side_door(&self, method: &str, body: &str) -> String {
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
            .arg(self.info["url"].as_str().unwrap())
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

    fn guest_write(&self, moref: &str, key: i64, offset: u64, data: &[u8]) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.side_door(
            "FerrySimGuestWrite",
            &format!("<vm>{moref}</vm><deviceKey>{key}</deviceKey><offset>{offset}</offset><data>{b64}</data>"),
        );
    }

    fn snapshots_on_vcenter(&self) -> u64 {
        let s = self.side_door("FerrySimSnapshotCount", "");
        let n = s
            .split("<returnval>")
            .nth(1)
            .and_then(|r| r.split('<').next());
        n.and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{s}"))
    }

    fn copy_disks(&self, label: &str) -> Vec<PathBuf> {
        self.vm()
            .2
            .iter()
            .enumerate()
            .map(|(i, (_, live))| {
                let p = self.path(&format!("{label}-{i}.raw"));
                std::fs::copy(live, &p).unwrap();
                p
            })
            .collect()
    }

    fn backup(&self, args: &[&str]) -> (Value, String) {
        let mut all = vec!["backup", "--source", "lab", "--json"];
        all.extend_from_slice(args);
        let (out, err) = self.ok(&all);
        let v: Value = serde_json::from_str(&out).unwrap();
        let [one] = v.as_array().unwrap().as_slice() else {
            panic!("one VM expected: {v}")
        };
        (one.clone(), err)
    }

    fn assert_restores(&self, snapshot: &str, names: &[&str], expected: &[PathBuf]) {
        for (name, want) in names.iter().zip(expected) {
            let out = self.path(&format!(
                "restored-{snapshot}-{}.raw",
                name.replace(':', "-")
            ));
            self.ok(&[
                "restore",
                snapshot,
                "--disk",
                name,
                "--to",
                out.to_str().unwrap(),
            ]);
            assert_eq!(
                std::fs::metadata(&out).unwrap().len(),
                std::fs::metadata(want).unwrap().len()
            );
            ferry_testkit::qemu_img_compare(&out, "raw", want, "raw");
        }
    }
}

impl Lab {
    /// Starts a throttled full backup of `vm`, SIGKILLs it while it reads and checks that its
    /// snapshot is still on vCenter.
    fn kill_mid_backup(&self, name: &str) {
        let mut child = ferry()
            .args([
                "-v",
                "backup",
                "--source",
                "lab",
                "--vm",
                name,
                "--full",
                "--limit-rate",
                "1M",
            ])
            .envs(self.env())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = String::new();
        loop {
            let mut l = String::new();
            assert!(
                err.read_line(&mut l).unwrap() > 0 && Instant::now() < deadline,
                "backup ended before it read: {seen}"
            );
            seen.push_str(&l);
            if l.contains("backing up disk") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        std::thread::sleep(Duration::from_millis(300));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            self.snapshots_on_vcenter(),
            1,
            "the kill should land mid-backup"
        );
    }
}

fn init_repo(path: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(path.to_str().unwrap(), true).unwrap();
        let opts = InitOptions {
            chunk_size: CHUNK as u32,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(store, Some(&Secret::new(PASSWORD)), opts)
            .await
            .unwrap();
    });
}

fn disk<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {report}"))
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Full then CBT-incremental backup of the 2-disk VM through `mode`; returns the lab.
fn full_then_incremental(transports: &str, extra: &str, mode: &str) -> Lab {
    let lab = Lab::start(transports, extra);
    let (name, moref, disks) = lab.vm();
    let (out, _) = lab.ok(&["vms", "--source", "lab", "--json"]);
    let vms: Value = serde_json::from_str(&out).unwrap();
    let listed = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{name} not in {vms}"));
    assert_eq!(listed["disks"].as_array().unwrap().len(), 2, "{listed}");

    let names = ["scsi0:0", "scsi0:1"];
    let full_disks = lab.copy_disks("full");
    let (full, _) = lab.backup(&["--vm", &name]);
    assert_eq!(full["vm_name"], name.as_str());
    assert_eq!(full["consistency"], "file-system", "{full}");
    for dn in names {
        let d = disk(&full, dn);
        assert_eq!(d["transport"], mode, "{d}");
        assert_eq!(d["mode"], "full", "{d}");
        assert!(
            d["full_reason"]
                .as_str()
                .unwrap()
                .contains("changed block tracking was off"),
            "{d}"
        );
        // QueryChangedDiskAreas("*") bounds the read to the allocated areas.
        let data = n(&d["source_read_bytes"]) - n(&d["probe_bytes"]);
        assert!(data <= 4 * BLOCK, "{d}");
        assert!(data > 0, "{d}");
    }
    assert_eq!(lab.snapshots_on_vcenter(), 0, "the snapshot is removed");
    let full_id = full["snapshot"].as_str().unwrap().to_string();
    lab.assert_restores(&full_id, &names, &full_disks);

    // The guest writes into both disks; the incremental reads only those areas.
    let writes: [Vec<(u64, Vec<u8>)>; 2] = [
        vec![(5 * BLOCK + 7, b"changed after the full backup".to_vec())],
        vec![
            (0, vec![0xAB; 3 * BLOCK as usize]),
            (100 * BLOCK - 10, vec![0xEE; 20]),
        ],
    ];
    for ((key, _), ws) in disks.iter().zip(&writes) {
        for (off, data) in ws {
            lab.guest_write(&moref, *key, *off, data);
        }
    }
    let incr_disks = lab.copy_disks("incr");
    let (incr, _) = lab.backup(&["--vm", &name, "--verify-sample", "0"]);
    assert_eq!(incr["previous"], full_id.as_str());
    for (dn, ws) in names.iter().zip(&writes) {
        let d = disk(&incr, dn);
        assert_eq!(d["mode"], "changed-blocks", "{d}");
        let mut blocks = std::collections::BTreeSet::new();
        let mut chunks = std::collections::BTreeSet::new();
        for (off, data) in ws {
            let end = off + data.len() as u64 - 1;
            blocks.extend(off / BLOCK..=end / BLOCK);
            chunks.extend(off / CHUNK..=end / CHUNK);
        }
        assert_eq!(
            n(&d["cbt_changed_bytes"]),
            blocks.len() as u64 * BLOCK,
            "{d}"
        );
        let touched = chunks.len() as u64 * CHUNK;
        let data = n(&d["source_read_bytes"]) - n(&d["probe_bytes"]);
        assert!(
            data > 0 && data <= touched,
            "read {data} for {touched} bytes of changed chunks: {d}"
        );
    }
    assert_eq!(lab.snapshots_on_vcenter(), 0);
    lab.assert_restores(incr["snapshot"].as_str().unwrap(), &names, &incr_disks);
    lab
}

#[test]
fn san_full_incremental_cbt_reset_and_sigkill() {
    let lab = full_then_incremental("[\"san\", \"network\"]", "", "san");
    let (name, moref, disks) = lab.vm();
    // CBT reset (as after a storage vMotion): a logged full read, the reason in the report.
    lab.side_door(
        "FerrySimResetCbt",
        &format!("<vm>{moref}</vm><deviceKey>{}</deviceKey>", disks[1].0),
    );
    let (r, err) = lab.backup(&["--vm", &name]);
    let d = disk(&r, "scsi0:1");
    assert_eq!(d["mode"], "full", "{d}");
    let reason = d["full_reason"].as_str().unwrap();
    assert!(
        reason.contains("refused the previous changeId") && reason.contains("FileFault"),
        "{reason}"
    );
    assert!(err.contains("refused the previous changeId"), "{err}");
    assert_eq!(disk(&r, "scsi0:0")["mode"], "changed-blocks");

    // SIGKILL mid-backup: the snapshot stays until the next run removes it.
    for i in 0..6u64 {
        lab.guest_write(
            &moref,
            disks[1].0,
            i << 20,
            &ferry_testkit::noise(1 << 20, i),
        );
    }
    // Killed once: `ferry source cleanup` removes the snapshot. Killed again: the next backup does.
    lab.kill_mid_backup(&name);
    let (out, _) = lab.ok(&["source", "cleanup", "--source", "lab", "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["snapshots"], 1, "{report}");
    assert_eq!(lab.snapshots_on_vcenter(), 0);
    lab.kill_mid_backup(&name);
    let expected = lab.copy_disks("after-kill");
    let (r, err) = lab.backup(&["--vm", &name]);
    assert!(err.contains("leftover"), "{err}");
    assert_eq!(lab.snapshots_on_vcenter(), 0);
    lab.assert_restores(
        r["snapshot"].as_str().unwrap(),
        &["scsi0:0", "scsi0:1"],
        &expected,
    );
}

#[test]
fn network_full_incremental_through_nbdkit_and_missing_vddk() {
    let lab = full_then_incremental("[\"network\"]", "nbdkit-stand-in = \"file\"", "network");
    // Without VDDK (and without the lab stand-in) the network mode names what is missing.
    let t = std::fs::read_to_string(lab.path("ferry.toml")).unwrap();
    std::fs::write(
        lab.path("ferry.toml"),
        t.replace("nbdkit-stand-in = \"file\"\n", "").replace(
            "transports = [\"network\"]",
            "transports = [\"network\", \"hotadd\"]",
        ),
    )
    .unwrap();
    let (name, _, _) = lab.vm();
    let out = lab.run(&["backup", "--source", "lab", "--vm", &name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("vddk-libdir") && err.contains("libvixDiskLib.so"),
        "{err}"
    );
    assert!(err.contains("hotadd"), "{err}");
    assert_eq!(
        lab.snapshots_on_vcenter(),
        0,
        "a failed start removes its snapshot"
    );
}

#[test]
fn demo_runs_against_the_vsphere_simulator() {
    let out = ferry_testkit::run_logged(
        env!("CARGO_BIN_EXE_ferry"),
        &["demo", "--hypervisor", "vmware", "--size-mib", "16"],
        &[(
            "FERRY_VCSIM".to_string(),
            ferry_testkit::tool("vcsim").display().to_string(),
        )],
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}");
    assert_eq!(
        s.matches("identical to the disks at snapshot time").count(),
        2,
        "{s}"
    );
    assert!(s.contains("snapshots left on vCenter: 0"), "{s}");
    assert!(s.contains("incremental (CBT)"), "{s}");
}
