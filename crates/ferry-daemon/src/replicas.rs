//! Replica jobs in the appliance (docs/replication.md, ADRs 0133, 0163): the replica records
//! the CLI keeps in `<state-dir>/replicas/` are read at scrape time for `/metrics` and for the
//! REST API, and a lag past a replica's RPO raises an `rpo` alert (resolved once a cycle catches
//! up). The records are read, never written, here (the [`crate::Backend`]'s replica actions
//! write them); fields this reader does not know are ignored.

use crate::App;
use crate::alerts::Alert;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A `[replicas.NAME]` table of `ferry.toml`: a replica job `ferry serve` runs every `every`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Source of the VM.
    pub source: String,
    /// The VM (name or id).
    pub vm: String,
    /// Target source.
    pub to_source: String,
    /// A `[repositories.NAME]` table.
    pub repository: String,
    /// Cycle interval (`5m`, `30s`, …).
    #[serde(default = "default_every")]
    pub every: String,
    /// Recovery points kept.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Lag beyond which the replica is stale (default twice `every`).
    #[serde(default)]
    pub rpo: Option<String>,
    /// Seed restore point.
    #[serde(default)]
    pub seed: Option<String>,
    /// Scheduled cycles only when enabled.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

fn default_every() -> String {
    "5m".into()
}
fn default_keep() -> usize {
    4
}
fn default_enabled() -> bool {
    true
}

impl ReplicaConfig {
    /// Checks the table against the rest of the configuration: its sources and repository
    /// exist, its durations parse, it keeps at least one point. Returns (every, rpo).
    pub fn validate(
        &self,
        name: &str,
        doc: &crate::config::Document,
    ) -> Result<(Duration, Option<Duration>), crate::problem::Problem> {
        use crate::problem::Problem;
        for (field, s) in [("source", &self.source), ("to_source", &self.to_source)] {
            if !doc.ferry.sources.contains_key(s) {
                return Err(Problem::invalid(
                    field,
                    format!("replica `{name}`: no source `{s}`"),
                ));
            }
        }
        if !doc.repositories.contains_key(&self.repository) {
            return Err(Problem::invalid(
                "repository",
                format!("replica `{name}`: no repository `{}`", self.repository),
            ));
        }
        self.check(name)
    }

    /// What the table alone must satisfy (checked before any precondition): at least one
    /// point kept, durations that parse. Returns (every, rpo).
    pub fn check(
        &self,
        name: &str,
    ) -> Result<(Duration, Option<Duration>), crate::problem::Problem> {
        use crate::problem::Problem;
        if self.keep == 0 {
            return Err(Problem::invalid(
                "keep",
                format!("replica `{name}`: keep at least 1 recovery point (a failover starts one)"),
            ));
        }
        let every = parse_duration(&self.every)
            .map_err(|e| Problem::invalid("every", format!("replica `{name}`: {e}")))?;
        if every.is_zero() {
            return Err(Problem::invalid(
                "every",
                format!("replica `{name}`: `every` must be at least 1s"),
            ));
        }
        let rpo = self
            .rpo
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| Problem::invalid("rpo", format!("replica `{name}`: {e}")))?;
        Ok((every, rpo))
    }
}

/// The replicas (`` `NAME` ``) whose table names source or repository `name`.
pub fn users_of(
    doc: &crate::config::Document,
    kind: crate::config::Kind,
    name: &str,
) -> Vec<String> {
    use crate::config::Kind;
    let keys: &[&str] = match kind {
        Kind::Source => &["source", "to-source"],
        Kind::Repository => &["repository"],
        _ => return vec![],
    };
    doc.names(Kind::Replica)
        .into_iter()
        .filter(|r| {
            doc.table(Kind::Replica, r).is_some_and(|t| {
                keys.iter()
                    .any(|k| t.get(*k).and_then(|v| v.as_str()) == Some(name))
            })
        })
        .map(|r| format!("`{r}`"))
        .collect()
}

/// A duration such as `30s`, `5m`, `24h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 30m, 24h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}`: unknown unit (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// What an operator asks of a replica (the REST API's actions; `ferry replica …` the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum ReplicaAction {
    /// One cycle now.
    Sync,
    /// Start the standby: planned (primary shut down, last changes sent, direction
    /// reversed) or unplanned at a recovery point.
    Failover {
        /// Planned (else unplanned).
        planned: bool,
        /// Recovery point of an unplanned failover (default: the newest).
        point: Option<String>,
        /// Fail over a stale replica anyway.
        force: bool,
    },
    /// An isolated copy of a recovery point.
    Test {
        /// The point (default: the newest).
        point: Option<String>,
    },
    /// Remove the test copy.
    TestCleanup,
    /// After an unplanned failover: replicate back.
    Reverse,
    /// End replication (recovery points and test copy removed, the record deleted).
    Cancel {
        /// Remove the standby VM too.
        delete_vm: bool,
    },
}

impl ReplicaAction {
    /// Its name in the API and the console.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Failover { planned: true, .. } => "planned failover",
            Self::Failover { .. } => "unplanned failover",
            Self::Test { .. } => "test failover",
            Self::TestCleanup => "test cleanup",
            Self::Reverse => "reverse",
            Self::Cancel { .. } => "cancel",
        }
    }
}

/// Why a replica action was not started.
#[derive(Debug, Clone)]
pub enum ReplicaRefusal {
    /// No such replica (no record, no `[replicas.NAME]`).
    NotFound(String),
    /// Not in this state (failed over, stale, a test copy runs, busy, the way back needs a
    /// replica target, …).
    Conflict(String),
    /// Replica actions are not available (a backend without them).
    Unavailable(String),
}

/// The rest of an accepted action, run in the background.
pub type ReplicaRun =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), crate::BackendError>> + Send>>;

/// The action this service runs or ran last on a replica.
#[derive(Debug, Clone, Serialize)]
pub struct ActionView {
    /// [`ReplicaAction::label`].
    pub action: String,
    /// Who asked.
    pub by: String,
    /// Unix seconds.
    pub started: i64,
    /// Unix seconds (none: still running).
    pub ended: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// What the appliance reads of a replica record.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicaHealth {
    /// Job name.
    pub name: String,
    /// Source of the primary.
    pub source: String,
    /// Target of the standby.
    pub target: String,
    /// The primary's name.
    pub vm_name: String,
    /// RPO in seconds.
    pub rpo: u64,
    /// Unix seconds of the restore point the standby holds.
    pub applied_time: Option<i64>,
    /// The restore point the standby holds.
    #[serde(default)]
    pub applied: Option<String>,
    /// The standby VM's id.
    #[serde(default)]
    pub standby: Option<String>,
    /// Seconds between cycles.
    #[serde(default)]
    pub every: u64,
    /// Points kept.
    #[serde(default)]
    pub keep: u64,
    /// `{"kind": "replicating"}` or `{"kind": "failed-over", "point": …}`.
    #[serde(default)]
    pub state: serde_json::Value,
    /// The running test copy.
    #[serde(default)]
    pub test_vm: Option<String>,
    /// An operation a killed command left unfinished.
    #[serde(default)]
    pub op: serde_json::Value,
    /// Recovery points on the target.
    #[serde(default)]
    pub points: Vec<serde_json::Value>,
    /// Health counters.
    #[serde(default)]
    pub health: Counters,
}

/// The record's `health`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Counters {
    /// Unix seconds of the last successful cycle.
    pub last_success: Option<i64>,
    /// Unix seconds of the last cycle attempted.
    #[serde(default)]
    pub last_attempt: Option<i64>,
    /// The last cycle's error.
    pub last_error: Option<String>,
    /// Bytes written by the last successful cycle.
    #[serde(default)]
    pub last_bytes: u64,
    /// Successful cycles.
    #[serde(default)]
    pub cycles: u64,
}

impl ReplicaHealth {
    /// Seconds since the restore point the standby holds (`None`: it holds none yet).
    pub fn lag(&self, now: i64) -> Option<i64> {
        self.applied_time.map(|t| (now - t).max(0))
    }

    /// The record as the API shows it (snake_case keys, unix seconds).
    pub fn view(&self, now: i64) -> serde_json::Value {
        let lag = self.lag(now);
        let h = &self.health;
        let points: Vec<serde_json::Value> = self
            .points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p["id"],
                    "restore_point": p["restore-point"],
                    "time": p["time"],
                })
            })
            .collect();
        serde_json::json!({
            "source": self.source,
            "target": self.target,
            "vm_name": self.vm_name,
            "standby": self.standby,
            "state": self.state.get("kind").cloned().unwrap_or_else(|| "replicating".into()),
            "failed_over_point": self.state.get("point"),
            "applied": self.applied,
            "applied_time": self.applied_time,
            "lag_seconds": lag,
            "rpo_seconds": self.rpo,
            "every_seconds": self.every,
            "keep": self.keep,
            "rpo_breached": lag.is_some_and(|l| l > self.rpo as i64),
            "last_success": h.last_success,
            "last_attempt": h.last_attempt,
            "last_error": h.last_error,
            "last_bytes": h.last_bytes,
            "cycles": h.cycles,
            "points": points,
            "test_vm": self.test_vm,
            "unfinished": if self.op.is_null() { None } else { Some(&self.op) },
        })
    }
}

/// The record of replica `name`, if there is one.
pub fn read_one(state_dir: &Path, name: &str) -> Option<ReplicaHealth> {
    read_all(state_dir).into_iter().find(|r| r.name == name)
}

/// Every readable record under `<state_dir>/replicas/` (an unreadable one is logged).
pub fn read_all(state_dir: &Path) -> Vec<ReplicaHealth> {
    let Ok(rd) = std::fs::read_dir(state_dir.join("replicas")) else {
        return vec![];
    };
    let mut out: Vec<ReplicaHealth> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
        })
        .filter_map(|p| {
            let r = std::fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()));
            r.map_err(
                |e| tracing::warn!(record = %p.display(), error = %e, "unreadable replica record"),
            )
            .ok()
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Registers the replica gauges (`ferry_replica_*`).
pub fn register(reg: &mut Registry, state_dir: &Path, now: i64) {
    let lag = Family::<Vec<(String, String)>, Gauge>::default();
    let last = Family::<Vec<(String, String)>, Gauge>::default();
    let bytes = Family::<Vec<(String, String)>, Gauge>::default();
    let points = Family::<Vec<(String, String)>, Gauge>::default();
    let failing = Family::<Vec<(String, String)>, Gauge>::default();
    let rpo = Family::<Vec<(String, String)>, Gauge>::default();
    for r in read_all(state_dir) {
        let l = vec![
            ("replica".to_string(), r.name.clone()),
            ("vm".to_string(), r.vm_name.clone()),
            ("source".to_string(), r.source.clone()),
            ("target".to_string(), r.target.clone()),
        ];
        if let Some(x) = r.lag(now) {
            lag.get_or_create(&l).set(x);
        }
        if let Some(t) = r.health.last_success {
            last.get_or_create(&l).set(t);
        }
        bytes.get_or_create(&l).set(r.health.last_bytes as i64);
        points.get_or_create(&l).set(r.points.len() as i64);
        failing
            .get_or_create(&l)
            .set(i64::from(r.health.last_error.is_some()));
        rpo.get_or_create(&l).set(r.rpo as i64);
    }
    reg.register(
        "replica_lag_seconds",
        "Age of the restore point each replica's standby holds",
        lag,
    );
    reg.register(
        "replica_last_success_timestamp_seconds",
        "End of each replica's last successful cycle",
        last,
    );
    reg.register(
        "replica_last_cycle_bytes",
        "Bytes written into each standby by its last successful cycle",
        bytes,
    );
    reg.register(
        "replica_recovery_points",
        "Recovery points kept on each replica's target",
        points,
    );
    reg.register(
        "replica_failing",
        "1 when a replica's last cycle failed",
        failing,
    );
    reg.register("replica_rpo_seconds", "Each replica's RPO", rpo);
}

impl App {
    /// Raises an `rpo` alert for each replica whose lag passed its RPO; resolves the others.
    pub fn check_replicas(self: &Arc<Self>) {
        let now = chrono::Utc::now().timestamp();
        for r in read_all(&self.state_dir) {
            let key = format!("replica-rpo:{}", r.name);
            let lag = r.lag(now);
            // A new replica before its first cycle is no breach; one whose cycles fail is.
            let breach = match lag {
                Some(l) => l > r.rpo as i64,
                None => r.health.last_error.is_some(),
            };
            if breach {
                let age = lag.map_or("no recovery point yet".to_string(), |l| {
                    format!("its standby's data is {l} s old")
                });
                self.raise_alert(
                    Alert {
                        kind: "rpo".into(),
                        title: format!(
                            "replica `{}` of VM `{}` breaches its RPO of {} s",
                            r.name, r.vm_name, r.rpo
                        ),
                        message: format!(
                            "replica `{}` ({} → {}): {age}{}",
                            r.name,
                            r.source,
                            r.target,
                            r.health
                                .last_error
                                .as_ref()
                                .map_or(String::new(), |e| format!("; last cycle failed: {e}"))
                        ),
                        job: None,
                        vm: Some(r.vm_name.clone()),
                        session: None,
                        resolves: None,
                    },
                    Some(key),
                    true,
                );
            } else if let Some(l) = lag {
                self.resolve_alerts(
                    &key,
                    Alert {
                        kind: "rpo".into(),
                        title: format!(
                            "replica `{}` of VM `{}` meets its RPO of {} s again",
                            r.name, r.vm_name, r.rpo
                        ),
                        message: format!(
                            "replica `{}` ({} → {}): its standby's data is {l} s old",
                            r.name, r.source, r.target
                        ),
                        job: None,
                        vm: Some(r.vm_name.clone()),
                        session: None,
                        resolves: None,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> ReplicaConfig {
        toml::from_str(&format!(
            "source = \"a\"\nvm = \"v\"\nto-source = \"b\"\nrepository = \"r\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn a_table_is_checked_on_its_own() {
        let (every, rpo) = table("").check("web").unwrap();
        assert_eq!((every.as_secs(), rpo), (300, None));
        let (every, rpo) = table("every = \"30s\"\nrpo = \"2m\"").check("web").unwrap();
        assert_eq!((every.as_secs(), rpo.map(|r| r.as_secs())), (30, Some(120)));
        for (bad, field) in [
            ("keep = 0", "keep"),
            ("every = \"often\"", "every"),
            ("every = \"0s\"", "every"),
            ("rpo = \"5x\"", "rpo"),
        ] {
            let p = table(bad).check("web").unwrap_err();
            assert_eq!(p.field.as_deref(), Some(field), "{bad}: {p:?}");
            assert!(p.detail.contains("replica `web`"), "{bad}: {p:?}");
        }
    }

    #[test]
    fn actions_and_views_speak_snake_case() {
        let a: ReplicaAction = serde_json::from_value(
            serde_json::json!({"action": "failover", "planned": false, "point": "p1", "force": true}),
        )
        .unwrap();
        assert_eq!(a.label(), "unplanned failover");
        assert_eq!(ReplicaAction::TestCleanup.label(), "test cleanup");
        let rec: ReplicaHealth = serde_json::from_value(serde_json::json!({
            "name": "web", "source": "a", "target": "b", "vm-name": "v", "rpo": 60,
            "applied-time": 1000, "state": {"kind": "failed-over", "point": "s1"},
            "points": [{"id": "s1", "restore-point": "rp1", "time": 1000}],
            "health": {"last-success": 1001, "last-bytes": 7, "cycles": 3},
            "a-field-from-a-newer-ferry": true
        }))
        .unwrap();
        let v = rec.view(1100);
        assert_eq!(v["state"], "failed-over");
        assert_eq!(v["failed_over_point"], "s1");
        assert_eq!(v["lag_seconds"], 100);
        assert_eq!(v["rpo_breached"], true);
        assert_eq!(v["points"][0]["restore_point"], "rp1");
        assert_eq!(v["last_bytes"], 7);
        assert_eq!(v["unfinished"], serde_json::Value::Null);
    }
}
