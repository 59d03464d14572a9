//! Benchmark driver for `tests/bench/san.sh`: reads every allocated byte of a VHDX/AVHDX chain
//! either from a plain file or straight from an NTFS volume image/device (the off-host SAN
//! path), and prints `{"bytes":…,"seconds":…}`.
//!
//! Usage: `san_read file PATH` | `san_read ntfs DEVICE PATH_IN_VOLUME`

use ferry_core::BlockSource;
use std::sync::Arc;
use std::time::Instant;

const REQUEST: u64 = 4 << 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let start = Instant::now();
    let img = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["file", path] => ferry_image::open_image(path).await?,
        ["ntfs", dev, path] => {
            let dev: Arc<dyn BlockSource> = Arc::new(ferry_image::FileSource::open(dev)?);
            let vol = ferry_fs::SanVolume::open(dev, None).await?;
            let file = vol.open_file(path).await?;
            let resolver = ferry_fs::SanResolver::new(vol, "C:\\");
            ferry_image::open_source(file, &resolver).await?
        }
        _ => return Err("usage: san_read file PATH | san_read ntfs DEVICE PATH".into()),
    };
    let src = img.source;
    let map = src.allocated(0..src.size()).await?;
    // Two readers, alternating 4 MiB requests of the allocated ranges.
    let reqs: Arc<Vec<(u64, u64)>> = Arc::new(
        map.iter()
            .flat_map(|e| {
                (e.offset..e.end())
                    .step_by(REQUEST as usize)
                    .map(move |o| (o, REQUEST.min(e.end() - o)))
            })
            .collect(),
    );
    let mut tasks = Vec::new();
    for t in 0..2usize {
        let (src, reqs) = (src.clone(), reqs.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; REQUEST as usize];
            for &(o, n) in reqs.iter().skip(t).step_by(2) {
                src.read_at(o, &mut buf[..n as usize]).await?;
            }
            Ok::<(), ferry_core::BlockError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "{{\"bytes\":{},\"seconds\":{:.3}}}",
        map.total_len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
