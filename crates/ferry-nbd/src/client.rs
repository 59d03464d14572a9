//! The NBD client: negotiation (fixed newstyle, STARTTLS, structured replies, meta contexts,
//! GO with fallback to EXPORT_NAME), one pipelined [`Connection`] per socket with a reader task
//! that matches replies to requests by cookie, and [`NbdClient`], a pool of connections (several
//! when the server advertises multi-conn) that reconnects and retries idempotent requests.

use crate::codec::{
    self, Decoded, Outcome, Pending, ProtocolError, ReplyAssembler, ReplyDecoder, ReplyFrame,
    Request,
};
use crate::error::NbdError;
use crate::proto::{self, cmd, opt, rep, tflag};
use crate::uri::{Address, NbdConfig};
use bytes::{Bytes, BytesMut};
use ferry_core::ExtentMap;
use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, oneshot};

/// A byte stream the protocol runs over: TCP, Unix socket, or TLS over either.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
pub(crate) type BoxStream = Box<dyn Stream>;

/// Names used in every message of one client: the server address and the redacted export.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub server: String,
    pub export: String,
}

impl Ctx {
    fn io(&self, op: impl Into<String>, source: std::io::Error) -> NbdError {
        NbdError::Io {
            server: self.server.clone(),
            export: self.export.clone(),
            op: op.into(),
            source,
        }
    }
    fn protocol(&self, message: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            server: self.server.clone(),
            export: self.export.clone(),
            message: message.into(),
        }
    }
    fn timeout(&self, op: impl Into<String>, d: Duration) -> NbdError {
        NbdError::Timeout {
            server: self.server.clone(),
            export: self.export.clone(),
            op: op.into(),
            secs: d.as_secs_f64(),
        }
    }
    fn tls(&self, message: impl Into<String>) -> NbdError {
        NbdError::Tls {
            server: self.server.clone(),
            export: self.export.clone(),
            message: message.into(),
        }
    }
    fn unsupported(&self, message: impl Into<String>) -> NbdError {
        NbdError::Unsupported {
            server: self.server.clone(),
            export: self.export.clone(),
            message: message.into(),
        }
    }
}

/// What negotiation established about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::tflag`).
    pub flags: u16,
    /// Minimum block size (1 if unstated).
    pub block_min: u32,
    /// Preferred block size (4096 if unstated).
    pub block_preferred: u32,
    /// Largest payload (32 MiB if unstated).
    pub block_max: u32,
    /// Structured replies are on.
    pub structured_replies: bool,
    /// Metadata contexts the server selected.
    pub meta_contexts: Vec<String>,
    /// The session runs over TLS.
    pub tls: bool,
    /// `NBD_OPT_GO` was used (false: the `NBD_OPT_EXPORT_NAME` fallback).
    pub used_go: bool,
}

impl ExportInfo {
    /// The export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & tflag::READ_ONLY != 0
    }
    /// Several connections see one consistent export.
    pub fn can_multi_conn(&self) -> bool {
        self.flags & tflag::CAN_MULTI_CONN != 0
    }
    /// FLUSH is supported.
    pub fn can_flush(&self) -> bool {
        self.flags & tflag::SEND_FLUSH != 0
    }
    /// TRIM is supported.
    pub fn can_trim(&self) -> bool {
        self.flags & tflag::SEND_TRIM != 0
    }
    /// WRITE_ZEROES is supported.
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & tflag::SEND_WRITE_ZEROES != 0
    }
}

async fn step<T>(
    ctx: &Ctx,
    d: Duration,
    op: &str,
    f: impl Future<Output = Result<T, NbdError>>,
) -> Result<T, NbdError> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| ctx.timeout(op, d))?
}

async fn connect_socket(cfg: &NbdConfig, ctx: &Ctx) -> Result<BoxStream, NbdError> {
    match &cfg.address {
        Address::Tcp { host, port } => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| ctx.io("connect", e))?;
            // Request headers are tiny; Nagle would hold them back behind outstanding data.
            s.set_nodelay(true)
                .map_err(|e| ctx.io("set TCP_NODELAY", e))?;
            Ok(Box::new(s))
        }
        Address::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| ctx.io("connect", e))?;
            Ok(Box::new(s))
        }
    }
}

/// The negotiation phase on one socket.
struct Negotiator<'a> {
    s: BoxStream,
    ctx: &'a Ctx,
}

/// One option reply.
struct OptReply {
    reply_type: u32,
    data: Vec<u8>,
}

impl Negotiator<'_> {
    async fn send(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut b = Vec::with_capacity(16 + data.len());
        codec::encode_option(&mut b, option, data);
        self.s
            .write_all(&b)
            .await
            .map_err(|e| self.ctx.io(format!("send {}", proto::opt_name(option)), e))?;
        self.s
            .flush()
            .await
            .map_err(|e| self.ctx.io(format!("send {}", proto::opt_name(option)), e))
    }

    async fn reply(&mut self, option: u32) -> Result<OptReply, NbdError> {
        let op = || format!("read reply to {}", proto::opt_name(option));
        let mut h = [0u8; 20];
        self.s
            .read_exact(&mut h)
            .await
            .map_err(|e| self.ctx.io(op(), e))?;
        let h =
            codec::decode_option_reply_header(&h, option).map_err(|e| self.ctx.protocol(e.0))?;
        let mut data = vec![0u8; h.len as usize];
        self.s
            .read_exact(&mut data)
            .await
            .map_err(|e| self.ctx.io(op(), e))?;
        Ok(OptReply {
            reply_type: h.reply_type,
            data,
        })
    }

    fn refused(&self, option: u32, r: &OptReply) -> NbdError {
        NbdError::Refused {
            server: self.ctx.server.clone(),
            export: self.ctx.export.clone(),
            option: proto::opt_name(option),
            reply: proto::rep_err_name(r.reply_type),
            message: String::from_utf8_lossy(&r.data).into_owned(),
            code: r.reply_type,
        }
    }

    fn check_error(&self, option: u32, r: &OptReply) -> Result<(), NbdError> {
        if r.reply_type == rep::ERR_TLS_REQD {
            return Err(self.ctx.tls(format!(
                "the server requires TLS before {}; use an nbds:// URI with a CA or fingerprint",
                proto::opt_name(option)
            )));
        }
        if r.reply_type & rep::FLAG_ERROR != 0 {
            return Err(self.refused(option, r));
        }
        Ok(())
    }
}

/// Performs the whole handshake on a new socket.
async fn negotiate(
    cfg: &NbdConfig,
    ctx: &Ctx,
) -> Result<(BoxStream, ExportInfo, Vec<(u32, String)>), NbdError> {
    let t = cfg.connect_timeout;
    let s = step(ctx, t, "connect", connect_socket(cfg, ctx)).await?;
    let mut n = Negotiator { s, ctx };
    let mut g = [0u8; 18];
    step(ctx, t, "read greeting", async {
        n.s.read_exact(&mut g)
            .await
            .map_err(|e| ctx.io("read greeting", e))
    })
    .await?;
    let hflags = codec::decode_greeting(&g).map_err(|e| ctx.protocol(e.0))?;
    let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
    let cflags = proto::CLIENT_FIXED_NEWSTYLE
        | if no_zeroes {
            proto::CLIENT_NO_ZEROES
        } else {
            0
        };
    n.s.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| ctx.io("send client flags", e))?;

    let mut tls = false;
    if cfg.tls_required {
        let opts = cfg.tls.as_ref().ok_or_else(|| {
            ctx.tls("TLS is required but no CA certificate or fingerprint was configured")
        })?;
        n.send(opt::STARTTLS, &[]).await?;
        let r = step(ctx, t, "STARTTLS", n.reply(opt::STARTTLS)).await?;
        if r.reply_type != rep::ACK {
            return Err(ctx.tls(format!(
                "the server refused STARTTLS ({})",
                proto::rep_err_name(r.reply_type)
            )));
        }
        let config =
            crate::tls::client_config_with_identity(&opts.verify, opts.client_identity.as_ref())
                .map_err(|m| ctx.tls(m))?;
        let name = opts
            .server_name
            .clone()
            .unwrap_or_else(|| match &cfg.address {
                Address::Tcp { host, .. } => host.clone(),
                Address::Unix(_) => "localhost".into(),
            });
        let name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| ctx.tls(format!("invalid TLS server name: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let s = std::mem::replace(&mut n.s, Box::new(tokio::io::duplex(1).0));
        let tls_stream = tokio::time::timeout(t, connector.connect(name, s))
            .await
            .map_err(|_| ctx.timeout("TLS handshake", t))?
            .map_err(|e| {
                ctx.tls(format!(
                    "handshake failed: {}",
                    ferry_tls::describe_handshake_error(&e)
                ))
            })?;
        n.s = Box::new(tls_stream);
        tls = true;
    }

    let mut structured = false;
    n.send(opt::STRUCTURED_REPLY, &[]).await?;
    let r = step(ctx, t, "STRUCTURED_REPLY", n.reply(opt::STRUCTURED_REPLY)).await?;
    if r.reply_type == rep::ACK {
        structured = true;
    } else if r.reply_type == rep::ERR_TLS_REQD {
        n.check_error(opt::STRUCTURED_REPLY, &r)?;
    } else if r.reply_type & rep::FLAG_ERROR == 0 {
        return Err(ctx.protocol(format!(
            "unexpected reply type {} to NBD_OPT_STRUCTURED_REPLY",
            r.reply_type
        )));
    }

    let mut contexts = Vec::new();
    if structured && !cfg.meta_contexts.is_empty() {
        let data = codec::encode_meta_context_data(&cfg.export, &cfg.meta_contexts);
        n.send(opt::SET_META_CONTEXT, &data).await?;
        step(ctx, t, "SET_META_CONTEXT", async {
            loop {
                let r = n.reply(opt::SET_META_CONTEXT).await?;
                match r.reply_type {
                    rep::ACK => break,
                    rep::META_CONTEXT => {
                        let (id, name) =
                            codec::decode_meta_context(&r.data).map_err(|e| ctx.protocol(e.0))?;
                        if !cfg.meta_contexts.contains(&name) {
                            return Err(ctx.protocol(format!(
                                "server selected meta context `{name}` that was not asked for"
                            )));
                        }
                        if contexts.len() >= cfg.meta_contexts.len() {
                            return Err(
                                ctx.protocol("server selected more meta contexts than asked")
                            );
                        }
                        contexts.push((id, name));
                    }
                    t if t & rep::FLAG_ERROR != 0 => {
                        // Not fatal: block status is then simply unavailable.
                        tracing::debug!(server = %ctx.server, reply = proto::rep_err_name(t),
                            "SET_META_CONTEXT refused");
                        contexts.clear();
                        break;
                    }
                    t => {
                        return Err(ctx.protocol(format!(
                            "unexpected reply type {t} to NBD_OPT_SET_META_CONTEXT"
                        )));
                    }
                }
            }
            Ok(())
        })
        .await?;
    }

    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        block_min: 1,
        block_preferred: 4096,
        block_max: proto::DEFAULT_MAX_BLOCK,
        structured_replies: structured,
        meta_contexts: contexts.iter().map(|(_, n)| n.clone()).collect(),
        tls,
        used_go: true,
    };
    n.send(
        opt::GO,
        &codec::encode_go_data(&cfg.export, &[proto::info::BLOCK_SIZE]),
    )
    .await?;
    let mut have_export = false;
    let fallback = step(ctx, t, "GO", async {
        loop {
            let r = n.reply(opt::GO).await?;
            match r.reply_type {
                rep::ACK => {
                    if !have_export {
                        return Err(ctx.protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"));
                    }
                    return Ok(false);
                }
                rep::INFO => match codec::decode_info(&r.data).map_err(|e| ctx.protocol(e.0))? {
                    codec::InfoItem::Export { size, flags } => {
                        info.size = size;
                        info.flags = flags;
                        have_export = true;
                    }
                    codec::InfoItem::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        info.block_min = min;
                        info.block_preferred = preferred;
                        info.block_max = max;
                    }
                    _ => {}
                },
                rep::ERR_UNSUP => return Ok(true),
                _ => {
                    n.check_error(opt::GO, &r)?;
                    return Err(ctx.protocol(format!(
                        "unexpected reply type {} to NBD_OPT_GO",
                        r.reply_type
                    )));
                }
            }
        }
    })
    .await?;
    if fallback {
        info.used_go = false;
        n.send(opt::EXPORT_NAME, cfg.export.as_bytes()).await?;
        let mut b = [0u8; 10];
        step(ctx, t, "EXPORT_NAME", async {
            n.s.read_exact(&mut b).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    ctx.unsupported(
                        "the server closed the connection on NBD_OPT_EXPORT_NAME (unknown export?)",
                    )
                } else {
                    ctx.io("read NBD_OPT_EXPORT_NAME reply", e)
                }
            })?;
            if !no_zeroes {
                let mut z = [0u8; 124];
                n.s.read_exact(&mut z)
                    .await
                    .map_err(|e| ctx.io("read NBD_OPT_EXPORT_NAME padding", e))?;
            }
            Ok(())
        })
        .await?;
        let (size, flags) = codec::decode_export_name_reply(&b);
        info.size = size;
        info.flags = flags;
    }
    if info.flags & tflag::HAS_FLAGS == 0 {
        return Err(ctx.protocol("transmission flags lack NBD_FLAG_HAS_FLAGS"));
    }
    tracing::debug!(server = %ctx.server, export = %ctx.export, size = info.size,
        flags = info.flags, structured, tls, "NBD export negotiated");
    Ok((n.s, info, contexts))
}

/// Lists the exports of a server (`NBD_OPT_LIST`): `(name, description)` pairs.
pub async fn list_exports(cfg: &NbdConfig) -> Result<Vec<(String, String)>, NbdError> {
    let ctx = Ctx {
        server: cfg.server_label(),
        export: String::new(),
    };
    let t = cfg.connect_timeout;
    let s = step(&ctx, t, "connect", connect_socket(cfg, &ctx)).await?;
    let mut n = Negotiator { s, ctx: &ctx };
    let mut g = [0u8; 18];
    step(&ctx, t, "read greeting", async {
        n.s.read_exact(&mut g)
            .await
            .map_err(|e| ctx.io("read greeting", e))
    })
    .await?;
    let hflags = codec::decode_greeting(&g).map_err(|e| ctx.protocol(e.0))?;
    let cflags = proto::CLIENT_FIXED_NEWSTYLE
        | if hflags & proto::FLAG_NO_ZEROES != 0 {
            proto::CLIENT_NO_ZEROES
        } else {
            0
        };
    n.s.write_all(&cflags.to_be_bytes())
        .await
        .map_err(|e| ctx.io("send client flags", e))?;
    if cfg.tls_required {
        let opts = cfg
            .tls
            .as_ref()
            .ok_or_else(|| ctx.tls("TLS is required but not configured"))?;
        n.send(opt::STARTTLS, &[]).await?;
        let r = step(&ctx, t, "STARTTLS", n.reply(opt::STARTTLS)).await?;
        if r.reply_type != rep::ACK {
            return Err(ctx.tls("the server refused STARTTLS"));
        }
        let config =
            crate::tls::client_config_with_identity(&opts.verify, opts.client_identity.as_ref())
                .map_err(|m| ctx.tls(m))?;
        let name = opts
            .server_name
            .clone()
            .unwrap_or_else(|| match &cfg.address {
                Address::Tcp { host, .. } => host.clone(),
                Address::Unix(_) => "localhost".into(),
            });
        let name = rustls::pki_types::ServerName::try_from(name)
            .map_err(|e| ctx.tls(format!("invalid TLS server name: {e}")))?;
        let s = std::mem::replace(&mut n.s, Box::new(tokio::io::duplex(1).0));
        let tls_stream =
            tokio::time::timeout(t, tokio_rustls::TlsConnector::from(config).connect(name, s))
                .await
                .map_err(|_| ctx.timeout("TLS handshake", t))?
                .map_err(|e| {
                    ctx.tls(format!(
                        "handshake failed: {}",
                        ferry_tls::describe_handshake_error(&e)
                    ))
                })?;
        n.s = Box::new(tls_stream);
    }
    n.send(opt::LIST, &[]).await?;
    let mut out = Vec::new();
    step(&ctx, t, "LIST", async {
        loop {
            let r = n.reply(opt::LIST).await?;
            match r.reply_type {
                rep::ACK => return Ok(()),
                rep::SERVER => {
                    if out.len() >= 1 << 16 {
                        return Err(ctx.protocol("more than 65536 exports listed"));
                    }
                    out.push(codec::decode_list_entry(&r.data).map_err(|e| ctx.protocol(e.0))?)
                }
                _ => {
                    n.check_error(opt::LIST, &r)?;
                    return Err(ctx.protocol(format!(
                        "unexpected reply type {} to NBD_OPT_LIST",
                        r.reply_type
                    )));
                }
            }
        }
    })
    .await?;
    let _ = n.send(opt::ABORT, &[]).await;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// One connection in transmission
// ---------------------------------------------------------------------------------------------

/// Why a connection is unusable.
#[derive(Debug, Clone)]
struct DeadCause {
    message: String,
    protocol: bool,
}

/// A finished successful reply.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    /// READ data pieces (disk offset, bytes); holes are implied.
    pub data: Vec<(u64, Bytes)>,
    /// BLOCK_STATUS descriptors per context id.
    pub block_status: Vec<(u32, Vec<(u32, u32)>)>,
}

struct Entry {
    asm: ReplyAssembler,
    data: Vec<(u64, Bytes)>,
    tx: oneshot::Sender<Result<Reply, NbdError>>,
}

#[derive(Default)]
struct Inflight {
    map: HashMap<u64, Entry>,
    dead: Option<DeadCause>,
}

/// One negotiated connection in transmission phase.
pub(crate) struct Connection {
    ctx: Arc<Ctx>,
    info: ExportInfo,
    contexts: Vec<(u32, String)>,
    writer: tokio::sync::Mutex<WriteHalf<BoxStream>>,
    inflight: Arc<Mutex<Inflight>>,
    next_cookie: AtomicU64,
    permits: Semaphore,
    request_timeout: Duration,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    async fn open(cfg: &NbdConfig, ctx: Arc<Ctx>) -> Result<Self, NbdError> {
        let (stream, info, contexts) = negotiate(cfg, &ctx).await?;
        let (rd, wr) = tokio::io::split(stream);
        let inflight = Arc::new(Mutex::new(Inflight::default()));
        let reader = tokio::spawn(read_replies(
            rd,
            ReplyDecoder {
                structured: info.structured_replies,
            },
            inflight.clone(),
            ctx.clone(),
        ));
        Ok(Self {
            ctx,
            info,
            contexts,
            writer: tokio::sync::Mutex::new(wr),
            inflight,
            next_cookie: AtomicU64::new(1),
            permits: Semaphore::new(cfg.max_in_flight.max(1)),
            request_timeout: cfg.request_timeout,
            reader,
        })
    }

    fn is_dead(&self) -> bool {
        self.inflight.lock().expect("inflight lock").dead.is_some()
    }

    fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(_, n)| n == name)
            .map(|(id, _)| *id)
    }

    fn dead_error(&self, cause: &DeadCause) -> NbdError {
        dead_error(&self.ctx, cause)
    }

    /// Marks the connection dead and fails every request in flight.
    fn kill(&self, cause: DeadCause) {
        kill(&self.inflight, &self.ctx, cause);
        self.reader.abort();
    }

    /// Sends one request and waits for its reply.
    async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Reply, NbdError> {
        let _permit = self.permits.acquire().await.map_err(|_| {
            self.dead_error(&DeadCause {
                message: "connection closed".into(),
                protocol: false,
            })
        })?;
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut g = self.inflight.lock().expect("inflight lock");
            if let Some(c) = &g.dead {
                return Err(self.dead_error(c));
            }
            g.map.insert(
                cookie,
                Entry {
                    asm: ReplyAssembler::new(Pending {
                        cmd,
                        offset,
                        length,
                    }),
                    data: Vec::new(),
                    tx,
                },
            );
        }
        let hdr = Request {
            flags,
            cmd,
            cookie,
            offset,
            length,
        }
        .encode();
        let what = || {
            format!(
                "{} of {length} bytes at offset {offset}",
                proto::cmd_name(cmd)
            )
        };
        let work = async {
            {
                let mut w = self.writer.lock().await;
                let r = async {
                    w.write_all(&hdr).await?;
                    if let Some(p) = payload {
                        w.write_all(p).await?;
                    }
                    w.flush().await
                }
                .await;
                if let Err(e) = r {
                    let err = self.ctx.io(format!("send {}", what()), e);
                    self.kill(DeadCause {
                        message: err.to_string(),
                        protocol: false,
                    });
                    return Err(err);
                }
            }
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(self.dead_error(&DeadCause {
                    message: "reply channel closed".into(),
                    protocol: false,
                })),
            }
        };
        match tokio::time::timeout(self.request_timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                let err = self.ctx.timeout(what(), self.request_timeout);
                // A stalled server: nothing on this connection can be trusted to finish.
                self.kill(DeadCause {
                    message: err.to_string(),
                    protocol: false,
                });
                Err(err)
            }
        }
    }

    async fn disconnect(&self) {
        let cause = DeadCause {
            message: "disconnected by the client".into(),
            protocol: false,
        };
        // Closed on purpose: the server's EOF that follows is expected, not a lost connection.
        {
            let mut g = self.inflight.lock().expect("inflight lock");
            if g.dead.is_none() {
                g.dead = Some(cause.clone());
            }
        }
        let hdr = Request {
            flags: 0,
            cmd: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        let mut w = self.writer.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = w.write_all(&hdr).await;
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        })
        .await;
        self.kill(cause);
    }
}

fn dead_error(ctx: &Ctx, cause: &DeadCause) -> NbdError {
    NbdError::Disconnected {
        server: ctx.server.clone(),
        export: ctx.export.clone(),
        message: cause.message.clone(),
        transient: !cause.protocol,
    }
}

fn kill(inflight: &Mutex<Inflight>, ctx: &Ctx, cause: DeadCause) {
    let mut g = inflight.lock().expect("inflight lock");
    if g.dead.is_none() {
        tracing::warn!(server = %ctx.server, export = %ctx.export, cause = %cause.message,
            "NBD connection lost");
        g.dead = Some(cause.clone());
    }
    for (_, e) in g.map.drain() {
        let err = if cause.protocol {
            ctx.protocol(cause.message.clone())
        } else {
            dead_error(ctx, &cause)
        };
        let _ = e.tx.send(Err(err));
    }
}

/// The reader task: decodes replies and completes the matching requests.
async fn read_replies(
    mut rd: ReadHalf<BoxStream>,
    dec: ReplyDecoder,
    inflight: Arc<Mutex<Inflight>>,
    ctx: Arc<Ctx>,
) {
    let mut buf = BytesMut::with_capacity(1 << 20);
    loop {
        let decoded = {
            let g = inflight.lock().expect("inflight lock");
            dec.decode(&buf, |c| g.map.get(&c).map(|e| e.asm.pending()))
        };
        match decoded {
            Err(ProtocolError(m)) => {
                return kill(
                    &inflight,
                    &ctx,
                    DeadCause {
                        message: m,
                        protocol: true,
                    },
                );
            }
            Ok(Decoded::Incomplete(need)) => {
                if buf.capacity() < need {
                    // Whole frames land in one allocation so payloads can be handed out as
                    // `Bytes` without copying; 1 MiB minimum keeps small replies batched.
                    buf.reserve((need - buf.len()).max(1 << 20));
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) => {
                        let message = if buf.is_empty() {
                            "the server closed the connection".to_string()
                        } else {
                            format!(
                                "the server closed the connection inside a reply ({} bytes of a frame)",
                                buf.len()
                            )
                        };
                        return kill(
                            &inflight,
                            &ctx,
                            DeadCause {
                                message,
                                protocol: false,
                            },
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let message = format!("read reply: {e}");
                        return kill(
                            &inflight,
                            &ctx,
                            DeadCause {
                                message,
                                protocol: false,
                            },
                        );
                    }
                }
            }
            Ok(Decoded::Frame { frame, len }) => {
                let bytes = buf.split_to(len).freeze();
                let mut g = inflight.lock().expect("inflight lock");
                let cookie = frame.cookie();
                let Some(entry) = g.map.get_mut(&cookie) else {
                    drop(g);
                    return kill(
                        &inflight,
                        &ctx,
                        DeadCause {
                            message: format!(
                                "reply for cookie {cookie:#x} that is no longer in flight"
                            ),
                            protocol: true,
                        },
                    );
                };
                let p = entry.asm.pending();
                match &frame {
                    ReplyFrame::Simple { error: 0, data, .. } if !data.is_empty() => {
                        entry.data.push((p.offset, bytes.slice(data.clone())));
                    }
                    ReplyFrame::Chunk {
                        chunk: codec::Chunk::Data { offset, data },
                        ..
                    } => {
                        entry.data.push((*offset, bytes.slice(data.clone())));
                    }
                    _ => {}
                }
                match entry.asm.accept(&frame) {
                    Err(ProtocolError(m)) => {
                        drop(g);
                        return kill(
                            &inflight,
                            &ctx,
                            DeadCause {
                                message: m,
                                protocol: true,
                            },
                        );
                    }
                    Ok(None) => {}
                    Ok(Some(outcome)) => {
                        let e = g.map.remove(&cookie).expect("entry present");
                        let result = match outcome {
                            Outcome::Ok(block_status) => Ok(Reply {
                                data: e.data,
                                block_status,
                            }),
                            Outcome::Failed(se) => Err(NbdError::Command {
                                server: ctx.server.clone(),
                                export: ctx.export.clone(),
                                cmd: proto::cmd_name(p.cmd),
                                offset: se.offset.unwrap_or(p.offset),
                                len: u64::from(p.length),
                                errno: se.error,
                                errno_name: proto::errno::name(se.error),
                                message: se.message,
                            }),
                        };
                        let _ = e.tx.send(result);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client: a pool of connections
// ---------------------------------------------------------------------------------------------

struct Slot {
    conn: Mutex<Arc<Connection>>,
    reconnecting: tokio::sync::Mutex<()>,
}

/// An NBD client for one export: one or more pipelined connections.
///
/// Reads and block-status queries are idempotent: after a dropped connection, a timeout or an
/// `EIO` reply they are retried (on a fresh connection where needed) up to
/// [`NbdConfig::retries`] times. Writes are never retried behind the caller's back.
pub struct NbdClient {
    cfg: NbdConfig,
    ctx: Arc<Ctx>,
    info: ExportInfo,
    slots: Vec<Slot>,
    next: AtomicUsize,
    max_request: u32,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("uri", &self.cfg.uri_redacted())
            .field("size", &self.info.size)
            .field("connections", &self.slots.len())
            .finish()
    }
}

impl NbdClient {
    /// Connects with the given configuration, opening `cfg.connections` connections if the
    /// server advertises multi-conn and one otherwise.
    pub async fn connect(cfg: NbdConfig) -> Result<Self, NbdError> {
        let ctx = Arc::new(Ctx {
            server: cfg.server_label(),
            export: cfg.export_label(),
        });
        let first = Connection::open(&cfg, ctx.clone()).await?;
        let info = first.info.clone();
        let want = if info.can_multi_conn() {
            cfg.connections.max(1)
        } else {
            1
        };
        let mut conns = vec![first];
        let more =
            futures::future::try_join_all((1..want).map(|_| Connection::open(&cfg, ctx.clone())))
                .await?;
        for c in more {
            if c.info.size != info.size {
                return Err(ctx.protocol(format!(
                    "connections disagree on the export size ({} vs {})",
                    c.info.size, info.size
                )));
            }
            conns.push(c);
        }
        let max_request = cfg
            .max_request
            .min(info.block_max)
            .max(info.block_min)
            .max(512);
        // A multiple of the minimum block size, so split requests stay aligned.
        let max_request = max_request / info.block_min * info.block_min;
        tracing::info!(uri = %cfg.uri_redacted(), size = info.size, connections = conns.len(),
            tls = info.tls, structured = info.structured_replies, "connected to NBD export");
        Ok(Self {
            slots: conns
                .into_iter()
                .map(|c| Slot {
                    conn: Mutex::new(Arc::new(c)),
                    reconnecting: tokio::sync::Mutex::new(()),
                })
                .collect(),
            cfg,
            ctx,
            info,
            next: AtomicUsize::new(0),
            max_request,
        })
    }

    /// Connects to an NBD URI with default settings.
    pub async fn connect_uri(uri: &str) -> Result<Self, NbdError> {
        Self::connect(NbdConfig::from_uri(uri)?).await
    }

    /// What negotiation established.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Size of the export.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.slots.len()
    }

    /// The configuration (export name included; print [`NbdConfig::uri_redacted`] instead).
    pub fn config(&self) -> &NbdConfig {
        &self.cfg
    }

    /// The URI with secrets redacted.
    pub fn uri_redacted(&self) -> String {
        self.cfg.uri_redacted()
    }

    async fn live_conn(&self, slot: &Slot) -> Result<Arc<Connection>, NbdError> {
        let c = slot.conn.lock().expect("slot lock").clone();
        if !c.is_dead() {
            return Ok(c);
        }
        let _g = slot.reconnecting.lock().await;
        let c = slot.conn.lock().expect("slot lock").clone();
        if !c.is_dead() {
            return Ok(c);
        }
        tracing::info!(uri = %self.cfg.uri_redacted(), "reconnecting to NBD server");
        let fresh = Connection::open(&self.cfg, self.ctx.clone()).await?;
        if fresh.info.size != self.info.size {
            return Err(self.ctx.protocol(format!(
                "export size changed across reconnect ({} -> {})",
                self.info.size, fresh.info.size
            )));
        }
        let fresh = Arc::new(fresh);
        *slot.conn.lock().expect("slot lock") = fresh.clone();
        Ok(fresh)
    }

    /// Runs `op` on a live connection; retries idempotent operations on transient errors.
    async fn run<T, F, Fut>(&self, idempotent: bool, op: F) -> Result<T, NbdError>
    where
        F: Fn(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T, NbdError>>,
    {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        let mut attempt = 0u32;
        loop {
            let r = match self.live_conn(slot).await {
                Ok(c) => op(c).await,
                Err(e) => Err(e),
            };
            match r {
                Err(e) if idempotent && e.is_retryable() && attempt < self.cfg.retries => {
                    attempt += 1;
                    tracing::warn!(uri = %self.cfg.uri_redacted(), attempt, error = %e,
                        "retrying NBD request");
                    tokio::time::sleep(Duration::from_millis(20 << attempt.min(6))).await;
                }
                other => return other,
            }
        }
    }

    fn check_range(&self, op: &str, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(NbdError::Unsupported {
                server: self.ctx.server.clone(),
                export: self.ctx.export.clone(),
                message: format!(
                    "{op} of {len} bytes at offset {offset} reaches past the end of the export ({} bytes)",
                    self.info.size
                ),
            }),
        }
    }

    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> + use<> {
        let step = u64::from(self.max_request);
        let end = offset + len;
        (0..len.div_ceil(step)).map(move |i| {
            let o = offset + i * step;
            (o, (end - o).min(step) as u32)
        })
    }

    async fn read_piece(&self, offset: u64, out: &mut [u8]) -> Result<(), NbdError> {
        let len = out.len() as u32;
        let reply = self
            .run(true, |c| async move {
                c.request(cmd::READ, 0, offset, len, None).await
            })
            .await?;
        fill_from_reply(out, offset, reply);
        Ok(())
    }

    /// Reads `len` bytes at `offset` into a buffer of their own, as one request up to the
    /// server's maximum block size (not split at `max_request`: joining pieces would be a
    /// copy). When the server answers with one data piece (the usual case), that buffer is the
    /// received reply itself. The backup engine reads whole chunks (1 MiB by default) this way.
    pub async fn read_shared(&self, offset: u64, len: usize) -> Result<Bytes, NbdError> {
        self.check_range("read", offset, len as u64)?;
        let min = u64::from(self.info.block_min);
        let aligned = min <= 1 || (offset % min == 0 && len as u64 % min == 0);
        if len == 0 || len > self.info.block_max as usize || !aligned {
            let mut v = vec![0u8; len];
            self.read(offset, &mut v).await?;
            return Ok(Bytes::from(v));
        }
        let reply = self
            .run(true, |c| async move {
                c.request(cmd::READ, 0, offset, len as u32, None).await
            })
            .await?;
        if let [(o, b)] = reply.data.as_slice() {
            if *o == offset && b.len() == len {
                return Ok(b.clone());
            }
        }
        let mut v = vec![0u8; len];
        fill_from_reply(&mut v, offset, reply);
        Ok(Bytes::from(v))
    }

    /// Reads `buf.len()` bytes at `offset`, as many requests in flight as the connections allow.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_range("read", offset, buf.len() as u64)?;
        let min = u64::from(self.info.block_min);
        let end = offset + buf.len() as u64;
        if min > 1 && (offset % min != 0 || end % min != 0) {
            // The server enforces a minimum block size: read the aligned superset.
            let start = offset / min * min;
            let aligned_end = end.div_ceil(min).saturating_mul(min).min(self.info.size);
            let mut tmp = vec![0u8; (aligned_end - start) as usize];
            Box::pin(self.read(start, &mut tmp)).await?;
            let at = (offset - start) as usize;
            buf.copy_from_slice(&tmp[at..at + buf.len()]);
            return Ok(());
        }
        let step = self.max_request as usize;
        let futs = buf
            .chunks_mut(step)
            .enumerate()
            .map(|(i, part)| self.read_piece(offset + (i * step) as u64, part));
        futures::future::try_join_all(futs).await?;
        Ok(())
    }

    fn require_writable(&self, op: &str) -> Result<(), NbdError> {
        if self.info.read_only() {
            return Err(self
                .ctx
                .unsupported(format!("{op}: the export is read-only")));
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.require_writable("write")?;
        self.check_range("write", offset, data.len() as u64)?;
        let min = u64::from(self.info.block_min);
        if min > 1 && (offset % min != 0 || data.len() as u64 % min != 0) {
            return Err(self.ctx.unsupported(format!(
                "write of {} bytes at offset {offset} is not aligned to the server's minimum block size {min}",
                data.len()
            )));
        }
        let step = self.max_request as usize;
        let futs = data.chunks(step).enumerate().map(|(i, part)| {
            let o = offset + (i * step) as u64;
            self.run(false, move |c| async move {
                c.request(cmd::WRITE, 0, o, part.len() as u32, Some(part))
                    .await
                    .map(drop)
            })
        });
        futures::future::try_join_all(futs).await?;
        Ok(())
    }

    async fn ranged(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdError> {
        // Zeroing and trimming carry no payload, so they may be larger than a READ.
        let step = 1u64 << 30;
        let end = offset + len;
        let mut pos = offset;
        let mut futs = Vec::new();
        while pos < end {
            let l = (end - pos).min(step) as u32;
            let o = pos;
            futs.push(self.run(false, move |c| async move {
                c.request(command, flags, o, l, None).await.map(drop)
            }));
            pos += u64::from(l);
        }
        futures::future::try_join_all(futs).await?;
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros (WRITE_ZEROES, holes allowed), or writes zero
    /// buffers when the server lacks WRITE_ZEROES.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.require_writable("write zeroes")?;
        self.check_range("write zeroes", offset, len)?;
        if self.info.can_write_zeroes() {
            return self.ranged(cmd::WRITE_ZEROES, 0, offset, len).await;
        }
        let zeros = vec![0u8; (self.max_request as u64).min(len) as usize];
        for (o, l) in self.pieces(offset, len) {
            self.write(o, &zeros[..l as usize]).await?;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` (contents afterwards are unspecified).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.require_writable("trim")?;
        self.check_range("trim", offset, len)?;
        if !self.info.can_trim() {
            return Err(self.ctx.unsupported("the server does not support TRIM"));
        }
        self.ranged(cmd::TRIM, 0, offset, len).await
    }

    /// Flushes every connection (each may hold writes the others have not seen flushed).
    pub async fn flush(&self) -> Result<(), NbdError> {
        if !self.info.can_flush() {
            return Ok(());
        }
        for slot in &self.slots {
            let c = self.live_conn(slot).await?;
            c.request(cmd::FLUSH, 0, 0, 0, None).await?;
        }
        Ok(())
    }

    /// Block status of `range` for metadata context `context`: `(range, flags)` pairs covering
    /// the range in order.
    pub async fn block_status(
        &self,
        context: &str,
        range: Range<u64>,
    ) -> Result<Vec<(Range<u64>, u32)>, NbdError> {
        let end = range.end.min(self.info.size);
        if !self.info.meta_contexts.iter().any(|c| c == context) {
            return Err(self.ctx.unsupported(format!(
                "meta context `{context}` was not negotiated (selected: {})",
                if self.info.meta_contexts.is_empty() {
                    "none".to_string()
                } else {
                    self.info.meta_contexts.join(", ")
                }
            )));
        }
        let mut out: Vec<(Range<u64>, u32)> = Vec::new();
        let mut pos = range.start;
        while pos < end {
            let len = (end - pos).min(1 << 30) as u32;
            let o = pos;
            let extents = self
                .run(true, |c| async move {
                    let id = c.context_id(context).ok_or_else(|| {
                        self.ctx.unsupported(format!("meta context `{context}` lost on reconnect"))
                    })?;
                    let reply = c.request(cmd::BLOCK_STATUS, 0, o, len, None).await?;
                    let d = reply
                        .block_status
                        .into_iter()
                        .find(|(cid, _)| *cid == id)
                        .map(|(_, d)| d)
                        .ok_or_else(|| {
                            self.ctx.protocol(format!(
                                "BLOCK_STATUS reply at offset {o} lacks context `{context}` (id {id})"
                            ))
                        })?;
                    Ok(codec::descriptors_to_extents(o, o + u64::from(len), &d))
                })
                .await?;
            let Some(last) = extents.last() else {
                return Err(self
                    .ctx
                    .protocol(format!("empty BLOCK_STATUS reply at offset {o}")));
            };
            pos = last.0.end;
            for (r, f) in extents {
                match out.last_mut() {
                    Some((lr, lf)) if *lf == f && lr.end == r.start => lr.end = r.end,
                    _ => out.push((r, f)),
                }
            }
        }
        Ok(out)
    }

    /// Ranges whose status under `context` has any of `bits` set (`want_set`) or none of them.
    async fn status_map(
        &self,
        context: &str,
        range: Range<u64>,
        bits: u32,
        want_set: bool,
    ) -> Result<ExtentMap, NbdError> {
        let mut m = ExtentMap::new();
        for (r, f) in self.block_status(context, range).await? {
            if (f & bits != 0) == want_set {
                m.insert(r);
            }
        }
        Ok(m)
    }

    /// Parts of `range` that may hold data (`base:allocation` without HOLE or ZERO), or the whole
    /// range when the server offers no `base:allocation`.
    pub async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, NbdError> {
        let range = range.start..range.end.min(self.info.size);
        if !self
            .info
            .meta_contexts
            .iter()
            .any(|c| c == crate::BASE_ALLOCATION)
        {
            return Ok(ExtentMap::from_range(range));
        }
        self.status_map(
            crate::BASE_ALLOCATION,
            range,
            proto::state::HOLE | proto::state::ZERO,
            false,
        )
        .await
    }

    /// Extents of `range` that dirty bitmap `bitmap` marks as changed (context
    /// `qemu:dirty-bitmap:NAME`, which must be in [`NbdConfig::meta_contexts`]).
    pub async fn changed_extents(
        &self,
        bitmap: &str,
        range: Range<u64>,
    ) -> Result<ExtentMap, NbdError> {
        let range = range.start..range.end.min(self.info.size);
        self.status_map(&format!("qemu:dirty-bitmap:{bitmap}"), range, 1, true)
            .await
    }

    /// Sends `NBD_CMD_DISC` on every connection and closes them.
    pub async fn close(&self) {
        for slot in &self.slots {
            let c = slot.conn.lock().expect("slot lock").clone();
            c.disconnect().await;
        }
    }
}

/// Copies a READ reply's data pieces (already checked to lie within the request) into `out`,
/// which starts at disk offset `offset`; what no piece covers reads as zeros.
fn fill_from_reply(out: &mut [u8], offset: u64, reply: Reply) {
    let filled: usize = reply.data.iter().map(|(_, b)| b.len()).sum();
    if filled != out.len() {
        out.fill(0);
    }
    for (o, b) in reply.data {
        let at = (o - offset) as usize;
        out[at..at + b.len()].copy_from_slice(&b);
    }
}
