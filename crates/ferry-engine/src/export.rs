//! Export: a restore point's disk served over NBD for instant recovery and file-level restore,
//! read-only or writable through a copy-on-write overlay (writes never reach the repository).

use crate::error::{EngineError, Result};
use ferry_nbd::{NbdExport, NbdServer};
use ferry_repo::Repository;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// Unix domain socket (removed again when the export stops).
    Unix(tokio::net::UnixListener, PathBuf),
}

/// Binds `listen`: `HOST:PORT` (port 0 picks a free one) or `unix:PATH`.
pub async fn bind(listen: &str) -> Result<Listener> {
    if let Some(path) = listen.strip_prefix("unix:") {
        let l = tokio::net::UnixListener::bind(path)
            .map_err(|e| EngineError::Usage(format!("cannot listen on unix socket {path}: {e}")))?;
        return Ok(Listener::Unix(l, PathBuf::from(path)));
    }
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| EngineError::Usage(format!("cannot listen on {listen}: {e}")))?;
    Ok(Listener::Tcp(l))
}

impl Listener {
    /// The NBD URI a client uses to reach `export` here.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Self::Tcp(l) => match l.local_addr() {
                Ok(a) if a.is_ipv6() => format!("nbd://[{}]:{}/{export}", a.ip(), a.port()),
                Ok(a) => format!("nbd://{}:{}/{export}", a.ip(), a.port()),
                Err(_) => format!("nbd://?/{export}"),
            },
            Self::Unix(_, p) => format!("nbd+unix:///{export}?socket={}", p.display()),
        }
    }
}

/// Serves `disk` of restore point `snapshot` as export `disk` on `listener` until `shutdown`.
pub async fn serve(
    repo: &Repository,
    snapshot: &str,
    disk: &str,
    writable: bool,
    listener: Listener,
    shutdown: CancellationToken,
) -> Result<()> {
    let export = if writable {
        writable_export(repo, snapshot, disk).await?
    } else {
        let source = repo
            .open_disk(snapshot, disk)
            .await
            .map_err(|e| EngineError::repo(disk, e))?;
        NbdExport::read_only(disk, source)
            .with_description(format!("ferry restore point {snapshot}, disk {disk}"))
    };
    tracing::info!(%snapshot, %disk, writable, "exporting over NBD");
    serve_exports(vec![export], listener, shutdown)
        .await
        .map_err(|e| EngineError::Usage(format!("NBD export of {snapshot}/{disk} failed: {e}")))
}

/// Export `disk` of restore point `snapshot`, writable through a copy-on-write overlay
/// ([`NbdExport::overlay`] gives what was written); the repository is never written.
pub async fn writable_export(repo: &Repository, snapshot: &str, disk: &str) -> Result<NbdExport> {
    let source = repo
        .open_disk(snapshot, disk)
        .await
        .map_err(|e| EngineError::repo(disk, e))?;
    Ok(NbdExport::copy_on_write(disk, source)
        .map_err(|e| EngineError::Usage(format!("cannot create the write overlay: {e}")))?
        .with_description(format!("ferry restore point {snapshot}, disk {disk}")))
}

/// Serves `exports` on `listener` until `shutdown` (a Unix socket is removed afterwards).
pub async fn serve_exports(
    exports: Vec<NbdExport>,
    listener: Listener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let server = NbdServer::new(exports);
    match listener {
        Listener::Tcp(l) => server.serve(l, shutdown).await,
        Listener::Unix(l, path) => {
            let r = server.serve(l, shutdown).await;
            let _ = std::fs::remove_file(path);
            r
        }
    }
}
