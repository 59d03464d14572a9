//! The appliance service through the `ferry` binary: `ferry serve` on a loopback port with a
//! temporary state directory, driven over HTTPS (pinned to the fingerprint it prints) like an
//! administrator's script: log in, roles, add `ferry sim xen` as a source (a refused login on
//! the test endpoint), a local repository, bad jobs refused whole, a job run twice with its
//! retention, sessions with logs and per-VM progress, restore points, a cancel, metrics parsed
//! as Prometheus text, a graceful SIGTERM and `--rebuild-catalog`. A second test runs
//! schemathesis (PyPI) against the live service with the OpenAPI document it serves.

use ferry_testkit::Killed;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN_PW: &str = "admin password 1";

#[path = "common/cli.rs"]
mod cli;
use cli::{ferry, first_line};

fn start_sim(dir: &Path) -> (Killed, Value) {
    let mut child = ferry()
        .args([
            "sim",
            "xen",
            "--listen",
            "127.0.0.1:0",
            "--disk-mib",
            "8",
            "--dir",
        ])
        .arg(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let info = first_line(&mut child);
    (Killed(child), info)
}

fn start_serve(state: &Path, extra: &[&str]) -> (Killed, Value) {
    let mut child = ferry()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--job-grace",
            "30",
            "--init-admin",
            "admin",
            "--state-dir",
        ])
        .arg(state)
        .args(extra)
        .env("FERRY_ADMIN_PASSWORD", ADMIN_PW)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let info = first_line(&mut child);
    (Killed(child), info)
}

/// An HTTPS client pinned to the service's certificate.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

impl Api {
    fn new(info: &Value) -> Self {
        let fp = ferry_tls::parse_fingerprint(info["tls_fingerprint"].as_str().unwrap()).unwrap();
        let tls = ferry_tls::client_config(&ferry_tls::Trust::Fingerprint(fp)).unwrap();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .no_proxy()
            .build()
            .unwrap();
        Self {
            http,
            base: info["url"].as_str().unwrap().into(),
            token: None,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> Reply {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.http.request(m, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        if let Some(e) = if_match {
            r = r.header("If-Match", e);
        }
        let resp = r
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None, None).await
    }

    async fn ok(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
        want: u16,
    ) -> Reply {
        let r = self.call(method, path, body, if_match).await;
        assert_eq!(r.status, want, "{method} {path}: {}", r.text);
        r
    }

    async fn login(&mut self, user: &str, pw: &str) {
        let r = self
            .ok(
                "POST",
                "/api/login",
                Some(json!({"username": user, "password": pw})),
                None,
                200,
            )
            .await;
        self.token = Some(r.body["token"].as_str().unwrap().into());
    }

    /// Runs job `job` by hand and waits for its session to end.
    /// The messages of a session's log.
    async fn log_lines(&self, id: &str) -> Vec<String> {
        let log = self
            .ok("GET", &format!("/api/sessions/{id}/log"), None, None, 200)
            .await
            .body;
        log.as_array()
            .unwrap()
            .iter()
            .map(|e| e["message"].as_str().unwrap().to_string())
            .collect()
    }

    async fn run_job(&self, job: &str) -> Value {
        let r = self
            .ok("POST", &format!("/api/jobs/{job}/run"), None, None, 202)
            .await;
        self.wait_session(r.body["session"].as_str().unwrap()).await
    }

    /// Polls a session until it ends.
    async fn wait_session(&self, id: &str) -> Value {
        let t = Instant::now();
        loop {
            let s = self
                .ok("GET", &format!("/api/sessions/{id}"), None, None, 200)
                .await
                .body;
            if !["queued", "running", "retrying"].contains(&s["status"].as_str().unwrap()) {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "session {id} still running: {s}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn problem(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/problem+json",
        "{}",
        r.text
    );
    let d = r.body["detail"].as_str().unwrap_or_default();
    assert!(d.contains(needle), "wanted `{needle}` in: {}", r.text);
}

fn source_body(sim: &Value, password: &str) -> Value {
    let state = Path::new(sim["dir"].as_str().unwrap()).join("../xen-state");
    json!({
        "state_dir": state,
        "kind": "xen",
        "url": sim["url"],
        "username": sim["username"],
        "password": password,
        "tls_fingerprint": sim["tls_fingerprint"],
        "transports": ["network"],
        "proxy_vm": sim["proxy_vm"],
        "hotadd_device_dir": sim["hotadd_device_dir"],
        "san_paths": sim["san_paths"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_administrator_drives_the_appliance_over_its_api() {
    let dir = ferry_testkit::scratch_dir();
    let (_sim, sim) = start_sim(&dir.path().join("sim"));
    let state = dir.path().join("state");
    let (mut serve, info) = start_serve(&state, &[]);
    let mut api = Api::new(&info);
    let toml_path = state.join("ferry.toml");
    let sim_pw = sim["password"].as_str().unwrap().to_string();

    // Health is public; the API needs a token; a wrong password is refused.
    let h = api.ok("GET", "/health", None, None, 200).await;
    assert_eq!(h.body["status"], "ok");
    problem(&api.get("/api/sources").await, 401, "Bearer");
    let r = api
        .call(
            "POST",
            "/api/login",
            Some(json!({"username": "admin", "password": "nope"})),
            None,
        )
        .await;
    problem(&r, 401, "wrong user name or password");
    api.login("admin", ADMIN_PW).await;
    assert_eq!(api.get("/api/me").await.body["role"], "admin");
    let users = std::fs::read_to_string(state.join("users.json")).unwrap();
    assert!(!users.contains(ADMIN_PW));

    // A viewer reads but cannot change; an operator runs but cannot configure.
    api.ok(
        "POST",
        "/api/users",
        Some(json!({"name": "vic", "role": "viewer", "password": "viewer pass"})),
        None,
        201,
    )
    .await;
    api.ok(
        "POST",
        "/api/users",
        Some(json!({"name": "olga", "role": "operator", "password": "operator pass"})),
        None,
        201,
    )
    .await;
    let mut viewer = Api::new(&info);
    viewer.login("vic", "viewer pass").await;
    viewer.ok("GET", "/api/sources", None, None, 200).await;
    let r = viewer
        .call(
            "PUT",
            "/api/sources/lab",
            Some(source_body(&sim, &sim_pw)),
            None,
        )
        .await;
    problem(&r, 403, "admin role");
    let mut operator = Api::new(&info);
    operator.login("olga", "operator pass").await;
    let r = operator
        .call("PUT", "/api/jobs/x", Some(json!({})), None)
        .await;
    problem(&r, 403, "admin role");

    // The source: its password is write-only and kept out of ferry.toml.
    let r = api
        .ok(
            "PUT",
            "/api/sources/lab",
            Some(source_body(&sim, &sim_pw)),
            None,
            201,
        )
        .await;
    assert_eq!(r.body["password_set"], true);
    assert!(
        r.body.get("password").is_none() && !r.text.contains(&sim_pw),
        "{}",
        r.text
    );
    let src_etag = r.headers["etag"].to_str().unwrap().to_string();
    let cfg_text = std::fs::read_to_string(&toml_path).unwrap();
    assert!(
        !cfg_text.contains(&sim_pw) && cfg_text.contains("[sources.lab]"),
        "{cfg_text}"
    );
    let r = api.ok("GET", "/api/sources/lab", None, None, 200).await;
    assert_eq!(r.headers["etag"].to_str().unwrap(), src_etag);
    assert!(!r.text.contains(&sim_pw));

    // Test connection: the stored source logs in; a candidate with a wrong password is refused
    // by the pool and nothing is saved.
    let r = operator
        .ok("POST", "/api/sources/lab/test", None, None, 200)
        .await;
    assert!(r.body["vms"].as_u64().unwrap() >= 2, "{}", r.text);
    let r = operator
        .call(
            "POST",
            "/api/sources/lab/test",
            Some(source_body(&sim, "wrong password")),
            None,
        )
        .await;
    problem(&r, 422, "lab");
    assert_eq!(r.body["field"], "connection");
    assert_eq!(std::fs::read_to_string(&toml_path).unwrap(), cfg_text);
    // A change without the ETag, or with a stale one, is refused.
    problem(
        &api.call(
            "PUT",
            "/api/sources/lab",
            Some(source_body(&sim, &sim_pw)),
            None,
        )
        .await,
        428,
        "If-Match",
    );
    problem(
        &api.call(
            "PUT",
            "/api/sources/lab",
            Some(source_body(&sim, &sim_pw)),
            Some("\"stale\""),
        )
        .await,
        412,
        "changed since",
    );

    // A repository, created by the API.
    let repo_dir = dir.path().join("repo");
    let r = api
        .ok(
            "PUT",
            "/api/repositories/local",
            Some(json!({"url": repo_dir, "password": "repo password", "init": true})),
            None,
            201,
        )
        .await;
    assert_eq!(r.body["password_set"], true);
    assert!(repo_dir.join("config").exists() || std::fs::read_dir(&repo_dir).unwrap().count() > 0);
    // Opening with the wrong password fails and is not saved.
    let r = api
        .call(
            "PUT",
            "/api/repositories/other",
            Some(json!({"url": repo_dir, "password": "wrong"})),
            None,
        )
        .await;
    problem(&r, 422, "cannot open the repository");
    assert!(api.get("/api/repositories/other").await.status == 404);

    // Bad jobs: clear problems, nothing saved.
    let before = std::fs::read_to_string(&toml_path).unwrap();
    for (body, field, needle) in [
        (
            json!({"source": "lab", "repository": "local", "vms": ["debian-web"], "schedule": "0 0 30 2 *"}),
            "schedule",
            "never fires",
        ),
        (
            json!({"source": "lab", "repository": "local", "vms": ["debian-web"], "schedule": "every night"}),
            "schedule",
            "every night",
        ),
        (
            json!({"source": "lab", "repository": "local", "vms": ["debian-web"], "timezone": "Mars/Base"}),
            "timezone",
            "Mars/Base",
        ),
        (
            json!({"source": "lab", "repository": "local", "vms": "debian-web"}),
            "job",
            "vms",
        ),
        (
            json!({"source": "nope", "repository": "local", "vms": ["x"]}),
            "source",
            "no source `nope`",
        ),
        (
            json!({"source": "lab", "repository": "local", "vms": ["x"], "retention": {}}),
            "retention",
            "every count 0",
        ),
        (
            json!({"source": "lab", "repository": "local", "vms": ["x"], "colour": "red"}),
            "job",
            "colour",
        ),
    ] {
        let r = api
            .call("PUT", "/api/jobs/nightly", Some(body.clone()), None)
            .await;
        problem(&r, 422, needle);
        assert_eq!(r.body["field"], field, "{body}: {}", r.text);
    }
    problem(
        &api.call("PUT", "/api/jobs/nightly", None, None).await,
        400,
        "request body",
    );
    assert_eq!(std::fs::read_to_string(&toml_path).unwrap(), before);

    // A good job, by pattern, with a schedule in a time zone and retention.
    let job = json!({
        "source": "lab", "repository": "local", "vms": ["debian-*"],
        "schedule": "0 22 * * *", "timezone": "Europe/Berlin",
        "retention": {"last": 1}, "retries": 1, "retry_delay_seconds": 1
    });
    let r = api
        .ok("PUT", "/api/jobs/nightly", Some(job.clone()), None, 201)
        .await;
    assert!(
        r.body["next_run"].as_str().unwrap().contains("T2"),
        "{}",
        r.text
    );
    let etag = r.headers["etag"].to_str().unwrap().to_string();
    problem(
        &api.call("DELETE", "/api/sources/lab", None, Some(&src_etag))
            .await,
        409,
        "nightly",
    );

    // Run it by hand twice: each a session with a log, per-VM progress and a restore point;
    // retention keeps one.
    let mut points = Vec::new();
    for round in 0..2 {
        let r = operator
            .ok("POST", "/api/jobs/nightly/run", None, None, 202)
            .await;
        let id = r.body["session"].as_str().unwrap().to_string();
        let s = api.wait_session(&id).await;
        assert_eq!(s["status"], "success", "round {round}: {s}");
        let vms = s["vms"].as_array().unwrap();
        assert_eq!(vms.len(), 1, "{s}");
        assert_eq!(vms[0]["vm_name"], "debian-web");
        assert_eq!(vms[0]["done"], vms[0]["total"], "{s}");
        assert!(vms[0]["total"].as_u64().unwrap() > 0);
        assert!(!vms[0]["disks"].as_array().unwrap().is_empty(), "{s}");
        points.push(vms[0]["restore_point"].as_str().unwrap().to_string());
        assert_eq!(s["pruned"], round, "{s}");
        let lines = api.log_lines(&id).await;
        assert!(
            lines
                .iter()
                .any(|l| l.contains("restore point") && l.contains("written")),
            "{lines:?}"
        );
        let after = api
            .ok(
                "GET",
                &format!("/api/sessions/{id}/log?after=1"),
                None,
                None,
                200,
            )
            .await
            .body;
        assert_eq!(after.as_array().unwrap().len(), lines.len() - 1);
    }
    let rps = api
        .ok(
            "GET",
            "/api/repositories/local/restore-points",
            None,
            None,
            200,
        )
        .await
        .body;
    let ids: Vec<&str> = rps
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![points[1].as_str()],
        "retention keeps the newest only"
    );
    let sessions = api.ok("GET", "/api/sessions", None, None, 200).await.body;
    assert_eq!(sessions.as_array().unwrap().len(), 2);
    let hist = api
        .ok("GET", "/api/vms/debian-web/history", None, None, 200)
        .await
        .body;
    assert_eq!(hist[0]["restore_point"], points[1].as_str());

    // Cancel: a run cancelled at once ends cancelled and adds no restore point.
    let r = operator
        .ok("POST", "/api/jobs/nightly/run", None, None, 202)
        .await;
    let id = r.body["session"].as_str().unwrap().to_string();
    problem(
        &operator
            .call("POST", "/api/jobs/nightly/run", None, None)
            .await,
        409,
        "already running",
    );
    operator
        .ok(
            "POST",
            &format!("/api/sessions/{id}/cancel"),
            None,
            None,
            202,
        )
        .await;
    let s = api.wait_session(&id).await;
    assert_eq!(s["status"], "cancelled", "{s}");
    let rps2 = api
        .ok(
            "GET",
            "/api/repositories/local/restore-points",
            None,
            None,
            200,
        )
        .await
        .body;
    assert_eq!(rps2.as_array().unwrap().len(), 1, "{rps2}");
    problem(
        &operator
            .call("POST", &format!("/api/sessions/{id}/cancel"), None, None)
            .await,
        409,
        "ended",
    );

    // Metrics, parsed as Prometheus text.
    let m = api.get("/metrics").await;
    assert_eq!(m.status, 200);
    let lines = m.text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no {name} {label:?} in:\n{}", m.text));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name}: {:?}", s.value),
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = value(
        "ferry_vm_last_success_timestamp_seconds",
        Some(("vm", "debian-web")),
    );
    assert!(now - last < 600.0 && last <= now, "{last} vs {now}");
    let rpo = value("ferry_vm_rpo_age_seconds", Some(("vm", "debian-web")));
    assert!((0.0..600.0).contains(&rpo), "{rpo}");
    assert!(value("ferry_bytes_read_total", None) > 0.0);
    assert!(value("ferry_bytes_uploaded_total", None) > 0.0);
    assert_eq!(
        value(
            "ferry_repository_restore_points",
            Some(("repository", "local"))
        ),
        1.0
    );
    assert!(
        value(
            "ferry_repository_chunk_bytes",
            Some(("repository", "local"))
        ) > 0.0
    );
    assert_eq!(
        value("ferry_vm_backups_total", Some(("result", "success"))),
        2.0
    );
    assert_eq!(
        value("ferry_sessions_total", Some(("status", "cancelled"))),
        1.0
    );

    // Jobs change only with their ETag; delete needs it too.
    let mut j2 = job.clone();
    j2["retention"] = json!({"last": 3});
    let r = api
        .ok("PUT", "/api/jobs/nightly", Some(j2), Some(&etag), 200)
        .await;
    let etag2 = r.headers["etag"].to_str().unwrap().to_string();
    assert_ne!(etag, etag2);
    problem(
        &api.call("DELETE", "/api/jobs/nightly", None, Some(&etag))
            .await,
        412,
        "changed since",
    );

    // SIGTERM: a clean stop.
    let pid = nix::unistd::Pid::from_raw(serve.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = serve.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "ferry serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    // The catalog is an index: rebuilt from the repository it shows the restore point.
    std::fs::remove_file(state.join("catalog.sqlite")).unwrap();
    for f in ["catalog.sqlite-wal", "catalog.sqlite-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let (_serve2, info2) = start_serve(&state, &["--rebuild-catalog"]);
    let mut api2 = Api::new(&info2);
    assert_eq!(
        info2["tls_fingerprint"], info["tls_fingerprint"],
        "the certificate is kept"
    );
    api2.login("admin", ADMIN_PW).await;
    let vms = api2.ok("GET", "/api/vms", None, None, 200).await.body;
    let v = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm_name"] == "debian-web")
        .unwrap_or_else(|| panic!("{vms}"));
    assert_eq!(v["restore_points"], 1, "{vms}");
    assert!(v["rpo_age_seconds"].as_i64().unwrap() < 600);
    // Sessions of the first run are history, not in the repository: gone with the catalog.
    assert_eq!(
        api2.get("/api/sessions")
            .await
            .body
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_holds_against_the_live_service() {
    let st = ferry_testkit::peers_dir().join("venv/bin/schemathesis");
    assert!(
        st.exists(),
        "peer `schemathesis` not found at {}: run tests/peers/install.sh",
        st.display()
    );
    let dir = ferry_testkit::scratch_dir();
    let state = dir.path().join("state");
    let (_serve, info) = start_serve(&state, &[]);
    let mut api = Api::new(&info);
    api.login("admin", ADMIN_PW).await;
    // Something to read: a repository and a job (its source never answers: no job is run).
    let repo_dir = dir.path().join("repo");
    api.ok(
        "PUT",
        "/api/repositories/local",
        Some(json!({"url": repo_dir, "password": "repo password", "init": true})),
        None,
        201,
    )
    .await;
    api.ok("PUT", "/api/sources/lab", Some(json!({"kind": "xen", "url": "https://127.0.0.1:9", "username": "root", "password": "x", "tls_insecure": true})), None, 201).await;
    api.ok(
        "PUT",
        "/api/jobs/j",
        Some(
            json!({"source": "lab", "repository": "local", "vms": ["*"], "schedule": "0 3 * * *"}),
        ),
        None,
        201,
    )
    .await;
    let token = api.token.clone().unwrap();
    let url = format!("{}/api/openapi.json", info["url"].as_str().unwrap());
    let out = Command::new(&st)
        .args([
            "run",
            &url,
            "--tls-verify",
            "false",
            "--max-examples",
            "25",
            "--checks",
            "all",
            "--workers",
            "1",
        ])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        // Schema-valid jobs naming sources that do not exist are rightly refused (422): the
        // service validates references and cron expressions beyond what a schema can say.
        .args(["--exclude-checks", "positive_data_acceptance"])
        // Operations that reach out (log in to a source, create directories, run jobs) or end
        // the test's own session are left out: generated data must not make the service
        // connect anywhere or revoke the token.
        .args([
            "--exclude-operation-id",
            "testSource",
            "--exclude-operation-id",
            "sourceVms",
            "--exclude-operation-id",
            "putRepository",
            "--exclude-operation-id",
            "runJob",
            "--exclude-operation-id",
            "logout",
            "--exclude-operation-id",
            "deleteToken",
            "--exclude-operation-id",
            "deleteUser",
            "--exclude-operation-id",
            "putSource",
            "--exclude-operation-id",
            "startRestore",
            "--exclude-operation-id",
            "testAlertTarget",
            // The all-sessions event stream never ends by itself.
            "--exclude-operation-id",
            "allEvents",
        ])
        .env("NO_PROXY", "127.0.0.1")
        // Its cache of findings stays in the scratch directory, out of the source tree.
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // It really ran operations.
    assert!(text.contains("passed") || text.contains("Passed"), "{text}");
    // The service is still healthy and its configuration parses.
    api.ok("GET", "/health", None, None, 200).await;
}

/// A simulator, a service with an admin logged in, the simulator as source `lab`, a local
/// repository and a job `nightly` for `debian-web` already run once.
struct Lab {
    dir: tempfile::TempDir,
    info: Value,
    api: Api,
    restore_point: String,
    _sim: Killed,
    _serve: Killed,
}

impl Lab {
    /// `toml` is the start of `ferry.toml` (the `[appliance]` table, say).
    async fn start(toml: &str) -> Self {
        let dir = ferry_testkit::scratch_dir();
        let (sim_child, sim) = start_sim(&dir.path().join("sim"));
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("ferry.toml"), toml).unwrap();
        let (serve, info) = start_serve(&state, &[]);
        let mut api = Api::new(&info);
        api.login("admin", ADMIN_PW).await;
        let pw = sim["password"].as_str().unwrap().to_string();
        api.ok(
            "PUT",
            "/api/sources/lab",
            Some(source_body(&sim, &pw)),
            None,
            201,
        )
        .await;
        api.ok(
            "PUT",
            "/api/repositories/local",
            Some(
                json!({"url": dir.path().join("repo"), "password": "repo password", "init": true}),
            ),
            None,
            201,
        )
        .await;
        api.ok(
            "PUT",
            "/api/jobs/nightly",
            Some(json!({"source": "lab", "repository": "local", "vms": ["debian-web"], "retries": 0})),
            None,
            201,
        )
        .await;
        let s = api.run_job("nightly").await;
        assert_eq!(s["status"], "success", "{s}");
        let restore_point = s["vms"][0]["restore_point"].as_str().unwrap().to_string();
        Self {
            dir,
            info,
            api,
            restore_point,
            _sim: sim_child,
            _serve: serve,
        }
    }

    /// Starts a restore; returns its session id.
    async fn restore(&self, body: Value) -> String {
        let r = self
            .api
            .ok("POST", "/api/restores", Some(body), None, 202)
            .await;
        let id = r.body["session"].as_str().unwrap().to_string();
        assert_eq!(
            r.headers["location"].to_str().unwrap(),
            format!("/api/sessions/{id}")
        );
        id
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_run_as_sessions_through_the_api() {
    let lab = Lab::start("").await;
    let api = &lab.api;
    let rp = lab.restore_point.clone();

    // The VM's restore points, by name and by id, across repositories.
    let pts = api
        .ok("GET", "/api/vms/debian-web/restore-points", None, None, 200)
        .await
        .body;
    assert_eq!(pts.as_array().unwrap().len(), 1, "{pts}");
    assert_eq!(pts[0]["id"], rp.as_str());
    assert_eq!(pts[0]["repository"], "local");
    let disk = pts[0]["disks"][0]["name"].as_str().unwrap().to_string();
    let size = pts[0]["disks"][0]["size"].as_u64().unwrap();
    let by_id = api
        .ok(
            "GET",
            &format!(
                "/api/vms/{}/restore-points",
                pts[0]["vm_id"].as_str().unwrap()
            ),
            None,
            None,
            200,
        )
        .await
        .body;
    assert_eq!(by_id, pts);
    assert_eq!(
        api.ok("GET", "/api/vms/no-such-vm/restore-points", None, None, 200)
            .await
            .body,
        json!([])
    );

    // Bad requests: named fields, nothing started.
    let out = lab.dir.path().join("restored.raw");
    let base = json!({"repository": "local", "restore_point": rp, "kind": "disk", "disk": disk});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (body, status, field, needle) in [
        (base.clone(), 422, Some("path"), "path"),
        (
            with(json!({"path": "relative.raw"})),
            422,
            Some("path"),
            "absolute",
        ),
        (
            with(json!({"path": lab.dir.path().join("sim")})),
            422,
            Some("path"),
            "exists",
        ),
        (
            with(json!({"path": out, "disk": "nope"})),
            422,
            Some("disk"),
            "no disk `nope`",
        ),
        (
            with(json!({"path": out, "format": "qcow9"})),
            422,
            Some("format"),
            "qcow9",
        ),
        (
            with(json!({"path": out, "source": "lab"})),
            422,
            Some("source"),
            "does not apply",
        ),
        (
            with(json!({"kind": "vm", "disk": null})),
            422,
            Some("source"),
            "source",
        ),
        (
            with(json!({"kind": "vm", "disk": null, "source": "nope"})),
            422,
            Some("source"),
            "no source `nope`",
        ),
        (
            with(json!({"repository": "nope", "path": out})),
            422,
            Some("repository"),
            "no repository",
        ),
        (
            with(json!({"restore_point": "20000101T000000.000Z-00000000", "path": out})),
            404,
            None,
            "does not exist",
        ),
        (with(json!({"kind": "tape"})), 400, None, "tape"),
    ] {
        let r = api
            .call("POST", "/api/restores", Some(body.clone()), None)
            .await;
        problem(&r, status, needle);
        if let Some(f) = field {
            assert_eq!(r.body["field"], f, "{body}: {}", r.text);
        }
    }
    assert!(!out.exists());
    let mut viewer = Api::new(&lab.info);
    api.ok(
        "POST",
        "/api/users",
        Some(json!({"name": "vic", "role": "viewer", "password": "viewer pass"})),
        None,
        201,
    )
    .await;
    viewer.login("vic", "viewer pass").await;
    problem(
        &viewer
            .call(
                "POST",
                "/api/restores",
                Some(with(json!({"path": out}))),
                None,
            )
            .await,
        403,
        "operator",
    );

    // A disk to a new file: a session with progress that ends with the whole disk written.
    let id = lab.restore(with(json!({"path": out, "disk": disk}))).await;
    let s = api.wait_session(&id).await;
    assert_eq!(s["status"], "success", "{s}");
    assert_eq!(s["kind"], "restore");
    assert_eq!(s["restore"]["kind"], "disk");
    assert_eq!(s["vms"][0]["vm_name"], "debian-web");
    assert_eq!(s["vms"][0]["total"], size);
    assert_eq!(s["vms"][0]["done"], size, "{s}");
    let restored = std::fs::read(&out).unwrap();
    assert_eq!(restored.len() as u64, size);
    assert!(
        restored.iter().any(|b| *b != 0),
        "the restored disk is all zeros"
    );
    let lines = api.log_lines(&id).await;
    assert!(lines.iter().any(|l| l.contains("restored to")), "{lines:?}");

    // The disk over NBD: served until the session is cancelled; the same bytes.
    let id = lab
        .restore(
            json!({"repository": "local", "restore_point": rp, "kind": "export", "disk": disk}),
        )
        .await;
    let s = api
        .ok("GET", &format!("/api/sessions/{id}"), None, None, 200)
        .await
        .body;
    assert_eq!(s["status"], "running", "{s}");
    let uri = s["restore"]["nbd_uri"].as_str().unwrap().to_string();
    let copy = lab.dir.path().join("exported.raw");
    ferry_testkit::run_ok(
        Command::new(ferry_testkit::tool("nbdcopy"))
            .arg(&uri)
            .arg(&copy),
    );
    assert!(
        std::fs::read(&copy).unwrap() == restored,
        "the export differs from the restored file"
    );
    api.ok(
        "POST",
        &format!("/api/sessions/{id}/cancel"),
        None,
        None,
        202,
    )
    .await;
    let s = api.wait_session(&id).await;
    assert_eq!(s["status"], "success", "a stopped export ends well: {s}");
    let o = Command::new(ferry_testkit::tool("nbdinfo"))
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "the export still answers after its session ended"
    );

    // The whole VM onto the source: a new VM with the restore point's disks.
    let id = lab
        .restore(json!({"repository": "local", "restore_point": rp, "kind": "vm", "source": "lab", "name": "web-restored"}))
        .await;
    let s = api.wait_session(&id).await;
    assert_eq!(s["status"], "success", "{s}");
    let new_vm = &s["restore"]["new_vm"];
    assert_eq!(new_vm["name"], "web-restored", "{s}");
    assert!(s["vms"][0]["done"].as_u64().unwrap() > 0, "{s}");
    let vms = api
        .ok("GET", "/api/sources/lab/vms", None, None, 200)
        .await
        .body;
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "web-restored" && v["id"] == new_vm["id"]),
        "{vms}"
    );
    // Restore sessions are listed with the job runs.
    let all = api.ok("GET", "/api/sessions", None, None, 200).await.body;
    let kinds: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "restore").count(),
        3,
        "{kinds:?}"
    );
}

/// A child printing JSON lines; reads them one at a time.
struct Lines {
    _child: Killed,
    out: BufReader<std::process::ChildStdout>,
}

impl Lines {
    fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self {
            _child: Killed(child),
            out,
        }
    }

    fn next(&mut self) -> Value {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datastore_limits_queue_vms_visibly_and_the_bottleneck_is_live() {
    let lab = Lab::start("").await;
    let api = &lab.api;
    // Bad limits: refused with the field named.
    for (field, v) in [("per_datastore_vms", 0), ("parallel_disks", 5000)] {
        let mut body = json!({"source": "lab", "repository": "local", "vms": ["*"]});
        body[field] = json!(v);
        let r = api.call("PUT", "/api/jobs/bad", Some(body), None).await;
        assert_eq!(r.status, 422, "{}", r.text);
        assert_eq!(r.body["field"], field, "{}", r.text);
    }
    // debian-web has a disk on each SR, win-db both on the LVM SR: with one VM per datastore,
    // two VMs in parallel still run one after the other, and the second says why it waits.
    // Reads throttled (all day) so the first runs long enough to watch.
    api.ok(
        "PUT",
        "/api/jobs/pair",
        Some(json!({"source": "lab", "repository": "local", "vms": ["debian-web", "win-db"],
            "retries": 0, "parallel_vms": 2, "per_datastore_vms": 1, "parallel_disks": 4,
            "throttle": [{"start": "00:00", "end": "12:00", "rate": 1}, {"start": "12:00", "end": "00:00", "rate": 1}]})),
        None,
        201,
    )
    .await;
    let id = api
        .ok("POST", "/api/jobs/pair/run", None, None, 202)
        .await
        .body["session"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut saw_wait, mut saw_live) = (None, None);
    let t = Instant::now();
    let end = loop {
        let v = api
            .ok("GET", &format!("/api/sessions/{id}"), None, None, 200)
            .await
            .body;
        for m in v["vms"].as_array().unwrap() {
            if let Some(w) = m["waiting_for"].as_str() {
                saw_wait.get_or_insert(w.to_string());
            }
            if m["status"] == "running" && m["time_split"].is_object() {
                saw_live.get_or_insert(m.clone());
            }
        }
        if !["queued", "running", "retrying"].contains(&v["status"].as_str().unwrap()) {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(50),
            "session still running: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(end["status"], "success", "{end}");
    let w = saw_wait.expect("a VM waited and said so");
    assert!(
        w.contains("datastore `Shared LVM storage` (per-datastore-vms = 1)"),
        "{w}"
    );
    let live = saw_live.expect("a running VM showed its split live");
    let split = &live["time_split"];
    assert!(
        ["source", "cpu", "target"].contains(&split["bottleneck"].as_str().unwrap()),
        "{live}"
    );
    let sum: f64 = ["source_pct", "cpu_pct", "target_pct"]
        .iter()
        .map(|k| split[k].as_f64().unwrap())
        .sum();
    assert!((sum - 100.0).abs() < 0.5, "{live}");
    assert!(
        !live["disk_time_splits"].as_array().unwrap().is_empty(),
        "{live}"
    );
    for m in end["vms"].as_array().unwrap() {
        assert!(m["waiting_for"].is_null(), "{m}");
        assert_eq!(m["disk_time_splits"].as_array().unwrap().len(), 2, "{m}");
    }
    let lines = api.log_lines(&id).await;
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("waiting for datastore `Shared LVM storage`")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("disk ") && l.contains(": bottleneck: ")),
        "the live log tells the bottleneck: {lines:?}"
    );

    // Disk slots: two 2-disk VMs, 3 disk slots: the second VM waits for its two.
    let r = api.get("/api/jobs/pair").await;
    let etag = r.headers["etag"].to_str().unwrap().to_string();
    let mut j = r.body.clone();
    j.as_object_mut().unwrap().remove("per_datastore_vms");
    j["parallel_disks"] = json!(3);
    api.ok("PUT", "/api/jobs/pair", Some(j), Some(&etag), 200)
        .await;
    let s = api.run_job("pair").await;
    assert_eq!(s["status"], "success", "{s}");
    let lines = api.log_lines(s["id"].as_str().unwrap()).await;
    assert!(
        lines
            .iter()
            .any(|l| l == "waiting for 2 disk slot(s) of the job (parallel-disks = 3)"),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("datastore")), "{lines:?}");
}

/// Waits until `f` holds for the alerts list; returns it.
async fn wait_alerts(api: &Api, what: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let a = api.ok("GET", "/api/alerts", None, None, 200).await.body;
        let a = a.as_array().unwrap().clone();
        if f(&a) {
            return a;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: {a:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the mails aiosmtpd saved into Maildir `dir`, waiting for at least `n`.
fn wait_mails(dir: &Path, n: usize) -> Vec<String> {
    let t = Instant::now();
    loop {
        let mut mails: Vec<String> = std::fs::read_dir(dir.join("new"))
            .map(|d| {
                // Header lines folded by the sender are joined again.
                d.map(|e| {
                    std::fs::read_to_string(e.unwrap().path())
                        .unwrap()
                        .replace("\r\n", "\n")
                        .replace("\n ", " ")
                })
                .collect()
            })
            .unwrap_or_default();
        if mails.len() >= n {
            mails.sort();
            return mails;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} of {n} mails arrived",
            mails.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_a_mail_sink_and_a_webhook() {
    let venv = ferry_testkit::peers_dir().join("venv/bin/python");
    let lab = Lab::start("[appliance]\nrpo-check-seconds = 1\n").await;
    let api = &lab.api;
    // The SMTP sink: aiosmtpd (PyPI) saving into a Maildir; the webhook: a small receiver.
    let maildir = lab.dir.path().join("maildir");
    let port = ferry_testkit::free_port();
    let _smtp = Killed(
        Command::new(&venv)
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "aiosmtpd did not start (peer missing? run tests/peers/install.sh)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut hook = Lines::spawn(
        Command::new(&venv)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhook_sink.py")),
    );
    let hook_port = hook.next()["port"].as_u64().unwrap();

    // Targets: bad ones refused with the field named, nothing saved.
    for (body, field) in [
        (
            json!({"kind": "email", "smtp_host": "127.0.0.1", "from": "ferry@appliance.test"}),
            "to",
        ),
        (
            json!({"kind": "email", "smtp_host": "127.0.0.1", "from": "not an address", "to": ["ops@example.test"]}),
            "from",
        ),
        (
            json!({"kind": "webhook", "url": "ftp://example.test/x"}),
            "url",
        ),
        (
            json!({"kind": "webhook", "url": "http://127.0.0.1/x", "events": ["sunshine"]}),
            "events",
        ),
        (json!({"kind": "pager"}), "alert target"),
    ] {
        let r = api
            .call("PUT", "/api/alert-targets/bad", Some(body.clone()), None)
            .await;
        assert_eq!(r.status, 422, "{body}: {}", r.text);
        assert_eq!(r.body["field"], field, "{body}: {}", r.text);
    }
    assert_eq!(api.get("/api/alert-targets/bad").await.status, 404);
    api.ok(
        "PUT",
        "/api/alert-targets/mail",
        Some(
            json!({"kind": "email", "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_tls": "none",
                    "from": "ferry@appliance.test", "to": ["ops@example.test"]}),
        ),
        None,
        201,
    )
    .await;
    let r = api
        .ok(
            "PUT",
            "/api/alert-targets/hook",
            Some(json!({"kind": "webhook", "url": format!("http://127.0.0.1:{hook_port}/ferry"), "password": "hook secret 1"})),
            None,
            201,
        )
        .await;
    assert_eq!(r.body["password_set"], true);
    let listed = api.ok("GET", "/api/alert-targets", None, None, 200).await;
    assert!(!listed.text.contains("hook secret 1"), "{}", listed.text);
    let cfg = std::fs::read_to_string(lab.dir.path().join("state/ferry.toml")).unwrap();
    assert!(
        !cfg.contains("hook secret 1") && cfg.contains("[alert-targets.hook]"),
        "{cfg}"
    );

    // The test action delivers at once, to that target only.
    api.ok("POST", "/api/alert-targets/mail/test", None, None, 200)
        .await;
    let mails = wait_mails(&maildir, 1);
    assert!(
        mails[0].contains("Subject: [Ferry] test alert to `mail`"),
        "{}",
        mails[0]
    );
    assert!(mails[0].contains("To: ops@example.test"), "{}", mails[0]);
    api.ok("POST", "/api/alert-targets/hook/test", None, None, 200)
        .await;
    let h = hook.next();
    assert_eq!(h["authorization"], "Bearer hook secret 1");
    assert_eq!(h["body"]["kind"], "test");
    // A target that cannot be reached: a clear 502.
    api.ok(
        "PUT",
        "/api/alert-targets/dead",
        Some(json!({"kind": "webhook", "url": format!("http://127.0.0.1:{}/x", ferry_testkit::free_port()), "enabled": false})),
        None,
        201,
    )
    .await;
    problem(
        &api.call("POST", "/api/alert-targets/dead/test", None, None)
            .await,
        502,
        "dead",
    );

    // A failing job: one alert, by mail and webhook.
    api.ok(
        "PUT",
        "/api/jobs/broken",
        Some(json!({"source": "lab", "repository": "local", "vms": ["no-such-vm"], "retries": 0})),
        None,
        201,
    )
    .await;
    let s = api.run_job("broken").await;
    assert_eq!(s["status"], "failed");
    let id = s["id"].as_str().unwrap().to_string();
    let alerts = wait_alerts(api, "failure alert delivered", |a| {
        a.iter()
            .any(|x| x["kind"] == "failure" && x["deliveries"].as_array().unwrap().len() == 2)
    })
    .await;
    let f = alerts.iter().find(|x| x["kind"] == "failure").unwrap();
    assert_eq!(f["session"], id.as_str());
    assert!(
        f["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["ok"] == true),
        "{f}"
    );
    let h = hook.next();
    assert_eq!(h["body"]["kind"], "failure");
    assert_eq!(h["body"]["job"], "broken");
    assert!(
        h["body"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-vm"),
        "{h}"
    );
    let mails = wait_mails(&maildir, 2);
    assert!(
        mails
            .iter()
            .any(|m| m.contains("Subject: [Ferry] job `broken` failed")),
        "{mails:?}"
    );

    // The job fixed and run again: the failure is resolved, with one `resolved` alert.
    let r = api.get("/api/jobs/broken").await;
    let etag = r.headers["etag"].to_str().unwrap().to_string();
    let mut j = r.body.clone();
    j["vms"] = json!(["debian-web"]);
    api.ok("PUT", "/api/jobs/broken", Some(j), Some(&etag), 200)
        .await;
    assert_eq!(api.run_job("broken").await["status"], "success");
    let alerts = wait_alerts(api, "resolved alert delivered", |a| {
        a.iter()
            .any(|x| x["kind"] == "resolved" && x["deliveries"].as_array().unwrap().len() == 2)
    })
    .await;
    let r = alerts.iter().find(|x| x["kind"] == "resolved").unwrap();
    assert_eq!(r["resolves"], "failure", "{r}");
    assert_eq!(r["job"], "broken", "{r}");
    assert!(r["resolved"].is_i64(), "a resolved alert is closed: {r}");
    let f = alerts.iter().find(|x| x["kind"] == "failure").unwrap();
    assert!(f["resolved"].is_i64(), "the failure is resolved: {f}");
    let h = hook.next();
    assert_eq!(h["body"]["kind"], "resolved", "{h}");
    assert_eq!(h["body"]["resolves"], "failure", "{h}");
    let mails = wait_mails(&maildir, 3);
    assert!(
        mails
            .iter()
            .any(|m| m.contains("Subject: [Ferry] resolved: job `broken` succeeds again")),
        "{mails:?}"
    );
    // Another success resolves nothing more: still one `resolved` alert.
    assert_eq!(api.run_job("broken").await["status"], "success");
    let alerts = api.ok("GET", "/api/alerts", None, None, 200).await.body;
    let n = |a: &Value, kind: &str| {
        a.as_array()
            .unwrap()
            .iter()
            .filter(|x| x["kind"] == kind)
            .count()
    };
    assert_eq!(n(&alerts, "resolved"), 1, "{alerts}");

    // An RPO breach: a job promising 1 s, checked every second; raised once, not per check.
    let r = api.get("/api/jobs/nightly").await;
    let etag = r.headers["etag"].to_str().unwrap().to_string();
    let mut j = r.body.clone();
    j["rpo_hours"] = json!(0.0003);
    api.ok("PUT", "/api/jobs/nightly", Some(j), Some(&etag), 200)
        .await;
    let h = hook.next();
    assert_eq!(h["body"]["kind"], "rpo", "{h}");
    assert_eq!(h["body"]["vm"], "debian-web");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alerts = api.ok("GET", "/api/alerts", None, None, 200).await.body;
    let rpo: Vec<&Value> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "rpo")
        .collect();
    assert_eq!(rpo.len(), 1, "{alerts}");
    assert!(rpo[0]["resolved"].is_null());
    let mails = wait_mails(&maildir, 4);
    assert!(
        mails.iter().any(|m| m.contains("breaches its RPO")),
        "{mails:?}"
    );

    // The promise relaxed: the breach ends with one `resolved` alert for the rpo targets.
    let r = api.get("/api/jobs/nightly").await;
    let etag = r.headers["etag"].to_str().unwrap().to_string();
    let mut j = r.body.clone();
    j["rpo_hours"] = json!(1000.0);
    api.ok("PUT", "/api/jobs/nightly", Some(j), Some(&etag), 200)
        .await;
    let h = hook.next();
    assert_eq!(h["body"]["kind"], "resolved", "{h}");
    assert_eq!(h["body"]["resolves"], "rpo", "{h}");
    assert_eq!(h["body"]["vm"], "debian-web");
    let alerts = wait_alerts(api, "rpo breach resolved", |a| {
        a.iter()
            .any(|x| x["kind"] == "rpo" && x["resolved"].is_i64())
    })
    .await;
    assert_eq!(
        alerts.iter().filter(|x| x["resolves"] == "rpo").count(),
        1,
        "{alerts:?}"
    );
    let mails = wait_mails(&maildir, 5);
    assert!(
        mails
            .iter()
            .any(|m| m.contains("Subject: [Ferry] resolved: VM `debian-web` meets its RPO")),
        "{mails:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_console_backs_up_and_restores_in_chromium() {
    let dir = ferry_testkit::scratch_dir();
    let (_sim, sim) = start_sim(&dir.path().join("sim"));
    let state = dir.path().join("state");
    let (_serve, info) = start_serve(&state, &[]);
    // The console is served by the service itself, under a strict policy.
    let mut api = Api::new(&info);
    let page = api.get("/").await;
    assert_eq!(page.status, 200);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(page.text.contains("/console/app.js"));
    let mut extra = source_body(&sim, "");
    for k in ["kind", "url", "username", "password", "tls_fingerprint"] {
        extra.as_object_mut().unwrap().remove(k);
    }
    let shots = dir.path().join("shots");
    std::fs::create_dir_all(&shots).unwrap();
    let (sim_line, extra) = (sim.to_string(), extra.to_string());
    let (repo, profile) = (dir.path().join("repo"), dir.path().join("chromium-profile"));
    let report = cli::chromium_script(
        "console_e2e.js",
        &[
            ("FERRY_URL", info["url"].as_str().unwrap().as_ref()),
            ("FERRY_USER", "admin".as_ref()),
            ("FERRY_PASSWORD", ADMIN_PW.as_ref()),
            ("FERRY_SIM", sim_line.as_ref()),
            ("FERRY_SOURCE_EXTRA", extra.as_ref()),
            ("FERRY_REPO", repo.as_os_str()),
            ("FERRY_SHOTS", shots.as_os_str()),
            ("FERRY_PROFILE", profile.as_os_str()),
        ],
    );
    let shots_taken = report["shots"].as_array().unwrap();
    assert_eq!(shots_taken.len(), 11, "{report}");
    for s in shots_taken {
        let png = std::fs::read(s["file"].as_str().unwrap()).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "{s}"
        );
    }
    // What the browser did is real: the restored VM is on the source, the job's restore point
    // in the repository.
    api.login("admin", ADMIN_PW).await;
    let vms = api
        .ok("GET", "/api/sources/lab/vms", None, None, 200)
        .await
        .body;
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "web-from-console"),
        "{vms}"
    );
    let pts = api
        .ok("GET", "/api/vms/debian-web/restore-points", None, None, 200)
        .await
        .body;
    // The job's, and the replica cycle's.
    assert_eq!(pts.as_array().unwrap().len(), 2, "{pts}");
    let r = api
        .ok("GET", "/api/replicas/web", None, None, 200)
        .await
        .body;
    assert_eq!(r["status"]["cycles"], 1, "{r}");
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "debian-web (replica)"),
        "{vms}"
    );
    assert!(api.get("/api/sources/bad").await.status == 404);
}
