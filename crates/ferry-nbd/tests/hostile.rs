//! The client against a scripted server that sends crafted bytes: every violation becomes a
//! clear error naming the server and export, never a panic, hang or wrong data.

use ferry_nbd::codec::{self, Request};
use ferry_nbd::proto::{self, chunk, cmd, opt, rep, tflag};
use ferry_nbd::{Address, NbdClient, NbdConfig, NbdError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SIZE: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Neg {
    Normal,
    RefuseStartTls,
    GoUnsupported,
    BadGreeting,
}

enum Action {
    Send(Vec<u8>),
    SendAndClose(Vec<u8>),
    Stall,
}

type Script = Arc<dyn Fn(usize, &Request) -> Action + Send + Sync>;

fn byte_at(o: u64) -> u8 {
    (o % 251) as u8
}

/// A correct structured READ reply.
fn good_read(r: &Request) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_chunk_header(
        &mut out,
        r.cookie,
        chunk::FLAG_DONE,
        chunk::OFFSET_DATA,
        8 + r.length,
    );
    out.extend_from_slice(&r.offset.to_be_bytes());
    out.extend((r.offset..r.offset + u64::from(r.length)).map(byte_at));
    out
}

struct Fake {
    port: u16,
    exports: Arc<Mutex<Vec<String>>>,
}

async fn fake(neg: Neg, script: Script) -> Fake {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let exports = Arc::new(Mutex::new(Vec::new()));
    let ex = exports.clone();
    tokio::spawn(async move {
        for n in 0.. {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(session(s, n, neg, script.clone(), ex.clone()));
        }
    });
    Fake { port, exports }
}

async fn reply(s: &mut TcpStream, option: u32, t: u32, d: &[u8]) {
    let mut b = Vec::new();
    codec::encode_option_reply(&mut b, option, t, d);
    s.write_all(&b).await.unwrap();
}

async fn session(
    mut s: TcpStream,
    n: usize,
    neg: Neg,
    script: Script,
    exports: Arc<Mutex<Vec<String>>>,
) {
    let flags = proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES;
    if neg == Neg::BadGreeting {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n").await;
        return;
    }
    s.write_all(&codec::encode_greeting(flags)).await.unwrap();
    let mut f = [0u8; 4];
    if s.read_exact(&mut f).await.is_err() {
        return;
    }
    let tflags = tflag::HAS_FLAGS | tflag::READ_ONLY;
    loop {
        let mut h = [0u8; 16];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
        s.read_exact(&mut d).await.unwrap();
        match option {
            opt::STARTTLS => reply(&mut s, option, rep::ERR_POLICY, b"no").await,
            opt::STRUCTURED_REPLY => reply(&mut s, option, rep::ACK, &[]).await,
            opt::SET_META_CONTEXT => {
                let mut m = 5u32.to_be_bytes().to_vec();
                m.extend_from_slice(b"base:allocation");
                reply(&mut s, option, rep::META_CONTEXT, &m).await;
                reply(&mut s, option, rep::ACK, &[]).await;
            }
            opt::GO if neg == Neg::GoUnsupported => {
                reply(&mut s, option, rep::ERR_UNSUP, &[]).await
            }
            opt::GO => {
                let go = codec::decode_go_data(&d).unwrap();
                exports.lock().unwrap().push(go.export);
                let mut i = proto::info::EXPORT.to_be_bytes().to_vec();
                i.extend_from_slice(&SIZE.to_be_bytes());
                i.extend_from_slice(&tflags.to_be_bytes());
                reply(&mut s, option, rep::INFO, &i).await;
                reply(&mut s, option, rep::ACK, &[]).await;
                break;
            }
            opt::EXPORT_NAME => {
                exports.lock().unwrap().push(String::from_utf8(d).unwrap());
                let mut b = SIZE.to_be_bytes().to_vec();
                b.extend_from_slice(&tflags.to_be_bytes());
                s.write_all(&b).await.unwrap();
                break;
            }
            _ => reply(&mut s, option, rep::ERR_UNSUP, &[]).await,
        }
    }
    loop {
        let mut h = [0u8; 28];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let r = Request::decode(&h).unwrap().unwrap();
        if r.cmd == cmd::DISC {
            return;
        }
        match script(n, &r) {
            Action::Send(b) => {
                if s.write_all(&b).await.is_err() {
                    return;
                }
            }
            Action::SendAndClose(b) => {
                let _ = s.write_all(&b).await;
                return;
            }
            Action::Stall => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
        }
    }
}

fn cfg(port: u16) -> NbdConfig {
    let mut c = NbdConfig::new(
        Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        },
        "disk",
    );
    c.retries = 0;
    c.request_timeout = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(5);
    c
}

async fn read_err(script: Script) -> (NbdError, u16) {
    let f = fake(Neg::Normal, script).await;
    let c = NbdClient::connect(cfg(f.port)).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(8192, &mut buf).await.unwrap_err();
    (e, f.port)
}

fn assert_names(e: &NbdError, port: u16, needle: &str) {
    let s = e.to_string();
    assert!(
        s.contains(&format!("127.0.0.1:{port}")) && s.contains("export `disk`"),
        "{s}"
    );
    assert!(s.contains(needle), "expected {needle:?} in: {s}");
}

#[tokio::test]
async fn wrong_cookie() {
    let (e, p) = read_err(Arc::new(|_, r: &Request| {
        let mut b = Vec::new();
        codec::encode_simple_reply(&mut b, r.cookie + 1000, 0);
        Action::Send(b)
    }))
    .await;
    assert!(matches!(e, NbdError::Protocol { .. }));
    assert_names(&e, p, "unknown cookie");
}

#[tokio::test]
async fn overlong_chunk_length() {
    let (e, p) = read_err(Arc::new(|_, r: &Request| {
        let mut b = Vec::new();
        codec::encode_chunk_header(
            &mut b,
            r.cookie,
            chunk::FLAG_DONE,
            chunk::OFFSET_DATA,
            0xFFFF_FFF0,
        );
        Action::Send(b)
    }))
    .await;
    assert_names(&e, p, "limit");
}

#[tokio::test]
async fn chunk_outside_the_request() {
    let (e, p) = read_err(Arc::new(|_, r: &Request| {
        let mut shifted = *r;
        shifted.offset += 4096;
        Action::Send(good_read(&shifted))
    }))
    .await;
    assert_names(&e, p, "outside");
}

#[tokio::test]
async fn overlapping_chunks() {
    let (e, p) = read_err(Arc::new(|_, r: &Request| {
        let mut b = Vec::new();
        for done in [0, chunk::FLAG_DONE] {
            codec::encode_chunk_header(&mut b, r.cookie, done, chunk::OFFSET_DATA, 8 + r.length);
            b.extend_from_slice(&r.offset.to_be_bytes());
            b.extend(std::iter::repeat_n(1u8, r.length as usize));
        }
        Action::Send(b)
    }))
    .await;
    assert_names(&e, p, "overlap");
}

#[tokio::test]
async fn bad_reply_magic() {
    let (e, p) = read_err(Arc::new(|_, _: &Request| Action::Send(vec![0x12; 32]))).await;
    assert_names(&e, p, "bad reply magic");
}

#[tokio::test]
async fn truncated_frame() {
    let (e, p) = read_err(Arc::new(|_, r: &Request| {
        let mut b = good_read(r);
        b.truncate(100);
        Action::SendAndClose(b)
    }))
    .await;
    assert!(
        matches!(e, NbdError::Disconnected { .. }) && e.is_retryable(),
        "{e}"
    );
    assert_names(&e, p, "inside a reply");
}

#[tokio::test]
async fn server_error_chunk_is_reported() {
    let (e, p) = read_err(Arc::new(|_, r: &Request| {
        let msg = b"disk on fire";
        let mut b = Vec::new();
        codec::encode_chunk_header(
            &mut b,
            r.cookie,
            chunk::FLAG_DONE,
            chunk::ERROR,
            6 + msg.len() as u32,
        );
        b.extend_from_slice(&proto::errno::EIO.to_be_bytes());
        b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        b.extend_from_slice(msg);
        Action::Send(b)
    }))
    .await;
    assert!(matches!(e, NbdError::Command { errno: 5, .. }));
    assert_names(
        &e,
        p,
        "READ of 4096 bytes at offset 8192 failed: EIO (5): disk on fire",
    );
}

#[tokio::test]
async fn stalled_server_times_out() {
    let f = fake(Neg::Normal, Arc::new(|_, _: &Request| Action::Stall)).await;
    let mut c = cfg(f.port);
    c.request_timeout = Duration::from_millis(200);
    let client = NbdClient::connect(c).await.unwrap();
    let e = client.read(0, &mut [0u8; 512]).await.unwrap_err();
    assert!(matches!(e, NbdError::Timeout { .. }));
    assert_names(&e, f.port, "timed out");
}

#[tokio::test]
async fn tls_refused_and_bad_greeting() {
    let f = fake(
        Neg::RefuseStartTls,
        Arc::new(|_, r: &Request| Action::Send(good_read(r))),
    )
    .await;
    let c = cfg(f.port).with_tls_fingerprint(&"00".repeat(32)).unwrap();
    let e = NbdClient::connect(c).await.unwrap_err();
    assert!(matches!(e, NbdError::Tls { .. }));
    assert_names(&e, f.port, "refused STARTTLS");
    // nbds without any trust anchor is a configuration error, not a silent plain connection.
    let mut c = cfg(f.port);
    c.tls_required = true;
    let e = NbdClient::connect(c).await.unwrap_err();
    assert_names(&e, f.port, "no CA certificate or fingerprint");

    let f = fake(
        Neg::BadGreeting,
        Arc::new(|_, r: &Request| Action::Send(good_read(r))),
    )
    .await;
    let e = NbdClient::connect(cfg(f.port)).await.unwrap_err();
    assert_names(&e, f.port, "not an NBD server");
}

#[tokio::test]
async fn reconnects_and_resumes_reads() {
    // The first connection dies on its first request; later ones answer.
    let f = fake(
        Neg::Normal,
        Arc::new(|n, r: &Request| {
            if n == 0 {
                Action::SendAndClose(Vec::new())
            } else {
                Action::Send(good_read(r))
            }
        }),
    )
    .await;
    let mut c = cfg(f.port);
    c.retries = 2;
    let client = NbdClient::connect(c).await.unwrap();
    let mut buf = vec![0u8; 10_000];
    client.read(3, &mut buf).await.unwrap();
    assert!(
        buf.iter()
            .enumerate()
            .all(|(i, b)| *b == byte_at(3 + i as u64))
    );
}

#[tokio::test]
async fn xenserver_export_name_fallback_keeps_the_session_secret() {
    let f = fake(
        Neg::GoUnsupported,
        Arc::new(|_, r: &Request| Action::Send(good_read(r))),
    )
    .await;
    let export = "/8f1c1c2e-0000-4000-8000-000000000001?session_id=OpaqueRef:topsecret";
    let mut c = cfg(f.port);
    c.export = export.into();
    let client = NbdClient::connect(c).await.unwrap();
    assert!(!client.info().used_go);
    assert_eq!(client.size(), SIZE);
    assert_eq!(f.exports.lock().unwrap().as_slice(), &[export.to_string()]);
    let mut buf = vec![0u8; 100];
    client.read(SIZE - 100, &mut buf).await.unwrap();
    assert_eq!(buf[0], byte_at(SIZE - 100));
    let e = client.read(SIZE, &mut buf).await.unwrap_err();
    let shown = format!(
        "{e} {e:?} {client:?} {}",
        ferry_core::BlockSource::name(&client)
    );
    assert!(!shown.contains("topsecret"), "{shown}");
    assert!(shown.contains("?***"), "{shown}");
}
