//! The REST API (axum). JSON in and out, snake_case keys (a source's `tls_fingerprint` is
//! `tls-fingerprint` in `ferry.toml`); errors as problem details; changes guarded by ETags.

use crate::App;
use crate::auth::{Caller, Role, TokenKind};
use crate::config::{Document, Kind, Precondition, etag};
use crate::problem::{ApiResult, Problem};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferry_core::Secret;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

type St = State<Arc<App>>;

/// The OpenAPI document (hand-maintained; a test holds it to the router).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route: (method, path) as the OpenAPI document spells it.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/api/openapi.json"),
    ("post", "/api/login"),
    ("post", "/api/logout"),
    ("get", "/api/me"),
    ("get", "/api/users"),
    ("post", "/api/users"),
    ("delete", "/api/users/{name}"),
    ("get", "/api/tokens"),
    ("post", "/api/tokens"),
    ("delete", "/api/tokens/{id}"),
    ("get", "/api/sources"),
    ("get", "/api/sources/{name}"),
    ("put", "/api/sources/{name}"),
    ("delete", "/api/sources/{name}"),
    ("post", "/api/sources/{name}/test"),
    ("get", "/api/sources/{name}/vms"),
    ("get", "/api/repositories"),
    ("get", "/api/repositories/{name}"),
    ("put", "/api/repositories/{name}"),
    ("delete", "/api/repositories/{name}"),
    ("get", "/api/repositories/{name}/restore-points"),
    ("get", "/api/jobs"),
    ("get", "/api/jobs/{name}"),
    ("put", "/api/jobs/{name}"),
    ("delete", "/api/jobs/{name}"),
    ("post", "/api/jobs/{name}/run"),
    ("get", "/api/sessions"),
    ("get", "/api/sessions/{id}"),
    ("get", "/api/sessions/{id}/log"),
    ("post", "/api/sessions/{id}/cancel"),
    ("get", "/api/vms"),
    ("get", "/api/vms/{vm}/history"),
    ("get", "/api/leases"),
    ("get", "/api/vms/{vm}/restore-points"),
    ("post", "/api/restores"),
    ("get", "/api/alert-targets"),
    ("get", "/api/alert-targets/{name}"),
    ("put", "/api/alert-targets/{name}"),
    ("delete", "/api/alert-targets/{name}"),
    ("post", "/api/alert-targets/{name}/test"),
    ("get", "/api/alerts"),
    ("get", "/api/usage"),
];

/// The router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/users", get(list_users).post(add_user))
        .route("/api/users/{name}", axum::routing::delete(delete_user))
        .route("/api/tokens", get(list_tokens).post(add_token))
        .route("/api/tokens/{id}", axum::routing::delete(delete_token))
        .route(
            "/api/sources",
            get(|s: St, c: Caller| list(s, c, Kind::Source)),
        )
        .route(
            "/api/sources/{name}",
            get(|s: St, c: Caller, p: Path<String>| get_one(s, c, p, Kind::Source))
                .put(put_source)
                .delete(|s: St, c: Caller, p: Path<String>, h: HeaderMap| {
                    delete_one(s, c, p, h, Kind::Source)
                }),
        )
        .route("/api/sources/{name}/test", post(test_source))
        .route("/api/sources/{name}/vms", get(source_vms))
        .route(
            "/api/repositories",
            get(|s: St, c: Caller| list(s, c, Kind::Repository)),
        )
        .route(
            "/api/repositories/{name}",
            get(|s: St, c: Caller, p: Path<String>| get_one(s, c, p, Kind::Repository))
                .put(put_repository)
                .delete(|s: St, c: Caller, p: Path<String>, h: HeaderMap| {
                    delete_one(s, c, p, h, Kind::Repository)
                }),
        )
        .route(
            "/api/repositories/{name}/restore-points",
            get(restore_points),
        )
        .route("/api/jobs", get(|s: St, c: Caller| list(s, c, Kind::Job)))
        .route(
            "/api/jobs/{name}",
            get(|s: St, c: Caller, p: Path<String>| get_one(s, c, p, Kind::Job))
                .put(put_job)
                .delete(|s: St, c: Caller, p: Path<String>, h: HeaderMap| {
                    delete_one(s, c, p, h, Kind::Job)
                }),
        )
        .route("/api/jobs/{name}/run", post(run_job))
        .route("/api/sessions", get(list_sessions))
        .route("/api/sessions/{id}", get(get_session))
        .route("/api/sessions/{id}/log", get(session_log))
        .route("/api/sessions/{id}/cancel", post(cancel_session))
        .route("/api/vms", get(vms))
        .route("/api/vms/{vm}/history", get(vm_history))
        .route("/api/leases", get(leases))
        .route("/api/vms/{vm}/restore-points", get(vm_restore_points))
        .route("/api/restores", post(start_restore))
        .route(
            "/api/alert-targets",
            get(|s: St, c: Caller| list(s, c, Kind::AlertTarget)),
        )
        .route(
            "/api/alert-targets/{name}",
            get(|s: St, c: Caller, p: Path<String>| get_one(s, c, p, Kind::AlertTarget))
                .put(put_alert_target)
                .delete(|s: St, c: Caller, p: Path<String>, h: HeaderMap| {
                    delete_one(s, c, p, h, Kind::AlertTarget)
                }),
        )
        .route("/api/alert-targets/{name}/test", post(test_alert_target))
        .route("/api/alerts", get(list_alerts))
        .route("/api/usage", get(usage))
        .merge(crate::replica_api::routes())
        .merge(crate::events_api::routes())
        .route("/", get(crate::console::index))
        .route("/console/app.js", get(crate::console::script))
        .route("/console/app.css", get(crate::console::style))
        .fallback(|| async { Problem::not_found("this path") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this method is not allowed here",
            )
        })
        .with_state(app)
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Problem> {
        let h = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| Problem::unauthorized("log in: send Authorization: Bearer TOKEN"))?;
        let token = h
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Problem::unauthorized("the Authorization header must be `Bearer TOKEN`")
            })?;
        app.users
            .authenticate(token.trim())
            .ok_or_else(|| Problem::unauthorized("the token is unknown, revoked or expired"))
    }
}

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// A query string, or a problem naming what is wrong with it.
fn query<T>(q: QueryResult<T>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| Problem::bad_request(format!("query string: {}", e.body_text())))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| Problem::bad_request(format!("request body: {e}")))
}

pub(crate) fn json_ok(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

pub(crate) fn with_etag(mut r: Response, tag: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(tag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

pub(crate) fn precondition(h: &HeaderMap) -> Precondition {
    Precondition {
        if_match: h
            .get(header::IF_MATCH)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

async fn health(State(app): St) -> Response {
    let doc_ok = app.store.load().is_ok();
    json_ok(
        if doc_ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        json!({
            "status": if doc_ok { "ok" } else { "configuration unreadable" },
            "version": env!("CARGO_PKG_VERSION"),
            "sessions_running": app.running(),
            "tls_fingerprint": app.fingerprint,
        }),
    )
}

async fn metrics(State(app): St) -> ApiResult<Response> {
    let text = app
        .metrics
        .render_with(
            &app.catalog,
            app.running(),
            chrono::Utc::now().timestamp(),
            Some(&app.state_dir),
        )
        .map_err(Problem::internal)?;
    let mut r = text.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(r)
}

async fn openapi() -> Response {
    let mut r = OPENAPI.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: Secret,
}

async fn login(State(app): St, body: Bytes) -> ApiResult<Response> {
    let b: LoginBody = parse_body(&body)?;
    let users = app.clone();
    let (token, view, role) =
        tokio::task::spawn_blocking(move || users.users.login(&b.username, &b.password))
            .await
            .map_err(|e| Problem::internal(e.to_string()))??;
    Ok(json_ok(
        StatusCode::OK,
        json!({"token": token, "expires": view.expires, "role": role}),
    ))
}

async fn logout(State(app): St, c: Caller) -> ApiResult<StatusCode> {
    app.users.revoke(&c, &c.token_id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(c: Caller) -> Response {
    json_ok(StatusCode::OK, json!({"user": c.user, "role": c.role}))
}

async fn list_users(State(app): St, c: Caller) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    Ok(json_ok(StatusCode::OK, json!(app.users.list())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserBody {
    name: String,
    role: Role,
    password: Secret,
}

async fn add_user(State(app): St, c: Caller, body: Bytes) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    let b: UserBody = parse_body(&body)?;
    let a = app.clone();
    let v = tokio::task::spawn_blocking(move || a.users.add(&b.name, b.role, &b.password))
        .await
        .map_err(|e| Problem::internal(e.to_string()))??;
    Ok(json_ok(StatusCode::CREATED, json!(v)))
}

async fn delete_user(State(app): St, c: Caller, Path(name): Path<String>) -> ApiResult<StatusCode> {
    c.require(Role::Admin)?;
    app.users.remove(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tokens(State(app): St, c: Caller) -> Response {
    json_ok(StatusCode::OK, json!(app.users.tokens(&c.user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    #[serde(default)]
    expires_in_days: Option<u32>,
}

async fn add_token(State(app): St, c: Caller, body: Bytes) -> ApiResult<Response> {
    let b: TokenBody = parse_body(&body)?;
    if b.name.trim().is_empty() || b.name.len() > 100 {
        return Err(Problem::invalid(
            "name",
            "give the token a name of 1 to 100 characters",
        ));
    }
    if b.expires_in_days == Some(0) {
        return Err(Problem::invalid(
            "expires_in_days",
            "at least 1 day, or leave it out",
        ));
    }
    let (token, view) = app.users.issue(
        &c.user,
        TokenKind::Api,
        &b.name,
        b.expires_in_days.map(|d| i64::from(d) * 86400),
    )?;
    Ok(json_ok(
        StatusCode::CREATED,
        json!({"token": token, "id": view.id, "name": view.name, "expires": view.expires}),
    ))
}

async fn delete_token(State(app): St, c: Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.users.revoke(&c, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// A table as API JSON: top-level keys in snake_case, secrets replaced by `password_set`.
fn table_to_json(kind: Kind, name: &str, t: &toml::Table, doc: &Document, app: &App) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("name".into(), name.into());
    let mut password_set = false;
    for (k, v) in t {
        if k == "password" || k == "password-file" {
            password_set = true;
            continue;
        }
        o.insert(
            k.replace('-', "_"),
            serde_json::to_value(v).unwrap_or(Value::Null),
        );
    }
    if kind != Kind::Job {
        o.insert("password_set".into(), password_set.into());
    }
    if kind == Kind::Job
        && let Some(j) = doc.jobs.get(name)
    {
        let next = app.planner_next(name).or_else(|| {
            j.schedule()
                .ok()
                .flatten()
                .and_then(|s| s.next_after(chrono::Utc::now()))
        });
        o.insert(
            "next_run".into(),
            next.filter(|_| j.enabled)
                .map(|t| Value::String(t.to_rfc3339()))
                .unwrap_or(Value::Null),
        );
    }
    Value::Object(o)
}

/// API JSON to a table; `password` is taken out and returned apart.
pub(crate) fn json_to_table(
    body: &Bytes,
    read_only: &[&'static str],
) -> ApiResult<(toml::Table, Option<Secret>, serde_json::Map<String, Value>)> {
    let v: Value = parse_body(body)?;
    let Value::Object(mut o) = v else {
        return Err(Problem::bad_request("request body: expected a JSON object"));
    };
    let password = match o.remove("password") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s)),
        Some(_) => {
            return Err(Problem::invalid(
                "password",
                "password must be a non-empty string",
            ));
        }
    };
    // Read-only fields a client may send back unchanged from a GET.
    for k in ["name", "password_set", "next_run"] {
        let ok = match (k, o.remove(k)) {
            (_, None) => true,
            ("name", Some(v)) => v.is_string(),
            ("password_set", Some(v)) => v.is_boolean(),
            (_, Some(v)) => v.is_string() || v.is_null(),
        };
        if !ok {
            return Err(Problem::invalid(
                k,
                format!("`{k}` is read-only and has the wrong type"),
            ));
        }
    }
    let mut extra = serde_json::Map::new();
    let mut t = toml::Table::new();
    for (k, v) in o {
        if k == "password_file" {
            return Err(Problem::invalid(
                "password_file",
                "send `password`; the appliance keeps it in its own secret file",
            ));
        }
        if k == "init" && read_only.contains(&"init") {
            extra.insert(k, v);
            continue;
        }
        if v.is_null() {
            return Err(Problem::invalid(
                k.clone(),
                format!("`{k}` cannot be null: leave it out for the default"),
            ));
        }
        let tv = toml::Value::try_from(&v)
            .map_err(|e| Problem::invalid(k.clone(), format!("`{k}`: {e}")))?;
        t.insert(k.replace('_', "-"), tv);
    }
    Ok((t, password, extra))
}

async fn list(State(app): St, c: Caller, kind: Kind) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let doc = app.store.load()?;
    let items: Vec<Value> = doc
        .names(kind)
        .iter()
        .filter_map(|n| {
            doc.table(kind, n)
                .map(|t| table_to_json(kind, n, t, &doc, &app))
        })
        .collect();
    Ok(json_ok(StatusCode::OK, Value::Array(items)))
}

async fn get_one(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    kind: Kind,
) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let doc = app.store.load()?;
    let t = doc
        .table(kind, &name)
        .ok_or_else(|| Problem::not_found(format!("{} `{name}`", kind.noun())))?;
    Ok(with_etag(
        json_ok(StatusCode::OK, table_to_json(kind, &name, t, &doc, &app)),
        &etag(t),
    ))
}

async fn delete_one(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    h: HeaderMap,
    kind: Kind,
) -> ApiResult<StatusCode> {
    c.require(Role::Admin)?;
    app.store.delete(kind, &name, &precondition(&h)).await?;
    app.wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// The table's shape alone (types, unknown keys), before preconditions are looked at: a body
/// that can never be valid is a 422 whatever the ETag.
pub(crate) fn precheck<T: serde::de::DeserializeOwned>(
    kind: Kind,
    name: &str,
    t: &toml::Table,
) -> ApiResult<()> {
    toml::Value::Table(t.clone())
        .try_into::<T>()
        .map(|_| ())
        .map_err(|e: toml::de::Error| {
            Problem::invalid(
                kind.noun(),
                format!(
                    "{} `{name}`: {}",
                    kind.noun(),
                    e.to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            )
        })
}

/// The body of a resource without a secret as its table, shape-checked against `T` (a 422
/// before the ETag is looked at); a `password` in it is refused with `why`.
pub(crate) fn plain_table<T: serde::de::DeserializeOwned>(
    kind: Kind,
    name: &str,
    body: &Bytes,
    why: &str,
) -> ApiResult<toml::Table> {
    let (t, pw, _) = json_to_table(body, &[])?;
    if pw.is_some() {
        return Err(Problem::invalid("password", why));
    }
    precheck::<T>(kind, name, &t)?;
    Ok(t)
}

/// 201 for a resource a PUT created, 200 for one it changed.
pub(crate) fn put_status(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

fn saved(app: &App, kind: Kind, name: &str, tag: String, created: bool) -> ApiResult<Response> {
    let doc = app.store.load()?;
    let t = doc
        .table(kind, name)
        .ok_or_else(|| Problem::internal("the saved resource vanished"))?;
    app.wake.notify_one();
    Ok(with_etag(
        json_ok(put_status(created), table_to_json(kind, name, t, &doc, app)),
        &tag,
    ))
}

/// A resource whose only extra is a write-only `password` (sources, alert targets): shape
/// and content are checked before the ETag, so a body that can never be valid is a 422.
async fn put_with_secret<T: serde::de::DeserializeOwned>(
    app: &App,
    kind: Kind,
    name: &str,
    h: &HeaderMap,
    body: &Bytes,
    validate: impl Fn(T) -> ApiResult<()>,
) -> ApiResult<Response> {
    let (t, pw, _) = json_to_table(body, &[])?;
    precheck::<T>(kind, name, &t)?;
    if let Ok(cfg) = toml::Value::Table(t.clone()).try_into::<T>() {
        validate(cfg)?;
    }
    let (tag, created) = app
        .store
        .put(
            kind,
            name,
            t,
            pw.map(|p| ("password-file", p)),
            &precondition(h),
            |_| async { Ok(()) },
        )
        .await?;
    saved(app, kind, name, tag, created)
}

async fn put_source(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    put_with_secret::<ferry_hv::SourceConfig>(&app, Kind::Source, &name, &h, &body, |_| Ok(()))
        .await
}

async fn put_repository(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    let (t, pw, extra) = json_to_table(&body, &["init"])?;
    precheck::<crate::config::RepositoryConfig>(Kind::Repository, &name, &t)?;
    let init = match extra.get("init") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Problem::invalid("init", "init must be true or false")),
    };
    let n2 = name.clone();
    let (tag, created) = app
        .store
        .put(
            Kind::Repository,
            &name,
            t,
            pw.map(|p| ("password-file", p)),
            &precondition(&h),
            move |doc: Document| async move {
                let cfg = doc
                    .repositories
                    .get(&n2)
                    .ok_or_else(|| Problem::internal("repository missing after the change"))?;
                let password = cfg
                    .password()
                    .map_err(|e| Problem::invalid("password", e))?;
                if init {
                    let store = ferry_repo::Store::open(&cfg.url, true)
                        .map_err(|e| Problem::invalid("url", e.to_string()))?;
                    let opts = ferry_repo::InitOptions::default();
                    match &cfg.kms {
                        Some(kms) => {
                            ferry_repo::Repository::init_kms(store, password.as_ref(), kms, opts)
                                .await
                        }
                        None => ferry_repo::Repository::init(store, password.as_ref(), opts).await,
                    }
                    .map_err(|e| {
                        Problem::invalid("url", format!("cannot create the repository: {e}"))
                    })?;
                } else {
                    crate::jobs::open_repository(cfg).await.map_err(|e| {
                        Problem::invalid("url", format!("cannot open the repository: {e}"))
                    })?;
                }
                Ok(())
            },
        )
        .await?;
    saved(&app, Kind::Repository, &name, tag, created)
}

async fn put_job(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    let t =
        plain_table::<crate::config::JobConfig>(Kind::Job, &name, &body, "a job has no password")?;
    let (tag, created) = app
        .store
        .put(Kind::Job, &name, t, None, &precondition(&h), |_| async {
            Ok(())
        })
        .await?;
    saved(&app, Kind::Job, &name, tag, created)
}

async fn put_alert_target(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    c.require(Role::Admin)?;
    put_with_secret(
        &app,
        Kind::AlertTarget,
        &name,
        &h,
        &body,
        |t: crate::alerts::AlertTargetConfig| t.validate(&name),
    )
    .await
}

async fn test_alert_target(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let doc = app.store.load()?;
    let t = doc
        .alert_targets
        .get(&name)
        .ok_or_else(|| Problem::not_found(format!("alert target `{name}`")))?;
    let a = crate::alerts::Alert {
        kind: "test".into(),
        title: format!("test alert to `{name}`"),
        message: format!("{} asked the appliance to send this test alert.", c.user),
        job: None,
        vm: None,
        session: None,
        resolves: None,
    };
    crate::alerts::send(&name, t, &a).await.map_err(|e| {
        Problem::new(
            StatusCode::BAD_GATEWAY,
            format!("alert target `{name}`: {e}"),
        )
    })?;
    Ok(json_ok(StatusCode::OK, json!({"ok": true})))
}

async fn list_alerts(State(app): St, c: Caller, q: QueryResult<ListQuery>) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let q = query(q)?;
    Ok(json_ok(StatusCode::OK, json!(app.alerts(limit(q.limit)?)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    #[serde(default)]
    days: Option<u32>,
}

async fn usage(State(app): St, c: Caller, q: QueryResult<UsageQuery>) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let q = query(q)?;
    Ok(json_ok(
        StatusCode::OK,
        app.usage(crate::console::days(q.days)?)?,
    ))
}

async fn test_source(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let doc = app.store.load()?;
    let cfg = if body.iter().all(u8::is_ascii_whitespace) {
        doc.ferry
            .sources
            .get(&name)
            .cloned()
            .ok_or_else(|| Problem::not_found(format!("source `{name}`")))?
    } else {
        // A candidate, not saved: the stored password unless a new one is given.
        let (mut t, pw, _) = json_to_table(&body, &[])?;
        match (pw, doc.table(Kind::Source, &name)) {
            (Some(p), _) => {
                t.insert("password".into(), toml::Value::String(p.expose().into()));
            }
            (None, Some(old)) => {
                for k in ["password", "password-file"] {
                    if let Some(v) = old.get(k) {
                        t.insert(k.into(), v.clone());
                    }
                }
            }
            (None, None) => {}
        }
        let mut root = toml::Table::new();
        let mut s = toml::Table::new();
        s.insert(name.clone(), toml::Value::Table(t));
        root.insert("sources".into(), toml::Value::Table(s));
        let text = toml::to_string(&root).map_err(|e| Problem::internal(e.to_string()))?;
        let f =
            ferry_hv::FerryConfig::parse(&text, std::path::Path::new("request")).map_err(|e| {
                Problem::invalid("source", e.to_string().replace("config request: ", ""))
            })?;
        f.sources
            .get(&name)
            .cloned()
            .ok_or_else(|| Problem::internal("candidate source missing"))?
    };
    let driver = app
        .backend
        .connect(&name, &cfg)
        .await
        .map_err(|e| Problem::invalid("connection", format!("source `{name}`: {}", e.0)))?;
    let vms = driver
        .list_vms()
        .await
        .map_err(|e| Problem::invalid("connection", format!("source `{name}`: {e}")))?;
    Ok(json_ok(
        StatusCode::OK,
        json!({"ok": true, "vms": vms.len()}),
    ))
}

async fn source_vms(State(app): St, c: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let doc = app.store.load()?;
    let cfg = doc
        .ferry
        .sources
        .get(&name)
        .ok_or_else(|| Problem::not_found(format!("source `{name}`")))?;
    let driver =
        app.backend.connect(&name, cfg).await.map_err(|e| {
            Problem::new(StatusCode::BAD_GATEWAY, format!("source `{name}`: {}", e.0))
        })?;
    let vms = driver
        .list_vms()
        .await
        .map_err(|e| Problem::new(StatusCode::BAD_GATEWAY, format!("source `{name}`: {e}")))?;
    Ok(json_ok(StatusCode::OK, json!(vms)))
}

async fn restore_points(
    State(app): St,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let repo = crate::restore::open_named(&app, &name).await?;
    let ms = repo
        .snapshots()
        .await
        .map_err(|e| Problem::new(StatusCode::BAD_GATEWAY, format!("repository `{name}`: {e}")))?;
    let out: Vec<Value> = ms
        .iter()
        .rev()
        .map(|m| crate::restore::restore_point_json(&name, m))
        .collect();
    Ok(json_ok(StatusCode::OK, Value::Array(out)))
}

async fn vm_restore_points(
    State(app): St,
    c: Caller,
    Path(vm): Path<String>,
) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let out = crate::restore::vm_restore_points(&app, &vm).await?;
    Ok(json_ok(StatusCode::OK, Value::Array(out)))
}

async fn start_restore(State(app): St, c: Caller, body: Bytes) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let r: crate::restore::RestoreRequest = parse_body(&body)?;
    let id = app.start_restore(r, &c.user).await?;
    Ok(started(&id))
}

/// 202 with the new session's id and its address.
fn started(id: &str) -> Response {
    let mut r = json_ok(StatusCode::ACCEPTED, json!({"session": id}));
    if let Ok(v) = HeaderValue::from_str(&format!("/api/sessions/{id}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

async fn run_job(State(app): St, c: Caller, Path(name): Path<String>) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let id = app.start_session(&name, "manual", &c.user)?;
    Ok(started(&id))
}

fn limit(l: Option<u32>) -> ApiResult<u32> {
    match l.unwrap_or(100) {
        n @ 1..=1000 => Ok(n),
        n => Err(Problem::bad_request(format!("limit {n}: use 1 to 1000"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    limit: Option<u32>,
}

async fn list_sessions(
    State(app): St,
    c: Caller,
    q: QueryResult<ListQuery>,
) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let q = query(q)?;
    let limit = limit(q.limit)?;
    let mut rows = app
        .catalog
        .sessions(limit)
        .map_err(|e| Problem::internal(e.to_string()))?;
    // Running sessions: their live view.
    for r in &mut rows {
        if let Some(id) = r["id"].as_str()
            && let Ok(v) = app.session_json(id)
        {
            *r = v;
        }
    }
    Ok(json_ok(StatusCode::OK, Value::Array(rows)))
}

async fn get_session(State(app): St, c: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    Ok(json_ok(StatusCode::OK, app.session_json(&id)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    #[serde(default)]
    after: Option<u64>,
}

async fn session_log(
    State(app): St,
    c: Caller,
    Path(id): Path<String>,
    q: QueryResult<LogQuery>,
) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let q = query(q)?;
    app.session_json(&id)?;
    let ev = app
        .catalog
        .events(&id, q.after.unwrap_or(0))
        .map_err(|e| Problem::internal(e.to_string()))?;
    Ok(json_ok(StatusCode::OK, json!(ev)))
}

async fn cancel_session(State(app): St, c: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    c.require(Role::Operator)?;
    let v = app.cancel_session(&id)?;
    Ok(json_ok(StatusCode::ACCEPTED, json!(v)))
}

async fn vms(State(app): St, c: Caller) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let now = chrono::Utc::now().timestamp();
    let rows = app
        .catalog
        .vm_status()
        .map_err(|e| Problem::internal(e.to_string()))?;
    let out: Vec<Value> = rows
        .into_iter()
        .map(|v| {
            let mut j = json!(v);
            j["rpo_age_seconds"] = v
                .last_success
                .map(|t| json!((now - t).max(0)))
                .unwrap_or(Value::Null);
            j
        })
        .collect();
    Ok(json_ok(StatusCode::OK, Value::Array(out)))
}

async fn leases(State(app): St, c: Caller) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let doc = app.store.load()?;
    let mut out = Vec::new();
    for (name, r) in &doc.repositories {
        // Leases are plain objects beside the encrypted data: no password needed.
        let store = ferry_repo::Store::open(&r.url, false)
            .map_err(|e| Problem::internal(format!("repository `{name}`: {e}")))?;
        let states = ferry_repo::work::list(&store)
            .await
            .map_err(|e| Problem::internal(format!("repository `{name}`: {e}")))?;
        for st in states {
            out.push(json!({
                "repository": name,
                "window": st.window,
                "vm": st.vm,
                "state": st.state,
                "lease": st.lease.map(|l| json!({
                    "appliance": l.appliance,
                    "owner": l.owner,
                    "expires": l.expires,
                    "generation": l.generation,
                })),
                "done": st.done.map(|d| json!({
                    "appliance": d.appliance,
                    "status": d.status,
                    "restore_point": d.restore_point,
                    "error": d.error,
                    "time": d.time,
                })),
            }));
        }
    }
    Ok(json_ok(StatusCode::OK, Value::Array(out)))
}

async fn vm_history(
    State(app): St,
    c: Caller,
    Path(vm): Path<String>,
    q: QueryResult<ListQuery>,
) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let q = query(q)?;
    let rows = app
        .catalog
        .vm_history(&vm, limit(q.limit)?)
        .map_err(|e| Problem::internal(e.to_string()))?;
    Ok(json_ok(StatusCode::OK, json!(rows)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = Vec::new();
        for (p, item) in paths {
            for m in item.as_object().unwrap().keys() {
                if ["get", "put", "post", "delete", "patch"].contains(&m.as_str()) {
                    documented.push((m.clone(), p.clone()));
                }
            }
        }
        documented.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .chain(crate::replica_api::ROUTES)
            .chain(crate::events_api::ROUTES)
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(documented, routes);
        assert_eq!(doc["openapi"], "3.0.3");
    }
}
