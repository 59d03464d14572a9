//! Benchmark driver: reads every allocated byte of an image through ferry-image and prints one
//! JSON line `{"bytes":…,"seconds":…,"virtual":…}`. Used by `tests/bench/image.sh`.
//!
//! Usage: `[REQUEST_KIB=4096] image_read PATH [JOBS]` — JOBS tasks (default 2) read requests of
//! REQUEST_KIB KiB concurrently.

use ferry_core::BlockSource;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: image_read PATH [JOBS]")?;
    let jobs: usize = args.next().map_or(Ok(2), |j| j.parse())?;
    // Request size in KiB (default 4 MiB, the repository's chunk size).
    let request: u64 = std::env::var("REQUEST_KIB").map_or(Ok(4096), |v| v.parse())? << 10;
    let start = Instant::now();
    let img = ferry_image::open_image(&path).await?;
    let src = img.source.clone();
    let map = src.allocated(0..src.size()).await?;
    // Split the allocated extents into requests; workers take them in disk order.
    let mut reqs = Vec::new();
    for e in map.iter() {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = request.min(e.end() - pos);
            reqs.push((pos, n));
            pos += n;
        }
    }
    let reqs = Arc::new(reqs);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..jobs.max(1) {
        let (src, reqs, next) = (src.clone(), reqs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; request as usize];
            let mut sum = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(off, n)) = reqs.get(i) else { break };
                src.read_at(off, &mut buf[..n as usize]).await?;
                // Touch the data so nothing is optimized away.
                sum = sum.wrapping_add(buf[0] as u64 + buf[n as usize - 1] as u64);
            }
            Ok::<u64, ferry_core::BlockError>(sum)
        }));
    }
    let mut check = 0u64;
    for t in tasks {
        check = check.wrapping_add(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"bytes\":{},\"seconds\":{secs:.3},\"virtual\":{},\"format\":\"{}\",\"subformat\":\"{}\",\"check\":{check}}}",
        map.total_len(),
        src.size(),
        img.info.format,
        img.info.subformat
    );
    Ok(())
}
