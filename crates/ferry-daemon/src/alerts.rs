//! Alerts: a backup session that fails and a VM whose newest restore point is older than its
//! job's `rpo-hours` raise an alert; each alert is kept in the catalog (`alerts` table) and
//! sent to every enabled `[alert-targets.NAME]` that takes its kind: e-mail over SMTP
//! (`lettre`, rustls) or a JSON POST to a webhook (ferry-http's reqwest client). An RPO breach
//! is raised once and resolved by the VM's next success; the check runs periodically. When a
//! failing job succeeds again or a breach ends, the open alerts are marked resolved and one
//! `resolved` alert goes to the targets that took the original kind (ADR 0140).
//! Targets' secrets (SMTP password, webhook bearer token) live in the appliance's secret
//! files like every other password and are never returned.

use crate::App;
use crate::problem::{ApiResult, Problem};
use lettre::AsyncTransport;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How a target is reached.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// SMTP e-mail.
    Email,
    /// A JSON POST.
    Webhook,
}

/// TLS of an SMTP connection.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (a relay on the appliance's own network only).
    None,
    /// STARTTLS after connecting (port 587 by default).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465 by default).
    Tls,
}

/// `[alert-targets.NAME]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AlertTargetConfig {
    /// `email` or `webhook`.
    pub kind: TargetKind,
    /// SMTP server (email).
    #[serde(default)]
    pub smtp_host: Option<String>,
    /// SMTP port (email; default by `smtp-tls`: 25, 587, 465).
    #[serde(default)]
    pub smtp_port: Option<u16>,
    /// SMTP TLS (email; default `starttls`).
    #[serde(default)]
    pub smtp_tls: SmtpTls,
    /// SMTP user (email; the password is the target's secret).
    #[serde(default)]
    pub username: Option<String>,
    /// Sender address (email).
    #[serde(default)]
    pub from: Option<String>,
    /// Recipients (email).
    #[serde(default)]
    pub to: Vec<String>,
    /// URL to POST to (webhook).
    #[serde(default)]
    pub url: Option<String>,
    /// Pin of the webhook server's certificate (`sha256:…`).
    #[serde(default)]
    pub tls_fingerprint: Option<String>,
    /// CA of the webhook server's certificate (PEM file).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The secret: SMTP password, or the webhook's bearer token.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Kinds sent: `failure`, `rpo` (default both). Tests are always sent.
    #[serde(default = "all_events")]
    pub events: Vec<String>,
    /// Nothing is sent when false.
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn all_events() -> Vec<String> {
    vec!["failure".into(), "rpo".into()]
}
fn yes() -> bool {
    true
}

impl AlertTargetConfig {
    /// Checks what a typed parse cannot.
    pub fn validate(&self, name: &str) -> Result<(), Problem> {
        let bad = |field: &str, what: String| {
            Err(Problem::invalid(
                field,
                format!("alert target `{name}`: {what}"),
            ))
        };
        for e in &self.events {
            if !["failure", "rpo"].contains(&e.as_str()) {
                return bad(
                    "events",
                    format!("unknown event `{e}` (use failure and/or rpo)"),
                );
            }
        }
        match self.kind {
            TargetKind::Email => {
                if self
                    .smtp_host
                    .as_deref()
                    .is_none_or(|h| h.trim().is_empty())
                {
                    return bad("smtp_host", "an e-mail target needs smtp-host".into());
                }
                let Some(from) = &self.from else {
                    return bad("from", "an e-mail target needs from".into());
                };
                if let Err(e) = from.parse::<lettre::message::Mailbox>() {
                    return bad("from", format!("`{from}` is not an e-mail address: {e}"));
                }
                if self.to.is_empty() {
                    return bad("to", "list at least one recipient in to".into());
                }
                for t in &self.to {
                    if let Err(e) = t.parse::<lettre::message::Mailbox>() {
                        return bad("to", format!("`{t}` is not an e-mail address: {e}"));
                    }
                }
                if self.url.is_some()
                    || self.tls_fingerprint.is_some()
                    || self.tls_ca_file.is_some()
                {
                    return bad(
                        "url",
                        "url, tls-fingerprint and tls-ca-file are for webhooks".into(),
                    );
                }
            }
            TargetKind::Webhook => {
                let Some(url) = &self.url else {
                    return bad("url", "a webhook target needs url".into());
                };
                match url::Url::parse(url) {
                    Ok(u) if ["http", "https"].contains(&u.scheme()) && u.host().is_some() => {}
                    _ => return bad("url", format!("`{url}` is not an http(s) URL")),
                }
                if self.smtp_host.is_some() || self.from.is_some() || !self.to.is_empty() {
                    return bad(
                        "smtp_host",
                        "smtp-host, from and to are for e-mail targets".into(),
                    );
                }
                if let Some(fp) = &self.tls_fingerprint {
                    if ferry_tls::parse_fingerprint(fp).is_none() {
                        return bad(
                            "tls_fingerprint",
                            format!("`{fp}` is not a SHA-256 fingerprint (sha256:AB:CD:…)"),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn secret(&self) -> Result<Option<ferry_core::Secret>, String> {
        match &self.password_file {
            None => Ok(None),
            Some(p) => std::fs::read_to_string(p)
                .map(|t| Some(ferry_core::Secret::new(t.lines().next().unwrap_or(""))))
                .map_err(|e| format!("cannot read the secret file {}: {e}", p.display())),
        }
    }
}

/// An alert to raise.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    /// `failure`, `rpo` or `test`.
    pub kind: String,
    /// One line.
    pub title: String,
    /// The details.
    pub message: String,
    /// The job, if any.
    pub job: Option<String>,
    /// The VM, if any.
    pub vm: Option<String>,
    /// The session, if any.
    pub session: Option<String>,
    /// For a `resolved` alert: the kind it resolves (`failure` or `rpo`); targets are picked
    /// by that kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolves: Option<String>,
}

impl Alert {
    /// The kind targets subscribe to.
    fn event(&self) -> &str {
        self.resolves.as_deref().unwrap_or(&self.kind)
    }
}

/// The key under which an open alert waits to be resolved.
fn failure_key(job: &str) -> String {
    format!("failure:{job}")
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time INTEGER NOT NULL,
    kind TEXT NOT NULL,
    key TEXT,
    title TEXT NOT NULL,
    message TEXT NOT NULL,
    job TEXT,
    vm TEXT,
    session TEXT,
    resolved INTEGER,
    deliveries TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS alerts_key ON alerts (key, resolved);
";

/// Creates the catalog's `alerts` table.
pub fn init(catalog: &crate::catalog::Catalog) -> Result<(), crate::catalog::CatalogError> {
    catalog.with(|c| c.execute_batch(SCHEMA))
}

/// Sends `a` to target `name`.
pub async fn send(name: &str, t: &AlertTargetConfig, a: &Alert) -> Result<(), String> {
    let secret = t.secret()?;
    match t.kind {
        TargetKind::Email => {
            let host = t.smtp_host.clone().unwrap_or_default();
            type Smtp = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;
            let (mut b, port) = match t.smtp_tls {
                SmtpTls::None => (Smtp::builder_dangerous(&host), 25),
                SmtpTls::Starttls => (
                    Smtp::starttls_relay(&host).map_err(|e| format!("SMTP {host}: {e}"))?,
                    587,
                ),
                SmtpTls::Tls => (
                    Smtp::relay(&host).map_err(|e| format!("SMTP {host}: {e}"))?,
                    465,
                ),
            };
            let port = t.smtp_port.unwrap_or(port);
            b = b.port(port).timeout(Some(Duration::from_secs(30)));
            if let Some(u) = &t.username {
                let pw = secret
                    .as_ref()
                    .map(|s| s.expose().to_string())
                    .unwrap_or_default();
                b = b.credentials(lettre::transport::smtp::authentication::Credentials::new(
                    u.clone(),
                    pw,
                ));
            }
            let mut m = lettre::Message::builder()
                .from(
                    t.from
                        .as_deref()
                        .unwrap_or_default()
                        .parse()
                        .map_err(|e| format!("from: {e}"))?,
                )
                .subject(match a.resolves {
                    Some(_) => format!("[Ferry] resolved: {}", a.title),
                    None => format!("[Ferry] {}", a.title),
                })
                .header(lettre::message::header::ContentType::TEXT_PLAIN);
            for to in &t.to {
                m = m.to(to.parse().map_err(|e| format!("to `{to}`: {e}"))?);
            }
            let msg = m
                .body(body_text(a))
                .map_err(|e| format!("cannot build the mail: {e}"))?;
            b.build()
                .send(msg)
                .await
                .map(|_| ())
                .map_err(|e| format!("SMTP {host}:{port}: {e}"))
        }
        TargetKind::Webhook => {
            let url = t.url.clone().unwrap_or_default();
            let trust = match (&t.tls_fingerprint, &t.tls_ca_file) {
                (Some(fp), _) => ferry_tls::Trust::Fingerprint(
                    ferry_tls::parse_fingerprint(fp)
                        .ok_or_else(|| format!("tls-fingerprint `{fp}` is not sha256:AB:CD:…"))?,
                ),
                (None, Some(ca)) => ferry_tls::Trust::CaPem(
                    std::fs::read_to_string(ca)
                        .map_err(|e| format!("cannot read {}: {e}", ca.display()))?,
                ),
                (None, None) => ferry_tls::Trust::System,
            };
            let mut o = ferry_http::ClientOptions::new(format!("alert target {name}"), trust);
            o.read_timeout = Duration::from_secs(30);
            let client = ferry_http::HttpClient::new(&o).map_err(|e| e.to_string())?;
            let mut req = client.inner().post(&url).json(&json!({
                "kind": a.kind,
                "title": a.title,
                "message": a.message,
                "job": a.job,
                "vm": a.vm,
                "session": a.session,
                "resolves": a.resolves,
                "time": chrono::Utc::now().to_rfc3339(),
                "appliance": hostname(),
            }));
            if let Some(s) = &secret {
                req = req.bearer_auth(s.expose());
            }
            client
                .send_ok("alert webhook", req)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn body_text(a: &Alert) -> String {
    let mut s = format!("{}\n\n{}\n", a.title, a.message);
    for (k, v) in [("Job", &a.job), ("VM", &a.vm), ("Session", &a.session)] {
        if let Some(v) = v {
            s.push_str(&format!("{k}: {v}\n"));
        }
    }
    s.push_str(&format!("Appliance: {}\n", hostname()));
    s
}

impl App {
    /// Records `a` and sends it to every enabled target taking its kind (in the background;
    /// each delivery's result is added to the alert's row). `key` names what the alert is
    /// about until it is resolved; with `once`, an open alert with the same key suppresses
    /// this one (an RPO breach is one alert, each failed session is one).
    pub fn raise_alert(self: &Arc<Self>, a: Alert, key: Option<String>, once: bool) {
        let now = chrono::Utc::now().timestamp();
        // A `resolved` alert is closed from the start.
        let closed = a.resolves.as_ref().map(|_| now);
        let id = self.catalog.with(|c| {
            if let (Some(k), true) = (&key, once) {
                let open: i64 = c.query_row(
                    "SELECT COUNT(*) FROM alerts WHERE key = ?1 AND resolved IS NULL",
                    [k],
                    |r| r.get(0),
                )?;
                if open > 0 {
                    return Ok(None);
                }
            }
            c.execute(
                "INSERT INTO alerts (time, kind, key, title, message, job, vm, session, resolved) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                rusqlite::params![now, a.kind, key, a.title, a.message, a.job, a.vm, a.session, closed],
            )?;
            Ok(Some(c.last_insert_rowid()))
        });
        let id = match id {
            Ok(Some(id)) => id,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot record an alert");
                return;
            }
        };
        tracing::warn!(kind = %a.kind, "alert: {}", a.title);
        let app = self.clone();
        tokio::spawn(async move {
            let targets = match app.store.load() {
                Ok(d) => d.alert_targets,
                Err(p) => {
                    tracing::warn!("alerts: {}", p.detail);
                    return;
                }
            };
            let mut out = Vec::new();
            for (name, t) in targets
                .iter()
                .filter(|(_, t)| t.enabled && t.events.iter().any(|e| e == a.event()))
            {
                let r = send(name, t, &a).await;
                if let Err(e) = &r {
                    tracing::warn!(alert_target = %name, "alert not delivered: {e}");
                }
                out.push(json!({"target": name, "ok": r.is_ok(), "error": r.err()}));
            }
            let text = Value::Array(out).to_string();
            if let Err(e) = app.catalog.with(|c| {
                c.execute(
                    "UPDATE alerts SET deliveries = ?1 WHERE id = ?2",
                    rusqlite::params![text, id],
                )
            }) {
                tracing::warn!(error = %e, "cannot record alert deliveries");
            }
        });
    }

    /// Marks the open alerts keyed `key` resolved; if there were any, raises one `resolved`
    /// alert (`title`, `message`) to the targets of their kind.
    pub(crate) fn resolve_alerts(self: &Arc<Self>, key: &str, mut a: Alert) {
        let now = chrono::Utc::now().timestamp();
        let kinds = self.catalog.with(|c| {
            let mut st =
                c.prepare("SELECT DISTINCT kind FROM alerts WHERE key = ?1 AND resolved IS NULL")?;
            let kinds = st
                .query_map([key], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            c.execute(
                "UPDATE alerts SET resolved = ?1 WHERE key = ?2 AND resolved IS NULL",
                rusqlite::params![now, key],
            )?;
            Ok(kinds)
        });
        match kinds {
            Ok(kinds) => {
                if let Some(kind) = kinds.into_iter().next() {
                    a.kind = "resolved".into();
                    a.resolves = Some(kind);
                    self.raise_alert(a, Some(format!("resolved:{key}")), false);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot resolve an alert"),
        }
    }

    /// Alerts, newest first.
    pub fn alerts(&self, limit: u32) -> ApiResult<Vec<Value>> {
        self.catalog
            .with(|c| {
                let mut st = c.prepare(
                    "SELECT id, time, kind, title, message, job, vm, session, resolved, deliveries, key
                     FROM alerts ORDER BY id DESC LIMIT ?1",
                )?;
                let rows = st.query_map([limit], |r| {
                    let d: String = r.get(9)?;
                    let key: Option<String> = r.get(10)?;
                    // `resolved:failure:JOB` → `failure`.
                    let resolves = key.as_deref().and_then(|k| {
                        k.strip_prefix("resolved:")
                            .and_then(|k| k.split(':').next())
                            .map(str::to_string)
                    });
                    Ok(json!({
                        "id": r.get::<_, i64>(0)?,
                        "time": r.get::<_, i64>(1)?,
                        "kind": r.get::<_, String>(2)?,
                        "title": r.get::<_, String>(3)?,
                        "message": r.get::<_, String>(4)?,
                        "job": r.get::<_, Option<String>>(5)?,
                        "vm": r.get::<_, Option<String>>(6)?,
                        "session": r.get::<_, Option<String>>(7)?,
                        "resolved": r.get::<_, Option<i64>>(8)?,
                        "resolves": resolves,
                        "deliveries": serde_json::from_str::<Value>(&d).unwrap_or(json!([])),
                    }))
                })?;
                rows.collect()
            })
            .map_err(|e| Problem::internal(e.to_string()))
    }

    /// A backup session ended: a failed one raises an alert naming its failed VMs; a
    /// successful one resolves the job's open failure alerts.
    pub fn alert_session_end(self: &Arc<Self>, v: &crate::jobs::SessionView) {
        if v.kind != "backup" {
            return;
        }
        if v.status == crate::jobs::Status::Success {
            self.resolve_alerts(
                &failure_key(&v.job),
                Alert {
                    kind: String::new(),
                    title: format!("job `{}` succeeds again", v.job),
                    message: format!(
                        "session {} of job `{}` backed up every VM; its earlier failures are resolved",
                        v.id, v.job
                    ),
                    job: Some(v.job.clone()),
                    vm: None,
                    session: Some(v.id.clone()),
                    resolves: None,
                },
            );
            return;
        }
        if v.status != crate::jobs::Status::Failed {
            return;
        }
        let failed: Vec<String> = v
            .vms
            .iter()
            .filter(|m| m.status == crate::jobs::Status::Failed)
            .map(|m| format!("{}: {}", m.vm_name, m.error.as_deref().unwrap_or("failed")))
            .collect();
        let mut message = String::new();
        if let Some(e) = &v.error {
            message.push_str(e);
            message.push('\n');
        }
        message.push_str(&failed.join("\n"));
        self.raise_alert(
            Alert {
                kind: "failure".into(),
                title: format!("job `{}` failed", v.job),
                message,
                job: Some(v.job.clone()),
                vm: None,
                session: Some(v.id.clone()),
                resolves: None,
            },
            Some(failure_key(&v.job)),
            false,
        );
    }

    /// Raises an alert for every VM of a job with `rpo-hours` whose newest successful backup
    /// is older than that, and resolves the breaches of VMs backed up since.
    pub fn check_rpo(self: &Arc<Self>) {
        let Ok(doc) = self.store.load() else { return };
        let Ok(status) = self.catalog.vm_status() else {
            return;
        };
        let now = chrono::Utc::now().timestamp();
        for (job, j) in doc.jobs.iter().filter(|(_, j)| j.enabled) {
            let Some(hours) = j.rpo_hours else { continue };
            let limit = (hours * 3600.0) as i64;
            for vm in status
                .iter()
                .filter(|v| v.source == j.source && j.selects(&v.vm_name, &v.vm_id))
            {
                let key = format!("rpo:{job}:{}", vm.vm_id);
                let Some(last) = vm.last_success else {
                    continue;
                };
                let age = now - last;
                let alert = |title: String, message: String| Alert {
                    kind: "rpo".into(),
                    title,
                    message,
                    job: Some(job.clone()),
                    vm: Some(vm.vm_name.clone()),
                    session: None,
                    resolves: None,
                };
                let (name, old) = (&vm.vm_name, human_age(age));
                if age > limit {
                    self.raise_alert(
                        alert(
                            format!("VM `{name}` breaches its RPO of {hours} h (job `{job}`)"),
                            format!("the newest restore point of VM `{name}` is {old} old; job `{job}` promises at most {hours} h"),
                        ),
                        Some(key),
                        true,
                    );
                } else {
                    self.resolve_alerts(
                        &key,
                        alert(
                            format!("VM `{name}` meets its RPO of {hours} h again (job `{job}`)"),
                            format!("the newest restore point of VM `{name}` is {old} old, within the {hours} h job `{job}` promises"),
                        ),
                    );
                }
            }
        }
    }

    /// VMs breaching their job's RPO now (the dashboard's count).
    pub fn rpo_breaches(&self) -> usize {
        self.catalog
            .with(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM alerts WHERE kind = 'rpo' AND resolved IS NULL",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .map(|n| n as usize)
            .unwrap_or(0)
    }
}

fn human_age(s: i64) -> String {
    if s >= 3600 {
        format!("{:.1} h", s as f64 / 3600.0)
    } else if s >= 60 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// Checks RPOs every `[appliance] rpo-check-seconds` until `stop`.
pub async fn rpo_loop(app: Arc<App>, stop: CancellationToken) {
    loop {
        let every = app
            .store
            .load()
            .map(|d| d.appliance.rpo_check_seconds)
            .unwrap_or(300)
            .max(1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(every)) => {}
        }
        app.check_rpo();
        app.check_replicas();
    }
}
