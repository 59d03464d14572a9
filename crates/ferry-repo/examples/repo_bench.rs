//! Repository benchmark (run by `tests/bench/repo.sh` with `--release`):
//!
//! 1. chunk encode (hash + zstd + AES-256-GCM) and decode (decrypt + decompress + verify hash)
//!    throughput, MB/s of plaintext per core, on compressible (≈2.5:1) and incompressible data,
//!    at 1, 2 and 4 MiB chunks;
//! 2. end-to-end backup of a generated disk into a local-filesystem repository with 2 workers;
//! 3. chunk-size trade-off: upload amplification of small random writes vs object count.
//!
//! ```text
//! repo_bench [MIB_PER_CASE] [REPO_DIR]
//! repo_bench dump PATH MIB
//! ```

use ferry_core::Secret;
use ferry_core::vm::{ConsistencyLevel, HypervisorKind, VmConfig};
use ferry_repo::{
    ChunkCodec, InitOptions, KdfParams, Keys, Repository, SnapshotMeta, Store, VmIdentity, testdata,
};
use std::sync::Arc;
use std::time::Instant;

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn codec_case(kind: &str, chunk: usize, total: usize) {
    let codec = ChunkCodec::new(
        Arc::new(Keys::from_master([1; 32], true)),
        ferry_repo::Compression::Lz4,
        chunk as u32,
    );
    let n = (total / chunk).max(1);
    let chunks: Vec<Vec<u8>> = (0..n)
        .map(|i| match kind {
            "compressible" => testdata::compressible(i as u64, chunk),
            _ => testdata::incompressible(i as u64, chunk),
        })
        .collect();
    let t = Instant::now();
    let encoded: Vec<_> = chunks
        .iter()
        .map(|c| codec.encode(c).expect("encode"))
        .collect();
    let enc_s = t.elapsed().as_secs_f64();
    let stored: usize = encoded.iter().map(|e| e.data.len()).sum();
    let t = Instant::now();
    for e in &encoded {
        let p = codec.decode(&e.id, &e.data).expect("decode");
        assert_eq!(p.len(), chunk);
    }
    let dec_s = t.elapsed().as_secs_f64();
    let bytes = n * chunk;
    println!(
        "codec  {kind:<14} {:>2} MiB  encode {:>7.0} MB/s  decode {:>7.0} MB/s  ratio {:.2}",
        chunk >> 20,
        mbps(bytes, enc_s),
        mbps(bytes, dec_s),
        bytes as f64 / stored as f64
    );
}

async fn backup_case(dir: &std::path::Path, chunk: u32, total: usize) {
    let loc = dir.join(format!("repo-{}m", chunk >> 20));
    let _ = std::fs::remove_dir_all(&loc);
    let store = Store::open(loc.to_str().expect("utf-8 path"), true).expect("store");
    let pw = Secret::new("bench");
    let opts = InitOptions {
        chunk_size: chunk,
        kdf: KdfParams::insecure_fast(),
        ..Default::default()
    };
    let repo = Repository::init(store, Some(&pw), opts)
        .await
        .expect("init");
    let n = total / chunk as usize;
    // Generate up front: the benchmark measures the repository, not the generator.
    let data: Vec<bytes::Bytes> = (0..n as u64)
        .map(|i| testdata::compressible(i + 7, chunk as usize).into())
        .collect();
    let meta = SnapshotMeta {
        vm: VmIdentity {
            id: "bench".into(),
            name: "bench".into(),
        },
        source: "bench".into(),
        hypervisor: HypervisorKind::Generic,
        consistency: ConsistencyLevel::Unknown,
        config: VmConfig::default(),
        native_config: None,
        transport: None,
        labels: Default::default(),
    };
    let t = Instant::now();
    let w = repo.begin_backup(meta).await.expect("begin");
    let d = Arc::new(
        w.add_disk("disk0", (n * chunk as usize) as u64, None)
            .expect("disk"),
    );
    // Two workers (the box has two cores), each putting every other chunk.
    let mut tasks = Vec::new();
    for k in 0..2usize {
        let d = d.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            for i in (k..n).step_by(2) {
                d.put_chunk(i as u64, data[i].clone()).await.expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    let stats = w.stats();
    let d = Arc::try_unwrap(d).expect("sole owner");
    w.commit(vec![d]).await.expect("commit");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "backup 2 workers      {:>2} MiB  {:>7.0} MB/s  ({} MiB compressible into local FS, {} objects, {} MiB stored)",
        chunk >> 20,
        mbps(n * chunk as usize, secs),
        (n * chunk as usize) >> 20,
        stats.uploaded,
        stats.uploaded_bytes >> 20
    );
}

fn amplification() {
    // 64 GiB disk, 2,000 random 4 KiB writes (≈ 8 MiB changed, like a quiet VM's hour), and a
    // clustered variant (writes land in 64 hot 1 MiB regions, as file systems tend to do).
    let disk: u64 = 64 << 30;
    let mut rng = testdata::Rng::new(99);
    let random: Vec<u64> = (0..2000)
        .map(|_| rng.next_u64() % (disk / 4096) * 4096)
        .collect();
    let hot: Vec<u64> = (0..64)
        .map(|_| (rng.next_u64() % (disk >> 20)) << 20)
        .collect();
    let clustered: Vec<u64> = (0..2000)
        .map(|i| hot[i % 64] + (rng.next_u64() % 256) * 4096)
        .collect();
    println!("chunk-size trade-off (64 GiB disk, 2,000 × 4 KiB writes = 7.8 MiB changed):");
    println!(
        "  chunk   objects/full   random: chunks  upload MiB  amplif.   clustered: chunks  upload MiB  amplif."
    );
    for mib in [1u64, 2, 4] {
        let cs = mib << 20;
        let count = |offs: &[u64]| {
            let mut s: Vec<u64> = offs.iter().map(|o| o / cs).collect();
            s.sort_unstable();
            s.dedup();
            s.len() as u64
        };
        let (r, c) = (count(&random), count(&clustered));
        let changed = 2000.0 * 4096.0;
        println!(
            "  {mib} MiB   {:>12}   {:>14}  {:>10}  {:>6.0}×   {:>17}  {:>10}  {:>6.0}×",
            disk / cs,
            r,
            r * mib,
            (r * cs) as f64 / changed,
            c,
            c * mib,
            (c * cs) as f64 / changed
        );
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("dump") {
        // `repo_bench dump PATH MIB`: the compressible data, for the reference tools.
        let mib: usize = args[3].parse().expect("MiB");
        std::fs::write(&args[2], testdata::compressible(7, mib << 20)).expect("write sample");
        return;
    }
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let dir = std::path::PathBuf::from(
        args.get(2)
            .cloned()
            .unwrap_or_else(|| "/tmp/ferry-repo-bench".into()),
    );
    for chunk in [1usize << 20, 2 << 20, 4 << 20] {
        codec_case("compressible", chunk, mib << 20);
        codec_case("incompressible", chunk, mib << 20);
    }
    for chunk in [1u32 << 20, 2 << 20, 4 << 20] {
        backup_case(&dir, chunk, mib << 20).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    amplification();
}
