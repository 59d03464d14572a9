//! The vSphere driver through the `ferry` binary against `ferry sim vmware` (govmomi's vcsim
//! behind Ferry's front): `vms`, full and CBT-incremental `backup --source` of a 2-disk VM in
//! san and network (nbdkit) mode with restores compared by `qemu-img`, reads limited to the
//! changed areas, a CBT reset read in full with the reason shown, a SIGKILLed backup whose
//! snapshot the next run removes, and a clear error when VDDK is missing; hot-add with its orphan
//! sweep; whole-VM restore to vSphere (config read back with pyvmomi, VMDKs compared) and across
//! hypervisors with `ferry sim xen`; dropped connections. The tests act as the guest through the
//! simulator's side door (`FerrySimGuestWrite`, `FerrySimDropNext`, … sent with curl).

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use ferry_testkit::Killed;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

#[path = "common/cli.rs"]
mod cli;
#[path = "common/vsphere_lab.rs"]
mod vsphere_lab;
#[path = "common/xen_probe.rs"]
mod xen_probe;
use xen_probe::macs;

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
        let (sim, info) = vsphere_lab::start_sim(ferry(), &dir.path().join("sim"));
        let pw = dir.path().join("vc.pw");
        std::fs::write(&pw, info["password"].as_str().unwrap()).unwrap();
        // The hot-add proxy: a VM with one disk (the 2-disk one is backed up).
        let proxy = info["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["disks"].as_array().unwrap().len() == 1)
            .expect("a 1-disk VM")["name"]
            .as_str()
            .unwrap()
            .to_string();
        let extra = extra.replace("{proxy-vm}", &proxy).replace(
            "{hotadd-device-dir}",
            info["hotadd_device_dir"].as_str().unwrap(),
        );
        let t = vsphere_lab::source_toml_with(
            "lab",
            &info,
            &pw,
            &dir.path().join("state"),
            transports,
            &extra,
        );
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

    /// The simulator's VM with two disks: (name, moref, [(device key, live file)]), in
    /// scsi0:0, scsi0:1 order (the seeded 1 MiB disk, then the 8 MiB one the simulator added).
    fn vm(&self) -> (String, String, Vec<(i64, PathBuf)>) {
        vsphere_lab::two_disk_vm(&self.info)
    }

    /// A vim25 call of the simulator's side door.
    fn side_door(&self, method: &str, body: &str) -> String {
        vsphere_lab::side_door(&self.info, method, body)
    }

    fn guest_write(&self, moref: &str, key: i64, offset: u64, data: &[u8]) {
        vsphere_lab::guest_write(&self.info, moref, key, offset, data);
    }

    fn snapshots_on_vcenter(&self) -> u64 {
        vsphere_lab::snapshot_count(&self.info)
    }

    fn copy_disks(&self, label: &str) -> Vec<PathBuf> {
        vsphere_lab::copy_live_disks(&self.vm().2, self.dir.path(), label)
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
    /// The guest fills 6 MiB of the second disk with noise, so a throttled backup reads for a while.
    fn fill_second_disk(&self) {
        let (_, moref, disks) = self.vm();
        for i in 0..6u64 {
            self.guest_write(
                &moref,
                disks[1].0,
                i << 20,
                &ferry_testkit::noise(1 << 20, i),
            );
        }
    }

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
        cli::wait_for_stderr(&mut child, "backing up disk");
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
    lab.fill_second_disk();
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
    assert!(
        s.contains("whole-VM restore to vCenter") && s.contains("disks identical to the VM"),
        "{s}"
    );
}

impl Lab {
    /// What VMware's own SDK (pyvmomi) reports of the VMs `names` (null: no such VM).
    fn probe(&self, names: &[&str]) -> Value {
        vsphere_lab::probe(&self.info, names)
    }

    /// The local file of a datastore path through the simulator's datastore directories.
    fn datastore_file(&self, file: &str) -> PathBuf {
        vsphere_lab::datastore_file(&self.info, file)
    }
}

/// The parts of a VM's configuration a restore must carry over (not its identity: uuid, files).
fn machine(vm: &Value) -> Value {
    let disks: Vec<Value> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::json!([d["position"], d["capacity"]]))
        .collect();
    let nics: Vec<Value> = vm["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| serde_json::json!([n["type"], n["mac"], n["network"]]))
        .collect();
    serde_json::json!({"cpus": vm["cpus"], "memory_mb": vm["memory_mb"], "firmware": vm["firmware"],
        "guest_id": vm["guest_id"], "disks": disks, "nics": nics})
}

#[test]
fn restore_to_vsphere_creates_the_vm_and_removes_failed_and_killed_ones() {
    let lab = Lab::start("[\"network\"]", "nbdkit-stand-in = \"file\"");
    let (name, _, _) = lab.vm();
    let expected = lab.copy_disks("orig");
    let (b, _) = lab.backup(&["--vm", &name]);
    let id = b["snapshot"].as_str().unwrap();

    let (out, err) = lab.ok(&["restore", id, "--to-source", "lab", "--name", "restored"]);
    let p = lab.probe(&[&name, "restored"]);
    let (orig, copy) = (&p[name.as_str()], &p["restored"]);
    assert!(copy.is_object(), "no restored VM: {p}\n{err}");
    assert_eq!(out.trim(), copy["uuid"], "{err}");
    assert_ne!(copy["uuid"], orig["uuid"]);
    assert_eq!(machine(copy), machine(orig), "{p}");
    assert!(!orig["nics"].as_array().unwrap().is_empty(), "{orig}");
    assert_eq!(copy["power"], "poweredOff");
    assert!(err.contains("via network (nbdkit file stand-in)"), "{err}");
    // The restored VM's own disks (descriptor + flat extent on the datastore) hold the data.
    let files: Vec<&Value> = copy["disks"].as_array().unwrap().iter().collect();
    assert_eq!(files.len(), expected.len());
    for (d, want) in files.iter().zip(&expected) {
        let desc = lab.datastore_file(d["file"].as_str().unwrap());
        ferry_testkit::qemu_img_compare(&desc, "vmdk", want, "raw");
    }

    // A restore that fails at its last step (power-on) destroys the VM it created.
    lab.side_door(
        "FerrySimFailNext",
        "<method>PowerOnVM_Task</method><fault>InsufficientResourcesFault</fault><count>1</count>",
    );
    let o = lab.run(&[
        "restore",
        id,
        "--to-source",
        "lab",
        "--name",
        "broken",
        "--power-on",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("InsufficientResourcesFault") && err.contains("destroying the partial VM"),
        "{err}"
    );
    assert!(lab.probe(&["broken"])["broken"].is_null());

    // SIGKILL once the VM exists: the next sweep destroys the partial VM.
    let mut child = ferry()
        .args([
            "-v",
            "restore",
            id,
            "--to-source",
            "lab",
            "--name",
            "killed",
        ])
        .envs(lab.env())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cli::wait_for_stderr(&mut child, "VM created; writing its disks");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(lab.probe(&["killed"])["killed"].is_object());
    let (out, _) = lab.ok(&["source", "cleanup", "--source", "lab", "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["partial-vms"], 1, "{report}");
    assert!(lab.probe(&["killed"])["killed"].is_null());
    let ds = PathBuf::from(lab.info["san_paths"]["LocalDS_0"].as_str().unwrap());
    assert!(!ds.join("broken/broken-flat.vmdk").exists());
}

#[test]
fn cross_hypervisor_restores_between_vsphere_and_xen() {
    let lab = Lab::start("[\"san\"]", "nbdkit-stand-in = \"file\"");
    // The Xen simulator as a second source of the same ferry.toml.
    let (_xen, xen) = Killed::spawn_json_line(
        ferry()
            .args(["sim", "xen", "--listen", "127.0.0.1:0", "--disk-mib", "4"])
            .arg("--dir")
            .arg(lab.path("xen-sim")),
    );
    let pw = lab.path("xen.pw");
    std::fs::write(&pw, xen["password"].as_str().unwrap()).unwrap();
    let mut t = std::fs::read_to_string(lab.path("ferry.toml")).unwrap();
    t.push_str(&format!(
        "[sources.xen]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\ntransports = [\"network\"]\n",
        xen["url"].as_str().unwrap(),
        xen["username"].as_str().unwrap(),
        pw.display(),
        xen["tls_fingerprint"].as_str().unwrap(),
        lab.path("state").display()
    ));
    std::fs::write(lab.path("ferry.toml"), t).unwrap();

    // vSphere → Xen.
    let (name, _, _) = lab.vm();
    let expected = lab.copy_disks("vsphere");
    let (b, _) = lab.backup(&["--vm", &name]);
    let id = b["snapshot"].as_str().unwrap();
    let (_, err) = lab.ok(&[
        "restore",
        id,
        "--to-source",
        "xen",
        "--name",
        "from-vsphere",
    ]);
    let orig = lab.probe(&[&name])[name.as_str()].clone();
    let mut xp = xen_probe::Probe::start(&xen);
    let x = &xp.assert_disks("from-vsphere", &expected, lab.dir.path());
    assert_eq!(
        x["VCPUs_max"].to_string().trim_matches('"'),
        orig["cpus"].to_string()
    );
    assert_eq!(
        x["memory_static_max"].to_string().trim_matches('"'),
        (orig["memory_mb"].as_u64().unwrap() << 20).to_string()
    );
    assert_eq!(macs(x, "vifs", "MAC"), macs(&orig, "nics", "mac"), "{x}");
    for w in [
        "position `scsi0:0` does not exist on Xen; attached as device 0",
        "is not kept (the pool picks the emulated model)",
        "does not exist in this pool",
    ] {
        assert!(err.contains(w), "no warning `{w}`: {err}");
    }

    // Xen → vSphere.
    let web = &xp.vm("debian-web");
    let xen_disks = xp.export_disks("debian-web", lab.dir.path(), "web");
    let (out, _) = lab.ok(&["backup", "--source", "xen", "--vm", "debian-web", "--json"]);
    let r: Value = serde_json::from_str(&out).unwrap();
    let xid = r[0]["snapshot"].as_str().unwrap();
    let (_, err) = lab.ok(&["restore", xid, "--to-source", "lab", "--name", "from-xen"]);
    let v = lab.probe(&["from-xen"])["from-xen"].clone();
    assert!(v.is_object(), "{err}");
    assert_eq!(
        v["cpus"].to_string(),
        web["VCPUs_max"].to_string().trim_matches('"')
    );
    assert_eq!(
        (v["memory_mb"].as_u64().unwrap() << 20).to_string(),
        web["memory_static_max"].to_string().trim_matches('"')
    );
    assert_eq!(macs(&v, "nics", "mac"), macs(web, "vifs", "MAC"), "{v}");
    let vdisks = v["disks"].as_array().unwrap();
    assert_eq!(vdisks.len(), xen_disks.len(), "{v}");
    for (i, (d, want)) in vdisks.iter().zip(&xen_disks).enumerate() {
        assert_eq!(d["position"], format!("scsi0:{i}"), "{v}");
        let desc = lab.datastore_file(d["file"].as_str().unwrap());
        ferry_testkit::qemu_img_compare(&desc, "vmdk", want, "raw");
    }
    assert!(
        err.contains("does not exist on vSphere; attached at scsi0:0"),
        "{err}"
    );
}

#[test]
fn hotadd_full_incremental_and_a_killed_backup_leaves_no_attachment() {
    let lab = full_then_incremental(
        "[\"hotadd\"]",
        "proxy-vm = \"{proxy-vm}\"\nhotadd-device-dir = \"{hotadd-device-dir}\"",
        "hotadd",
    );
    let dev_dir = PathBuf::from(lab.info["hotadd_device_dir"].as_str().unwrap());
    let devices = || std::fs::read_dir(&dev_dir).unwrap().count();
    assert_eq!(devices(), 0, "every hot-added disk is detached");
    let proxy = std::fs::read_to_string(lab.path("ferry.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("proxy-vm = \"")
                .map(|p| p.trim_end_matches('"').to_string())
        })
        .unwrap();
    let proxy_disks = || {
        lab.probe(&[&proxy])[proxy.as_str()]["disks"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(proxy_disks(), 1, "the proxy holds only its own disk");

    // SIGKILL while reading: both disks stay on the proxy until the sweep detaches them.
    let (name, _, _) = lab.vm();
    lab.fill_second_disk();
    lab.kill_mid_backup(&name);
    assert_eq!(devices(), 2);
    assert_eq!(proxy_disks(), 3);
    let (out, _) = lab.ok(&["source", "cleanup", "--source", "lab", "--json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["attachments"], 2, "{report}");
    assert_eq!(report["snapshots"], 1, "{report}");
    assert_eq!(devices(), 0);
    assert_eq!(proxy_disks(), 1);
    assert_eq!(lab.snapshots_on_vcenter(), 0);
    // Killed again: the next backup's sweep detaches them before it attaches its own.
    lab.kill_mid_backup(&name);
    assert_eq!(devices(), 2);
    let expected = lab.copy_disks("after-kill");
    let (r, err) = lab.backup(&["--vm", &name]);
    assert!(
        err.contains("detached a disk a killed backup left on the proxy"),
        "{err}"
    );
    assert_eq!(devices(), 0);
    assert_eq!(proxy_disks(), 1);
    lab.assert_restores(
        r["snapshot"].as_str().unwrap(),
        &["scsi0:0", "scsi0:1"],
        &expected,
    );
}

#[test]
fn dropped_connections_retry_reads_and_a_lost_snapshot_answer_is_swept() {
    let lab = Lab::start("[\"san\"]", "");
    let (name, _, _) = lab.vm();
    let drop_next = |method: &str, phase: &str, count: u32| {
        lab.side_door(
            "FerrySimDropNext",
            &format!("<method>{method}</method><phase>{phase}</phase><count>{count}</count>"),
        );
    };
    drop_next("RetrievePropertiesEx", "response", 2);
    drop_next("QueryChangedDiskAreas", "request", 1);
    let (r, err) = lab.backup(&["--vm", &name]);
    assert_eq!(r["disks"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(
        err.matches("failed in transit; retrying").count(),
        3,
        "{err}"
    );
    assert_eq!(lab.snapshots_on_vcenter(), 0);

    // A lost CreateSnapshot_Task answer is not retried (the snapshot may exist): a clear error,
    // and the snapshot it made is removed by the next run.
    drop_next("CreateSnapshot_Task", "response", 1);
    let o = lab.run(&["backup", "--source", "lab", "--vm", &name]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("CreateSnapshot_Task"), "{err}");
    assert!(
        !err.contains("CreateSnapshot_Task failed in transit; retrying"),
        "{err}"
    );
    assert_eq!(lab.snapshots_on_vcenter(), 1);
    let (_, err) = lab.backup(&["--vm", &name]);
    assert!(err.contains("leftover"), "{err}");
    assert_eq!(lab.snapshots_on_vcenter(), 0);
}

#[test]
fn the_inventory_names_each_vms_cluster_as_pyvmomi_reads_it() {
    let lab = Lab::start("[\"san\"]", "");
    let (out, err) = lab.ok(&["vms", "--source", "lab", "--json"]);
    let vms: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    let vms = vms.as_array().unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    let p = lab.probe(&names);
    for v in vms {
        let want = &p[v["name"].as_str().unwrap()]["cluster"];
        assert_eq!(&v["cluster"], want, "{v}\npyvmomi: {p}");
    }
    // vcsim's model has both: VMs in cluster DC0_C0 and VMs on the standalone host.
    assert!(vms.iter().any(|v| v["cluster"] == "DC0_C0"), "{out}");
    assert!(vms.iter().any(|v| v["cluster"].is_null()), "{out}");
}
