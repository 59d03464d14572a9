//! The simulator's NBD server, standing in for xapi-nbd: one export per (VDI with data, live
//! session), named `/<vdi-uuid>?session_id=<session-ref>`, read-only, over TLS (`STARTTLS`,
//! required) when a network has purpose `nbd`. Export names are computed per connection, so a
//! session that logged out cannot open anything. Fault injection: drop a connection after a
//! number of bytes sent.
//!
//! Limitation: Ferry's NBD server answers `NBD_OPT_LIST` (xapi-nbd does not), which would list
//! session ids to any client that completed TLS; acceptable in a simulator.

use super::Shared;
use super::storage;
use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource, ExtentMap};
use ferry_nbd::{NbdExport, NbdListener, NbdServer, NbdStream, ServerTls};
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// A VDI opened on first read (most exports of a connection are never used).
#[derive(Debug)]
struct LazyVdi {
    name: String,
    file: PathBuf,
    live: bool,
    size: u64,
    inner: OnceCell<Arc<dyn BlockSource>>,
}

impl LazyVdi {
    async fn get(&self) -> Result<&Arc<dyn BlockSource>, BlockError> {
        self.inner
            .get_or_try_init(|| async {
                storage::open(&self.file, self.live)
                    .await
                    .map_err(|m| BlockError::Other {
                        disk: self.name.clone(),
                        message: format!("cannot open VDI data: {m}"),
                        retryable: false,
                        source: None,
                    })
            })
            .await
    }
}

#[async_trait]
impl BlockSource for LazyVdi {
    fn size(&self) -> u64 {
        self.size
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.get().await?.read_at(offset, buf).await
    }
    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        self.get().await?.allocated(range).await
    }
}

/// A stream that fails after `limit` bytes written and cancels `done` when dropped.
struct ConnStream {
    inner: Box<dyn NbdStream>,
    limit: Option<u64>,
    done: CancellationToken,
}

impl Drop for ConnStream {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

impl AsyncRead for ConnStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = match self.limit {
            Some(0) => {
                tracing::info!("simulated NBD connection drop");
                return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
            }
            Some(l) => buf.len().min(l as usize),
            None => buf.len(),
        };
        let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let (Poll::Ready(Ok(w)), Some(l)) = (&r, self.limit) {
            self.limit = Some(l - *w as u64);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Hands one already-accepted connection to an [`NbdServer`], then waits forever.
struct OneShot(Option<(Box<dyn NbdStream>, String)>);

impl NbdListener for OneShot {
    async fn accept_stream(&mut self) -> std::io::Result<(Box<dyn NbdStream>, String)> {
        match self.0.take() {
            Some(s) => Ok(s),
            None => std::future::pending().await,
        }
    }
}

/// Accepts NBD clients until `shutdown`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let (exports, tls_on, limit) = {
            let st = shared.state.lock().await;
            let mut exports = Vec::new();
            for (vdi, d) in st.disks.iter() {
                let (Some(file), Ok(uuid)) = (d.file.clone(), st.fstr("VDI", vdi, "uuid")) else {
                    continue;
                };
                let src: Arc<dyn BlockSource> = Arc::new(LazyVdi {
                    name: format!("VDI {uuid}"),
                    file,
                    live: d.live,
                    size: d.size,
                    inner: OnceCell::new(),
                });
                for sref in st.sessions.keys() {
                    exports.push(NbdExport::read_only(
                        format!("/{uuid}?session_id={sref}"),
                        src.clone(),
                    ));
                }
            }
            let tls_on = st.all_of("network").iter().any(|n| {
                st.frefs("network", n, "purpose")
                    .unwrap_or_default()
                    .iter()
                    .any(|p| p == "nbd")
            });
            (exports, tls_on, st.faults.nbd_drop_after)
        };
        let conn = shutdown.child_token();
        let stream = ConnStream {
            inner: Box::new(sock),
            limit,
            done: conn.clone(),
        };
        let mut server = NbdServer::new(exports);
        if tls_on {
            server = server.with_tls(ServerTls {
                config: tls.clone(),
                required: true,
            });
        }
        tokio::spawn(async move {
            let _ = server
                .serve(OneShot(Some((Box::new(stream), peer.to_string()))), conn)
                .await;
        });
    }
}
