//! The Xen driver through the `ferry` binary against `ferry sim xen`: `vms`, full and
//! incremental `backup --source` in each transport mode with restores compared by `qemu-img`,
//! failed and SIGKILLed backups, a CBT reset, several VMs at once, and whole-VM restores to the
//! same and to another pool. What is left on the pool is checked after every backup through
//! the official Python XenAPI SDK (`tests/xen_probe.py`), which is also how the tests act as
//! the guest and inject faults (the simulator's `sim.*` side door).

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use ferry_testkit::Killed;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const PASSWORD: &str = "test password";
/// The repository's chunk size: 4 CBT blocks.
const CHUNK: u64 = 256 << 10;
const CBT_BLOCK: u64 = 64 << 10;

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("RUST_LOG").env("FERRY_PASSWORD", PASSWORD);
    c
}

/// `ferry sim xen` on a free port; its JSON line.
fn start_sim(dir: &Path) -> (Killed, Value) {
    xen_probe::start_sim(ferry(), dir)
}

/// A `[sources.NAME]` table for the simulator described by `info`.
fn source_toml(name: &str, info: &Value, pw: &Path, state: &Path, transports: &[&str]) -> String {
    let mut t = format!(
        "[sources.{name}]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nproxy-vm = \"{}\"\nhotadd-device-dir = \"{}\"\nstate-dir = \"{}\"\n",
        info["url"].as_str().unwrap(),
        info["username"].as_str().unwrap(),
        pw.display(),
        info["tls_fingerprint"].as_str().unwrap(),
        info["proxy_vm"].as_str().unwrap(),
        info["hotadd_device_dir"].as_str().unwrap(),
        state.display()
    );
    if !transports.is_empty() {
        let t2: Vec<String> = transports.iter().map(|m| format!("\"{m}\"")).collect();
        t.push_str(&format!("transports = [{}]\n", t2.join(", ")));
    }
    t.push_str(&format!("[sources.{name}.san-paths]\n"));
    for (uuid, path) in info["san_paths"].as_object().unwrap() {
        t.push_str(&format!("\"{uuid}\" = \"{}\"\n", path.as_str().unwrap()));
    }
    t
}

#[path = "common/cli.rs"]
mod cli;

#[path = "common/xen_probe.rs"]
mod xen_probe;
use xen_probe::Probe;

/// A simulator, its probe, a repository and a `ferry.toml`.
struct Lab {
    dir: tempfile::TempDir,
    info: Value,
    probe: Probe,
    _sim: Killed,
}

impl Lab {
    fn start(transports: &[&str]) -> Self {
        let dir = ferry_testkit::scratch_dir();
        let (sim, info) = start_sim(&dir.path().join("sim"));
        let pw = dir.path().join("xen.pw");
        std::fs::write(&pw, info["password"].as_str().unwrap()).unwrap();
        std::fs::write(
            dir.path().join("ferry.toml"),
            source_toml("lab", &info, &pw, &dir.path().join("state"), transports),
        )
        .unwrap();
        init_repo(&dir.path().join("repo"));
        let probe = Probe::start(&info);
        Self {
            dir,
            info,
            probe,
            _sim: sim,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn ferry(&self) -> Command {
        let mut c = ferry();
        c.env("FERRY_REPO", self.path("repo"))
            .env("FERRY_CONFIG", self.path("ferry.toml"));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let env = [
            ("FERRY_PASSWORD", PASSWORD.to_string()),
            ("FERRY_REPO", self.path("repo").display().to_string()),
            (
                "FERRY_CONFIG",
                self.path("ferry.toml").display().to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v));
        ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &env)
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        assert!(out.status.success(), "ferry {args:?} failed");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    /// `ferry backup --source lab --json ARGS`: the one VM's report and stderr.
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

    fn snapshots(&self) -> usize {
        let (out, _) = self.ok(&["snapshots", "--json"]);
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    }

    /// Restores every disk of `snapshot` and compares each with `expected` (qemu-img).
    fn assert_restores(&self, snapshot: &str, expected: &[PathBuf]) {
        for (i, want) in expected.iter().enumerate() {
            let disk = format!("xvd{}", (b'a' + i as u8) as char);
            let out = self.path(&format!("restored-{snapshot}-{disk}.raw"));
            self.ok(&[
                "restore",
                snapshot,
                "--disk",
                &disk,
                "--to",
                out.to_str().unwrap(),
            ]);
            assert_same(&out, want);
        }
    }
}

impl Lab {
    /// A throttled full backup of `debian-web`, returned once the engine reads its disks.
    fn throttled_backup_reading(&self) -> Child {
        let mut child = self
            .ferry()
            // -v: the engine's info event says when it starts reading.
            .args([
                "-v",
                "backup",
                "--source",
                "lab",
                "--vm",
                "debian-web",
                "--full",
                "--limit-rate",
                "1M",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        cli::wait_for_stderr(&mut child, "backing up disk");
        std::thread::sleep(Duration::from_millis(300));
        child
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

/// Same size and, per `qemu-img compare`, the same content.
fn assert_same(a: &Path, b: &Path) {
    assert_eq!(
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    ferry_testkit::qemu_img_compare(a, "raw", b, "raw");
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

/// The repository chunks that byte ranges touch.
fn chunks_touched(ranges: &[(u64, u64)]) -> u64 {
    let mut set = std::collections::BTreeSet::new();
    for (off, len) in ranges {
        for c in off / CHUNK..=(off + len - 1) / CHUNK {
            set.insert(c);
        }
    }
    set.len() as u64
}

/// The CBT blocks that byte ranges touch, in bytes.
fn cbt_bytes(ranges: &[(u64, u64)]) -> u64 {
    let mut set = std::collections::BTreeSet::new();
    for (off, len) in ranges {
        for b in off / CBT_BLOCK..=(off + len - 1) / CBT_BLOCK {
            set.insert(b);
        }
    }
    set.len() as u64 * CBT_BLOCK
}

/// A full then an incremental backup of the 2-disk VM `debian-web` with only `mode` allowed;
/// returns the lab with the VM's disk uuids.
fn full_then_incremental(mode: &str) -> (Lab, Vec<String>) {
    let mut lab = Lab::start(&[mode]);
    let web = lab.probe.vm("debian-web");
    let vdis = lab.probe.disk_uuids("debian-web");
    assert_eq!(vdis.len(), 2);

    // Full: both disks read in full, with the reason, through `mode`.
    let full_disks = lab.probe.export_disks("debian-web", lab.dir.path(), "full");
    let (full, _) = lab.backup(&["--vm", "debian-web"]);
    assert_eq!(full["vm_name"], "debian-web");
    assert_eq!(full["vm"], web["uuid"]);
    assert_eq!(full["consistency"], "crash");
    assert!(
        full["transport"].as_str().unwrap().starts_with(mode),
        "{full}"
    );
    for name in ["xvda", "xvdb"] {
        let d = disk(&full, name);
        assert_eq!(d["transport"], mode, "{d}");
        assert_eq!(d["mode"], "full", "{d}");
        assert!(
            d["full_reason"]
                .as_str()
                .unwrap()
                .contains("CBT was not enabled"),
            "{d}"
        );
        assert_eq!(n(&d["read_bytes"]) + n(&d["hole_bytes"]), n(&d["size"]));
        // The driver's source saw exactly the data read plus the swap/pagefile probe.
        assert_eq!(
            n(&d["source_read_bytes"]),
            n(&d["read_bytes"]) + n(&d["probe_bytes"]),
            "{d}"
        );
        assert!(n(&d["read_bytes"]) > 0);
    }
    lab.probe
        .assert_clean(2, &format!("the full {mode} backup"));
    let full_id = full["snapshot"].as_str().unwrap().to_string();
    lab.assert_restores(&full_id, &full_disks);

    // The guest writes; the incremental reads only the chunks CBT reports changed.
    let writes: [Vec<(u64, Vec<u8>)>; 2] = [
        vec![
            (5 * CBT_BLOCK + 7, b"changed after the full backup".to_vec()),
            (40 * CBT_BLOCK - 10, vec![0xEE; 20]),
        ],
        vec![(0, vec![0xAB; 3 * CBT_BLOCK as usize])],
    ];
    for (vdi, ws) in vdis.iter().zip(&writes) {
        for (off, data) in ws {
            lab.probe.guest_write(vdi, *off, data);
        }
    }
    let incr_disks = lab.probe.export_disks("debian-web", lab.dir.path(), "incr");
    let (incr, _) = lab.backup(&["--vm", "debian-web", "--verify-sample", "0"]);
    assert_eq!(incr["previous"], full_id.as_str());
    for (name, ws) in ["xvda", "xvdb"].iter().zip(&writes) {
        let d = disk(&incr, name);
        let ranges: Vec<(u64, u64)> = ws.iter().map(|(o, b)| (*o, b.len() as u64)).collect();
        assert_eq!(d["mode"], "changed-blocks", "{d}");
        assert_eq!(d["full_reason"], Value::Null, "{d}");
        assert_eq!(n(&d["cbt_changed_bytes"]), cbt_bytes(&ranges), "{d}");
        let touched = chunks_touched(&ranges) * CHUNK;
        assert_eq!(n(&d["unchanged_bytes"]), n(&d["size"]) - touched, "{d}");
        let data = n(&d["source_read_bytes"]) - n(&d["probe_bytes"]);
        assert!(
            data > 0 && data <= touched,
            "{mode} {name}: read {data} from the source, CBT touched {touched} bytes of chunks: {d}"
        );
        // The driver's source saw exactly the data read plus the swap/pagefile probe.
        assert_eq!(
            n(&d["source_read_bytes"]),
            n(&d["read_bytes"]) + n(&d["probe_bytes"]),
            "{d}"
        );
    }
    lab.probe
        .assert_clean(2, &format!("the incremental {mode} backup"));
    lab.assert_restores(incr["snapshot"].as_str().unwrap(), &incr_disks);
    (lab, vdis)
}

#[test]
fn network_full_then_incremental_and_a_transfer_that_dies() {
    let (mut lab, vdis) = full_then_incremental("network");
    let before = lab.snapshots();
    // Every NBD connection now dies after 64 KiB: no 256 KiB chunk can arrive, so the backup
    // fails mid-transfer after the client's retries.
    lab.probe.guest_write(&vdis[0], 0, &[0x42; 4096]);
    lab.probe.sim("set_nbd_drop_after", json!(["65536"]));
    let out = lab.run(&["backup", "--source", "lab", "--vm", "debian-web"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("debian-web") && err.contains("no restore point was written"),
        "{err}"
    );
    assert_eq!(
        lab.snapshots(),
        before,
        "a failed backup must not be visible"
    );
    lab.probe
        .assert_clean(2, "a backup whose NBD transfer died");
    // The anchors of the last good restore point survived: the next backup is incremental.
    lab.probe.sim("set_nbd_drop_after", json!(["-1"]));
    let expected = lab
        .probe
        .export_disks("debian-web", lab.dir.path(), "after");
    let (r, _) = lab.backup(&["--vm", "debian-web"]);
    assert_eq!(disk(&r, "xvda")["mode"], "changed-blocks", "{r}");
    assert_eq!(n(&disk(&r, "xvda")["cbt_changed_bytes"]), CBT_BLOCK);
    lab.probe.assert_clean(2, "the backup after the failed one");
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
}

#[test]
fn hotadd_full_then_incremental_and_sigkill_mid_transfer() {
    let (mut lab, vdis) = full_then_incremental("hotadd");
    let before = lab.snapshots();
    lab.probe.guest_write(&vdis[1], 2 * CHUNK, &[0x17; 8192]);
    let mut child = lab.throttled_backup_reading();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let l = lab.probe.ask(json!({"op": "leftovers"}));
    assert_eq!(
        l["snapshot_vms"].as_array().unwrap().len(),
        1,
        "the kill should land mid-backup: {l}"
    );
    assert_eq!(l["proxy_vbds"].as_array().unwrap().len(), 2, "{l}");
    assert_eq!(
        lab.snapshots(),
        before,
        "a killed backup must not be visible"
    );
    // The re-run removes what the killed one left and is still incremental.
    let expected = lab
        .probe
        .export_disks("debian-web", lab.dir.path(), "rerun");
    let (r, err) = lab.backup(&["--vm", "debian-web"]);
    assert!(
        err.contains("removed leftovers of an interrupted backup"),
        "{err}"
    );
    assert_eq!(disk(&r, "xvdb")["mode"], "changed-blocks", "{r}");
    assert_eq!(lab.snapshots(), before + 1);
    lab.probe.assert_clean(2, "the re-run after SIGKILL");
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);
    let dev = PathBuf::from(lab.info["hotadd_device_dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_dir(&dev).map(|d| d.count()).unwrap_or(0),
        0,
        "hot-add devices left in {}",
        dev.display()
    );
}

#[test]
fn san_full_then_incremental_an_api_failure_and_ctrl_c() {
    let (mut lab, _) = full_then_incremental("san");
    let before = lab.snapshots();
    // The API fails right after the snapshot was taken: the driver removes it.
    lab.probe.sim(
        "fail_next",
        json!([
            "VM.add_to_other_config",
            ["SR_BACKEND_FAILURE", "", "", "injected by the test"],
            "1"
        ]),
    );
    let out = lab.run(&["backup", "--source", "lab", "--vm", "debian-web"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("injected by the test"), "{err}");
    assert_eq!(lab.snapshots(), before);
    lab.probe.assert_clean(2, "a backup failed by the API");

    // Ctrl-C (here SIGTERM) mid-transfer: exit 130, no restore point, the snapshot removed.
    let mut child = lab.throttled_backup_reading();
    ferry_testkit::run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    assert_eq!(
        lab.snapshots(),
        before,
        "a cancelled backup must not be visible"
    );
    lab.probe.assert_clean(2, "a cancelled backup");
}

#[test]
fn cbt_reset_means_a_logged_full_read_and_several_vms_run_despite_one_failure() {
    // Default transports: SAN first, which the proxy can use here.
    let mut lab = Lab::start(&[]);
    let vdis = lab.probe.disk_uuids("win-db");
    let (full, _) = lab.backup(&["--vm", "win-db"]);
    assert_eq!(disk(&full, "xvda")["transport"], "san");
    lab.probe.assert_clean(2, "the full backup");

    lab.probe
        .guest_write(&vdis[0], 3 * CBT_BLOCK, b"written after the full");
    lab.probe
        .guest_write(&vdis[1], CBT_BLOCK, b"written before the reset");
    lab.probe.sim("break_cbt", json!([vdis[1]]));
    let expected = lab.probe.export_disks("win-db", lab.dir.path(), "reset");
    let (r, err) = lab.backup(&["--vm", "win-db"]);
    assert_eq!(disk(&r, "xvda")["mode"], "changed-blocks", "{r}");
    let b = disk(&r, "xvdb");
    assert_eq!(b["mode"], "full", "{b}");
    assert!(b["full_reason"].as_str().unwrap().contains("CBT"), "{b}");
    assert_eq!(n(&b["unchanged_bytes"]), 0, "{b}");
    assert_eq!(
        n(&b["read_bytes"]) + n(&b["hole_bytes"]),
        n(&b["size"]),
        "{b}"
    );
    assert!(
        err.lines().any(|l| l.starts_with("warning: ")
            && l.contains("FULL backup of the disk")
            && l.contains("win-db/xvdb")
            && l.contains("CBT")),
        "the full read is not logged as such:\n{err}"
    );
    // The anchor CBT could no longer use is gone too: only the new ones remain.
    lab.probe.assert_clean(2, "the backup after a CBT reset");
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);

    // Several VMs: one unknown VM fails, the others still get their restore points.
    let before = lab.snapshots();
    let out = lab.run(&[
        "backup",
        "--source",
        "lab",
        "--vm",
        "win-db",
        "--vm",
        "no-such-vm",
        "--vm",
        "debian-web",
    ]);
    assert!(!out.status.success());
    let ids = String::from_utf8(out.stdout).unwrap();
    assert_eq!(ids.lines().count(), 2, "{ids}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-vm") && err.contains("1 of 3"),
        "{err}"
    );
    assert_eq!(lab.snapshots(), before + 2);
    lab.probe.assert_clean(4, "backing up two VMs");
}

#[test]
fn cbt_that_misses_a_write_is_caught_and_distrusted_until_a_fresh_full() {
    let mut lab = Lab::start(&["network"]);
    let web = lab.probe.vm("debian-web");
    let vdi = web["disks"][0]["uuid"].as_str().unwrap().to_string();
    lab.backup(&["--vm", "debian-web"]);
    // CBT records one write and misses another (a hypervisor bug): verifying every unchanged
    // chunk must catch it, and this restore point must still be right.
    lab.probe.guest_write(&vdi, 0, b"tracked");
    let missed = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([0x99u8; 4096])
    };
    lab.probe.sim(
        "untracked_write",
        json!([vdi, (10 * CHUNK).to_string(), missed]),
    );
    let expected = lab.probe.export_disks("debian-web", lab.dir.path(), "lie");
    let (r, err) = lab.backup(&["--vm", "debian-web", "--verify-sample", "100"]);
    assert_eq!(r["cbt_mismatch"], true, "{r}");
    let a = disk(&r, "xvda");
    assert_eq!(a["mode"], "full-cbt-distrusted", "{a}");
    assert!(
        a["full_reason"]
            .as_str()
            .unwrap()
            .contains("failed verification"),
        "{a}"
    );
    assert!(err.contains("CHANGE TRACKING IS BROKEN"), "{err}");
    assert_eq!(disk(&r, "xvdb")["mode"], "changed-blocks");
    lab.probe.assert_clean(2, "a backup that caught broken CBT");
    lab.assert_restores(r["snapshot"].as_str().unwrap(), &expected);

    // The next backup reads that disk in full again, saying why, and replaces its anchor.
    let (r, err) = lab.backup(&["--vm", "debian-web"]);
    let a = disk(&r, "xvda");
    assert_eq!(a["mode"], "full-cbt-distrusted", "{a}");
    assert!(
        a["full_reason"]
            .as_str()
            .unwrap()
            .contains("previous restore point"),
        "{a}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("warning: ") && l.contains("FULL read of the disk")),
        "{err}"
    );
    lab.probe.assert_clean(2, "the backup after broken CBT");
    // Then change tracking is trusted again.
    let (r, _) = lab.backup(&["--vm", "debian-web"]);
    assert_eq!(disk(&r, "xvda")["mode"], "changed-blocks", "{r}");
    lab.probe.assert_clean(2, "the backup after the fresh full");
}

/// The record fields a restore must carry over.
fn machine(v: &Value) -> Value {
    let mut m = json!({});
    for k in [
        "VCPUs_max",
        "VCPUs_at_startup",
        "memory_static_max",
        "memory_static_min",
        "memory_dynamic_max",
        "memory_dynamic_min",
        "HVM_boot_policy",
        "HVM_boot_params",
        "platform",
    ] {
        m[k] = v[k].clone();
    }
    m["disks"] = json!(
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| json!([d["userdevice"], d["bootable"], d["virtual_size"]]))
            .collect::<Vec<_>>()
    );
    m["vifs"] = json!(
        v["vifs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| json!([x["device"], x["MAC"], x["MTU"], x["network"]]))
            .collect::<Vec<_>>()
    );
    m
}

#[test]
fn whole_vm_restore_to_the_same_and_another_pool_matches_the_original() {
    let mut lab = Lab::start(&["network"]);
    let original = lab.probe.vm("debian-web");
    let disks = lab.probe.export_disks("debian-web", lab.dir.path(), "orig");
    let (b, _) = lab.backup(&["--vm", "debian-web"]);
    let id = b["snapshot"].as_str().unwrap();

    let (out, err) = lab.ok(&["restore", id, "--to-source", "lab", "--name", "web-copy"]);
    let copy = lab.probe.vm("web-copy");
    assert_eq!(out.trim(), copy["uuid"], "{err}");
    assert_ne!(copy["uuid"], original["uuid"]);
    assert_eq!(machine(&copy), machine(&original));
    assert_eq!(copy["power_state"], "Halted");
    let got = lab.probe.export_disks("web-copy", lab.dir.path(), "copy");
    for (g, w) in got.iter().zip(&disks) {
        assert_same(g, w);
    }
    lab.probe.assert_clean(2, "a restore");

    // A restore that fails half-way leaves no VM and no disk behind.
    let vdis_before = lab.probe.ask(json!({"op": "vdis"}));
    lab.probe.sim(
        "fail_next",
        json!([
            "VIF.create",
            ["INTERNAL_ERROR", "injected by the test"],
            "1"
        ]),
    );
    let o = lab.run(&["restore", id, "--to-source", "lab", "--name", "broken"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("injected by the test"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(lab.probe.ask(json!({"op": "vdis"})), vdis_before);
    let names = lab.probe.ask(json!({"op": "vm_names"}));
    assert!(
        !names.as_array().unwrap().iter().any(|n| n == "broken"),
        "{names}"
    );

    // Another pool (another source in ferry.toml): the native record applies, the VM is started.
    let (_other_sim, other) = start_sim(&lab.path("other-sim"));
    let pw = lab.path("other.pw");
    std::fs::write(&pw, other["password"].as_str().unwrap()).unwrap();
    let mut cfg = std::fs::read_to_string(lab.path("ferry.toml")).unwrap();
    cfg.push_str(&source_toml(
        "other",
        &other,
        &pw,
        &lab.path("state"),
        &["network"],
    ));
    std::fs::write(lab.path("ferry.toml"), cfg).unwrap();
    let (out, _) = lab.ok(&[
        "restore",
        "debian-web@latest",
        "--to-source",
        "other",
        "--name",
        "web-elsewhere",
        "--power-on",
        "--json",
    ]);
    let r: Value = serde_json::from_str(&out).unwrap();
    let mut probe2 = Probe::start(&other);
    let moved = probe2.vm("web-elsewhere");
    assert_eq!(r["vm"]["id"], moved["uuid"]);
    assert_eq!(machine(&moved), machine(&original));
    assert_eq!(moved["power_state"], "Running");
    let got = probe2.export_disks("web-elsewhere", lab.dir.path(), "elsewhere");
    for (g, w) in got.iter().zip(&disks) {
        assert_same(g, w);
    }
}

#[test]
fn sim_then_vms_lists_the_seeded_inventory() {
    let lab = Lab::start(&[]);
    let info = &lab.info;
    for k in ["url", "username", "password", "tls_fingerprint"] {
        assert!(
            info[k].as_str().is_some_and(|v| !v.is_empty()),
            "{k} missing: {info}"
        );
    }
    let cfg = lab.path("ferry.toml");
    let out = ferry_testkit::run_ok(
        ferry()
            .args(["vms", "--source", "lab", "--json", "--config"])
            .arg(&cfg),
    );
    let vms: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["debian-web", "ferry-proxy", "win-db"]);
    assert_eq!(vms[0]["disks"].as_array().unwrap().len(), 2);
    assert_eq!(vms[0]["power-state"], "running");
    let table = ferry_testkit::run_ok(
        ferry()
            .args(["vms", "--source", "lab"])
            .env("FERRY_CONFIG", &cfg),
    );
    assert!(
        table.starts_with("NAME") && table.contains("win-db"),
        "{table}"
    );

    // A wrong pin is refused, and the password never shows.
    let bad = std::fs::read_to_string(&cfg).unwrap().replace(
        info["tls_fingerprint"].as_str().unwrap(),
        "sha256:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00",
    );
    std::fs::write(&cfg, bad).unwrap();
    let o = ferry()
        .args(["vms", "--source", "lab", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("lab"), "{err}");
    assert!(!err.contains(info["password"].as_str().unwrap()), "{err}");
    // The message names what the host presented and what is pinned.
    assert!(
        err.contains(info["tls_fingerprint"].as_str().unwrap())
            && err.contains("sha256:00:00")
            && err.contains("does not match"),
        "{err}"
    );
    let o = ferry()
        .args(["vms", "--source", "nope", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no source `nope`"),
        "{err}"
    );
}

#[test]
fn the_control_plane_goes_through_the_environments_proxy() {
    let lab = Lab::start(&[]);
    let cfg = lab.path("ferry.toml");
    // The pool's name resolves nowhere (`.invalid`): only the proxy, which maps it to loopback,
    // can reach it. The pin still decides trust through the tunnel.
    let url = lab.info["url"].as_str().unwrap();
    let port = url.rsplit_once(':').unwrap().1;
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("url = \"{url}\""),
        &format!("url = \"https://xen-pool.invalid:{port}\""),
    );
    std::fs::write(&cfg, &text).unwrap();
    let proxy = ferry_testkit::ConnectProxy::start();
    let out = ferry_testkit::run_ok(
        ferry()
            .args(["vms", "--source", "lab", "--json", "--config"])
            .arg(&cfg)
            .env("HTTPS_PROXY", proxy.url()),
    );
    let vms: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(vms.as_array().unwrap().len(), 3, "{vms}");
    let targets = proxy.targets();
    assert!(!targets.is_empty(), "no CONNECT seen");
    assert!(
        targets
            .iter()
            .all(|t| *t == format!("xen-pool.invalid:{port}")),
        "{targets:?}"
    );

    // `proxy = "none"` ignores the environment: the name cannot be resolved, and says so.
    let none = text.replace("[sources.lab]\n", "[sources.lab]\nproxy = \"none\"\n");
    std::fs::write(&cfg, none).unwrap();
    let o = ferry()
        .args(["vms", "--source", "lab", "--config"])
        .arg(&cfg)
        .env("HTTPS_PROXY", proxy.url())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("cannot connect to xen-pool.invalid") && !err.contains("through proxy"),
        "{err}"
    );
    assert_eq!(
        proxy.targets().len(),
        targets.len(),
        "no CONNECT with proxy = none"
    );
}
