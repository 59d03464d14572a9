//! Reads a whole NBD export as fast as the client can and prints one JSON line.
//! Used by `tests/bench/nbd.sh`; not a test.
//!
//! `nbd_read_bench URI [CONNECTIONS] [IN_FLIGHT_PER_CONN] [REQUEST_BYTES] [LIMIT_BYTES]`

use ferry_nbd::{NbdClient, NbdConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let uri = args
        .get(1)
        .expect("usage: nbd_read_bench URI [CONNS] [IN_FLIGHT] [REQUEST]");
    let arg = |i: usize, d: u64| {
        args.get(i)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("number"))
            .unwrap_or(d)
    };
    let mut cfg = NbdConfig::from_uri(uri).expect("URI");
    cfg.connections = arg(2, 4) as usize;
    cfg.max_in_flight = arg(3, 16) as usize;
    cfg.max_request = arg(4, 256 << 10) as u32;
    cfg.meta_contexts.clear();
    let client = Arc::new(NbdClient::connect(cfg.clone()).await.expect("connect"));
    let size = client.size().min(arg(5, u64::MAX));
    let step = u64::from(cfg.max_request).min(u64::from(client.info().block_max));
    let next = Arc::new(AtomicU64::new(0));
    let workers = client.connections() * cfg.max_in_flight;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (c, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; step as usize];
            let mut sum = 0u64;
            loop {
                let o = next.fetch_add(step, Ordering::Relaxed);
                if o >= size {
                    return sum;
                }
                let n = step.min(size - o) as usize;
                c.read(o, &mut buf[..n]).await.expect("read");
                // Touch the data so the copy cannot be elided.
                sum = sum.wrapping_add(u64::from(buf[0]) + u64::from(buf[n - 1]));
            }
        }));
    }
    let mut check = 0u64;
    for t in tasks {
        check = check.wrapping_add(t.await.expect("worker"));
    }
    let secs = start.elapsed().as_secs_f64();
    client.close().await;
    println!(
        "{{\"bytes\":{size},\"seconds\":{secs:.4},\"mb_per_s\":{:.1},\"connections\":{},\"in_flight\":{},\"request\":{step},\"check\":{check}}}",
        size as f64 / secs / 1e6,
        client.connections(),
        cfg.max_in_flight
    );
}
