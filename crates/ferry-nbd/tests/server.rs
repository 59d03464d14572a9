//! Our server against real clients (nbdinfo, nbdcopy, qemu-img, qemu-io) and our own client.

mod common;

use common::*;
use ferry_core::{BlockSource, MemSource};
use ferry_nbd::codec::{self, Request};
use ferry_nbd::proto::{self, cmd, opt};
use ferry_nbd::{NbdClient, NbdConfig, NbdExport, NbdServer, ServerTls};
use ferry_testkit::{TlsFiles, run_ok, scratch_dir, tool};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const SIZE: usize = 8 << 20;

/// 8 MiB with data in a few places and holes elsewhere; allocation from 64 KiB grains.
fn disk() -> MemSource {
    let mut d = vec![0u8; SIZE];
    let p = pattern(SIZE, 7);
    for (o, l) in [
        (0usize, 100_000usize),
        (1 << 20, 3 << 20),
        (7 << 20, 65536),
        (SIZE - 10, 10),
    ] {
        d[o..o + l].copy_from_slice(&p[o..o + l]);
    }
    MemSource::new("mem", d, 65536)
}

async fn sh(mut c: Command) -> String {
    tokio::task::spawn_blocking(move || run_ok(&mut c))
        .await
        .unwrap()
}

struct Running {
    token: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server shuts down promptly")
            .unwrap()
            .unwrap();
    }
}

fn serve_unix(server: NbdServer) -> Running {
    let dir = scratch_dir();
    let socket = dir.path().join("ferry.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, token.clone()));
    Running {
        token,
        task,
        socket,
        _dir: dir,
    }
}

fn ro_and_rw(src: &MemSource) -> (NbdExport, NbdExport) {
    let s: Arc<dyn BlockSource> = Arc::new(src.clone());
    (
        NbdExport::read_only("ro", s.clone()).with_description("read-only view"),
        NbdExport::copy_on_write("rw", s).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_read_exactly_the_exported_bytes() {
    let src = disk();
    let (ro, rw) = ro_and_rw(&src);
    let srv = serve_unix(NbdServer::new(vec![ro, rw]));
    let dir = scratch_dir();
    let expect_file = dir.path().join("expect.raw");
    std::fs::write(&expect_file, src.data()).unwrap();

    // nbdinfo --map: holes where MemSource has none of its 64 KiB grains allocated.
    let map = nbdinfo_map(&srv.uri("ro"), None);
    let alloc = src.allocated(0..SIZE as u64).await.unwrap();
    let want = merge(
        alloc
            .iter()
            .map(|e| (e.offset, e.length, 0))
            .chain(
                alloc
                    .complement(0..SIZE as u64)
                    .iter()
                    .map(|e| (e.offset, e.length, 3)),
            )
            .collect::<std::collections::BTreeSet<_>>(),
    );
    assert_eq!(map, want);

    // nbdcopy and qemu-img read back exactly the bytes.
    let out = dir.path().join("nbdcopy.raw");
    sh({
        let mut c = Command::new(tool("nbdcopy"));
        c.arg(srv.uri("ro")).arg(&out);
        c
    })
    .await;
    assert!(std::fs::read(&out).unwrap() == src.data());
    let out2 = dir.path().join("qemu.raw");
    sh({
        let mut c = Command::new(tool("qemu-img"));
        c.args(["convert", "-f", "raw", "-O", "raw"])
            .arg(srv.uri("ro"))
            .arg(&out2);
        c
    })
    .await;
    assert!(std::fs::read(&out2).unwrap() == src.data());
    sh({
        let mut c = Command::new(tool("qemu-img"));
        c.args(["compare", "-f", "raw", "-F", "raw"])
            .arg(srv.uri("ro"))
            .arg(&expect_file);
        c
    })
    .await;

    // Listing names both exports.
    let list = sh({
        let mut c = Command::new(tool("nbdinfo"));
        c.arg("--list").arg(srv.uri(""));
        c
    })
    .await;
    assert!(
        list.contains("export=\"ro\"")
            && list.contains("export=\"rw\"")
            && list.contains("read-only view"),
        "{list}"
    );
    srv.stop().await;
}

fn qemu_io(args: Vec<String>) -> Command {
    let mut c = Command::new(tool("qemu-io"));
    c.args(args);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_land_in_the_overlay_only() {
    let src = disk();
    let before = src.data().to_vec();
    let (ro, rw) = ro_and_rw(&src);
    let overlay = rw.overlay().unwrap().clone();
    let srv = serve_unix(NbdServer::new(vec![ro, rw]));
    let rw_uri = srv.uri("rw");
    let out = sh(qemu_io(vec![
        "-f".into(),
        "raw".into(),
        "-c".into(),
        "write -P 0x5a 4000 9000".into(),
        "-c".into(),
        "write -z 7340032 4096".into(),
        rw_uri.clone(),
    ]))
    .await;
    assert!(out.contains("wrote 9000/9000"), "{out}");
    // A new connection sees the writes ...
    let out = sh(qemu_io(vec![
        "-f".into(),
        "raw".into(),
        "-c".into(),
        "read -P 0x5a 4000 9000".into(),
        "-c".into(),
        "read -P 0 7340032 4096".into(),
        rw_uri.clone(),
    ]))
    .await;
    assert!(
        !out.contains("fail") && out.contains("read 9000/9000"),
        "{out}"
    );
    // ... the source and the read-only export do not.
    assert!(src.data() == &before[..]);
    let c = NbdClient::connect_uri(&srv.uri("ro")).await.unwrap();
    let mut got = vec![0u8; 9000];
    c.read(4000, &mut got).await.unwrap();
    assert_eq!(got[..], before[4000..13000]);
    assert_eq!(
        overlay.written().total_len(),
        2 * 65536,
        "one cell per write"
    );
    // Writing to the read-only export is refused by the server with EPERM.
    let mut raw = RawClient::go(&srv.socket, "ro").await;
    let r = raw
        .request(
            Request {
                flags: 0,
                cmd: cmd::WRITE,
                cookie: 9,
                offset: 0,
                length: 4,
            },
            &[1, 2, 3, 4],
        )
        .await;
    assert_eq!(r, (9, proto::errno::EPERM));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_over_tls_tcp_with_multi_conn() {
    let src = disk();
    let (ro, rw) = ro_and_rw(&src);
    let tls = TlsFiles::generate();
    let cert = std::fs::read_to_string(tls.dir().join("server-cert.pem")).unwrap();
    let key = std::fs::read_to_string(tls.dir().join("server-key.pem")).unwrap();
    let config = ferry_nbd::tls::server_config(&cert, &key).unwrap();
    let server = NbdServer::new(vec![ro, rw]).with_tls(ServerTls {
        config,
        required: true,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let token = CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, token.clone()));

    let uri = format!("nbds://127.0.0.1:{port}/ro");
    let c = NbdClient::connect(
        NbdConfig::from_uri(&uri)
            .unwrap()
            .with_tls_ca_pem(tls.ca_cert_pem()),
    )
    .await
    .unwrap();
    assert!(c.info().tls && c.info().structured_replies && c.info().read_only());
    assert_eq!(c.connections(), 4);
    assert_eq!(c.info().block_max, 32 << 20);
    assert!(ferry_core::block::read_all(&c).await.unwrap() == src.data());
    assert_eq!(
        c.allocated(0..SIZE as u64).await.unwrap(),
        src.allocated(0..SIZE as u64).await.unwrap()
    );
    let fp = ferry_nbd::tls::fingerprint_of(tls.server_cert_der());
    assert_eq!(fp, tls.fingerprint_sha256());
    let list = ferry_nbd::list_exports(
        &NbdConfig::from_uri(&uri)
            .unwrap()
            .with_tls_fingerprint(&fp)
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        list,
        vec![
            ("ro".to_string(), "read-only view".to_string()),
            ("rw".to_string(), String::new())
        ]
    );

    // Writable export over our client, through the BlockTarget trait.
    let w = NbdClient::connect(
        NbdConfig::from_uri(&format!("nbds://127.0.0.1:{port}/rw"))
            .unwrap()
            .with_tls_ca_pem(tls.ca_cert_pem()),
    )
    .await
    .unwrap();
    ferry_core::BlockTarget::write_at(&w, 5, b"hello")
        .await
        .unwrap();
    ferry_core::BlockTarget::write_zeroes(&w, 1 << 20, 1 << 20)
        .await
        .unwrap();
    ferry_core::BlockTarget::flush(&w).await.unwrap();
    let mut got = vec![0u8; 5];
    w.read(5, &mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    let mut z = vec![1u8; 1 << 20];
    w.read(1 << 20, &mut z).await.unwrap();
    assert!(z.iter().all(|b| *b == 0));

    // Without TLS the server refuses.
    let err = NbdClient::connect_uri(&format!("nbd://127.0.0.1:{port}/ro"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("requires TLS"), "{err}");
    // nbdinfo (GnuTLS) accepts our rustls server too.
    let nbdinfo_uri = format!(
        "nbds://127.0.0.1:{port}/ro?tls-certificates={}",
        tls.dir().display()
    );
    let out = sh({
        let mut c = Command::new(tool("nbdinfo"));
        c.arg(&nbdinfo_uri);
        c
    })
    .await;
    assert!(out.contains("export-size: 8388608"), "{out}");

    // Shutdown with clients still connected.
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop((c, w));
}

/// A hand-driven client for misbehaving on purpose.
struct RawClient {
    s: tokio::net::UnixStream,
}

impl RawClient {
    async fn greet(socket: &Path) -> Self {
        let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        codec::decode_greeting(&g).unwrap();
        s.write_all(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        Self { s }
    }

    /// Negotiates `export` with GO and no structured replies.
    async fn go(socket: &Path, export: &str) -> Self {
        let mut c = Self::greet(socket).await;
        let mut b = Vec::new();
        codec::encode_option(&mut b, opt::GO, &codec::encode_go_data(export, &[]));
        c.s.write_all(&b).await.unwrap();
        loop {
            let mut h = [0u8; 20];
            c.s.read_exact(&mut h).await.unwrap();
            let h = codec::decode_option_reply_header(&h, opt::GO).unwrap();
            let mut d = vec![0u8; h.len as usize];
            c.s.read_exact(&mut d).await.unwrap();
            if h.reply_type == proto::rep::ACK {
                return c;
            }
        }
    }

    /// Sends a request; returns (cookie, errno) of the simple reply.
    async fn request(&mut self, r: Request, payload: &[u8]) -> (u64, u32) {
        self.s.write_all(&r.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            proto::SIMPLE_REPLY_MAGIC
        );
        (
            u64::from_be_bytes(h[8..].try_into().unwrap()),
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
        )
    }

    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_get_errors_or_closed_connections() {
    let src = disk();
    let (ro, rw) = ro_and_rw(&src);
    let srv = serve_unix(NbdServer::new(vec![ro, rw]));

    // Bad option magic: closed.
    let mut c = RawClient::greet(&srv.socket).await;
    c.s.write_all(&[0xAB; 16]).await.unwrap();
    assert!(c.closed().await);

    // Absurd option length: closed before reading it.
    let mut c = RawClient::greet(&srv.socket).await;
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&b).await.unwrap();
    assert!(c.closed().await);

    // Truncated GO data: an error reply, and the session continues.
    let mut c = RawClient::greet(&srv.socket).await;
    let mut b = Vec::new();
    codec::encode_option(&mut b, opt::GO, &[0, 0, 0, 200, b'x']);
    c.s.write_all(&b).await.unwrap();
    let mut h = [0u8; 20];
    c.s.read_exact(&mut h).await.unwrap();
    assert_eq!(
        codec::decode_option_reply_header(&h, opt::GO)
            .unwrap()
            .reply_type,
        proto::rep::ERR_INVALID
    );

    // Requests outside the export, of zero length or unknown type: error replies.
    let mut c = RawClient::go(&srv.socket, "rw").await;
    let r = |cmd, offset, length, cookie| Request {
        flags: 0,
        cmd,
        cookie,
        offset,
        length,
    };
    assert_eq!(
        c.request(r(cmd::READ, SIZE as u64 - 1, 2, 1), &[]).await,
        (1, proto::errno::EINVAL)
    );
    assert_eq!(
        c.request(r(cmd::READ, u64::MAX, 2, 2), &[]).await,
        (2, proto::errno::EINVAL)
    );
    assert_eq!(
        c.request(r(cmd::WRITE, SIZE as u64, 1, 3), &[7]).await,
        (3, proto::errno::ENOSPC)
    );
    assert_eq!(
        c.request(r(99, 0, 1, 4), &[]).await,
        (4, proto::errno::EINVAL)
    );
    assert_eq!(
        c.request(r(cmd::BLOCK_STATUS, 0, 512, 5), &[]).await,
        (5, proto::errno::EINVAL)
    );
    // The connection still works.
    assert_eq!(c.request(r(cmd::FLUSH, 0, 0, 6), &[]).await, (6, 0));
    // A WRITE larger than the maximum payload: closed (its payload cannot be trusted).
    c.s.write_all(&r(cmd::WRITE, 0, 64 << 20, 7).encode())
        .await
        .unwrap();
    assert!(c.closed().await);
    // Bad request magic: closed.
    let mut c = RawClient::go(&srv.socket, "ro").await;
    c.s.write_all(&[0x55; 28]).await.unwrap();
    assert!(c.closed().await);
    // EXPORT_NAME for a missing export: closed.
    let mut c = RawClient::greet(&srv.socket).await;
    let mut b = Vec::new();
    codec::encode_option(&mut b, opt::EXPORT_NAME, b"missing");
    c.s.write_all(&b).await.unwrap();
    assert!(c.closed().await);

    // After all that, the server still serves.
    let ok = NbdClient::connect_uri(&srv.uri("ro")).await.unwrap();
    let mut got = vec![0u8; 100];
    ok.read(0, &mut got).await.unwrap();
    assert_eq!(got[..], src.data()[..100]);
    srv.stop().await;
}

/// A stream whose writes fail once `left` bytes went through (a peer that vanished mid-reply).
struct WriteLimit {
    inner: tokio::net::UnixStream,
    left: usize,
}

impl tokio::io::AsyncRead for WriteLimit {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteLimit {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        let n = buf.len().min(self.left);
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let std::task::Poll::Ready(Ok(w)) = &r {
            self.left -= *w;
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Choking(tokio::net::UnixListener);

impl ferry_nbd::NbdListener for Choking {
    async fn accept_stream(&mut self) -> std::io::Result<(Box<dyn ferry_nbd::NbdStream>, String)> {
        let (s, _) = self.0.accept().await?;
        let s = WriteLimit {
            inner: s,
            left: 4096,
        };
        Ok((Box::new(s), "choking".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_cannot_be_sent_closes_the_connection() {
    let dir = scratch_dir();
    let socket = dir.path().join("choke.sock");
    let listener = Choking(tokio::net::UnixListener::bind(&socket).unwrap());
    let src: Arc<dyn BlockSource> = Arc::new(disk());
    let token = CancellationToken::new();
    let task = tokio::spawn(
        NbdServer::new(vec![NbdExport::read_only("ro", src)]).serve(listener, token.clone()),
    );
    let mut c = RawClient::go(&socket, "ro").await;
    let read = Request {
        flags: 0,
        cmd: cmd::READ,
        cookie: 1,
        offset: 0,
        length: 1 << 20,
    };
    c.s.write_all(&read.encode()).await.unwrap();
    // Half a reply arrives, then the connection must close: the client can reconnect instead
    // of waiting for the rest forever.
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        let mut b = vec![0u8; 1 << 16];
        let mut got = 0;
        loop {
            match c.s.read(&mut b).await {
                Ok(0) | Err(_) => return got,
                Ok(n) => got += n,
            }
        }
    })
    .await
    .expect("the server kept a connection whose reply could not be sent");
    assert!(drained < (1 << 20) + 16, "{drained}");
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
