//! The embedded SQLite catalog (`STATE/catalog.sqlite`): sessions, their events (the live log)
//! and per-VM history. It is an index for the API, the console and the metrics; the
//! repository stays the source of truth: [`Catalog::rebuild_from`] replaces the VM history of
//! a repository by what its restore points say (`ferry serve --rebuild-catalog`).

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::path::Path;
use std::sync::Mutex;

/// A catalog error.
#[derive(Debug, thiserror::Error)]
#[error("catalog {path}: {message}")]
pub struct CatalogError {
    path: String,
    message: String,
}

/// The catalog.
pub struct Catalog {
    path: String,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL,
    started INTEGER NOT NULL,
    ended INTEGER,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    level TEXT NOT NULL,
    vm TEXT,
    message TEXT NOT NULL,
    PRIMARY KEY (session, seq)
);
CREATE TABLE IF NOT EXISTS vm_runs (
    vm_id TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    source TEXT NOT NULL,
    repository TEXT NOT NULL,
    job TEXT,
    session TEXT,
    time INTEGER NOT NULL,
    status TEXT NOT NULL,
    restore_point TEXT,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_uploaded INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    error TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS vm_runs_point ON vm_runs (repository, restore_point);
CREATE INDEX IF NOT EXISTS vm_runs_vm ON vm_runs (vm_id, time);
";

/// One row of a VM's history.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VmRun {
    /// The hypervisor's VM id.
    pub vm_id: String,
    /// Its name then.
    pub vm_name: String,
    /// Source name.
    pub source: String,
    /// Repository name.
    pub repository: String,
    /// Job, if run by one (`None` for rows rebuilt from the repository).
    pub job: Option<String>,
    /// Session id.
    pub session: Option<String>,
    /// Unix seconds (start of the backup).
    pub time: i64,
    /// `success` or `failed`.
    pub status: String,
    /// The restore point written.
    pub restore_point: Option<String>,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes uploaded to the repository.
    pub bytes_uploaded: u64,
    /// Wall time.
    pub seconds: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// One line of a session's log.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Event {
    /// Position in the session's log, from 1.
    pub seq: u64,
    /// Unix seconds.
    pub time: i64,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// The VM it concerns.
    pub vm: Option<String>,
    /// Text.
    pub message: String,
}

/// Per VM: the newest successful run and the number of failures since.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    /// VM id.
    pub vm_id: String,
    /// Latest name.
    pub vm_name: String,
    /// Source.
    pub source: String,
    /// Unix seconds of the newest success, if any.
    pub last_success: Option<i64>,
    /// Failed runs in total.
    pub failures: u64,
    /// Restore points known.
    pub restore_points: u64,
}

impl Catalog {
    /// Opens (creating) `path`.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let p = path.display().to_string();
        let err = |e: rusqlite::Error| CatalogError {
            path: p.clone(),
            message: e.to_string(),
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self {
            path: p.clone(),
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, CatalogError> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c).map_err(|e| CatalogError {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    /// Inserts or updates a session row (one argument per column).
    #[allow(clippy::too_many_arguments)]
    pub fn upsert_session(
        &self,
        id: &str,
        job: &str,
        trigger: &str,
        status: &str,
        started: i64,
        ended: Option<i64>,
        detail: &serde_json::Value,
    ) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO sessions (id, job, trigger, status, started, ended, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(id) DO UPDATE SET status = ?4, ended = ?6, detail = ?7",
                params![id, job, trigger, status, started, ended, detail.to_string()],
            )
            .map(|_| ())
        })
    }

    /// Sessions, newest first: (detail JSON).
    pub fn sessions(&self, limit: u32) -> Result<Vec<serde_json::Value>, CatalogError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT detail FROM sessions ORDER BY started DESC, id DESC LIMIT ?1")?;
            let rows = st.query_map([limit], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for r in rows {
                out.push(serde_json::from_str(&r?).unwrap_or_default());
            }
            Ok(out)
        })
    }

    /// One session's detail JSON.
    pub fn session(&self, id: &str) -> Result<Option<serde_json::Value>, CatalogError> {
        self.with(|c| {
            c.query_row("SELECT detail FROM sessions WHERE id = ?1", [id], |r| {
                r.get::<_, String>(0)
            })
            .optional()
            .map(|o| o.map(|s| serde_json::from_str(&s).unwrap_or_default()))
        })
    }

    /// Sessions a previous process left `running` (it died): marked failed.
    pub fn fail_orphans(&self, now: i64) -> Result<usize, CatalogError> {
        self.with(|c| {
            c.execute(
                "UPDATE sessions SET status = 'failed', ended = ?1,
                 detail = json_set(detail, '$.status', 'failed', '$.ended', ?1, '$.error', 'the appliance stopped during the run')
                 WHERE status IN ('queued', 'running')",
                [now],
            )
        })
    }

    /// Appends an event.
    pub fn add_event(&self, session: &str, e: &Event) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO events (session, seq, time, level, vm, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![session, e.seq as i64, e.time, e.level, e.vm, e.message],
            )
            .map(|_| ())
        })
    }

    /// Events of `session` after `seq`.
    pub fn events(&self, session: &str, after: u64) -> Result<Vec<Event>, CatalogError> {
        self.events_page(session, after, None)
    }

    /// At most `limit` events of `session` after `seq` (all without a limit).
    pub fn events_page(
        &self,
        session: &str,
        after: u64,
        limit: Option<u32>,
    ) -> Result<Vec<Event>, CatalogError> {
        // SQLite reads a negative LIMIT as none.
        let limit = limit.map_or(-1, i64::from);
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, time, level, vm, message FROM events WHERE session = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = st.query_map(params![session, after as i64, limit], |r| {
                Ok(Event {
                    seq: r.get::<_, i64>(0)? as u64,
                    time: r.get(1)?,
                    level: r.get(2)?,
                    vm: r.get(3)?,
                    message: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Records a VM run.
    pub fn add_run(&self, r: &VmRun) -> Result<(), CatalogError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO vm_runs (vm_id, vm_name, source, repository, job, session, time, status, restore_point, bytes_read, bytes_uploaded, seconds, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    r.vm_id, r.vm_name, r.source, r.repository, r.job, r.session, r.time, r.status,
                    r.restore_point, r.bytes_read as i64, r.bytes_uploaded as i64, r.seconds, r.error
                ],
            )
            .map(|_| ())
        })
    }

    /// A VM's history, newest first.
    pub fn vm_history(&self, vm: &str, limit: u32) -> Result<Vec<VmRun>, CatalogError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT vm_id, vm_name, source, repository, job, session, time, status, restore_point, bytes_read, bytes_uploaded, seconds, error
                 FROM vm_runs WHERE vm_id = ?1 OR vm_name = ?1 ORDER BY time DESC, rowid DESC LIMIT ?2",
            )?;
            let rows = st.query_map(params![vm, limit], row_to_run)?;
            rows.collect()
        })
    }

    /// Per VM: last success, failures, restore points.
    pub fn vm_status(&self) -> Result<Vec<VmStatus>, CatalogError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT vm_id,
                        (SELECT vm_name FROM vm_runs r2 WHERE r2.vm_id = r.vm_id ORDER BY time DESC LIMIT 1),
                        (SELECT source FROM vm_runs r2 WHERE r2.vm_id = r.vm_id ORDER BY time DESC LIMIT 1),
                        MAX(CASE WHEN status = 'success' THEN time END),
                        SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END),
                        SUM(CASE WHEN restore_point IS NOT NULL THEN 1 ELSE 0 END)
                 FROM vm_runs r GROUP BY vm_id ORDER BY vm_id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(VmStatus {
                    vm_id: r.get(0)?,
                    vm_name: r.get(1)?,
                    source: r.get(2)?,
                    last_success: r.get(3)?,
                    failures: r.get::<_, i64>(4)? as u64,
                    restore_points: r.get::<_, i64>(5)? as u64,
                })
            })?;
            rows.collect()
        })
    }

    /// Replaces the successful runs of `repository` by one row per restore point in
    /// `manifests` (keeping the byte counts and sessions of rows that match), so the history
    /// shows exactly the restore points the repository holds. Failed runs stay.
    pub fn rebuild_from(
        &self,
        repository: &str,
        manifests: &[ferry_repo::Manifest],
    ) -> Result<usize, CatalogError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let mut known = std::collections::HashMap::new();
            {
                let mut st = tx.prepare(
                    "SELECT vm_id, vm_name, source, repository, job, session, time, status, restore_point, bytes_read, bytes_uploaded, seconds, error
                     FROM vm_runs WHERE repository = ?1 AND restore_point IS NOT NULL",
                )?;
                for r in st.query_map([repository], row_to_run)? {
                    let r = r?;
                    known.insert(r.restore_point.clone().unwrap_or_default(), r);
                }
            }
            tx.execute(
                "DELETE FROM vm_runs WHERE repository = ?1 AND restore_point IS NOT NULL",
                [repository],
            )?;
            for m in manifests {
                let old = known.remove(&m.id);
                let r = VmRun {
                    vm_id: m.meta.vm.id.clone(),
                    vm_name: m.meta.vm.name.clone(),
                    source: m.meta.source.clone(),
                    repository: repository.into(),
                    job: old.as_ref().and_then(|o| o.job.clone()),
                    session: old.as_ref().and_then(|o| o.session.clone()),
                    time: m.time,
                    status: "success".into(),
                    restore_point: Some(m.id.clone()),
                    bytes_read: old.as_ref().map_or(0, |o| o.bytes_read),
                    bytes_uploaded: old.as_ref().map_or(0, |o| o.bytes_uploaded),
                    seconds: old.as_ref().map_or(0.0, |o| o.seconds),
                    error: None,
                };
                tx.execute(
                    "INSERT INTO vm_runs (vm_id, vm_name, source, repository, job, session, time, status, restore_point, bytes_read, bytes_uploaded, seconds, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                    params![
                        r.vm_id, r.vm_name, r.source, r.repository, r.job, r.session, r.time, r.status,
                        r.restore_point, r.bytes_read as i64, r.bytes_uploaded as i64, r.seconds, r.error
                    ],
                )?;
            }
            tx.commit()?;
            Ok(manifests.len())
        })
    }
}

fn row_to_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRun> {
    Ok(VmRun {
        vm_id: r.get(0)?,
        vm_name: r.get(1)?,
        source: r.get(2)?,
        repository: r.get(3)?,
        job: r.get(4)?,
        session: r.get(5)?,
        time: r.get(6)?,
        status: r.get(7)?,
        restore_point: r.get(8)?,
        bytes_read: r.get::<_, i64>(9)? as u64,
        bytes_uploaded: r.get::<_, i64>(10)? as u64,
        seconds: r.get(11)?,
        error: r.get(12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(vm: &str, t: i64, status: &str, rp: Option<&str>) -> VmRun {
        VmRun {
            vm_id: vm.into(),
            vm_name: format!("{vm}-name"),
            source: "s".into(),
            repository: "r".into(),
            job: Some("j".into()),
            session: Some("sess".into()),
            time: t,
            status: status.into(),
            restore_point: rp.map(str::to_string),
            bytes_read: 10,
            bytes_uploaded: 5,
            seconds: 1.5,
            error: (status == "failed").then(|| "boom".into()),
        }
    }

    #[test]
    fn sessions_events_history_and_orphans() {
        let d = tempfile::tempdir().unwrap();
        let c = Catalog::open(&d.path().join("c.sqlite")).unwrap();
        c.upsert_session(
            "a",
            "j",
            "manual",
            "running",
            1,
            None,
            &serde_json::json!({"id": "a", "status": "running"}),
        )
        .unwrap();
        c.add_event(
            "a",
            &Event {
                seq: 1,
                time: 1,
                level: "info".into(),
                vm: None,
                message: "hi".into(),
            },
        )
        .unwrap();
        c.add_event(
            "a",
            &Event {
                seq: 2,
                time: 2,
                level: "error".into(),
                vm: Some("v".into()),
                message: "bad".into(),
            },
        )
        .unwrap();
        assert_eq!(c.events("a", 1).unwrap().len(), 1);
        assert_eq!(c.fail_orphans(9).unwrap(), 1);
        let s = c.session("a").unwrap().unwrap();
        assert_eq!(s["status"], "failed");
        assert!(s["error"].as_str().unwrap().contains("stopped"));
        c.add_run(&run("v1", 10, "success", Some("p1"))).unwrap();
        c.add_run(&run("v1", 20, "failed", None)).unwrap();
        c.add_run(&run("v2", 15, "success", Some("p2"))).unwrap();
        let st = c.vm_status().unwrap();
        assert_eq!(st.len(), 2);
        assert_eq!(st[0].last_success, Some(10));
        assert_eq!(st[0].failures, 1);
        assert_eq!(c.vm_history("v1", 10).unwrap()[0].status, "failed");
        // Reopening keeps everything.
        drop(c);
        let c = Catalog::open(&d.path().join("c.sqlite")).unwrap();
        assert_eq!(c.vm_history("v1-name", 10).unwrap().len(), 2);
    }
}
