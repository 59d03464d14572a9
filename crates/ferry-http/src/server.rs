//! The server foundation: an `axum::Router` served by hyper over plain TCP or rustls.
//!
//! One task per connection; hyper handles keep-alive, pipelining, chunked and
//! `Content-Length` bodies and HTTP/2 (prior knowledge or ALPN `h2`). Shutdown stops accepting,
//! asks open connections to finish their current request, waits up to the grace period and then
//! drops whatever is still open (a simulator wants 0: its clients must see a dying peer).

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The TCP connection a request arrived on, in every request's extensions
/// (`axum::Extension<Connection>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection {
    /// Unique per server, counting from 0.
    pub id: u64,
    /// The client's address.
    pub peer: std::net::SocketAddr,
}

/// An HTTP(S) server on a bound listener.
pub struct Server {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    grace: Duration,
    accepted: Arc<AtomicU64>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Plain HTTP on `listener`, a 10 s grace period at shutdown.
    pub fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            tls: None,
            grace: Duration::from_secs(10),
            accepted: Arc::default(),
        }
    }

    /// Serves HTTPS with this rustls configuration.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    /// How long open requests may run on after shutdown is asked for.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// A counter of accepted TCP connections (keep-alive shows as few connections for many
    /// requests).
    pub fn connections(&self) -> Arc<AtomicU64> {
        self.accepted.clone()
    }

    /// Serves `app` until `shutdown` is cancelled, then winds down as described above.
    pub async fn run(self, app: Router, shutdown: CancellationToken) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let kill = CancellationToken::new();
        loop {
            let (sock, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let id = self.accepted.fetch_add(1, Ordering::Relaxed);
            // Handlers that keep per-connection state (NTLM's connection-bound sessions) see
            // which connection a request came on.
            let app = app.clone().layer(axum::Extension(Connection { id, peer }));
            let _ = sock.set_nodelay(true);
            let (tls, kill) = (self.tls.clone(), kill.clone());
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let served = async {
                    match tls {
                        Some(acc) => match acc.accept(sock).await {
                            Ok(s) => serve_io(s, app, watcher).await,
                            Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        },
                        None => serve_io(sock, app, watcher).await,
                    }
                };
                tokio::select! {
                    _ = kill.cancelled() => {}
                    _ = served => {}
                }
            });
        }
        drop(self.listener);
        if tokio::time::timeout(self.grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("grace period over; dropping open connections");
        }
        kill.cancel();
    }
}

async fn serve_io<I>(io: I, app: Router, watcher: hyper_util::server::graceful::Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = TowerToHyperService::new(app);
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}
