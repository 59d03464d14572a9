//! The web console, served by the appliance itself: one HTML page, a script and a style sheet
//! compiled into the binary (no external assets, nothing fetched from elsewhere), under a
//! strict Content-Security-Policy (only this origin's script and style; no inline code, no
//! frames). The script keeps the API token in memory only. It also holds the repository usage
//! history behind the dashboard's chart (`GET /api/usage`).

use crate::App;
use crate::problem::{ApiResult, Problem};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/app.css");

/// The console's Content-Security-Policy.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /`.
pub async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

/// `GET /console/app.js`.
pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

/// `GET /console/app.css`.
pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    time INTEGER NOT NULL,
    repository TEXT NOT NULL,
    restore_points INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    chunk_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_repo ON usage (repository, time);
";

/// Creates the catalog's `usage` table.
pub fn init(catalog: &crate::catalog::Catalog) -> Result<(), crate::catalog::CatalogError> {
    catalog.with(|c| c.execute_batch(SCHEMA))
}

impl App {
    /// Keeps the usage of `repository` just measured (after a job) for the chart.
    pub fn record_usage(&self, repository: &str) {
        let Some((points, chunks, bytes)) = self.metrics.usage_of(repository) else {
            return;
        };
        let now = chrono::Utc::now().timestamp();
        if let Err(e) = self.catalog.with(|c| {
            c.execute(
                "INSERT INTO usage (time, repository, restore_points, chunks, chunk_bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![now, repository, points as i64, chunks as i64, bytes as i64],
            )
        }) {
            tracing::warn!(error = %e, "cannot record repository usage");
        }
    }

    /// Usage samples of every configured repository over the last `days`, oldest first.
    pub fn usage(&self, days: u32) -> ApiResult<Value> {
        let doc = self.store.load()?;
        let since = chrono::Utc::now().timestamp() - i64::from(days) * 86400;
        let mut out = Vec::new();
        for name in doc.repositories.keys() {
            let samples = self
                .catalog
                .with(|c| {
                    let mut st = c.prepare(
                        "SELECT time, restore_points, chunks, chunk_bytes FROM usage
                         WHERE repository = ?1 AND time >= ?2 ORDER BY time, rowid",
                    )?;
                    let rows = st.query_map(rusqlite::params![name, since], |r| {
                        Ok(json!({
                            "time": r.get::<_, i64>(0)?,
                            "restore_points": r.get::<_, i64>(1)?,
                            "chunks": r.get::<_, i64>(2)?,
                            "chunk_bytes": r.get::<_, i64>(3)?,
                        }))
                    })?;
                    rows.collect::<rusqlite::Result<Vec<Value>>>()
                })
                .map_err(|e| Problem::internal(e.to_string()))?;
            out.push(json!({"name": name, "samples": samples}));
        }
        Ok(json!({"repositories": out}))
    }
}

/// Checks the `days` query value.
pub fn days(d: Option<u32>) -> ApiResult<u32> {
    match d.unwrap_or(30) {
        n @ 1..=3660 => Ok(n),
        n => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("days {n}: use 1 to 3660"),
        )),
    }
}
