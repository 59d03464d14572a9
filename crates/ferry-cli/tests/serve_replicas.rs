//! Replica jobs through the appliance's REST API (docs/appliance-service.md "Replicas"):
//! `ferry serve` with two `ferry sim xen` pools (`prod` with the 2-disk VM `debian-web`, `dr`
//! for its standby) driven over HTTPS like an administrator's script: roles, a job's table
//! refused and saved, refusals with their reasons, sync / test / test cleanup / unplanned
//! failover at a chosen point / reverse running in the background with their health in the
//! replica's view, and a delete that ends replication. The pools are looked at through the
//! XenAPI SDK (`tests/xen_probe.py`); disks are compared with `qemu-img compare`.

use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/replica_lab.rs"]
mod replica_lab;
#[path = "common/xen_probe.rs"]
mod xen_probe;
use cli::ferry;
use replica_lab::{assert_same_disks, init_repo};
use xen_probe::Probe;

const REPO_PW: &str = "repo password";
const ADMIN_PW: &str = "admin password 1";
const VM: &str = "debian-web";
const STANDBY: &str = "debian-web (replica)";

/// An HTTPS client pinned to the service's certificate, logged in as one user.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn login(info: &Value, user: &str, pw: &str) -> Self {
        let http = cli::pinned_client(info);
        let base = info["url"].as_str().unwrap().to_string();
        let mut api = Self {
            http,
            base,
            token: String::new(),
        };
        let (st, v, _) = api
            .call(
                "POST",
                "/api/login",
                Some(json!({"username": user, "password": pw})),
                None,
            )
            .await;
        assert_eq!(st, 200, "{v}");
        api.token = v["token"].as_str().unwrap().into();
        api
    }

    /// (status, JSON body, ETag).
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (u16, Value, Option<String>) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = self.http.request(m, format!("{}{path}", self.base));
        if !self.token.is_empty() {
            r = r.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        if let Some(e) = if_match {
            r = r.header("If-Match", e);
        }
        let resp = r.send().await.unwrap();
        let st = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string());
        let text = resp.text().await.unwrap();
        (st, serde_json::from_str(&text).unwrap_or(Value::Null), etag)
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (st, v, _) = self.call(method, path, body, None).await;
        assert_eq!(st, want, "{method} {path}: {v}");
        v
    }

    /// `method path` is refused with `status` and `needle` in the problem's detail.
    async fn refused(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        status: u16,
        needle: &str,
    ) {
        let (st, v, _) = self.call(method, path, body, None).await;
        assert_eq!(st, status, "{method} {path}: {v}");
        let d = v["detail"].as_str().unwrap_or_default();
        assert!(d.contains(needle), "wanted `{needle}` in: {v}");
    }

    /// Starts an action (202) and waits until the replica's view says it ended; returns the
    /// view then.
    async fn act(&self, action: &str, body: Option<Value>) -> Value {
        let v = self
            .ok("POST", &format!("/api/replicas/web/{action}"), body, 202)
            .await;
        assert_eq!(v["replica"], "web", "{v}");
        assert_eq!(v["action"]["ended"], Value::Null, "{v}");
        let t = Instant::now();
        loop {
            let r = self.ok("GET", "/api/replicas/web", None, 200).await;
            if !r["action"]["ended"].is_null() {
                assert_eq!(r["action"]["error"], Value::Null, "{action}: {r}");
                return r;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{action} never ended: {r}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn guest_writes(probe: &mut Probe, vm: &str, seed: u8) {
    let disks = probe.disk_uuids(vm);
    probe.guest_write(&disks[0], 1 << 20, &[seed; 70_000]);
    probe.guest_write(&disks[1], 3 << 20, &[seed.wrapping_add(1); 4096]);
}

#[test]
fn replicas_are_configured_watched_and_failed_over_through_the_api() {
    let dir = ferry_testkit::scratch_dir();
    let d = dir.path();
    let (_a, prod_info) = xen_probe::start_sim(ferry(), &d.join("prod"));
    let (_b, dr_info) = xen_probe::start_sim(ferry(), &d.join("dr"));
    let mut toml = String::new();
    for (name, info) in [("prod", &prod_info), ("dr", &dr_info)] {
        let pw = d.join(format!("{name}.pw"));
        std::fs::write(&pw, info["password"].as_str().unwrap()).unwrap();
        toml.push_str(&format!(
            "[sources.{name}]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\ntransports = [\"network\"]\n",
            info["url"].as_str().unwrap(),
            info["username"].as_str().unwrap(),
            pw.display(),
            info["tls_fingerprint"].as_str().unwrap(),
            d.join("xen-state").display()
        ));
    }
    init_repo(&d.join("repo"), REPO_PW);
    std::fs::write(d.join("repo.pw"), REPO_PW).unwrap();
    toml.push_str(&format!(
        "[repositories.main]\nurl = \"{}\"\npassword-file = \"{}\"\n",
        d.join("repo").display(),
        d.join("repo.pw").display()
    ));
    std::fs::write(d.join("ferry.toml"), toml).unwrap();
    let (_serve, info) = cli::serve_with_admin(&d.join("state"), &d.join("ferry.toml"), ADMIN_PW);
    let mut prod = Probe::start(&prod_info);
    let mut dr = Probe::start(&dr_info);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin = Api::login(&info, "admin", ADMIN_PW).await;
        for (user, role) in [("olga", "operator"), ("vic", "viewer")] {
            admin
                .ok(
                    "POST",
                    "/api/users",
                    Some(json!({"name": user, "role": role, "password": format!("{user} password 1")})),
                    201,
                )
                .await;
        }
        let op = Api::login(&info, "olga", "olga password 1").await;
        let viewer = Api::login(&info, "vic", "vic password 1").await;
        let anon = Api {
            token: String::new(),
            ..Api::login(&info, "vic", "vic password 1").await
        };
        let (st, _, _) = anon.call("GET", "/api/replicas", None, None).await;
        assert_eq!(st, 401);

        // A table naming what does not exist is refused whole; then saved (disabled: the
        // test runs every cycle itself). Only an admin changes tables.
        let job = json!({"source": "prod", "vm": VM, "to_source": "dr", "repository": "main",
            "every": "1h", "keep": 2, "rpo": "1h", "enabled": false});
        let mut bad = job.clone();
        bad["to_source"] = json!("nowhere");
        admin
            .refused("PUT", "/api/replicas/web", Some(bad), 422, "no source `nowhere`")
            .await;
        let mut bad = job.clone();
        bad["every"] = json!("often");
        admin
            .refused("PUT", "/api/replicas/web", Some(bad), 422, "not a duration")
            .await;
        op.refused("PUT", "/api/replicas/web", Some(job.clone()), 403, "admin")
            .await;
        let created = admin
            .ok("PUT", "/api/replicas/web", Some(job.clone()), 201)
            .await;
        assert_eq!(created["config"]["to_source"], "dr", "{created}");
        assert_eq!(created["status"], Value::Null, "{created}");
        let list = viewer.ok("GET", "/api/replicas", None, 200).await;
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        // A source a replica uses cannot be deleted.
        let (_, _, tag) = admin.call("GET", "/api/sources/dr", None, None).await;
        let (st, v, _) = admin
            .call("DELETE", "/api/sources/dr", None, tag.as_deref())
            .await;
        assert_eq!(st, 409, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("replica(s) `web`"), "{v}");

        // Actions: a viewer may not; nothing to fail over before the first cycle; unknown
        // replicas are 404.
        viewer
            .refused("POST", "/api/replicas/web/sync", None, 403, "operator")
            .await;
        op.refused("POST", "/api/replicas/web/failover", None, 409, "sync it first")
            .await;
        op.refused("POST", "/api/replicas/nope/sync", None, 404, "replica `nope`")
            .await;

        // The first sync creates the record and the standby; guest writes reach it in one
        // more cycle, sent as changed blocks; health is in the view.
        let r = op.act("sync", None).await;
        assert_eq!(r["action"]["action"], "sync", "{r}");
        assert_eq!(r["action"]["by"], "olga", "{r}");
        assert_eq!(r["status"]["cycles"], 1, "{r}");
        guest_writes(&mut prod, VM, 0x5a);
        let r = op.act("sync", None).await;
        let s = &r["status"];
        assert_eq!(s["cycles"], 2, "{r}");
        assert_eq!(s["last_bytes"], 2 * (2 << 20), "{r}");
        assert_eq!(s["state"], "replicating", "{r}");
        assert_eq!(s["rpo_breached"], false, "{r}");
        assert!(s["lag_seconds"].as_i64().unwrap() < 60, "{r}");
        assert!(s["last_success"].as_i64().unwrap() > 1_700_000_000, "{r}");
        assert_eq!(s["last_error"], Value::Null, "{r}");
        let points = s["points"].as_array().unwrap().clone();
        assert_eq!(points.len(), 2, "{r}");
        let want = prod.export_disks(VM, d, "prod-2");
        assert_same_disks(&dr.export_disks(STANDBY, d, "dr-2"), &want);

        // Test failover: an isolated copy runs; a second one is refused; cleanup removes it.
        let vms_before = dr.ask(json!({"op": "vm_names"}));
        let r = op.act("test", None).await;
        assert!(r["status"]["test_vm"].is_string(), "{r}");
        assert_eq!(dr.vm("debian-web (test failover)")["power_state"], "Running");
        op.refused("POST", "/api/replicas/web/test", None, 409, "test copy running")
            .await;
        let r = op.act("test/cleanup", None).await;
        assert_eq!(r["status"]["test_vm"], Value::Null, "{r}");
        assert_eq!(dr.ask(json!({"op": "vm_names"})), vms_before);

        // Unplanned failover to the older point (a planned one with a point is nonsense).
        op.refused(
            "POST",
            "/api/replicas/web/failover",
            Some(json!({"planned": true, "point": "x"})),
            422,
            "no recovery point to choose",
        )
        .await;
        let older = points[0]["restore_point"].as_str().unwrap().to_string();
        let r = op
            .act("failover", Some(json!({"point": older.clone()})))
            .await;
        assert_eq!(r["action"]["action"], "unplanned failover", "{r}");
        assert_eq!(r["status"]["state"], "failed-over", "{r}");
        assert_eq!(dr.vm(STANDBY)["power_state"], "Running");
        op.refused("POST", "/api/replicas/web/sync", None, 409, "is failed over")
            .await;

        // Reverse: the direction swaps; the old primary is the standby now.
        let r = op.act("reverse", None).await;
        assert_eq!(r["status"]["source"], "dr", "{r}");
        assert_eq!(r["status"]["target"], "prod", "{r}");
        assert_eq!(prod.vm(VM)["power_state"], "Halted");

        // Delete: If-Match is needed; then replication ends (points gone, record gone).
        let (st, _, _) = admin.call("DELETE", "/api/replicas/web", None, None).await;
        assert_eq!(st, 428);
        let (_, _, tag) = admin.call("GET", "/api/replicas/web", None, None).await;
        let (st, v, _) = admin
            .call("DELETE", "/api/replicas/web", None, tag.as_deref())
            .await;
        assert_eq!(st, 202, "{v}");
        assert_eq!(v["action"]["action"], "cancel", "{v}");
        let t = Instant::now();
        while admin.call("GET", "/api/replicas/web", None, None).await.0 != 404 {
            assert!(t.elapsed() < Duration::from_secs(30), "the replica never went");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for p in [&mut prod, &mut dr] {
            let l = p.ask(json!({"op": "leftovers"}));
            assert!(l["snapshot_vms"].as_array().unwrap().is_empty(), "{l}");
        }
        assert!(!d.join("state/replicas/web.json").exists());
    });
}
