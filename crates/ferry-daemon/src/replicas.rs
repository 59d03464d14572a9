//! Replica health in the appliance (docs/replication.md, ADR 0133): the replica records the
//! CLI keeps in `<state-dir>/replicas/` are read at scrape time for `/metrics`, and a lag past
//! a replica's RPO raises an `rpo` alert (resolved once a cycle catches up). The records are
//! read, never written, here; fields this reader does not know are ignored.

use crate::App;
use crate::alerts::Alert;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

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
