//! Throttling is retried with backoff: an S3 endpoint that answers `503 Slow Down` or `429`
//! before accepting a PUT still gets the object stored.

use ferry_repo::{Created, Store};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A tiny HTTP/1.1 server: the first `fail` requests get the given throttling status, later
/// ones `200 OK`. Counts requests.
fn throttling_server(fail: usize, status: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let c = c.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    let reply = if n < fail {
                        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n")
                    } else {
                        "HTTP/1.1 200 OK\r\nETag: \"e1\"\r\nContent-Length: 0\r\n\r\n".to_string()
                    };
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), count)
}

fn s3_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test]
async fn throttled_put_is_retried_until_it_succeeds() {
    for status in ["503 Slow Down", "429 Too Many Requests"] {
        let (endpoint, count) = throttling_server(2, status);
        let store = Store::open_with("s3://bucket/prefix", false, &s3_env(&endpoint)).unwrap();
        assert_eq!(
            store.create("chunks/aa/x", &b"data"[..]).await.unwrap(),
            Created::Written,
            "{status}"
        );
        assert_eq!(
            count.load(Ordering::SeqCst),
            3,
            "{status}: two throttled attempts, then success"
        );
    }
}
