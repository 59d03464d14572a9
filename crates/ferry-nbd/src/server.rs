//! The NBD server: exports any [`BlockSource`] read-only, or read-write through a
//! [`CowOverlay`], over TCP or Unix sockets, optionally with TLS.
//!
//! Negotiation supports `EXPORT_NAME`, `LIST`, `STARTTLS`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`). In transmission, requests are
//! served concurrently (up to [`MAX_IN_FLIGHT`] per connection) and replies are written whole
//! under one lock, so they never interleave. A client that breaks the protocol loses its
//! connection; a bad request inside the rules gets an error reply.

use crate::codec::{self, Request, RequestCheck};
use crate::overlay::CowOverlay;
use crate::proto::{self, chunk, cmd, errno, opt, rep, tflag};
use ferry_core::{BlockError, BlockSource, ExtentMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, WriteHalf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest payload the server accepts or sends (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests served at once per connection.
pub const MAX_IN_FLIGHT: usize = 16;
/// How long a client may take for each negotiation step.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Context id of `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;

/// A byte stream the server can speak NBD over.
pub trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> NbdStream for T {}

/// Something that accepts connections: implemented for TCP and Unix listeners.
pub trait NbdListener: Send {
    /// Waits for the next client; returns its stream and a name for logs.
    fn accept_stream(
        &mut self,
    ) -> impl Future<Output = std::io::Result<(Box<dyn NbdStream>, String)>> + Send;
}

impl NbdListener for tokio::net::TcpListener {
    async fn accept_stream(&mut self) -> std::io::Result<(Box<dyn NbdStream>, String)> {
        let (s, peer) = self.accept().await?;
        s.set_nodelay(true)?;
        Ok((Box::new(s), peer.to_string()))
    }
}

impl NbdListener for tokio::net::UnixListener {
    async fn accept_stream(&mut self) -> std::io::Result<(Box<dyn NbdStream>, String)> {
        let (s, _) = self.accept().await?;
        Ok((Box::new(s), "unix client".into()))
    }
}

/// One export.
#[derive(Clone)]
pub struct NbdExport {
    name: String,
    description: String,
    source: Arc<dyn BlockSource>,
    overlay: Option<Arc<CowOverlay>>,
}

impl std::fmt::Debug for NbdExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdExport")
            .field("name", &self.name)
            .field("source", &self.source.name())
            .field("writable", &self.overlay.is_some())
            .finish()
    }
}

impl NbdExport {
    /// Serves `source` read-only under `name`.
    pub fn read_only(name: impl Into<String>, source: Arc<dyn BlockSource>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            source,
            overlay: None,
        }
    }

    /// Serves `source` read-write; writes go to a copy-on-write overlay shared by every
    /// connection to this export, never to the source.
    pub fn copy_on_write(
        name: impl Into<String>,
        source: Arc<dyn BlockSource>,
    ) -> std::io::Result<Self> {
        let overlay = Arc::new(CowOverlay::new(source)?);
        Ok(Self {
            name: name.into(),
            description: String::new(),
            source: overlay.clone(),
            overlay: Some(overlay),
        })
    }

    /// Serves `overlay` read-write under `name`; exports made from one overlay share it (each
    /// connection of a multi-connection client gets its own export, the same bytes).
    pub fn writable(name: impl Into<String>, overlay: Arc<CowOverlay>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            source: overlay.clone(),
            overlay: Some(overlay),
        }
    }

    /// Sets the description shown by `NBD_OPT_LIST`.
    pub fn with_description(mut self, d: impl Into<String>) -> Self {
        self.description = d.into();
        self
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The overlay of a writable export.
    pub fn overlay(&self) -> Option<&Arc<CowOverlay>> {
        self.overlay.as_ref()
    }

    fn flags(&self) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_DF | tflag::CAN_MULTI_CONN;
        if self.overlay.is_some() {
            f |= tflag::SEND_FUA | tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES;
        } else {
            f |= tflag::READ_ONLY;
        }
        f
    }
}

/// TLS settings of the server.
#[derive(Clone)]
pub struct ServerTls {
    /// rustls configuration (see [`crate::tls::server_config`]).
    pub config: Arc<rustls::ServerConfig>,
    /// Refuse everything but STARTTLS until TLS is up.
    pub required: bool,
}

/// Why an export asked for by name is not served; the text goes to the client in the
/// option's error reply, so it must name the cause without secrets.
#[derive(Debug, Clone)]
pub struct ExportRefused {
    /// `true`: refused by policy (`NBD_REP_ERR_POLICY`); `false`: does not exist or cannot be
    /// opened (`NBD_REP_ERR_UNKNOWN`).
    pub policy: bool,
    /// What the client is told.
    pub message: String,
}

/// Opens exports by name when a client asks for them (a host agent exporting image files by
/// their path), instead of a fixed list.
#[async_trait::async_trait]
pub trait ExportProvider: Send + Sync {
    /// The export called `name`.
    async fn open(&self, name: &str) -> Result<NbdExport, ExportRefused>;
}

/// An NBD server for a fixed set of exports, or for exports opened by name.
#[derive(Clone)]
pub struct NbdServer {
    exports: Arc<Vec<NbdExport>>,
    provider: Option<Arc<dyn ExportProvider>>,
    tls: Option<ServerTls>,
}

impl NbdServer {
    /// A server for `exports` (the first is the default export, named by an empty name).
    pub fn new(exports: Vec<NbdExport>) -> Self {
        Self {
            exports: Arc::new(exports),
            provider: None,
            tls: None,
        }
    }

    /// A server whose exports `provider` opens by name at `NBD_OPT_GO`/`EXPORT_NAME` (no
    /// default export; `NBD_OPT_LIST` lists nothing).
    pub fn with_provider(provider: Arc<dyn ExportProvider>) -> Self {
        Self {
            exports: Arc::new(Vec::new()),
            provider: Some(provider),
            tls: None,
        }
    }

    /// Offers TLS (required or optional).
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Accepts clients until `shutdown` is cancelled, then closes every connection and returns
    /// once their tasks have finished.
    pub async fn serve<L: NbdListener>(
        self,
        mut listener: L,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept_stream() => match r {
                    Ok((stream, peer)) => {
                        let this = self.clone();
                        let token = shutdown.clone();
                        tracker.spawn(async move {
                            tokio::select! {
                                _ = token.cancelled() => {}
                                r = this.handle(stream, &peer) => {
                                    if let Err(e) = r {
                                        tracing::info!(peer = %peer, error = %e, "NBD client dropped");
                                    }
                                }
                            }
                        });
                    }
                    Err(e) => {
                        // Out of descriptors and similar: back off instead of spinning.
                        tracing::warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    fn find(&self, name: &str) -> Option<&NbdExport> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// The export `name`, from the fixed list or the provider.
    async fn lookup(&self, name: &str) -> Result<NbdExport, ExportRefused> {
        if let Some(p) = &self.provider {
            return p.open(name).await;
        }
        self.find(name).cloned().ok_or_else(|| ExportRefused {
            policy: false,
            message: format!("no export named {name:?}"),
        })
    }

    /// Whether a meta context set for `meta_name` applies to `export`.
    fn same_export(&self, meta_name: &str, export: &NbdExport) -> bool {
        if self.provider.is_some() {
            return meta_name == export.name;
        }
        self.find(meta_name).is_some_and(|x| x.name == export.name)
    }

    async fn handle(&self, stream: Box<dyn NbdStream>, peer: &str) -> std::io::Result<()> {
        let Some((stream, session)) = self.negotiate(stream, peer).await? else {
            return Ok(());
        };
        tracing::debug!(peer, export = %session.export.name, structured = session.structured,
            "NBD client entered transmission");
        transmission(stream, session).await
    }

    async fn negotiate(
        &self,
        mut s: Box<dyn NbdStream>,
        peer: &str,
    ) -> std::io::Result<Option<(Box<dyn NbdStream>, Session)>> {
        let timed =
            |what: &'static str| move |_| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
        s.write_all(&codec::encode_greeting(
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        ))
        .await?;
        s.flush().await?;
        let mut f = [0u8; 4];
        tokio::time::timeout(NEGOTIATION_TIMEOUT, s.read_exact(&mut f))
            .await
            .map_err(timed("client flags"))??;
        let cflags = u32::from_be_bytes(f);
        if cflags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
            return Err(bad_data(format!("unknown client flags {cflags:#x}")));
        }
        let no_zeroes = cflags & proto::CLIENT_NO_ZEROES != 0;
        let mut tls_up = false;
        let mut structured = false;
        // (export name, base:allocation selected) from the last SET_META_CONTEXT.
        let mut meta: Option<(String, bool)> = None;
        loop {
            let mut h = [0u8; 16];
            tokio::time::timeout(NEGOTIATION_TIMEOUT, s.read_exact(&mut h))
                .await
                .map_err(timed("option header"))??;
            let magic = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
            if magic != proto::IHAVEOPT {
                return Err(bad_data(format!("bad option magic {magic:#x}")));
            }
            let option = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
            if len > codec::MAX_OPTION_LEN {
                return Err(bad_data(format!("option {option} of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            tokio::time::timeout(NEGOTIATION_TIMEOUT, s.read_exact(&mut data))
                .await
                .map_err(timed("option data"))??;
            let mut out = Vec::new();
            let tls_blocked = self.tls.as_ref().is_some_and(|t| t.required) && !tls_up;
            if tls_blocked && option != opt::STARTTLS && option != opt::ABORT {
                if option == opt::EXPORT_NAME {
                    return Ok(None);
                }
                codec::encode_option_reply(&mut out, option, rep::ERR_TLS_REQD, b"TLS is required");
                s.write_all(&out).await?;
                s.flush().await?;
                continue;
            }
            match option {
                opt::EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let export = match self.lookup(&name).await {
                        Ok(e) => e,
                        Err(r) => {
                            tracing::info!(%peer, export = %name, reason = %r.message, "NBD export refused");
                            return Ok(None);
                        }
                    };
                    out.extend_from_slice(&export.source.size().to_be_bytes());
                    out.extend_from_slice(&export.flags().to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&out).await?;
                    s.flush().await?;
                    let base_allocation = structured
                        && meta
                            .as_ref()
                            .is_some_and(|(e, sel)| *sel && self.same_export(e, &export));
                    return Ok(Some((s, Session::new(export, structured, base_allocation))));
                }
                opt::ABORT => {
                    codec::encode_option_reply(&mut out, option, rep::ACK, &[]);
                    let _ = s.write_all(&out).await;
                    let _ = s.shutdown().await;
                    return Ok(None);
                }
                opt::LIST => {
                    if !data.is_empty() {
                        codec::encode_option_reply(
                            &mut out,
                            option,
                            rep::ERR_INVALID,
                            b"LIST takes no data",
                        );
                    } else {
                        for e in self.exports.iter() {
                            let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                            d.extend_from_slice(e.name.as_bytes());
                            d.extend_from_slice(e.description.as_bytes());
                            codec::encode_option_reply(&mut out, option, rep::SERVER, &d);
                        }
                        codec::encode_option_reply(&mut out, option, rep::ACK, &[]);
                    }
                }
                opt::STARTTLS => match &self.tls {
                    None => codec::encode_option_reply(
                        &mut out,
                        option,
                        rep::ERR_UNSUP,
                        b"TLS is not configured",
                    ),
                    Some(_) if tls_up || !data.is_empty() => {
                        codec::encode_option_reply(
                            &mut out,
                            option,
                            rep::ERR_INVALID,
                            b"TLS is already active",
                        );
                    }
                    Some(t) => {
                        codec::encode_option_reply(&mut out, option, rep::ACK, &[]);
                        s.write_all(&out).await?;
                        s.flush().await?;
                        let acceptor = tokio_rustls::TlsAcceptor::from(t.config.clone());
                        let tls = tokio::time::timeout(NEGOTIATION_TIMEOUT, acceptor.accept(s))
                            .await
                            .map_err(timed("TLS handshake"))??;
                        s = Box::new(tls);
                        tls_up = true;
                        // proto.md: STARTTLS discards everything negotiated before it.
                        structured = false;
                        meta = None;
                        continue;
                    }
                },
                opt::STRUCTURED_REPLY => {
                    if data.is_empty() {
                        structured = true;
                        codec::encode_option_reply(&mut out, option, rep::ACK, &[]);
                    } else {
                        codec::encode_option_reply(
                            &mut out,
                            option,
                            rep::ERR_INVALID,
                            b"no data expected",
                        );
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    match codec::decode_meta_context_data(&data) {
                        Err(e) => codec::encode_option_reply(
                            &mut out,
                            option,
                            rep::ERR_INVALID,
                            e.0.as_bytes(),
                        ),
                        Ok(_) if option == opt::SET_META_CONTEXT && !structured => {
                            codec::encode_option_reply(
                                &mut out,
                                option,
                                rep::ERR_INVALID,
                                b"structured replies first",
                            );
                        }
                        Ok((export, _))
                            if self.provider.is_none() && self.find(&export).is_none() =>
                        {
                            codec::encode_option_reply(
                                &mut out,
                                option,
                                rep::ERR_UNKNOWN,
                                b"unknown export",
                            );
                        }
                        Ok((export, queries)) => {
                            let listing = option == opt::LIST_META_CONTEXT;
                            let hit = queries
                                .iter()
                                .any(|q| q == crate::BASE_ALLOCATION || (listing && q == "base:"))
                                || (listing && queries.is_empty());
                            if hit {
                                let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                                d.extend_from_slice(crate::BASE_ALLOCATION.as_bytes());
                                codec::encode_option_reply(&mut out, option, rep::META_CONTEXT, &d);
                            }
                            codec::encode_option_reply(&mut out, option, rep::ACK, &[]);
                            if !listing {
                                meta = Some((export, hit));
                            }
                        }
                    }
                }
                opt::INFO | opt::GO => match codec::decode_go_data(&data) {
                    Err(e) => codec::encode_option_reply(
                        &mut out,
                        option,
                        rep::ERR_INVALID,
                        e.0.as_bytes(),
                    ),
                    Ok(go) => match self.lookup(&go.export).await {
                        Err(r) => {
                            tracing::info!(%peer, export = %go.export, reason = %r.message, "NBD export refused");
                            let code = if r.policy {
                                rep::ERR_POLICY
                            } else {
                                rep::ERR_UNKNOWN
                            };
                            let msg = &r.message.as_bytes()[..r.message.len().min(4096)];
                            codec::encode_option_reply(&mut out, option, code, msg);
                        }
                        Ok(export) => {
                            let mut d = proto::info::EXPORT.to_be_bytes().to_vec();
                            d.extend_from_slice(&export.source.size().to_be_bytes());
                            d.extend_from_slice(&export.flags().to_be_bytes());
                            codec::encode_option_reply(&mut out, option, rep::INFO, &d);
                            let mut d = proto::info::BLOCK_SIZE.to_be_bytes().to_vec();
                            for v in [1u32, 4096, MAX_PAYLOAD] {
                                d.extend_from_slice(&v.to_be_bytes());
                            }
                            codec::encode_option_reply(&mut out, option, rep::INFO, &d);
                            for i in &go.infos {
                                let text = match *i {
                                    proto::info::NAME => &export.name,
                                    proto::info::DESCRIPTION => &export.description,
                                    _ => continue,
                                };
                                let mut d = i.to_be_bytes().to_vec();
                                d.extend_from_slice(text.as_bytes());
                                codec::encode_option_reply(&mut out, option, rep::INFO, &d);
                            }
                            codec::encode_option_reply(&mut out, option, rep::ACK, &[]);
                            if option == opt::GO {
                                s.write_all(&out).await?;
                                s.flush().await?;
                                let base_allocation = structured
                                    && meta.as_ref().is_some_and(|(e, sel)| {
                                        *sel && self.same_export(e, &export)
                                    });
                                return Ok(Some((
                                    s,
                                    Session::new(export, structured, base_allocation),
                                )));
                            }
                        }
                    },
                },
                _ => {
                    codec::encode_option_reply(
                        &mut out,
                        option,
                        rep::ERR_UNSUP,
                        b"option not supported",
                    );
                }
            }
            s.write_all(&out).await?;
            s.flush().await?;
        }
    }
}

fn bad_data(m: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m)
}

/// State of one connection in transmission.
struct Session {
    export: NbdExport,
    structured: bool,
    base_allocation: bool,
}

impl Session {
    fn new(export: NbdExport, structured: bool, base_allocation: bool) -> Self {
        Self {
            export,
            structured,
            base_allocation,
        }
    }
}

type Writer = Arc<tokio::sync::Mutex<WriteHalf<Box<dyn NbdStream>>>>;

async fn transmission(stream: Box<dyn NbdStream>, session: Session) -> std::io::Result<()> {
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let writer: Writer = Arc::new(tokio::sync::Mutex::new(wr));
    let session = Arc::new(session);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let tasks = TaskTracker::new();
    let size = session.export.source.size();
    let read_only = session.export.overlay.is_none();
    // Cancelled when a reply cannot be sent: the stream may hold half a reply, so nothing
    // after it can be framed; closing lets the client see the loss and reconnect instead of
    // waiting for a reply that never comes.
    let broken = CancellationToken::new();
    let result = loop {
        let mut h = [0u8; codec::REQUEST_LEN];
        let r = tokio::select! {
            r = rd.read_exact(&mut h) => r,
            _ = broken.cancelled() => break Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "a reply could not be sent; closing the connection",
            )),
        };
        match r {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let req = match Request::decode(&h) {
            Ok(Some(r)) => r,
            Ok(None) => unreachable!("a whole header was read"),
            Err(e) => break Err(bad_data(e.0)),
        };
        let (payload_len, check) = match codec::check_request(&req, size, MAX_PAYLOAD, read_only) {
            Ok(x) => x,
            Err(e) => break Err(bad_data(e.0)),
        };
        let mut payload = vec![0u8; payload_len];
        if let Err(e) = rd.read_exact(&mut payload).await {
            break Err(e);
        }
        if req.cmd == cmd::DISC {
            break Ok(());
        }
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break Ok(());
        };
        let (w, sess, broken) = (writer.clone(), session.clone(), broken.clone());
        tasks.spawn(async move {
            let reply = match check {
                RequestCheck::Reject(e) => error_reply(&sess, &req, e, "invalid request"),
                RequestCheck::Ok => serve_request(&sess, &req, payload).await,
            };
            let mut w = w.lock().await;
            if let Err(e) = async {
                w.write_all(&reply).await?;
                w.flush().await
            }
            .await
            {
                tracing::debug!(error = %e, "NBD reply could not be sent");
                broken.cancel();
            }
            drop(permit);
        });
    };
    tasks.close();
    tasks.wait().await;
    let _ = writer.lock().await.shutdown().await;
    result
}

fn error_reply(s: &Session, r: &Request, e: u32, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if s.structured {
        let msg = &message.as_bytes()[..message.len().min(4096)];
        codec::encode_chunk_header(
            &mut out,
            r.cookie,
            chunk::FLAG_DONE,
            chunk::ERROR,
            6 + msg.len() as u32,
        );
        out.extend_from_slice(&e.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
    } else {
        codec::encode_simple_reply(&mut out, r.cookie, e);
    }
    out
}

fn block_errno(e: &BlockError) -> u32 {
    match e {
        BlockError::OutOfRange { .. } => errno::EINVAL,
        BlockError::Unsupported { .. } => errno::ENOTSUP,
        _ => errno::EIO,
    }
}

async fn serve_request(s: &Session, r: &Request, payload: Vec<u8>) -> Vec<u8> {
    let export = &s.export;
    let result: Result<Vec<u8>, BlockError> = async {
        let ok = || {
            let mut out = Vec::new();
            codec::encode_simple_reply(&mut out, r.cookie, 0);
            out
        };
        match r.cmd {
            cmd::READ => read_reply(s, r).await,
            cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM => {
                let ov = export.overlay.as_ref().expect("checked writable");
                match r.cmd {
                    cmd::WRITE => ov.write(r.offset, &payload).await?,
                    cmd::WRITE_ZEROES => ov.write_zeroes(r.offset, u64::from(r.length)).await?,
                    // Trimmed bytes may read back as anything; keeping them is simplest.
                    _ => {}
                }
                Ok(ok())
            }
            cmd::FLUSH | cmd::CACHE => Ok(ok()),
            cmd::BLOCK_STATUS => block_status_reply(s, r).await,
            _ => Ok(error_reply(s, r, errno::EINVAL, "unsupported command")),
        }
    }
    .await;
    result.unwrap_or_else(|e| {
        tracing::warn!(export = %export.name, error = %e, cmd = proto::cmd_name(r.cmd), "NBD request failed");
        error_reply(s, r, block_errno(&e), &e.to_string())
    })
}

async fn read_reply(s: &Session, r: &Request) -> Result<Vec<u8>, BlockError> {
    let src = &s.export.source;
    let len = r.length as usize;
    let range = r.offset..r.offset + u64::from(r.length);
    let mut out = Vec::with_capacity(len + 64);
    if !s.structured || r.flags & proto::cflag::DF != 0 {
        if s.structured {
            codec::encode_chunk_header(
                &mut out,
                r.cookie,
                chunk::FLAG_DONE,
                chunk::OFFSET_DATA,
                8 + r.length,
            );
            out.extend_from_slice(&r.offset.to_be_bytes());
        } else {
            codec::encode_simple_reply(&mut out, r.cookie, 0);
        }
        let at = out.len();
        out.resize(at + len, 0);
        src.read_at(r.offset, &mut out[at..]).await?;
        return Ok(out);
    }
    let alloc = src.allocated(range.clone()).await?;
    // Alternate data and hole pieces; the last piece carries DONE.
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = range.start;
    for e in alloc.iter() {
        if e.offset > pos {
            pieces.push((pos, e.offset - pos, false));
        }
        pieces.push((e.offset, e.length, true));
        pos = e.end();
    }
    if pos < range.end {
        pieces.push((pos, range.end - pos, false));
    }
    let n = pieces.len();
    for (i, (off, l, data)) in pieces.into_iter().enumerate() {
        let flags = if i + 1 == n { chunk::FLAG_DONE } else { 0 };
        if data {
            codec::encode_chunk_header(&mut out, r.cookie, flags, chunk::OFFSET_DATA, 8 + l as u32);
            out.extend_from_slice(&off.to_be_bytes());
            let at = out.len();
            out.resize(at + l as usize, 0);
            src.read_at(off, &mut out[at..]).await?;
        } else {
            codec::encode_chunk_header(&mut out, r.cookie, flags, chunk::OFFSET_HOLE, 12);
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&(l as u32).to_be_bytes());
        }
    }
    Ok(out)
}

async fn block_status_reply(s: &Session, r: &Request) -> Result<Vec<u8>, BlockError> {
    if !s.base_allocation {
        return Ok(error_reply(s, r, errno::EINVAL, "no meta context selected"));
    }
    let range = r.offset..r.offset + u64::from(r.length);
    let alloc: ExtentMap = s.export.source.allocated(range.clone()).await?;
    let mut desc: Vec<(u32, u32)> = Vec::new();
    let mut pos = range.start;
    let hole = proto::state::HOLE | proto::state::ZERO;
    for e in alloc.iter() {
        if e.offset > pos {
            desc.push(((e.offset - pos) as u32, hole));
        }
        desc.push((e.length as u32, 0));
        pos = e.end();
    }
    if pos < range.end {
        desc.push(((range.end - pos) as u32, hole));
    }
    let keep = if r.flags & proto::cflag::REQ_ONE != 0 {
        1
    } else {
        1 << 20
    };
    desc.truncate(keep);
    let mut out = Vec::with_capacity(24 + 8 * desc.len());
    codec::encode_chunk_header(
        &mut out,
        r.cookie,
        chunk::FLAG_DONE,
        chunk::BLOCK_STATUS,
        4 + 8 * desc.len() as u32,
    );
    out.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (l, f) in desc {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    Ok(out)
}
