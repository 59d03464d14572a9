//! Hyper-V as a replica target through the `ferry` binary (docs/replication.md, ADR 0175): the
//! 2-disk VM `debian-web` of a `ferry sim xen` pool (`prod`) replicated to a `ferry sim hyperv`
//! host (`hv`, disks written through `san-paths`). The Xen guest writes through the pool's side
//! door; the Hyper-V side is read with pypsrp (`tests/hyperv_replica_probe.py`); the standby's
//! VHDX chains are flattened with `ferry image convert` and compared with `qemu-img compare`.

use ferry_testkit::Killed;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;
#[path = "common/replica_lab.rs"]
mod replica_lab;
#[path = "common/vsphere_lab.rs"]
mod vsphere_lab;
#[path = "common/xen_probe.rs"]
mod xen_probe;
use replica_lab::{Ferry, LabDir, PASSWORD, assert_same_disks, ferry, init_repo, password_file};
use xen_probe::Probe;

const VM: &str = "debian-web";
const STANDBY: &str = "debian-web (replica)";
const COPY: &str = "debian-web (test failover)";
const MIB: u64 = 1 << 20;

/// Xen pool `prod` with `debian-web`, Hyper-V host `hv`, a repository, `ferry.toml`, state.
struct Lab {
    dir: tempfile::TempDir,
    prod: Probe,
    hv: Value,
    _sims: (Killed, Killed),
}

impl LabDir for Lab {
    fn lab_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Lab {
    fn start() -> Self {
        let dir = ferry_testkit::scratch_dir();
        let d = dir.path();
        let (a, xen) = xen_probe::start_sim(ferry(), &d.join("prod-sim"));
        let (b, hv) = start_hv(&d.join("hv-sim"));
        let state = d.join("state");
        let mut t = xen_probe::source_toml("prod", &xen, &password_file(d, "prod", &xen), &state);
        t.push_str(&hv_source_toml("hv", &hv, d, &state));
        lab_files(d, &t);
        Self {
            prod: Probe::start(&xen),
            hv,
            dir,
            _sims: (a, b),
        }
    }

    fn probe(&self, script: &str, name: &str) -> Value {
        probe(&self.hv, script, name)
    }

    /// The replica view of VM `name`: state, notes, images, standard checkpoints.
    fn hv_vm(&self, name: &str) -> Value {
        self.probe("hyperv_replica_probe.py", name)
    }

    /// VM `name`'s configuration (NICs with their switch) as `hyperv_vm_probe.py` reads it.
    fn hv_config(&self, name: &str) -> Value {
        self.probe("hyperv_vm_probe.py", name)
    }

    /// The images `paths` (host paths) flattened to raw files by Ferry's own reader.
    fn flat(&self, paths: &[Value], label: &str) -> Vec<PathBuf> {
        flat(self.dir.path(), &self.hv, paths, label)
    }

    fn local(&self, p: &str) -> PathBuf {
        local(&self.hv, p)
    }

    /// The standby's disks now (its drives' current images, flattened).
    fn standby_disks(&self, label: &str) -> Vec<PathBuf> {
        let v = self.hv_vm(STANDBY);
        self.flat(v["disks"].as_array().unwrap(), label)
    }

    fn restored(&self, rp: &str) -> Vec<PathBuf> {
        Ferry::in_dir(self.dir.path(), PASSWORD).restored(self.dir.path(), rp, &["xvda", "xvdb"])
    }

    fn xen_disks(&mut self, label: &str) -> Vec<PathBuf> {
        let dir = self.dir.path().to_path_buf();
        self.prod.export_disks(VM, &dir, label)
    }
}

/// `[sources.NAME]` for the Hyper-V simulator `info`: writes through `san-paths` (its `C:\\`),
/// restores under `C:\\ClusterStorage\\Volume1\\Replicas`.
fn hv_source_toml(name: &str, info: &Value, dir: &Path, state: &Path) -> String {
    let san = format!(
        "[sources.{name}.san-paths]\n'C:\\' = \"{}\"\n",
        info["san_paths"]["C:\\"].as_str().unwrap()
    );
    hv_source_toml_with(name, info, dir, state, "san", &san)
}

/// `[sources.NAME]` for the Hyper-V simulator `info` with `transports = [TRANSPORT]`, then
/// `tables` (its `san-paths` or `agent` table).
fn hv_source_toml_with(
    name: &str,
    info: &Value,
    dir: &Path,
    state: &Path,
    transport: &str,
    tables: &str,
) -> String {
    format!(
        "[sources.{name}]\nkind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\ntransports = [\"{transport}\"]\nrestore-dir = 'C:\\ClusterStorage\\Volume1\\Replicas'\n{tables}",
        info["url"].as_str().unwrap(),
        info["username"].as_str().unwrap(),
        password_file(dir, name, info).display(),
        info["tls_fingerprint"].as_str().unwrap(),
        state.display(),
    )
}

/// `ferry.toml` (`toml`) and a repository in lab directory `d`.
fn lab_files(d: &Path, toml: &str) {
    std::fs::write(d.join("ferry.toml"), toml).unwrap();
    init_repo(&d.join("repo"), PASSWORD);
}

/// Replica `web` as `ferry replica status web --json` shows it.
fn status_of(lab: &Ferry) -> Value {
    serde_json::from_str::<Value>(&lab.ok(&["replica", "status", "web", "--json"])).unwrap()[0]
        .clone()
}

/// `ferry sim hyperv` (8 MiB disks) in `dir`.
fn start_hv(dir: &Path) -> (Killed, Value) {
    Killed::spawn_json_line(
        ferry()
            .args([
                "sim",
                "hyperv",
                "--listen",
                "127.0.0.1:0",
                "--disk-mib",
                "8",
            ])
            .arg("--dir")
            .arg(dir),
    )
}

/// What pypsrp reads of VM `name` on the host `hv` with `tests/SCRIPT` (null: no such VM).
fn probe(hv: &Value, script: &str, name: &str) -> Value {
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv with pypsrp) not found: run tests/peers/install.sh"
    );
    let out = ferry_testkit::run_ok(
        std::process::Command::new(python)
            .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
            .arg(hv["url"].as_str().unwrap())
            .args(["username", "password"].map(|k| hv[k].as_str().unwrap()))
            .arg(name),
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v[name].clone()
}

/// The proxy's view of host path `p` (under `C:\`) of host `hv`.
fn local(hv: &Value, p: &str) -> PathBuf {
    let rest = p.strip_prefix("C:\\").unwrap_or_else(|| panic!("{p}"));
    let mut out = PathBuf::from(hv["san_paths"]["C:\\"].as_str().unwrap());
    out.extend(rest.split('\\'));
    out
}

/// Images `paths` (host paths on `hv`) flattened to raw files in `dir` by `ferry image convert`.
fn flat(dir: &Path, hv: &Value, paths: &[Value], label: &str) -> Vec<PathBuf> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ferry::in_dir(dir, PASSWORD).image_to_raw(
                &local(hv, p.as_str().unwrap()),
                &dir.join(format!("hv-{label}-{i}.raw")),
            )
        })
        .collect()
}

/// A side-door call on the Hyper-V simulator `hv`.
fn door(hv: &Value, method: &str, params: &[(&str, &str)]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = hyperv_lab::sim_client(&rt, hv);
    let epr = ferry_hv_hyperv::cim::Epr::new("FerrySim_SideDoor", &[("Name", "sidedoor")]);
    let p: Vec<ferry_hv_hyperv::cim::Param> = params
        .iter()
        .map(|(k, v)| ferry_hv_hyperv::cim::Param::Text(k.to_string(), v.to_string()))
        .collect();
    rt.block_on(client.invoke(&epr, method, &p))
        .unwrap_or_else(|e| panic!("side door {method}: {e}"));
}

/// The names of the virtual switches of host `hv`.
fn switches(hv: &Value) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = hyperv_lab::sim_client(&rt, hv);
    rt.block_on(client.enumerate("Msvm_VirtualEthernetSwitch", None))
        .unwrap()
        .iter()
        .filter_map(|s| s.text("ElementName").map(str::to_string))
        .collect()
}

/// The shutdown requests the guest of Hyper-V VM `vm` on `hv` received (side door).
fn shutdowns_of(hv: &Value, vm: &str) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = hyperv_lab::sim_client(&rt, hv);
    let epr = ferry_hv_hyperv::cim::Epr::new("FerrySim_SideDoor", &[("Name", "sidedoor")]);
    let p = [ferry_hv_hyperv::cim::Param::Text(
        "VirtualSystem".into(),
        vm.into(),
    )];
    let out = rt
        .block_on(client.invoke(&epr, "ShutdownsOf", &p))
        .unwrap_or_else(|e| panic!("side door ShutdownsOf: {e}"));
    out.texts("Requests")
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// The guest of Hyper-V VM `vm` on `hv` writes `data` at `offset` of its disk `disk`.
fn hv_guest_write(hv: &Value, vm: &str, disk: &str, offset: u64, data: &[u8]) {
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD.encode(data);
    let offset = offset.to_string();
    door(
        hv,
        "GuestWrite",
        &[
            ("VirtualSystem", vm),
            ("Disk", disk),
            ("Offset", &offset),
            ("Data", &data),
        ],
    );
}

/// The guest of the Xen VM writes into both its disks (one 2 MiB VHDX block each).
fn xen_guest_writes(p: &mut Probe, seed: u8) {
    let disks = p.disk_uuids(VM);
    p.guest_write(&disks[0], MIB, &[seed; 70_000]);
    p.guest_write(&disks[1], 3 * MIB, &[seed.wrapping_add(1); 4096]);
}

fn point_names(v: &Value) -> Vec<String> {
    v["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn xen_to_hyperv_replica_writes_changed_blocks_into_checkpoints_and_fails_over_to_an_older_point() {
    let mut lab = Lab::start();
    let out = lab.run(&[
        "replica",
        "create",
        "web",
        "--source",
        "prod",
        "--vm",
        VM,
        "--to-source",
        "hv",
        "--keep",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The first cycle: a whole-VM restore onto the host, off, marked in its Notes, one
    // standard checkpoint; its disks are the restore point's.
    lab.ok(&["replica", "sync", "web"]);
    let first = lab.replica_status("web");
    let rp1 = first["applied"].as_str().unwrap().to_string();
    let v = lab.hv_vm(STANDBY);
    assert_eq!(v["state"], "3", "{v}");
    let notes = v["notes"].as_str().unwrap();
    assert!(notes.contains("ferry.replica.job=web"), "{v}");
    assert!(notes.contains("ferry.replica.role=standby"), "{v}");
    assert_eq!(first["standby"], v["id"], "{first}");
    assert_eq!(point_names(&v), [format!("ferry-replica web {rp1}")], "{v}");
    // The drives hold the checkpoint's new children; the checkpoint holds the restored files.
    for (cur, held) in v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["checkpoints"][0]["disks"].as_array().unwrap())
    {
        assert!(cur.as_str().unwrap().ends_with(".avhdx"), "{v}");
        assert!(held.as_str().unwrap().ends_with(".vhdx"), "{v}");
    }
    let at1 = lab.restored(&rp1);
    assert_same_disks(&lab.standby_disks("1"), &at1);
    assert_same_disks(&at1, &lab.xen_disks("prod-1"));

    // Guest writes on both disks: one 2 MiB block of each disk's .avhdx is written.
    xen_guest_writes(&mut lab.prod, 0x5a);
    lab.ok(&["replica", "sync", "web"]);
    let second = lab.replica_status("web");
    let rp2 = second["applied"].as_str().unwrap().to_string();
    assert_eq!(second["health"]["last-bytes"], 4 * MIB, "{second}");
    let at2 = lab.restored(&rp2);
    assert_same_disks(&lab.standby_disks("2"), &at2);
    assert_same_disks(&at2, &lab.xen_disks("prod-2"));
    // The older point is untouched: its images still hold rp1.
    let v = lab.hv_vm(STANDBY);
    assert_same_disks(
        &lab.flat(v["checkpoints"][0]["disks"].as_array().unwrap(), "p1"),
        &at1,
    );

    // A third cycle: `--keep 2` deletes the oldest checkpoint (the host merges its files);
    // the points left are the newer two, and the disks are rp3's.
    xen_guest_writes(&mut lab.prod, 0x77);
    lab.ok(&["replica", "sync", "web"]);
    let third = lab.replica_status("web");
    let rp3 = third["applied"].as_str().unwrap().to_string();
    let v = lab.hv_vm(STANDBY);
    assert_eq!(
        point_names(&v),
        [
            format!("ferry-replica web {rp2}"),
            format!("ferry-replica web {rp3}")
        ],
        "{v}"
    );
    let ids: Vec<&str> = third["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    let on_host: Vec<&str> = v["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, on_host, "{third}");
    let at3 = lab.restored(&rp3);
    assert_same_disks(&lab.standby_disks("3"), &at3);
    assert_same_disks(
        &lab.flat(v["checkpoints"][0]["disks"].as_array().unwrap(), "p2"),
        &at2,
    );

    // A test failover copy of the older point: a new VM with that point's disks and its
    // adapters on a private switch, running, while the standby stays off and unchanged; cleanup
    // removes it with its folder.
    let before = lab.standby_disks("before-test");
    lab.ok(&["replica", "test", "web", "--point", &rp2]);
    let copies = lab.hv_vm(COPY);
    assert_eq!(copies["state"], "2", "{copies}");
    assert_eq!(lab.replica_status("web")["test-vm"], copies["id"]);
    assert!(
        copies["notes"]
            .as_str()
            .unwrap()
            .contains("ferry.replica.role=test"),
        "{copies}"
    );
    assert_same_disks(&lab.flat(copies["disks"].as_array().unwrap(), "copy"), &at2);
    let probe = lab.hv_config(COPY);
    let nics = probe["nics"].as_array().unwrap();
    assert!(!nics.is_empty(), "{probe}");
    // On the new private switch `<copy> (isolated)` (ADR 0187).
    let isolated = format!("{COPY} (isolated)");
    assert!(
        nics.iter().all(|n| n["switch"] == isolated.as_str()),
        "{probe}"
    );
    assert!(switches(&lab.hv).contains(&isolated));
    assert_eq!(lab.hv_vm(STANDBY)["state"], "3");
    assert_same_disks(&lab.standby_disks("during-test"), &before);
    let folder = lab.local(copies["folder"].as_str().unwrap());
    assert!(folder.exists());
    lab.ok(&["replica", "test", "web", "--cleanup"]);
    assert!(lab.hv_vm(COPY).is_null());
    assert!(!folder.exists(), "{}", folder.display());
    assert!(!switches(&lab.hv).contains(&isolated));
    assert_eq!(point_names(&lab.hv_vm(STANDBY)), point_names(&v));

    // Unplanned failover to the older point: running, with exactly rp2's disks.
    lab.ok(&["replica", "failover", "web", "--unplanned", "--point", &rp2]);
    let v = lab.hv_vm(STANDBY);
    assert_eq!(v["state"], "2", "{v}");
    assert_same_disks(&lab.standby_disks("failed-over"), &at2);
    assert_eq!(lab.replica_status("web")["state"]["kind"], "failed-over");

    // Cancel: the checkpoints go (merged), the VM stays, unmarked, with rp2's disks.
    lab.ok(&["replica", "cancel", "web"]);
    let v = lab.hv_vm(STANDBY);
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), 0, "{v}");
    assert!(
        !v["notes"].as_str().unwrap_or("").contains("ferry.replica"),
        "{v}"
    );
    assert_same_disks(&lab.standby_disks("cancelled"), &at2);
}

/// Two Hyper-V simulators `hv1`, `hv2` (sources of that name), the lab files in `d`, and
/// replica `web` of `vm` (on `hv1`) to `hv2` keeping `keep` points, after its first cycle.
fn hv_pair(d: &Path, vm: &str, keep: &str) -> ((Killed, Value), (Killed, Value), Ferry) {
    let (a, hv1) = start_hv(&d.join("hv1-sim"));
    let (b, hv2) = start_hv(&d.join("hv2-sim"));
    let state = d.join("state");
    let mut t = hv_source_toml("hv1", &hv1, d, &state);
    t.push_str(&hv_source_toml("hv2", &hv2, d, &state));
    lab_files(d, &t);
    let lab = Ferry::in_dir(d, PASSWORD);
    lab.ok(&[
        "replica",
        "create",
        "web",
        "--source",
        "hv1",
        "--vm",
        vm,
        "--to-source",
        "hv2",
        "--keep",
        keep,
    ]);
    lab.ok(&["replica", "sync", "web"]);
    ((a, hv1), (b, hv2), lab)
}

/// Two Hyper-V hosts: `win-sql-01` of `hv1` replicated to `hv2`.
#[test]
fn hyperv_to_hyperv_failed_cycle_keeps_the_point_and_planned_failover_replicates_back() {
    const PRIMARY: &str = "win-sql-01";
    const REPLICA: &str = "win-sql-01 (replica)";
    let dir = ferry_testkit::scratch_dir();
    let d = dir.path();
    let ((_a, hv1), (_b, hv2), lab) = hv_pair(d, PRIMARY, "3");
    let status = || status_of(&lab);
    let restored = |rp: &str| lab.restored(d, rp, &["disk0", "disk1"]);
    let current = |hv: &Value, vm: &str, label: &str| {
        let v = probe(hv, "hyperv_replica_probe.py", vm);
        flat(d, hv, v["disks"].as_array().unwrap(), label)
    };
    let rp1 = status()["applied"].as_str().unwrap().to_string();
    let at1 = restored(&rp1);
    assert_same_disks(&current(&hv2, REPLICA, "1"), &at1);

    // A cycle whose recovery point cannot be taken (an injected CreateSnapshot fault on the
    // target) fails after writing; the point the standby holds is intact; the next cycle
    // completes.
    hv_guest_write(&hv1, PRIMARY, "disk0", 3 * MIB, &[0x42; 8192]);
    door(
        &hv2,
        "FailNext",
        &[
            ("Method", "Msvm_VirtualSystemSnapshotService.CreateSnapshot"),
            ("Count", "1"),
        ],
    );
    let o = lab.run(&["replica", "sync", "web"]);
    assert!(!o.status.success());
    let s = status();
    assert!(s["health"]["last-error"].as_str().is_some(), "{s}");
    let v = probe(&hv2, "hyperv_replica_probe.py", REPLICA);
    assert_eq!(v["checkpoints"].as_array().unwrap().len(), 1, "{v}");
    assert_same_disks(
        &flat(
            d,
            &hv2,
            v["checkpoints"][0]["disks"].as_array().unwrap(),
            "kept",
        ),
        &at1,
    );
    hv_guest_write(&hv1, PRIMARY, "disk1", 5 * MIB, &[0x24; 4096]);
    lab.ok(&["replica", "sync", "web"]);
    let s = status();
    let rp3 = s["applied"].as_str().unwrap().to_string();
    assert_eq!(s["points"].as_array().unwrap().len(), 2, "{s}");
    assert_same_disks(&current(&hv2, REPLICA, "3"), &restored(&rp3));

    // Planned failover: the primary is turned off, the replica runs on hv2, and hv1's VM is
    // the standby (off, marked) that the next cycle writes into.
    lab.ok(&["replica", "failover", "web", "--planned"]);
    let s = status();
    assert_eq!(s["source"], "hv2", "{s}");
    assert_eq!(s["target"], "hv1", "{s}");
    assert_eq!(
        probe(&hv2, "hyperv_replica_probe.py", REPLICA)["state"],
        "2"
    );
    let old = probe(&hv1, "hyperv_replica_probe.py", PRIMARY);
    assert_eq!(old["state"], "3", "{old}");
    // Shut down by its guest, not turned off (ADR 0187).
    assert_eq!(
        shutdowns_of(&hv1, PRIMARY),
        [format!(
            "force=false reason={}",
            ferry_hv_hyperv::shutdown::SHUTDOWN_REASON
        )]
    );
    assert!(
        old["notes"]
            .as_str()
            .unwrap_or("")
            .contains("ferry.replica.role=standby"),
        "{old}"
    );
    hv_guest_write(&hv2, REPLICA, "disk0", MIB, &[0x99; 4096]);
    lab.ok(&["replica", "sync", "web"]);
    let back = status()["applied"].as_str().unwrap().to_string();
    assert_same_disks(&current(&hv1, PRIMARY, "back"), &restored(&back));
    lab.ok(&["replica", "cancel", "web"]);
    assert!(
        probe(&hv1, "hyperv_replica_probe.py", PRIMARY)["checkpoints"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// Xen → Hyper-V with a target source that has no `san-paths`: the standby's disks are made
/// and updated through the host agent alone (`update:vhdx` requests, ADR 0176).
#[test]
fn xen_to_hyperv_through_the_host_agent_alone() {
    let dir = ferry_testkit::scratch_dir();
    let d = dir.path();
    let (_a, xen) = xen_probe::start_sim(ferry(), &d.join("prod-sim"));
    let (_b, hv) = start_hv(&d.join("hv-sim"));
    let state = d.join("state");
    let agent = &hv["agent"];
    let mut t = xen_probe::source_toml("prod", &xen, &password_file(d, "prod", &xen), &state);
    t.push_str(&hv_source_toml_with(
        "hv",
        &hv,
        d,
        &state,
        "network",
        &format!(
            "[sources.hv.agent]\nport = {}\nfingerprint = \"{}\"\n",
            agent["port"],
            agent["fingerprint"].as_str().unwrap()
        ),
    ));
    lab_files(d, &t);
    let lab = Ferry::in_dir(d, PASSWORD);
    let pin = lab.ok(&["source", "agent-pin", "hv"]);
    door(&hv, "AgentPin", &[("Fingerprint", pin.trim())]);
    let mut prod = Probe::start(&xen);
    let status = || status_of(&lab);
    let current = |label: &str| {
        let v = probe(&hv, "hyperv_replica_probe.py", STANDBY);
        flat(d, &hv, v["disks"].as_array().unwrap(), label)
    };
    lab.ok(&[
        "replica",
        "create",
        "web",
        "--source",
        "prod",
        "--vm",
        VM,
        "--to-source",
        "hv",
    ]);
    lab.ok(&["replica", "sync", "web"]);
    let rp1 = status()["applied"].as_str().unwrap().to_string();
    let at1 = lab.restored(d, &rp1, &["xvda", "xvdb"]);
    assert_same_disks(&current("1"), &at1);
    xen_guest_writes(&mut prod, 0x3c);
    lab.ok(&["replica", "sync", "web"]);
    let s = status();
    let rp2 = s["applied"].as_str().unwrap().to_string();
    // The changed 256 KiB chunks are sent; the agent writes their VHDX blocks.
    let bytes = s["health"]["last-bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes <= 3 * (256 << 10), "{s}");
    assert_same_disks(&current("2"), &lab.restored(d, &rp2, &["xvda", "xvdb"]));
    lab.ok(&["replica", "failover", "web", "--unplanned", "--point", &rp1]);
    assert_same_disks(&current("failed-over"), &at1);
    // The standby's folder: the agent's disks and Hyper-V's checkpoint files over them.
    let v = probe(&hv, "hyperv_replica_probe.py", STANDBY);
    let folder = local(&hv, v["disks"][0].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let avhdx = |f: &Path| {
        std::fs::read_dir(f)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".avhdx"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(avhdx(&folder) > 0, "{}", folder.display());
    lab.ok(&["replica", "cancel", "web", "--delete-vm"]);
    assert!(probe(&hv, "hyperv_replica_probe.py", STANDBY).is_null());
    // `delete` through the agent removed the checkpoint files too, so the folder is gone.
    assert!(!folder.exists(), "{}", folder.display());
}

/// vSphere → Hyper-V: the 2-disk VM of `ferry sim vmware` replicated to a Hyper-V host; guest
/// writes reach the standby's `.avhdx` in one cycle and an unplanned failover runs it.
#[test]
fn vsphere_to_hyperv_replica_follows_writes() {
    let dir = ferry_testkit::scratch_dir();
    let d = dir.path();
    let (_a, vc) = vsphere_lab::start_sim(ferry(), &d.join("vc-sim"));
    let (_b, hv) = start_hv(&d.join("hv-sim"));
    let state = d.join("state");
    let mut t = vsphere_lab::source_toml("vc", &vc, &password_file(d, "vc", &vc), &state);
    t.push_str(&hv_source_toml("hv", &hv, d, &state));
    lab_files(d, &t);
    let (vm, moref, disks) = vsphere_lab::two_disk_vm(&vc);
    let standby = format!("{vm} (replica)");
    let lab = Ferry::in_dir(d, PASSWORD);
    let status = || status_of(&lab);
    let current = |label: &str| {
        let v = probe(&hv, "hyperv_replica_probe.py", &standby);
        flat(d, &hv, v["disks"].as_array().unwrap(), label)
    };
    let restored = |rp: &str| lab.restored(d, rp, &["scsi0:0", "scsi0:1"]);
    lab.ok(&[
        "replica",
        "create",
        "web",
        "--source",
        "vc",
        "--vm",
        &vm,
        "--to-source",
        "hv",
    ]);
    lab.ok(&["replica", "sync", "web"]);
    let rp1 = status()["applied"].as_str().unwrap().to_string();
    let at1 = restored(&rp1);
    assert_same_disks(&current("1"), &at1);
    assert_same_disks(&at1, &vsphere_lab::copy_live_disks(&disks, d, "vc-1"));
    vsphere_lab::guest_write(&vc, &moref, disks[0].0, 300 << 10, &[0x6b; 70_000]);
    vsphere_lab::guest_write(&vc, &moref, disks[1].0, 5 << 20, &[0x6c; 4096]);
    lab.ok(&["replica", "sync", "web"]);
    let s = status();
    let rp2 = s["applied"].as_str().unwrap().to_string();
    // At most one 2 MiB block of each disk's .avhdx (a disk's last block may be short).
    let bytes = s["health"]["last-bytes"].as_u64().unwrap();
    assert!(bytes > 2 * MIB && bytes <= 4 * MIB, "{s}");
    let at2 = restored(&rp2);
    assert_same_disks(&current("2"), &at2);
    assert_same_disks(&at2, &vsphere_lab::copy_live_disks(&disks, d, "vc-2"));
    lab.ok(&["replica", "failover", "web", "--unplanned"]);
    assert_eq!(
        probe(&hv, "hyperv_replica_probe.py", &standby)["state"],
        "2"
    );
    assert_same_disks(&current("failed-over"), &at2);
    lab.ok(&["replica", "cancel", "web"]);
}

/// Planned failover of a Hyper-V primary whose guest refuses the shutdown (its integration
/// service does not answer): the VM is turned off with a WARN, and the failover completes.
#[test]
fn hyperv_planned_failover_turns_off_a_guest_that_refuses_to_shut_down() {
    const PRIMARY: &str = "win-sql-01";
    let dir = ferry_testkit::scratch_dir();
    let d = dir.path();
    let ((_a, hv1), _hv2, lab) = hv_pair(d, PRIMARY, "2");
    door(
        &hv1,
        "GuestShutdown",
        &[("VirtualSystem", PRIMARY), ("Answer", "refuse")],
    );
    let o = lab.run(&["replica", "failover", "web", "--planned"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("clean shutdown failed") && err.contains("32775"),
        "{err}"
    );
    assert_eq!(
        probe(&hv1, "hyperv_replica_probe.py", PRIMARY)["state"],
        "3"
    );
    assert!(shutdowns_of(&hv1, PRIMARY).is_empty());
    assert_eq!(status_of(&lab)["source"], "hv2");
}
