//! The client and the server foundation against each other over real loopback TLS: pinning,
//! CA trust, proxies (a CONNECT proxy on hyper from the test kit), keep-alive, chunked bodies,
//! timeouts, status errors and shutdown.

use axum::Router;
use axum::body::Body;
use axum::routing::{get, put};
use ferry_http::{ClientOptions, HttpClient, HttpError, ProxySetting, Server};
use ferry_tls::{SelfSigned, Trust, parse_fingerprint};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Running {
    port: u16,
    cert: SelfSigned,
    connections: Arc<AtomicU64>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    fn pin(&self) -> Trust {
        Trust::Fingerprint(parse_fingerprint(&self.cert.fingerprint()).unwrap())
    }
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

fn app() -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/whoami",
            get(|h: http::HeaderMap| async move {
                let ua = h
                    .get(http::header::USER_AGENT)
                    .map(|v| v.to_str().unwrap().to_string());
                let cookie = h
                    .get(http::header::COOKIE)
                    .map(|v| v.to_str().unwrap().to_string());
                (
                    [(http::header::SET_COOKIE, "session=abc; Path=/")],
                    format!("{} {}", ua.unwrap_or_default(), cookie.unwrap_or_default()),
                )
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "late"
            }),
        )
        .route(
            "/fail",
            get(|| async {
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "pool busy, try later",
                )
            }),
        )
        .route(
            "/count",
            put(|headers: http::HeaderMap, body: Body| async move {
                let chunked = headers
                    .get(http::header::TRANSFER_ENCODING)
                    .is_some_and(|v| v == "chunked");
                let mut n = 0usize;
                let mut s = body.into_data_stream();
                while let Some(c) = s.next().await {
                    n += c.unwrap().len();
                }
                format!("{n} chunked={chunked}")
            }),
        )
}

async fn start(grace: Duration) -> Running {
    let cert = SelfSigned::generate(&["localhost", "127.0.0.1"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = Server::new(listener)
        .tls(cert.server_config().unwrap())
        .grace(grace);
    let connections = server.connections();
    let stop = CancellationToken::new();
    let done = tokio::spawn(server.run(app(), stop.clone()));
    Running {
        port,
        cert,
        connections,
        stop,
        done,
    }
}

fn client(trust: Trust) -> HttpClient {
    let mut o = ClientOptions::new("lab", trust);
    o.proxy = ProxySetting::Off;
    HttpClient::new(&o).unwrap()
}

async fn get_text(c: &HttpClient, url: &str) -> Result<String, HttpError> {
    let r = c.send_ok("GET", c.inner().get(url)).await?;
    Ok(String::from_utf8(c.body_limited("GET", r, 1 << 20).await?.to_vec()).unwrap())
}

#[tokio::test]
async fn a_pin_is_enforced_and_a_mismatch_names_both_fingerprints() {
    let s = start(Duration::from_secs(1)).await;
    assert_eq!(
        get_text(&client(s.pin()), &s.url("/hello")).await.unwrap(),
        "hello"
    );

    let other = SelfSigned::generate(&["localhost"]).unwrap();
    let wrong = Trust::Fingerprint(parse_fingerprint(&other.fingerprint()).unwrap());
    let e = get_text(&client(wrong), &s.url("/hello"))
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::Tls { .. }), "{e}");
    assert!(!e.is_retryable());
    let m = e.to_string();
    assert!(m.contains(&s.cert.fingerprint()), "presented: {m}");
    assert!(m.contains(&other.fingerprint()), "pinned: {m}");
    assert!(
        m.contains("source `lab`") && m.contains(&format!("127.0.0.1:{}", s.port)),
        "{m}"
    );
}

#[tokio::test]
async fn a_ca_bundle_checks_issuer_and_name() {
    let s = start(Duration::from_secs(1)).await;
    let by_ca = client(Trust::CaPem(s.cert.cert_pem.clone()));
    let url = format!("https://localhost:{}/hello", s.port);
    assert_eq!(get_text(&by_ca, &url).await.unwrap(), "hello");

    let other = SelfSigned::generate(&["localhost"]).unwrap();
    let e = get_text(&client(Trust::CaPem(other.cert_pem)), &url)
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");
}

#[tokio::test]
async fn requests_name_ferry_and_keep_session_cookies_when_asked() {
    let s = start(Duration::from_secs(1)).await;
    let mut o = ClientOptions::new("lab", s.pin());
    o.proxy = ProxySetting::Off;
    o.cookies = true;
    let with = HttpClient::new(&o).unwrap();
    let first = get_text(&with, &s.url("/whoami")).await.unwrap();
    assert_eq!(first, format!("{} ", ferry_http::USER_AGENT));
    assert!(first.starts_with("ferry/0."), "{first}");
    let second = get_text(&with, &s.url("/whoami")).await.unwrap();
    assert!(
        second.ends_with(" session=abc"),
        "the cookie came back: {second}"
    );
    let without = client(s.pin());
    get_text(&without, &s.url("/whoami")).await.unwrap();
    let again = get_text(&without, &s.url("/whoami")).await.unwrap();
    assert!(again.ends_with(' '), "no cookie store, no cookie: {again}");
}

#[tokio::test]
async fn connections_are_kept_alive() {
    let s = start(Duration::from_secs(1)).await;
    let c = client(s.pin());
    for _ in 0..20 {
        assert_eq!(get_text(&c, &s.url("/hello")).await.unwrap(), "hello");
    }
    assert_eq!(
        s.connections.load(Ordering::Relaxed),
        1,
        "20 calls, one connection"
    );
}

#[tokio::test]
async fn requests_go_through_a_configured_proxy() {
    let s = start(Duration::from_secs(1)).await;
    let proxy = ferry_testkit::ConnectProxy::start();
    let mut o = ClientOptions::new("lab", s.pin());
    o.proxy = ProxySetting::Url(proxy.url());
    let c = HttpClient::new(&o).unwrap();
    // `.invalid` never resolves: only the proxy (which maps it to loopback) can reach it.
    let url = format!("https://xen-pool.invalid:{}/hello", s.port);
    assert_eq!(get_text(&c, &url).await.unwrap(), "hello");
    assert_eq!(
        proxy.targets(),
        vec![format!("xen-pool.invalid:{}", s.port)]
    );

    // Excluded hosts go direct (and so fail to resolve, naming no proxy).
    o.no_proxy = vec!["xen-pool.invalid".into()];
    let direct = HttpClient::new(&o).unwrap();
    let e = get_text(&direct, &url).await.unwrap_err();
    assert!(matches!(e, HttpError::Connect { .. }), "{e}");
    assert_eq!(proxy.targets().len(), 1, "no second CONNECT");

    // A proxy that is down is named in the error.
    drop(proxy);
    o.no_proxy.clear();
    let fresh = HttpClient::new(&o).unwrap();
    let e = get_text(&fresh, &url).await.unwrap_err();
    assert!(
        matches!(e, HttpError::Connect { .. }) && e.to_string().contains("through proxy"),
        "{e}"
    );
    assert!(e.is_retryable());
}

#[tokio::test]
async fn bodies_stream_chunked_or_with_a_length() {
    let s = start(Duration::from_secs(1)).await;
    let c = client(s.pin());
    let pieces = futures::stream::iter(
        (0..8).map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![i as u8; 100_000]))),
    );
    let r = c
        .send_ok(
            "upload",
            c.inner()
                .put(s.url("/count"))
                .body(reqwest::Body::wrap_stream(pieces)),
        )
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "800000 chunked=true");
    let r = c
        .send_ok(
            "upload",
            c.inner().put(s.url("/count")).body(vec![1u8; 4096]),
        )
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "4096 chunked=false");
}

#[tokio::test]
async fn errors_say_what_failed() {
    let s = start(Duration::from_secs(1)).await;
    let c = client(s.pin());
    let e = get_text(&c, &s.url("/fail")).await.unwrap_err();
    assert!(matches!(e, HttpError::Status { status: 503, .. }), "{e}");
    assert!(e.to_string().contains("pool busy, try later"), "{e}");
    assert!(e.is_retryable());

    let e = get_text(&c, &s.url("/nothing-here")).await.unwrap_err();
    assert!(matches!(e, HttpError::Status { status: 404, .. }), "{e}");
    assert!(!e.is_retryable());

    let r = c
        .send_ok("GET", c.inner().get(s.url("/hello")))
        .await
        .unwrap();
    let e = c.body_limited("GET", r, 2).await.unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");

    let mut o = ClientOptions::new("lab", s.pin());
    o.proxy = ProxySetting::Off;
    o.read_timeout = Duration::from_millis(300);
    let impatient = HttpClient::new(&o).unwrap();
    let e = get_text(&impatient, &s.url("/slow")).await.unwrap_err();
    assert!(matches!(e, HttpError::Timeout { .. }), "{e}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let e = get_text(
        &c,
        &format!("https://127.0.0.1:{port}/?session_id=OpaqueRef:secret"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, HttpError::Connect { .. }), "{e}");
    assert!(!e.to_string().contains("secret"), "queries stay out: {e}");
}

#[tokio::test]
async fn shutdown_lets_a_request_finish_within_the_grace_period() {
    let s = start(Duration::from_secs(5)).await;
    let c = client(s.pin());
    let url = s.url("/slow");
    let pending = tokio::spawn(async move { get_text(&c, &url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.stop.cancel();
    assert_eq!(pending.await.unwrap().unwrap(), "late");
    let (trust, hello) = (s.pin(), s.url("/hello"));
    s.done.await.unwrap();
    let e = get_text(&client(trust), &hello).await.unwrap_err();
    assert!(matches!(e, HttpError::Connect { .. }), "stopped: {e}");
}

#[tokio::test]
async fn without_grace_open_requests_are_dropped() {
    let s = start(Duration::ZERO).await;
    let c = client(s.pin());
    let url = s.url("/slow");
    let pending = tokio::spawn(async move { get_text(&c, &url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.stop.cancel();
    let e = pending.await.unwrap().unwrap_err();
    assert!(e.is_retryable(), "a dropped connection may be retried: {e}");
}
