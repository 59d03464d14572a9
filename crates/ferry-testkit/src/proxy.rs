//! A forward HTTP proxy for tests: answers `CONNECT host:port` (and nothing else) by tunnelling
//! to that address, on hyper. Names under `.invalid` (RFC 6761: never resolvable) are sent to
//! 127.0.0.1, so a test can prove a client went through the proxy: without it the name would
//! not resolve.

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};

/// A running CONNECT proxy on a loopback port; stops when dropped.
#[derive(Debug)]
pub struct ConnectProxy {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnectProxy {
    /// Starts the proxy on a free loopback port.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the test proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local address").port();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let log = seen.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let sock = tokio::select! {
                        _ = &mut stopped => return,
                        r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                    };
                    let log = log.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let log = log.clone();
                            async move { Ok::<_, hyper::Error>(connect(req, log).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(sock), svc)
                            .with_upgrades()
                            .await;
                    });
                }
            });
        });
        Self {
            port,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every `CONNECT` target asked for so far, in order (`host:port`).
    pub fn targets(&self) -> Vec<String> {
        self.seen.lock().expect("proxy log").clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn connect(
    req: Request<hyper::body::Incoming>,
    log: Arc<Mutex<Vec<String>>>,
) -> Response<Empty<Bytes>> {
    let reply = |status| {
        let mut r = Response::new(Empty::new());
        *r.status_mut() = status;
        r
    };
    let Some(target) = req.uri().authority().map(|a| a.to_string()) else {
        return reply(StatusCode::BAD_REQUEST);
    };
    if req.method() != Method::CONNECT {
        return reply(StatusCode::METHOD_NOT_ALLOWED);
    }
    log.lock().expect("proxy log").push(target.clone());
    let (host, port) = target.rsplit_once(':').unwrap_or((&target, "443"));
    let dial = if host.ends_with(".invalid") {
        format!("127.0.0.1:{port}")
    } else {
        target.clone()
    };
    let Ok(mut upstream) = tokio::net::TcpStream::connect(&dial).await else {
        return reply(StatusCode::BAD_GATEWAY);
    };
    tokio::spawn(async move {
        if let Ok(up) = hyper::upgrade::on(req).await {
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(up), &mut upstream).await;
        }
    });
    reply(StatusCode::OK)
}
