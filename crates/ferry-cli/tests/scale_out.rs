//! Scale-out (issue 17, ADR 0105): three `ferry serve` appliances with one repository — local,
//! then S3 on moto — and one job of 30 VMs on `ferry sim xen`, scheduled for a time a few
//! seconds ahead. Every VM gets exactly one restore point in the window; one appliance is
//! SIGKILLed while it reads a VM, and the other two take its VMs over once its leases expire:
//! nothing is lost, no snapshot is left on the pool (checked through the Python XenAPI SDK), and
//! every VM of the window ends `done` in `/api/leases`.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use ferry_testkit::Killed;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "common/xen_probe.rs"]
mod xen_probe;
use xen_probe::Probe;

const VMS: usize = 30;
const APPLIANCES: usize = 3;
const REPO_PW: &str = "scale-out repository password";
const ADMIN_PW: &str = "admin password 1";

#[path = "common/cli.rs"]
mod cli;
use cli::{ferry, first_line};

/// One appliance: its process and an HTTPS client pinned to its certificate, logged in.
struct Appliance {
    name: String,
    child: Option<Killed>,
    http: reqwest::Client,
    base: String,
    token: String,
    stderr: std::path::PathBuf,
}

impl Appliance {
    async fn start(name: &str, state: &Path, env: &[(String, String)]) -> Self {
        let stderr = state.with_extension("log");
        let mut child = ferry()
            .args([
                "serve",
                "-v",
                "--listen",
                "127.0.0.1:0",
                "--init-admin",
                "admin",
                "--state-dir",
            ])
            .arg(state)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("FERRY_ADMIN_PASSWORD", ADMIN_PW)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let info = first_line(&mut child);
        let http = cli::pinned_client(&info);
        let base = info["url"].as_str().unwrap().to_string();
        let r: Value = http
            .post(format!("{base}/api/login"))
            .json(&json!({"username": "admin", "password": ADMIN_PW}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Self {
            name: name.into(),
            child: Some(Killed(child)),
            http,
            base,
            token: r["token"].as_str().unwrap().into(),
            stderr,
        }
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} GET {path}: {e}", self.name));
        assert!(
            r.status().is_success(),
            "{} GET {path}: {}",
            self.name,
            r.status()
        );
        let text = r.text().await.unwrap();
        if path == "/metrics" {
            return Value::String(text);
        }
        serde_json::from_str(&text).unwrap()
    }

    /// The appliance's session of the scheduled run, once it exists.
    async fn session(&self) -> Option<Value> {
        let list = self.get("/api/sessions").await;
        let id = list.as_array()?.first()?["id"].as_str()?.to_string();
        Some(self.get(&format!("/api/sessions/{id}")).await)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn config(
    name: &str,
    sim: &Value,
    sim_pw: &Path,
    repo_url: &str,
    repo_pw: &Path,
    at: chrono::DateTime<chrono::Utc>,
) -> String {
    format!(
        r#"[appliance]
name = "{name}"
lease-ttl-seconds = 4
max-concurrent-vms = 2
per-source-vms = 2

[sources.sim]
kind = "xen"
url = "{url}"
username = "{user}"
password-file = "{sim_pw}"
tls-fingerprint = "{fp}"
transports = ["network"]

[repositories.shared]
url = "{repo_url}"
password-file = "{repo_pw}"

[jobs.fleet]
source = "sim"
repository = "shared"
vms = ["vm-*"]
schedule = "{sec} {min} {hour} * * *"
retries = 1
retry-delay-seconds = 1
"#,
        url = sim["url"].as_str().unwrap(),
        user = sim["username"].as_str().unwrap(),
        sim_pw = sim_pw.display(),
        fp = sim["tls_fingerprint"].as_str().unwrap(),
        repo_pw = repo_pw.display(),
        sec = at.format("%-S"),
        min = at.format("%-M"),
        hour = at.format("%-H"),
    )
}

async fn three_appliances_share_one_repository(repo_url: &str, env: Vec<(String, String)>) {
    let t0 = Instant::now();
    let dir = ferry_testkit::scratch_dir();
    let (_sim, sim) = xen_probe::start_sim_with(
        ferry(),
        &dir.path().join("sim"),
        &["--extra-vms", &VMS.to_string()],
    );
    let mut probe = Probe::start(&sim);

    let store = Store::open_with(repo_url, true, &env).unwrap();
    let opts = InitOptions {
        kdf: KdfParams::insecure_fast(),
        ..Default::default()
    };
    let repo = Repository::init(store, Some(&Secret::new(REPO_PW)), opts)
        .await
        .unwrap();
    let (sim_pw, repo_pw) = (dir.path().join("sim.pw"), dir.path().join("repo.pw"));
    std::fs::write(&sim_pw, sim["password"].as_str().unwrap()).unwrap();
    std::fs::write(&repo_pw, REPO_PW).unwrap();

    // One firing, a few seconds ahead: every appliance plans the same window.
    let at = chrono::Utc::now() + chrono::Duration::seconds(6);
    let at = at - chrono::Duration::nanoseconds(at.timestamp_subsec_nanos() as i64);
    let mut apps = Vec::new();
    for i in 1..=APPLIANCES {
        let name = format!("a{i}");
        let state = dir.path().join(&name);
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            state.join("ferry.toml"),
            config(&name, &sim, &sim_pw, repo_url, &repo_pw, at),
        )
        .unwrap();
        apps.push(Appliance::start(&name, &state, &env).await);
    }
    assert!(
        chrono::Utc::now() < at,
        "the appliances took too long to start for the planned firing"
    );

    // Kill one appliance while it reads a VM (its snapshot exists and its lease is held).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (victim, victim_vm) = 'found: loop {
        assert!(
            Instant::now() < deadline,
            "no appliance was caught reading a VM"
        );
        for (i, a) in apps.iter().enumerate() {
            let Some(s) = a.session().await else { continue };
            for vm in s["vms"].as_array().unwrap() {
                let done = vm["done"].as_u64().unwrap_or(0);
                if vm["status"] == "running"
                    && vm["appliance"] == a.name.as_str()
                    && done > 0
                    && done < vm["total"].as_u64().unwrap_or(0)
                {
                    break 'found (i, vm["vm_name"].as_str().unwrap().to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let victim_name = apps[victim].name.clone();
    drop(apps[victim].child.take()); // SIGKILL
    eprintln!("killed {victim_name} while it read {victim_vm}");

    // The others finish the window, the victim's VMs included.
    let survivors: Vec<&Appliance> = apps.iter().filter(|a| a.name != victim_name).collect();
    let mut ended = Vec::new();
    for a in &survivors {
        let t = Instant::now();
        let s = loop {
            let s = a.session().await.expect("a session of the scheduled run");
            if !["queued", "running", "retrying"].contains(&s["status"].as_str().unwrap()) {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{} still running: {s}\n{}",
                a.name,
                a.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(s["status"], "success", "{}: {s}\n{}", a.name, a.log());
        assert_eq!(s["vms"].as_array().unwrap().len(), VMS);
        ended.push(s);
    }

    // Exactly one restore point per VM, all from this window, and the sessions agree on them.
    let points = repo.snapshots().await.unwrap();
    let mut per_vm: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &points {
        assert!(m.time >= at.timestamp(), "{} predates the window", m.id);
        per_vm
            .entry(m.meta.vm.name.clone())
            .or_default()
            .push(m.id.clone());
    }
    let want: Vec<String> = (1..=VMS).map(|n| format!("vm-{n:02}")).collect();
    assert_eq!(per_vm.keys().cloned().collect::<Vec<_>>(), want);
    for (vm, ids) in &per_vm {
        assert_eq!(
            ids.len(),
            1,
            "{vm} was backed up {} times: {ids:?}",
            ids.len()
        );
    }
    for s in &ended {
        for vm in s["vms"].as_array().unwrap() {
            let name = vm["vm_name"].as_str().unwrap();
            assert_eq!(vm["status"], "success", "{vm}");
            assert_eq!(vm["restore_point"], per_vm[name][0].as_str(), "{vm}");
            assert_ne!(
                vm["appliance"], "",
                "every VM names the appliance that backed it up"
            );
        }
    }
    // The victim's VM went to a survivor; each survivor did a share of the work.
    let by: Vec<String> = ended[0]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["appliance"].as_str().unwrap().to_string())
        .collect();
    let victim_row = ended[0]["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm_name"] == victim_vm.as_str())
        .unwrap();
    assert_ne!(
        victim_row["appliance"],
        victim_name.as_str(),
        "{victim_row}"
    );
    for a in &survivors {
        assert!(by.contains(&a.name), "{} backed up no VM: {by:?}", a.name);
    }
    let logs: String = survivors.iter().map(|a| a.log()).collect();
    assert!(
        logs.contains(&format!(
            "taking the VM over from appliance `{victim_name}`"
        )),
        "no takeover logged"
    );
    let mut takeovers = 0;
    for a in &survivors {
        let m = a.get("/metrics").await;
        let text = m.as_str().unwrap();
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("ferry_work_lease_takeovers_total "))
            .unwrap_or_else(|| panic!("no takeover metric in:\n{text}"))
            .trim()
            .parse()
            .unwrap();
        takeovers += n;
        assert!(text.contains("ferry_work_leases_held 0"), "{text}");
    }
    assert!(takeovers >= 1);

    // Every VM of the window is done in the leases, and nothing is left on the pool: the
    // victim's snapshot was removed by the appliance that took its VM over.
    let leases = survivors[0].get("/api/leases").await;
    let leases = leases.as_array().unwrap();
    assert_eq!(leases.len(), VMS, "{leases:?}");
    for l in leases {
        assert_eq!(l["state"], "done", "{l}");
        assert_eq!(l["done"]["status"], "success", "{l}");
    }
    let left = probe.ask(json!({"op": "leftovers"}));
    for k in [
        "snapshot_vms",
        "snapshot_vdis",
        "proxy_vbds",
        "vbds_on_snapshots",
    ] {
        assert!(
            left[k].as_array().is_some_and(Vec::is_empty),
            "{k} left on the pool: {left}"
        );
    }
    assert_eq!(
        left["cbt_anchors"].as_array().unwrap().len(),
        VMS,
        "one CBT anchor per disk: {left}"
    );
    eprintln!("scale-out test took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_appliances_on_a_local_repository() {
    let dir = ferry_testkit::scratch_dir();
    let url = dir.path().join("repo");
    three_appliances_share_one_repository(url.to_str().unwrap(), Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_appliances_on_s3() {
    let moto = ferry_testkit::Moto::start();
    three_appliances_share_one_repository(&moto.url(), moto.env()).await;
}
