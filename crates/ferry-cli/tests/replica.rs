//! Replication through the `ferry` binary (docs/replication.md): two `ferry sim xen` pools,
//! `prod` with the 2-disk VM `debian-web` and `dr` for its standby; the tests act as the guest
//! through the simulator's side door and look at both pools through the official Python
//! XenAPI SDK (`tests/xen_probe.py`). Disks are compared byte for byte (`qemu-img compare`)
//! after exporting them with `GET /export_raw_vdi`.

use ferry_testkit::Killed;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/replica_lab.rs"]
mod replica_lab;
#[path = "common/xen_probe.rs"]
mod xen_probe;
use replica_lab::{Ferry, LabDir, PASSWORD, assert_same_disks, ferry, init_repo, password_file};
use xen_probe::Probe;

const VM: &str = "debian-web";
const STANDBY: &str = "debian-web (replica)";

/// Two pools, their probes, a repository, a `ferry.toml` and a state directory.
struct Lab {
    dir: tempfile::TempDir,
    prod: Probe,
    dr: Probe,
    prod_info: Value,
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
        let (a, prod_info) = xen_probe::start_sim(ferry(), &dir.path().join("prod"));
        let (b, dr_info) = xen_probe::start_sim(ferry(), &dir.path().join("dr"));
        let mut toml = String::new();
        for (name, info) in [("prod", &prod_info), ("dr", &dr_info)] {
            let pw = password_file(dir.path(), name, info);
            toml.push_str(&xen_probe::source_toml(
                name,
                info,
                &pw,
                &dir.path().join("state"),
            ));
        }
        std::fs::write(dir.path().join("ferry.toml"), toml).unwrap();
        init_repo(&dir.path().join("repo"), PASSWORD);
        Self {
            prod: Probe::start(&prod_info),
            dr: Probe::start(&dr_info),
            prod_info,
            dir,
            _sims: (a, b),
        }
    }

    fn create(&self, keep: &str) {
        self.ok(&[
            "replica",
            "create",
            "web",
            "--source",
            "prod",
            "--vm",
            VM,
            "--to-source",
            "dr",
            "--keep",
            keep,
            "--every",
            "5m",
        ]);
    }

    /// The disks of VM `name` on pool `dr` (or `prod`), exported as raw files.
    fn disks(&mut self, on_dr: bool, name: &str, label: &str) -> Vec<PathBuf> {
        let dir = self.dir.path().to_path_buf();
        let p = if on_dr { &mut self.dr } else { &mut self.prod };
        p.export_disks(name, &dir, label)
    }

    /// Every disk of restore point `rp`, restored to files.
    fn restored(&self, rp: &str) -> Vec<PathBuf> {
        Ferry::in_dir(self.dir.path(), PASSWORD).restored(self.dir.path(), rp, &["xvda", "xvdb"])
    }
}

/// The guest of `vm` on `probe` writes a recognizable pattern into both its disks.
fn guest_writes(probe: &mut Probe, vm: &str, seed: u8) {
    let disks = probe.disk_uuids(vm);
    probe.guest_write(&disks[0], 1 << 20, &[seed; 70_000]);
    probe.guest_write(&disks[1], 3 << 20, &[seed.wrapping_add(1); 4096]);
}

#[test]
fn replica_follows_guest_writes_and_unplanned_failover_starts_the_chosen_point() {
    let mut lab = Lab::start();
    lab.create("2");
    let s = lab.replica_status("web");
    assert_eq!(s["standby"], Value::Null);
    assert!(s["stale"].as_str().unwrap().contains("no recovery point"));
    // Failover of a replica that holds nothing is refused with the reason.
    let o = lab.run(&["replica", "failover", "web", "--unplanned"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is stale"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The first cycle creates the standby (halted) with the VM's disks.
    lab.ok(&["replica", "sync", "web"]);
    let first = lab.replica_status("web");
    assert_eq!(first["points"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(lab.dr.vm(STANDBY)["power_state"], "Halted");
    let want = lab.disks(false, VM, "prod-1");
    assert_same_disks(&lab.disks(true, STANDBY, "dr-1"), &want);
    let rp1 = first["applied"].as_str().unwrap().to_string();

    // Guest writes reach the standby within one cycle, sending only the changed blocks.
    guest_writes(&mut lab.prod, VM, 0x5a);
    lab.ok(&["replica", "sync", "web"]);
    let second = lab.replica_status("web");
    let want2 = lab.disks(false, VM, "prod-2");
    assert_same_disks(&lab.disks(true, STANDBY, "dr-2"), &want2);
    let bytes = second["health"]["last-bytes"].as_u64().unwrap();
    // One changed chunk per disk, each sent as its whole 2 MiB VHD block.
    assert_eq!(bytes, 2 * (2 << 20), "{second}");
    assert!(second["lag"].as_i64().unwrap() < 60, "{second}");
    assert_eq!(second["health"]["cycles"], 2);

    // A third cycle: --keep 2 prunes the oldest point on the pool too.
    guest_writes(&mut lab.prod, VM, 0x77);
    lab.ok(&["replica", "sync", "web"]);
    let third = lab.replica_status("web");
    let points = third["points"].as_array().unwrap().clone();
    assert_eq!(points.len(), 2, "{third}");
    assert!(points.iter().all(|p| p["restore-point"] != rp1.as_str()));
    let snaps = lab.prod.ask(json!({"op": "leftovers"}));
    assert!(
        snaps["snapshot_vms"].as_array().unwrap().is_empty(),
        "{snaps}"
    );
    let dr = lab.dr.ask(json!({"op": "leftovers"}));
    assert_eq!(dr["snapshot_vms"].as_array().unwrap().len(), 2, "{dr}");

    // Unplanned failover to the older of the two points: running, disks as at that point.
    let older = points[0]["restore-point"].as_str().unwrap().to_string();
    lab.ok(&[
        "replica",
        "failover",
        "web",
        "--unplanned",
        "--point",
        &older,
    ]);
    assert_eq!(lab.dr.vm(STANDBY)["power_state"], "Running");
    let at = lab.restored(&older);
    assert_same_disks(&lab.disks(true, STANDBY, "dr-failed-over"), &at);
    assert_same_disks(&at, &want2);
    let s = lab.replica_status("web");
    assert_eq!(s["state"]["kind"], "failed-over", "{s}");
    // A failed-over replica is not synced into.
    let o = lab.run(&["replica", "sync", "web"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("reverse"));

    // Reverse: the old primary becomes the standby, fully resynchronized from the replica.
    guest_writes(&mut lab.dr, STANDBY, 0x33);
    lab.ok(&["replica", "reverse", "web"]);
    assert_eq!(lab.prod.vm(VM)["power_state"], "Halted");
    lab.ok(&["replica", "sync", "web"]);
    let s = lab.replica_status("web");
    assert_eq!(s["source"], "dr", "{s}");
    assert_eq!(lab.dr.vm(STANDBY)["power_state"], "Running");
    assert_same_disks(
        &lab.disks(false, VM, "prod-reversed"),
        &lab.disks(true, STANDBY, "dr-now"),
    );

    // Cancel removes the recovery points (on prod now) and the record; the VM stays.
    lab.ok(&["replica", "cancel", "web"]);
    let l = lab.prod.ask(json!({"op": "leftovers"}));
    assert!(l["snapshot_vms"].as_array().unwrap().is_empty(), "{l}");
    assert!(!lab.path("state/replicas/web.json").exists());
    lab.prod.vm(VM);
}

#[test]
fn test_failover_leaves_replication_alone_and_cleanup_leaves_nothing() {
    let mut lab = Lab::start();
    lab.create("3");
    lab.ok(&["replica", "sync", "web"]);
    let vdis = lab.dr.ask(json!({"op": "vdis"}));
    let nets = lab.dr.ask(json!({"op": "networks"}));
    let names = lab.dr.ask(json!({"op": "vm_names"}));

    lab.ok(&["replica", "test", "web"]);
    let copy = lab.dr.vm("debian-web (test failover)");
    assert_eq!(copy["power_state"], "Running");
    let vifs = copy["vifs"].as_array().unwrap();
    assert!(!vifs.is_empty());
    for v in vifs {
        assert_eq!(
            v["network"], "debian-web (test failover) (isolated)",
            "{copy}"
        );
    }
    assert_eq!(lab.dr.vm(STANDBY)["power_state"], "Halted");
    // A second test while one runs is refused.
    assert!(!lab.run(&["replica", "test", "web"]).status.success());
    let copy_disks = lab.disks(true, "debian-web (test failover)", "copy");
    assert_same_disks(&copy_disks, &lab.disks(true, STANDBY, "standby"));

    lab.ok(&["replica", "test", "web", "--cleanup"]);
    assert_eq!(lab.dr.ask(json!({"op": "vdis"})), vdis);
    assert_eq!(lab.dr.ask(json!({"op": "networks"})), nets);
    assert_eq!(lab.dr.ask(json!({"op": "vm_names"})), names);

    // Replication goes on while a test copy runs.
    lab.ok(&["replica", "test", "web"]);
    guest_writes(&mut lab.prod, VM, 0x42);
    lab.ok(&["replica", "sync", "web"]);
    assert_same_disks(
        &lab.disks(true, STANDBY, "standby-2"),
        &lab.disks(false, VM, "prod-2"),
    );
    assert_eq!(
        lab.dr.vm("debian-web (test failover)")["power_state"],
        "Running"
    );
    lab.ok(&["replica", "test", "web", "--cleanup"]);
    assert_eq!(lab.dr.ask(json!({"op": "networks"})), nets);
    assert_eq!(lab.dr.ask(json!({"op": "vm_names"})), names);
    assert_eq!(
        lab.replica_status("web")["points"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn planned_failover_killed_halfway_completes_when_run_again() {
    let mut lab = Lab::start();
    lab.create("2");
    lab.ok(&["replica", "sync", "web"]);
    guest_writes(&mut lab.prod, VM, 0x61);
    // The final cycle's snapshot task is slow: the failover is killed with the primary off
    // while it waits (the pool still makes the snapshot, as xapi finishes a task whose
    // caller died).
    lab.prod.sim("set_task_delay", json!(["3000"]));
    replica_lab::kill_planned_failover_in_final_cycle("web", &lab.env(), &lab.path("state"));
    assert_eq!(lab.prod.vm(VM)["power_state"], "Halted");
    assert_eq!(lab.dr.vm(STANDBY)["power_state"], "Halted");
    lab.prod.sim("set_task_delay", json!(["0"]));
    std::thread::sleep(Duration::from_secs(3));

    // Any command of the replica completes it; `failover` again is the natural one.
    lab.ok(&["replica", "failover", "web", "--planned"]);
    assert_eq!(lab.dr.vm(STANDBY)["power_state"], "Running");
    assert_same_disks(
        &lab.disks(true, STANDBY, "dr"),
        &lab.disks(false, VM, "prod"),
    );
    let s = lab.replica_status("web");
    assert_eq!(s["source"], "dr", "{s}");
    assert_eq!(s["target"], "prod", "{s}");
    assert_eq!(s["state"]["kind"], "replicating", "{s}");
    assert_eq!(s["op"], Value::Null, "{s}");
    // Nothing of the killed backup or of the old direction is left on either pool.
    let l = lab.prod.ask(json!({"op": "leftovers"}));
    assert!(l["snapshot_vms"].as_array().unwrap().is_empty(), "{l}");
    let l = lab.dr.ask(json!({"op": "leftovers"}));
    assert!(l["snapshot_vms"].as_array().unwrap().is_empty(), "{l}");

    // Reversed: changes on the new primary reach the old one in one cycle.
    guest_writes(&mut lab.dr, STANDBY, 0x19);
    lab.ok(&["replica", "sync", "web"]);
    assert_same_disks(
        &lab.disks(false, VM, "prod-after"),
        &lab.disks(true, STANDBY, "dr-after"),
    );
    let _ = &lab.prod_info;
}

/// `GET base+path` over HTTPS pinned to the service's certificate, with an optional token.
async fn get(info: &Value, path: &str, token: Option<&str>) -> (u16, String) {
    let http = cli::pinned_client(info);
    let mut r = http.get(format!("{}{path}", info["url"].as_str().unwrap()));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn record(lab: &Lab) -> Value {
    let p = lab.path("state/replicas/web.json");
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn wait_cycles(lab: &Lab, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let r = record(lab);
        if r["health"]["cycles"].as_u64().unwrap_or(0) >= n {
            return r;
        }
        assert!(Instant::now() < deadline, "no {n} cycles: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn serve_runs_replica_cycles_with_health_in_metrics_and_rpo_alerts() {
    let mut lab = Lab::start();
    let pw = lab.path("repo.pw");
    std::fs::write(&pw, PASSWORD).unwrap();
    let mut toml = std::fs::read_to_string(lab.path("ferry.toml")).unwrap();
    toml.push_str(&format!(
        "[appliance]\nrpo-check-seconds = 1\n[repositories.main]\nurl = \"{}\"\npassword-file = \"{}\"\n[replicas.web]\nsource = \"prod\"\nvm = \"{VM}\"\nto-source = \"dr\"\nrepository = \"main\"\nevery = \"2s\"\nkeep = 2\nrpo = \"1s\"\n",
        lab.path("repo").display(),
        pw.display()
    ));
    std::fs::write(lab.path("ferry.toml"), toml).unwrap();
    let (_serve, info) = cli::serve_with_admin(
        &lab.path("state"),
        &lab.path("ferry.toml"),
        "admin password",
    );

    // The job's record appears and cycles run on their own.
    let first = wait_cycles(&lab, 1);
    guest_writes(&mut lab.prod, VM, 0x2c);
    wait_cycles(&lab, first["health"]["cycles"].as_u64().unwrap() + 2);
    assert_same_disks(
        &lab.disks(true, STANDBY, "dr-served"),
        &lab.disks(false, VM, "prod-served"),
    );
    assert!(record(&lab)["points"].as_array().unwrap().len() <= 2);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (st, text) = get(&info, "/metrics", None).await;
        assert_eq!(st, 200);
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let value = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && s.labels.get("replica") == Some("web"))
                .map(|s| match s.value {
                    prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                    ref o => panic!("{name}: {o:?}"),
                })
                .unwrap_or_else(|| panic!("no {name} for web in:\n{text}"))
        };
        assert!(value("ferry_replica_lag_seconds") < 60.0);
        assert!(value("ferry_replica_last_success_timestamp_seconds") > 1.7e9);
        assert_eq!(value("ferry_replica_rpo_seconds"), 1.0);
        assert_eq!(value("ferry_replica_failing"), 0.0);

        // An RPO of one second is breached between cycles: an `rpo` alert names the replica.
        let http = cli::pinned_client(&info);
        let login: Value = http
            .post(format!("{}/api/login", info["url"].as_str().unwrap()))
            .json(&json!({"username": "admin", "password": "admin password"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = login["token"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, text) = get(&info, "/api/alerts", Some(&token)).await;
            let alerts: Value = serde_json::from_str(&text).unwrap();
            if alerts.as_array().unwrap().iter().any(|a| {
                a["kind"] == "rpo" && a["title"].as_str().unwrap_or("").contains("replica `web`")
            }) {
                break;
            }
            assert!(Instant::now() < deadline, "no replica RPO alert: {alerts}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
}
