//! Replica jobs over the REST API (docs/appliance-service.md "Replicas", ADR 0163): their
//! `[replicas.NAME]` tables created, changed and deleted like the other resources (admin,
//! ETags), their health read from the records, and the operations of `ferry replica …` started
//! by an operator. An action is checked before anything changes (a refusal is a 409 with the
//! reason) and then runs in the background like a session: `action` in the replica's view
//! says what runs or ran last, and the record what it did.

use crate::App;
use crate::api::{json_ok, plain_table, precondition, put_status, with_etag};
use crate::auth::{Caller, Role};
use crate::config::{Document, Kind, etag};
use crate::problem::{ApiResult, Problem};
use crate::replicas::{ActionView, ReplicaAction, ReplicaConfig, ReplicaHealth, ReplicaRefusal};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

type St = State<Arc<App>>;

/// The routes (merged into [`crate::api::router`]).
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/replicas", get(list))
        .route(
            "/api/replicas/{name}",
            get(get_one).put(put_one).delete(delete_one),
        )
        .route("/api/replicas/{name}/sync", post(sync))
        .route("/api/replicas/{name}/failover", post(failover))
        .route("/api/replicas/{name}/test", post(test))
        .route("/api/replicas/{name}/test/cleanup", post(test_cleanup))
        .route("/api/replicas/{name}/reverse", post(reverse))
}

/// Every route, as the OpenAPI document spells it.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/replicas"),
    ("get", "/api/replicas/{name}"),
    ("put", "/api/replicas/{name}"),
    ("delete", "/api/replicas/{name}"),
    ("post", "/api/replicas/{name}/sync"),
    ("post", "/api/replicas/{name}/failover"),
    ("post", "/api/replicas/{name}/test"),
    ("post", "/api/replicas/{name}/test/cleanup"),
    ("post", "/api/replicas/{name}/reverse"),
];

fn config_json(t: &toml::Table) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| {
                (
                    k.replace('-', "_"),
                    serde_json::to_value(v).unwrap_or(Value::Null),
                )
            })
            .collect(),
    )
}

/// One replica: its table (`config`, null for a job made with `ferry replica create`), its
/// record's health (`status`, null before the first cycle) and the action run through the API.
fn view(app: &App, name: &str, doc: &Document, rec: Option<&ReplicaHealth>) -> Value {
    let now = chrono::Utc::now().timestamp();
    let action = app
        .replica_actions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned();
    json!({
        "name": name,
        "config": doc.table(Kind::Replica, name).map(config_json),
        "status": rec.map(|r| r.view(now)),
        "action": action,
    })
}

async fn list(State(app): St, c: Caller) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let doc = app.store.load()?;
    let recs = crate::replicas::read_all(&app.state_dir);
    let mut names: Vec<String> = doc.names(Kind::Replica);
    names.extend(recs.iter().map(|r| r.name.clone()));
    names.sort();
    names.dedup();
    let out: Vec<Value> = names
        .iter()
        .map(|n| view(&app, n, &doc, recs.iter().find(|r| &r.name == n)))
        .collect();
    Ok(json_ok(StatusCode::OK, Value::Array(out)))
}

async fn get_one(State(app): St, c: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let doc = app.store.load()?;
    let rec = crate::replicas::read_one(&app.state_dir, &name);
    let table = doc.table(Kind::Replica, &name);
    if table.is_none() && rec.is_none() {
        return Err(Problem::not_found(format!("replica `{name}`")));
    }
    let r = json_ok(StatusCode::OK, view(&app, &name, &doc, rec.as_ref()));
    Ok(match table {
        Some(t) => with_etag(r, &etag(t)),
        None => r,
    })
}

async fn put_one(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    let t = plain_table::<ReplicaConfig>(
        Kind::Replica,
        &name,
        &body,
        "a replica has no password (its repository's is used)",
    )?;
    if let Ok(cfg) = toml::Value::Table(t.clone()).try_into::<ReplicaConfig>() {
        cfg.check(&name)?;
    }
    let n2 = name.clone();
    let (tag, created) = app
        .store
        .put(
            Kind::Replica,
            &name,
            t,
            None,
            &precondition(&h),
            move |doc: Document| async move {
                let t = doc
                    .table(Kind::Replica, &n2)
                    .cloned()
                    .ok_or_else(|| Problem::internal("replica missing after the change"))?;
                let cfg: ReplicaConfig = toml::Value::Table(t)
                    .try_into()
                    .map_err(|e: toml::de::Error| Problem::invalid("replica", e.to_string()))?;
                cfg.validate(&n2, &doc).map(|_| ())
            },
        )
        .await?;
    let doc = app.store.load()?;
    let rec = crate::replicas::read_one(&app.state_dir, &name);
    Ok(with_etag(
        json_ok(put_status(created), view(&app, &name, &doc, rec.as_ref())),
        &tag,
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    delete_vm: Option<bool>,
}

/// Removes the table (`If-Match`) and ends replication: recovery points and test copy go,
/// the standby VM stays unless `?delete_vm=true`. 202 when replication is being ended in the
/// background, 204 when there was no record.
async fn delete_one(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    h: HeaderMap,
    q: Result<axum::extract::Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    let q = q
        .map(|axum::extract::Query(v)| v)
        .map_err(|e| Problem::bad_request(format!("query string: {}", e.body_text())))?;
    let doc = app.store.load()?;
    let has_table = doc.table(Kind::Replica, &name).is_some();
    let has_record = crate::replicas::read_one(&app.state_dir, &name).is_some();
    if !has_table && !has_record {
        return Err(Problem::not_found(format!("replica `{name}`")));
    }
    if has_table {
        app.store
            .delete(Kind::Replica, &name, &precondition(&h))
            .await?;
    }
    if !has_record {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    start(
        &app,
        &c,
        &name,
        ReplicaAction::Cancel {
            delete_vm: q.delete_vm.unwrap_or(false),
        },
    )
    .await
}

/// Starts `action`: refused now (409/404) or accepted (202) and run in the background.
async fn start(
    app: &Arc<App>,
    c: &Caller,
    name: &str,
    action: ReplicaAction,
) -> ApiResult<Response> {
    if app.stopping.is_cancelled() {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is shutting down",
        ));
    }
    let label = action.label();
    let run = app
        .backend
        .replica_action(app.store.path(), &app.state_dir, name, action)
        .await
        .map_err(|r| match r {
            ReplicaRefusal::NotFound(d) => Problem::new(StatusCode::NOT_FOUND, d),
            ReplicaRefusal::Conflict(d) => Problem::conflict(d),
            ReplicaRefusal::Unavailable(d) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, d),
        })?;
    let v = ActionView {
        action: label.into(),
        by: c.user.clone(),
        started: chrono::Utc::now().timestamp(),
        ended: None,
        error: None,
    };
    app.replica_actions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.into(), v.clone());
    tracing::info!(replica = %name, action = label, user = %c.user, "replica action started");
    let (a2, n2) = (app.clone(), name.to_string());
    app.tracker.spawn(async move {
        let r = run.await;
        let mut map = a2.replica_actions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = map.get_mut(&n2) {
            v.ended = Some(chrono::Utc::now().timestamp());
            v.error = r.as_ref().err().map(|e| e.0.clone());
        }
        match r {
            Ok(()) => tracing::info!(replica = %n2, action = label, "replica action done"),
            Err(e) => {
                tracing::warn!(replica = %n2, action = label, error = %e, "replica action failed")
            }
        }
    });
    Ok(json_ok(
        StatusCode::ACCEPTED,
        json!({"replica": name, "action": v}),
    ))
}

/// A body that may be empty (no options).
fn options<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Problem::bad_request(format!("request body: {e}")))
}

async fn sync(State(app): St, c: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    start(&app, &c, &name, ReplicaAction::Sync).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FailoverBody {
    #[serde(default)]
    planned: bool,
    #[serde(default)]
    point: Option<String>,
    #[serde(default)]
    force: bool,
}

async fn failover(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let b: FailoverBody = options(&body)?;
    if b.planned && b.point.is_some() {
        return Err(Problem::invalid(
            "point",
            "a planned failover sends the last changes: it has no recovery point to choose",
        ));
    }
    start(
        &app,
        &c,
        &name,
        ReplicaAction::Failover {
            planned: b.planned,
            point: b.point,
            force: b.force,
        },
    )
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TestBody {
    #[serde(default)]
    point: Option<String>,
}

async fn test(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let b: TestBody = options(&body)?;
    start(&app, &c, &name, ReplicaAction::Test { point: b.point }).await
}

async fn test_cleanup(State(app): St, c: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    start(&app, &c, &name, ReplicaAction::TestCleanup).await
}

async fn reverse(State(app): St, c: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    start(&app, &c, &name, ReplicaAction::Reverse).await
}
