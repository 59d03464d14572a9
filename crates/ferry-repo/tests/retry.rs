//! Throttling is retried with backoff: an S3 endpoint that answers `503 Slow Down` or `429`
//! before accepting a PUT still gets the object stored.

use axum::http::StatusCode;
use axum::response::IntoResponse;
use ferry_repo::{Created, Store};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An S3 stand-in on hyper (through `ferry-http`): the first `fail` requests get `status`,
/// later ones `200 OK` with an ETag. Counts requests. Runs until the test's runtime ends.
async fn throttling_server(fail: usize, status: StatusCode) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let app = axum::Router::new().fallback(move || {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < fail {
                status.into_response()
            } else {
                (StatusCode::OK, [("ETag", "\"e1\"")]).into_response()
            }
        }
    });
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ferry_http::Server::new(listener).run(app, stop));
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
    for status in [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let (endpoint, count) = throttling_server(2, status).await;
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
