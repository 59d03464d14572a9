//! Streamed session progress (docs/appliance-service.md "Event streams", ADR 0178) through
//! the `ferry` binary: `ferry serve` backs up VMs of `ferry sim xen` with reads throttled so
//! the run can be watched, and clients read `GET /api/sessions/{id}/events` and
//! `GET /api/events` as Server-Sent Events over HTTPS (reqwest, pinned): progress with growing
//! bytes, every log line exactly once and in order (held against `GET …/log`), the session's
//! states and `end`; a reconnect with `Last-Event-ID` gets exactly the rest; a viewer opens
//! the stream with a ticket (what a browser's `EventSource` does), nobody opens it without
//! one, and the ticket never reaches the service's log; a client that stops reading falls
//! behind and gets a `resync`, and still every line.

use serde_json::{Value, json};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/xen_probe.rs"]
mod xen_probe;

const ADMIN_PW: &str = "admin password 1";

/// A simulator, `ferry serve -vvv` (its log in `serve.log`) with `appliance` as its
/// `[appliance]` table, the simulator as source `lab` and a local repository `local`.
struct Lab {
    dir: tempfile::TempDir,
    info: Value,
    http: reqwest::Client,
    token: String,
    _sim: ferry_testkit::Killed,
    _serve: ferry_testkit::Killed,
}

impl Lab {
    async fn start(appliance: &str, sim_args: &[&str]) -> Self {
        let dir = ferry_testkit::scratch_dir();
        let (sim_child, sim) =
            xen_probe::start_sim_with(cli::ferry(), &dir.path().join("sim"), sim_args);
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let pw = dir.path().join("lab.password");
        std::fs::write(&pw, sim["password"].as_str().unwrap()).unwrap();
        let config = dir.path().join("ferry.toml");
        std::fs::write(
            &config,
            format!(
                "[appliance]\n{appliance}\n{}",
                xen_probe::source_toml("lab", &sim, &pw, &dir.path().join("xen-state"))
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let (serve, info) = ferry_testkit::Killed::spawn_json_line(
            cli::ferry()
                .args(["-vvv", "serve", "--listen", "127.0.0.1:0"])
                .args(["--init-admin", "admin", "--state-dir"])
                .arg(&state)
                .arg("--config")
                .arg(&config)
                .env("FERRY_ADMIN_PASSWORD", ADMIN_PW)
                .stderr(Stdio::from(log)),
        );
        let http = cli::pinned_client(&info);
        let mut lab = Self {
            dir,
            info,
            http,
            token: String::new(),
            _sim: sim_child,
            _serve: serve,
        };
        lab.token = lab.login("admin", ADMIN_PW).await;
        let repo = lab.dir.path().join("repo");
        lab.call(
            "PUT",
            "/api/repositories/local",
            Some(json!({"url": repo, "password": "repo password", "init": true})),
            201,
        )
        .await;
        lab
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.info["url"].as_str().unwrap())
    }

    async fn login(&self, user: &str, pw: &str) -> String {
        let r = self
            .http
            .post(self.url("/api/login"))
            .json(&json!({"username": user, "password": pw}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// `method path` as the admin, answered `want`; the JSON body.
    async fn call(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self
            .http
            .request(m, self.url(path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let st = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(st, want, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// A job `name` of `vms` whose reads are throttled to `rate` MiB/s all day (so its runs
    /// can be watched), with more `settings`.
    async fn throttled_job(&self, name: &str, vms: Value, rate: u32, settings: Value) {
        let mut body = json!({"source": "lab", "repository": "local", "vms": vms, "retries": 0,
            "throttle": [{"start": "00:00", "end": "12:00", "rate": rate}, {"start": "12:00", "end": "00:00", "rate": rate}]});
        for (k, v) in settings.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.call("PUT", &format!("/api/jobs/{name}"), Some(body), 201)
            .await;
    }

    /// The session's log as `GET /api/sessions/{id}/log` gives it: (line, message).
    async fn log(&self, id: &str) -> Vec<(u64, String)> {
        let v = self
            .call("GET", &format!("/api/sessions/{id}/log"), None, 200)
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap(),
                    e["message"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn wait_session(&self, id: &str) -> Value {
        let t = Instant::now();
        loop {
            let s = self
                .call("GET", &format!("/api/sessions/{id}"), None, 200)
                .await;
            if !["queued", "running", "retrying"].contains(&s["status"].as_str().unwrap()) {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(50), "still running: {s}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Opens an event stream: `auth` is a bearer token or, with `?ticket=` in `path`, none.
    async fn open(&self, path: &str, auth: Option<&str>, last_id: Option<&str>) -> Sse {
        let mut r = self.http.get(self.url(path));
        if let Some(t) = auth {
            r = r.bearer_auth(t);
        }
        if let Some(l) = last_id {
            r = r.header("Last-Event-ID", l);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            resp,
            buf: String::new(),
        }
    }
}

/// One Server-Sent Event, or a comment (`name` empty).
#[derive(Debug, Clone)]
struct Ev {
    name: String,
    id: String,
    data: Value,
    comment: String,
}

/// A stream's events as they arrive.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    /// The next event or comment; `None` when the stream has ended.
    async fn next(&mut self) -> Option<Ev> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = Ev {
                    name: String::new(),
                    id: String::new(),
                    data: Value::Null,
                    comment: String::new(),
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        ev.comment = c.trim().to_string();
                    } else if let Some((k, v)) = line.split_once(':') {
                        let v = v.strip_prefix(' ').unwrap_or(v);
                        match k {
                            "event" => ev.name = v.to_string(),
                            "id" => ev.id = v.to_string(),
                            "data" => data.push_str(v),
                            _ => {}
                        }
                    }
                }
                if ev.name.is_empty() && ev.comment.is_empty() {
                    continue; // `retry:`
                }
                ev.data = serde_json::from_str(&data).unwrap_or(Value::Null);
                return Some(ev);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(40), self.resp.chunk())
                .await
                .expect("the stream went quiet for 40 s")
                .unwrap()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Everything up to the end of the stream.
    async fn rest(&mut self) -> Vec<Ev> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

/// The (line, message) of the `log` events.
fn lines(evs: &[Ev]) -> Vec<(u64, String)> {
    evs.iter()
        .filter(|e| e.name == "log")
        .map(|e| {
            (
                e.data["seq"].as_u64().unwrap(),
                e.data["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn run(lab: &Lab, job: &str) -> String {
    lab.call("POST", &format!("/api/jobs/{job}/run"), None, 202)
        .await["session"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_streams_progress_and_each_log_line_once_and_resumes_exactly() {
    let lab = Lab::start("", &[]).await;
    // Reads throttled to 2 MiB/s: debian-web's 12 MiB take some seconds.
    lab.throttled_job("watch", json!(["debian-web"]), 2, json!({}))
        .await;
    lab.call(
        "POST",
        "/api/users",
        Some(json!({"name": "vic", "role": "viewer", "password": "viewer password"})),
        201,
    )
    .await;
    let viewer = lab.login("vic", "viewer password").await;

    // Nobody without a token or a ticket; not with a made-up ticket.
    for path in [
        "/api/events",
        "/api/sessions/x/events",
        "/api/sessions/x/events?ticket=fe_made-up",
    ] {
        let r = lab.http.get(lab.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    // A ticket is for the streams only.
    let ticket = lab
        .http
        .post(lab.url("/api/events/ticket"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let r = lab
        .http
        .get(lab.url(&format!("/api/sessions?ticket={ticket}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The all-sessions stream, opened before the run.
    let mut all = lab.open("/api/events", Some(&viewer), None).await;
    let first = all.next().await.unwrap();
    assert_eq!(first.name, "resync", "{first:?}");
    assert_eq!(first.data["running"], json!([]));
    let all_task = tokio::spawn(async move {
        let t = Instant::now();
        let mut seen = Vec::new();
        // Until the run ended and a heartbeat came (every 15 s).
        while let Some(e) = all.next().await {
            seen.push(e);
            let ended = seen
                .iter()
                .any(|e| e.name == "state" && e.data["status"] == "success");
            if ended && seen.iter().any(|e| e.comment == "heartbeat") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(45), "{seen:?}");
        }
        seen
    });

    let id = run(&lab, "watch").await;
    // The viewer follows it with the ticket, as the console's EventSource does.
    let path = format!("/api/sessions/{id}/events?ticket={ticket}");
    let mut whole = lab.open(&path, None, None).await;
    let whole_task = tokio::spawn(async move { whole.rest().await });

    // A second client reads until it has some lines and progress, drops the connection, and
    // comes back with the last id it had.
    let mut part = lab
        .open(&format!("/api/sessions/{id}/events"), Some(&viewer), None)
        .await;
    let mut before = Vec::new();
    while let Some(e) = part.next().await {
        before.push(e);
        if lines(&before).len() >= 3 && before.iter().any(|e| e.name == "progress") {
            break;
        }
    }
    drop(part);
    let last = before.last().unwrap().id.clone();
    assert!(!last.is_empty(), "{before:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = lab
        .open(
            &format!("/api/sessions/{id}/events"),
            Some(&viewer),
            Some(&last),
        )
        .await
        .rest()
        .await;

    let whole = whole_task.await.unwrap();
    let end = lab.wait_session(&id).await;
    assert_eq!(end["status"], "success", "{end}");
    let log = lab.log(&id).await;
    assert!(log.len() >= 5, "{log:?}");

    // Every line once, in order, as the log endpoint has them; then the end.
    assert_eq!(lines(&whole), log);
    let last_ev = whole.last().unwrap();
    assert_eq!(last_ev.name, "end", "{whole:?}");
    assert_eq!(last_ev.data["status"], "success");
    let states: Vec<&str> = whole
        .iter()
        .filter(|e| e.name == "state")
        .map(|e| e.data["status"].as_str().unwrap())
        .collect();
    assert_eq!(states.last(), Some(&"success"), "{states:?}");
    assert!(states.contains(&"running"), "{states:?}");
    // Progress of the VM as it went: bytes growing, a rate, an ETA, its state.
    let done: Vec<u64> = whole
        .iter()
        .filter(|e| e.name == "progress")
        .map(|e| {
            assert_eq!(e.data["session"], id.as_str());
            assert_eq!(e.data["vm_name"], "debian-web");
            e.data["done"].as_u64().unwrap()
        })
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    let distinct = {
        let mut d = done.clone();
        d.dedup();
        d
    };
    assert!(distinct.len() >= 3, "bytes done grew visibly: {done:?}");
    let running = whole
        .iter()
        .find(|e| e.name == "progress" && e.data["rate"].as_u64() > Some(0))
        .expect("progress with a rate");
    assert_eq!(running.data["status"], "running");
    assert!(running.data["eta_seconds"].is_u64(), "{running:?}");
    assert_eq!(running.data["total"], json!(12 << 20));
    // Ids: N on line N, N.K after it.
    for e in &whole {
        let line = e.id.split('.').next().unwrap().parse::<u64>().unwrap();
        if e.name == "log" {
            assert_eq!(e.id, e.data["seq"].to_string());
        } else {
            assert!(e.id.contains('.'), "{e:?}");
            assert!(line <= log.len() as u64);
        }
    }

    // The reconnect: exactly the lines after the last id, then the end.
    let had = lines(&before);
    let resumed = lines(&after);
    let mut joined = had.clone();
    joined.extend(resumed.iter().cloned());
    assert_eq!(joined, log, "before: {had:?}\nafter: {resumed:?}");
    assert_eq!(after.last().unwrap().name, "end");
    // After the end: nothing but the state and the end; from the start: every line.
    let tail = lab
        .open(
            &format!("/api/sessions/{id}/events"),
            Some(&viewer),
            Some(&log.len().to_string()),
        )
        .await
        .rest()
        .await;
    let names: Vec<&str> = tail.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["state", "end"], "{tail:?}");
    let again = lab
        .open(&format!("/api/sessions/{id}/events"), Some(&viewer), None)
        .await
        .rest()
        .await;
    assert_eq!(lines(&again), log);

    // The all-sessions stream: the session's states and progress, no log lines, heartbeats.
    let seen = all_task.await.unwrap();
    assert!(!seen.iter().any(|e| e.name == "log"));
    let mine: Vec<&str> = seen
        .iter()
        .filter(|e| e.name == "state" && e.data["id"] == id.as_str())
        .map(|e| e.data["status"].as_str().unwrap())
        .collect();
    assert!(
        mine.first() == Some(&"queued") && mine.last() == Some(&"success"),
        "{mine:?}"
    );
    assert!(seen.iter().any(|e| e.name == "progress"));
    let ids: Vec<u64> = seen
        .iter()
        .filter(|e| e.name == "state" || e.name == "progress")
        .map(|e| e.id.parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // A ticket dies with the token that asked for it.
    lab.http
        .post(lab.url("/api/logout"))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    let r = lab.http.get(lab.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // No ticket or token in the service's log, even at trace level.
    let text = std::fs::read_to_string(lab.dir.path().join("serve.log")).unwrap();
    assert!(text.contains("session ended: success"), "the log is read");
    assert!(
        !text.contains(&ticket),
        "the ticket is in the service's log"
    );
    assert!(!text.contains(&viewer), "the token is in the service's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_falls_behind_gets_a_resync_and_still_every_line() {
    // The smallest buffer and 16 VMs' progress sampled every 10 ms: a client that stops
    // reading for the run falls behind (bursts of 16 events outrun a buffer of 4, and the
    // volume outruns what the kernel buffers for a connection).
    let lab = Lab::start(
        "events-buffer = 4\nevents-progress-ms = 10\nmax-concurrent-vms = 16\nper-source-vms = 16",
        &["--extra-vms", "16"],
    )
    .await;
    lab.throttled_job("many", json!(["vm-*"]), 1, json!({"parallel_vms": 16}))
        .await;
    let id = run(&lab, "many").await;
    let mut slow = lab
        .open(
            &format!("/api/sessions/{id}/events"),
            Some(&lab.token),
            None,
        )
        .await;
    let first = slow.next().await.unwrap();
    let end = lab.wait_session(&id).await;
    assert_eq!(end["status"], "success", "{end}");
    let mut evs = vec![first];
    evs.extend(slow.rest().await);
    let resync = evs.iter().find(|e| e.name == "resync").unwrap_or_else(|| {
        let bytes: usize = evs.iter().map(|e| e.data.to_string().len()).sum();
        panic!("no resync in {} events ({bytes} bytes)", evs.len())
    });
    assert_eq!(resync.data["id"], id.as_str());
    assert!(resync.data["status"].is_string(), "{resync:?}");
    assert_eq!(lines(&evs), lab.log(&id).await);
    assert_eq!(evs.last().unwrap().name, "end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_running_sessions_from_the_streams_in_chromium() {
    let lab = Lab::start("", &[]).await;
    lab.throttled_job("slow", json!(["debian-web"]), 3, json!({}))
        .await;
    lab.throttled_job("other", json!(["win-db"]), 2, json!({}))
        .await;
    let shots = lab.dir.path().join("shots");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = lab.dir.path().join("chromium-profile");
    let report = cli::chromium_script(
        "console_stream_e2e.js",
        &[
            ("FERRY_URL", lab.info["url"].as_str().unwrap().as_ref()),
            ("FERRY_USER", "admin".as_ref()),
            ("FERRY_PASSWORD", ADMIN_PW.as_ref()),
            ("FERRY_JOB", "slow".as_ref()),
            ("FERRY_JOB2", "other".as_ref()),
            ("FERRY_SHOTS", shots.as_os_str()),
            ("FERRY_PROFILE", profile.as_os_str()),
        ],
    );
    assert!(report["streamed"].as_u64().unwrap() > 5, "{report}");
    let png = std::fs::read(report["shot"].as_str().unwrap()).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{report}"
    );
    // What the browser watched is real: three runs, all successful.
    let sessions = lab.call("GET", "/api/sessions", None, 200).await;
    let ok = |job: &str| {
        sessions
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["job"] == job && s["status"] == "success")
            .count()
    };
    assert_eq!((ok("slow"), ok("other")), (2, 1), "{sessions}");
}
