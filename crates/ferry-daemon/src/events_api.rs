//! Server-Sent Events over the API's own server (axum's `Sse` body on hyper; ADR 0178):
//! `GET /api/sessions/{id}/events` follows one session (its log lines, each once and in
//! order, its VMs' progress, its milestones, then `end`), `GET /api/events` every session's
//! milestones and progress (no log lines). Each connection has a task that moves events from
//! the hub's broadcast channel into a small queue the response body drains: a client that
//! reads too slowly falls behind in the channel and gets a `resync` (the current state, then
//! the log lines it has not had, from the catalog) rather than holding memory.
//!
//! Event ids: in a session's stream `N` on log line N and `N.K` on the K-th other event after
//! it, so `Last-Event-ID` (or `?last_event_id=`) names the last line the client has, and a
//! reconnect gets exactly the lines after it, then the current state. Browsers cannot send a
//! header with `EventSource`: `POST /api/events/ticket` gives a 60-second ticket for
//! `?ticket=`, good for these two streams only and only while the token that asked for it
//! lives (ADR 0179).

use crate::App;
use crate::auth::{Caller, Role, random_b64, token_hash};
use crate::catalog::Event;
use crate::events::What;
use crate::problem::{ApiResult, Problem};
use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

type St = State<Arc<App>>;

/// The routes of this module, as the OpenAPI document spells them.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/api/events/ticket"),
    ("get", "/api/events"),
    ("get", "/api/sessions/{id}/events"),
];

/// A comment line this often keeps proxies and the browser from timing the stream out.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long a ticket opens streams.
const TICKET_SECONDS: i64 = 60;
/// Tickets alive at once (a client asks for one per stream it opens).
const MAX_TICKETS: usize = 10_000;
/// Log lines read from the catalog at once when catching up.
const PAGE: u32 = 500;
/// Events queued per connection between its task and the response body.
const QUEUE: usize = 16;

/// The routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/events/ticket", post(ticket))
        .route("/api/events", get(all_events))
        .route("/api/sessions/{id}/events", get(session_events))
}

/// Stream tickets: stored as SHA-256 hashes, in memory only (a restart ends them).
#[derive(Default)]
pub struct Tickets(Mutex<HashMap<String, (Caller, i64)>>);

impl Tickets {
    fn issue(&self, c: &Caller) -> ApiResult<(String, i64)> {
        let now = crate::jobs::now();
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, exp)| *exp > now);
        if m.len() >= MAX_TICKETS {
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many stream tickets are open; try again in a minute",
            ));
        }
        let t = format!("fe_{}", random_b64(32)?);
        let expires = now + TICKET_SECONDS;
        m.insert(token_hash(&t), (c.clone(), expires));
        Ok((t, expires))
    }

    fn check(&self, t: &str) -> Option<Caller> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&token_hash(t))
            .filter(|(_, exp)| *exp > crate::jobs::now())
            .map(|(c, _)| c.clone())
    }
}

/// Whether the token behind `c` is still valid (not revoked, not expired).
fn alive(app: &App, c: &Caller) -> bool {
    let now = crate::jobs::now();
    app.users
        .tokens(&c.user)
        .iter()
        .any(|t| t.id == c.token_id && t.expires.is_none_or(|e| e > now))
}

/// Who opens a stream: a bearer token as everywhere, or a ticket in `?ticket=`.
pub struct StreamCaller(Caller);

impl FromRequestParts<Arc<App>> for StreamCaller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Problem> {
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return Caller::from_request_parts(parts, app).await.map(Self);
        }
        let ticket = parts
            .uri
            .query()
            .and_then(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "ticket")
                    .map(|(_, v)| v.into_owned())
            })
            .ok_or_else(|| {
                Problem::unauthorized(
                    "log in: send Authorization: Bearer TOKEN, or ?ticket= from POST /api/events/ticket",
                )
            })?;
        app.tickets
            .check(&ticket)
            .filter(|c| alive(app, c))
            .map(Self)
            .ok_or_else(|| Problem::unauthorized("the ticket is unknown or expired"))
    }
}

async fn ticket(State(app): St, c: Caller) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let (t, expires) = app.tickets.issue(&c)?;
    let mut r = (
        StatusCode::CREATED,
        axum::Json(json!({"ticket": t, "expires": expires})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    /// Read by [`StreamCaller`].
    #[serde(default)]
    #[allow(dead_code)]
    ticket: Option<String>,
    #[serde(default)]
    last_event_id: Option<String>,
}

fn stream_query(
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<StreamQuery> {
    q.map(|Query(v)| v)
        .map_err(|e| Problem::bad_request(format!("query string: {}", e.body_text())))
}

/// The log line a client has last had: `Last-Event-ID` (a browser's own reconnect), else
/// `?last_event_id=`; `N` or `N.K`.
fn resume_point(h: &HeaderMap, q: Option<&str>) -> ApiResult<u64> {
    let Some(v) = h
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(q)
        .map(str::trim)
        .filter(|v| !v.is_empty())
    else {
        return Ok(0);
    };
    v.split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Problem::bad_request(format!(
                "Last-Event-ID `{v}`: use an id of this stream (N or N.K)"
            ))
        })
}

/// What a connection's task hands to its response body.
#[derive(Debug, Clone, PartialEq)]
enum Item {
    /// How long a browser waits before reconnecting.
    Retry(Duration),
    /// A comment that keeps the connection warm.
    Heartbeat,
    /// An event.
    Event {
        name: &'static str,
        id: String,
        data: String,
    },
}

impl Item {
    fn event(name: &'static str, id: String, data: &Value) -> Self {
        Item::Event {
            name,
            id,
            data: data.to_string(),
        }
    }

    fn into_sse(self) -> SseEvent {
        match self {
            Item::Retry(d) => SseEvent::default().retry(d),
            Item::Heartbeat => SseEvent::default().comment("heartbeat"),
            Item::Event { name, id, data } => SseEvent::default().event(name).id(id).data(data),
        }
    }
}

/// The response: the body drains `rx`.
fn sse(rx: mpsc::Receiver<Item>) -> Response {
    let mut rx = rx;
    let body = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|i| i.map(|i| Ok::<_, Infallible>(i.into_sse())))
    });
    let mut r = Sse::new(body).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Reverse proxies must pass events on as they come.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

fn is_done(v: &Value) -> bool {
    !matches!(
        v["status"].as_str(),
        Some("queued" | "running" | "retrying") | None
    )
}

/// One connection's writing side.
struct Out {
    tx: mpsc::Sender<Item>,
    last_log: u64,
    k: u64,
}

impl Out {
    /// Queues `e`; false once the client is gone.
    async fn put(&self, e: Item) -> bool {
        self.tx.send(e).await.is_ok()
    }

    async fn event(&mut self, name: &'static str, data: &Value) -> bool {
        self.k += 1;
        let id = format!("{}.{}", self.last_log, self.k);
        self.put(Item::event(name, id, data)).await
    }

    async fn line(&mut self, e: &Event) -> bool {
        self.last_log = e.seq;
        self.k = 0;
        let data = serde_json::to_value(e).unwrap_or_default();
        self.put(Item::event("log", e.seq.to_string(), &data)).await
    }

    /// Sends the lines of `session` after the last one sent, from the catalog.
    async fn catch_up(&mut self, app: &App, session: &str) -> bool {
        loop {
            let page = match app.catalog.events_page(session, self.last_log, Some(PAGE)) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(session, error = %e, "event stream: cannot read the log");
                    return false;
                }
            };
            if page.is_empty() {
                return true;
            }
            for e in &page {
                if !self.line(e).await {
                    return false;
                }
            }
        }
    }

    async fn end(&mut self, session: &str, view: &Value) {
        self.event(
            "end",
            &json!({"session": session, "status": view["status"]}),
        )
        .await;
    }
}

fn heartbeat() -> tokio::time::Interval {
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

async fn session_events(
    State(app): St,
    StreamCaller(c): StreamCaller,
    Path(id): Path<String>,
    h: HeaderMap,
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    let q = stream_query(q)?;
    let after = resume_point(&h, q.last_event_id.as_deref())?;
    // Subscribed before the state is read: nothing falls between the two.
    let rx = app.events.subscribe();
    app.session_json(&id)?;
    let (tx, out) = mpsc::channel(QUEUE);
    tokio::spawn(follow_session(
        app,
        c,
        id,
        rx,
        Out {
            tx,
            last_log: after,
            k: 0,
        },
    ));
    Ok(sse(out))
}

async fn follow_session(
    app: Arc<App>,
    c: Caller,
    id: String,
    mut rx: broadcast::Receiver<Arc<crate::events::Published>>,
    mut out: Out,
) {
    if !out.put(Item::Retry(Duration::from_secs(2))).await || !out.catch_up(&app, &id).await {
        return;
    }
    let Ok(view) = app.session_json(&id) else {
        return;
    };
    if !out.event("state", &view).await {
        return;
    }
    if is_done(&view) {
        // Its last lines may have come after the catch-up above.
        if out.catch_up(&app, &id).await {
            out.end(&id, &view).await;
        }
        return;
    }
    let mut beat = heartbeat();
    loop {
        let p = tokio::select! {
            _ = app.events.closing.cancelled() => return,
            _ = out.tx.closed() => return,
            _ = beat.tick() => {
                if !alive(&app, &c) || !out.put(Item::Heartbeat).await {
                    return;
                }
                continue;
            }
            r = rx.recv() => r,
        };
        let ok = match p {
            Ok(p) if p.session == id => match &p.what {
                // A line past the next one means lines in between are only in the catalog.
                What::Log(e) if e.seq > out.last_log + 1 => out.catch_up(&app, &id).await,
                What::Log(e) if e.seq == out.last_log + 1 => out.line(e).await,
                What::Log(_) => true,
                What::Progress(v) => out.event("progress", v).await,
                What::State(v) => {
                    if !out.event("state", v).await {
                        return;
                    }
                    if is_done(v) {
                        if out.catch_up(&app, &id).await {
                            out.end(&id, v).await;
                        }
                        return;
                    }
                    true
                }
            },
            Ok(_) => true,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(session = %id, missed = n, "event stream client behind: resync");
                // From the newest event on: the snapshot replaces what was missed.
                rx = rx.resubscribe();
                let Ok(view) = app.session_json(&id) else {
                    return;
                };
                if !out.event("resync", &view).await || !out.catch_up(&app, &id).await {
                    return;
                }
                if is_done(&view) {
                    out.end(&id, &view).await;
                    return;
                }
                true
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !ok {
            return;
        }
    }
}

/// The sessions running in this process, as `GET /api/sessions/{id}` shows them.
fn running(app: &App) -> Value {
    let live: Vec<Value> = app
        .live
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|s| s.view())
        .filter(|v| !v.status.done())
        .filter_map(|v| serde_json::to_value(v).ok())
        .collect();
    json!({"running": live})
}

async fn all_events(
    State(app): St,
    StreamCaller(c): StreamCaller,
    q: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    c.require(Role::Viewer)?;
    stream_query(q)?;
    let rx = app.events.subscribe();
    let (tx, out) = mpsc::channel(QUEUE);
    tokio::spawn(follow_all(app, c, rx, tx));
    Ok(sse(out))
}

/// Every session's milestones and progress; ids are the channel's positions. It starts, and
/// starts over after falling behind, with a `resync` of the running sessions.
async fn follow_all(
    app: Arc<App>,
    c: Caller,
    mut rx: broadcast::Receiver<Arc<crate::events::Published>>,
    tx: mpsc::Sender<Item>,
) {
    let send = |name: &'static str, id: u64, data: &Value| {
        tx.send(Item::event(name, id.to_string(), data))
    };
    if tx.send(Item::Retry(Duration::from_secs(2))).await.is_err()
        || send("resync", app.events.position(), &running(&app))
            .await
            .is_err()
    {
        return;
    }
    let mut beat = heartbeat();
    loop {
        let r = tokio::select! {
            _ = app.events.closing.cancelled() => return,
            _ = tx.closed() => return,
            _ = beat.tick() => {
                if !alive(&app, &c) || tx.send(Item::Heartbeat).await.is_err() {
                    return;
                }
                continue;
            }
            r = rx.recv() => r,
        };
        let sent = match r {
            Ok(p) => match &p.what {
                What::Log(_) => Ok(()),
                What::Progress(v) => send("progress", p.seq, v).await,
                What::State(v) => send("state", p.seq, v).await,
            },
            Err(broadcast::error::RecvError::Lagged(_)) => {
                rx = rx.resubscribe();
                send("resync", app.events.position(), &running(&app)).await
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{LiveSession, SessionView, Status};
    use crate::{Backend, BackendError, DaemonConfig, VmRestore};
    use ferry_hv::{HypervisorDriver, SourceConfig, VmSummary};

    /// The streams need no hypervisor.
    struct NoHypervisor;

    #[async_trait::async_trait]
    impl Backend for NoHypervisor {
        async fn connect(
            &self,
            _: &str,
            _: &SourceConfig,
        ) -> Result<Arc<dyn HypervisorDriver>, BackendError> {
            Err(BackendError("no hypervisor here".into()))
        }
        async fn backup_vm(
            &self,
            _: &dyn HypervisorDriver,
            _: &str,
            _: &ferry_repo::Repository,
            _: &VmSummary,
            _: ferry_engine::BackupOptions,
        ) -> Result<ferry_engine::BackupReport, BackendError> {
            Err(BackendError("no hypervisor here".into()))
        }
        async fn restore_vm(
            &self,
            _: &dyn HypervisorDriver,
            _: &ferry_repo::Repository,
            _: &ferry_repo::Manifest,
            _: VmRestore,
        ) -> Result<ferry_hv::RestoredVm, BackendError> {
            Err(BackendError("no hypervisor here".into()))
        }
    }

    /// A service state (events buffer of 4), a running session `s1` in it, and a viewer's
    /// token behind a caller.
    fn lab() -> (tempfile::TempDir, Arc<App>, Arc<LiveSession>, Caller) {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("ferry.toml");
        std::fs::write(&toml, "[appliance]\nevents-buffer = 4\n").unwrap();
        let mut cfg = DaemonConfig::new(dir.path().join("state"), toml, Arc::new(NoHypervisor));
        cfg.plain_http = true;
        let (app, _) = crate::build(cfg).unwrap();
        let s = Arc::new(LiveSession {
            id: "s1".into(),
            cancel: Default::default(),
            state: std::sync::Mutex::new((
                SessionView {
                    id: "s1".into(),
                    job: "j".into(),
                    trigger: "manual".into(),
                    status: Status::Running,
                    started: 1,
                    ended: None,
                    started_by: "vic".into(),
                    vms: Vec::new(),
                    pruned: 0,
                    error: None,
                    kind: "backup",
                    restore: None,
                },
                Default::default(),
            )),
            seq: Default::default(),
        });
        app.live.lock().unwrap().insert("s1".into(), s.clone());
        let (_, t) = app
            .users
            .issue("vic", crate::auth::TokenKind::Api, "t", None)
            .unwrap();
        let c = Caller {
            user: "vic".into(),
            role: Role::Viewer,
            token_id: t.id,
        };
        (dir, app, s, c)
    }

    fn open(app: &Arc<App>, c: &Caller, after: u64, queue: usize) -> mpsc::Receiver<Item> {
        let (tx, rx) = mpsc::channel(queue);
        let sub = app.events.subscribe();
        tokio::spawn(follow_session(
            app.clone(),
            c.clone(),
            "s1".into(),
            sub,
            Out {
                tx,
                last_log: after,
                k: 0,
            },
        ));
        rx
    }

    fn name(i: &Item) -> &str {
        match i {
            Item::Event { name, .. } => name,
            Item::Retry(_) => "retry",
            Item::Heartbeat => "heartbeat",
        }
    }

    fn line_no(i: &Item) -> Option<u64> {
        match i {
            Item::Event {
                name: "log", id, ..
            } => Some(id.parse().unwrap()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_reader_that_stops_gets_a_resync_then_every_line_once() {
        let (_d, app, s, c) = lab();
        let mut rx = open(&app, &c, 0, 1);
        assert_eq!(
            rx.recv().await.unwrap(),
            Item::Retry(Duration::from_secs(2))
        );
        assert_eq!(name(&rx.recv().await.unwrap()), "state");
        // The task now waits for events; 24 lines come before it runs again, 20 more than
        // the channel's 4 (this runtime has one thread): the reader falls behind.
        for i in 1..=24 {
            app.log(&s, "info", None, format!("line {i}"));
        }
        s.update(|v, _| {
            v.status = Status::Success;
            v.ended = Some(2);
        });
        app.log(&s, "info", None, "session ended: success".into());
        app.persist(&s);
        let mut got = Vec::new();
        while let Some(i) = rx.recv().await {
            got.push(i);
        }
        let names: Vec<&str> = got.iter().map(name).collect();
        assert!(names.contains(&"resync"), "{names:?}");
        assert_eq!(names.last(), Some(&"end"), "{names:?}");
        let lines: Vec<u64> = got.iter().filter_map(line_no).collect();
        assert_eq!(lines, (1..=25).collect::<Vec<u64>>(), "{names:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_streams_get_heartbeats_until_the_token_is_revoked() {
        let (_d, app, s, c) = lab();
        app.log(&s, "info", None, "line 1".into());
        // Resumed after line 1: no line again, the state, then heartbeats every 15 s.
        let mut rx = open(&app, &c, 1, 16);
        let t0 = tokio::time::Instant::now();
        let first: Vec<Item> = vec![rx.recv().await.unwrap(), rx.recv().await.unwrap()];
        assert_eq!(name(&first[1]), "state", "{first:?}");
        assert_eq!(rx.recv().await.unwrap(), Item::Heartbeat);
        assert_eq!(t0.elapsed(), HEARTBEAT);
        assert_eq!(rx.recv().await.unwrap(), Item::Heartbeat);
        app.users.revoke(&c, &c.token_id).unwrap();
        assert_eq!(rx.recv().await, None, "the stream ends with its token");
        assert_eq!(t0.elapsed(), 3 * HEARTBEAT);
    }

    #[test]
    fn the_resume_point_is_the_last_log_line() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_point(&h, None).unwrap(), 0);
        assert_eq!(resume_point(&h, Some("12.3")).unwrap(), 12);
        h.insert("last-event-id", HeaderValue::from_static("17"));
        // The header (a browser's own reconnect) wins over the query of the first connect.
        assert_eq!(resume_point(&h, Some("12.3")).unwrap(), 17);
        h.insert("last-event-id", HeaderValue::from_static("x.1"));
        assert_eq!(resume_point(&h, None).unwrap_err().status, 400);
    }

    #[test]
    fn tickets_are_kept_hashed_and_expire() {
        let t = Tickets::default();
        let c = Caller {
            user: "vic".into(),
            role: Role::Viewer,
            token_id: "t1".into(),
        };
        let (ticket, exp) = t.issue(&c).unwrap();
        assert!(exp > crate::jobs::now());
        assert_eq!(t.check(&ticket).unwrap().user, "vic");
        assert!(t.check("fe_nope").is_none());
        let m = t.0.lock().unwrap();
        assert!(!m.contains_key(&ticket), "only the hash is kept");
        drop(m);
        t.0.lock().unwrap().values_mut().for_each(|(_, e)| *e = 0);
        assert!(t.check(&ticket).is_none());
    }
}
