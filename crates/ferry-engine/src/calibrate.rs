//! How fast this machine does a backup's and a restore's CPU work, on one core and on all of
//! them, for a sample of real disk data (or generated data): the proxy's CPU ceiling, the way
//! `proxmox-backup-client benchmark` and `borg benchmark cpu` size a machine. The engine
//! benchmark also uses it as the same-run floor it compares wall times with: on a 2-core box the
//! wall time of a full backup can only approach `data / all-core pipeline rate`.

use crate::error::{EngineError, Result};
use bytes::Bytes;
use ferry_core::BlockSource;
use ferry_repo::Store;
use ferry_repo::codec::{self, ChunkCodec, ChunkId, Compression, Keys};
use ferry_repo::config::CONFIG_KEY;
use futures::StreamExt;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What to measure and how long.
#[derive(Clone, Debug)]
pub struct CalibrateOptions {
    /// Chunk size (the repository's).
    pub chunk_size: u32,
    /// Chunk compression (the repository's).
    pub compression: Compression,
    /// Encrypt as an encrypted repository does.
    pub encrypted: bool,
    /// Threads for the all-core measurements.
    pub threads: usize,
    /// Minimum time per measurement.
    pub min_time: Duration,
}

/// One measured rate, in bytes of plaintext per second.
#[derive(Clone, Debug, Serialize)]
pub struct Rate {
    /// What was measured.
    pub name: &'static str,
    /// Plaintext bytes per second.
    pub bytes_per_sec: f64,
}

/// The result of [`calibrate`].
#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    /// Bytes of (non-zero) sample data.
    pub sample_bytes: u64,
    /// Chunks in the sample.
    pub sample_chunks: usize,
    /// Chunk size.
    pub chunk_size: u32,
    /// Compression measured (`lz4`, `zstd:-1`, `none`).
    pub compression: String,
    /// Whether encryption was on.
    pub encrypted: bool,
    /// Plaintext bytes per stored byte of the sample (1.0: nothing gained).
    pub compression_ratio: f64,
    /// Single-core rates of the stages, then of the whole backup and restore pipelines.
    pub one_core: Vec<Rate>,
    /// Threads used for the all-core rates.
    pub threads: usize,
    /// A new chunk's CPU work (zero check, id, compress, encrypt) on all threads.
    pub backup_all_cores: f64,
    /// A restored chunk's CPU work (authenticate, decrypt, decompress, check the id) on all
    /// threads.
    pub restore_all_cores: f64,
}

impl Calibration {
    /// A single-core rate by name.
    pub fn one_core(&self, name: &str) -> Option<f64> {
        self.one_core
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.bytes_per_sec)
    }
}

/// Reads up to `max_bytes` of non-zero chunks from `src`, spread evenly over its allocated
/// data (the start of a disk is rarely typical of the rest).
pub async fn sample_source(
    src: &dyn BlockSource,
    max_bytes: u64,
    chunk_size: u32,
) -> Result<Vec<Vec<u8>>> {
    let size = src.size();
    let grain = u64::from(chunk_size.max(1));
    let read_err = |source| EngineError::Source {
        disk: src.name(),
        source,
    };
    let allocated = src.allocated(0..size).await.map_err(read_err)?;
    let cells = allocated.cells(grain).count() as u64;
    let wanted = max_bytes.div_ceil(grain).max(1);
    let step = (cells / wanted).max(1);
    let mut out = Vec::new();
    let mut taken = 0u64;
    for cell in allocated.cells(grain).step_by(step as usize) {
        if taken >= max_bytes {
            break;
        }
        let start = cell * grain;
        let len = grain.min(size - start) as usize;
        let mut buf = vec![0u8; len];
        src.read_at(start, &mut buf).await.map_err(read_err)?;
        if !codec::is_all_zero(&buf) {
            taken += len as u64;
            out.push(buf);
        }
    }
    if out.is_empty() {
        return Err(EngineError::Usage(format!(
            "{} holds no non-zero data to measure",
            src.name()
        )));
    }
    Ok(out)
}

/// Generated sample: `bytes` of file-system-like data (about 2:1 with lz4) in chunks.
pub fn generated_sample(bytes: u64, chunk_size: u32) -> Vec<Vec<u8>> {
    let n = bytes.div_ceil(u64::from(chunk_size)).max(1);
    (0..n)
        .map(|i| ferry_repo::testdata::compressible(0xfe77_0000 + i, chunk_size as usize))
        .collect()
}

/// Measures `sample` (non-empty chunks of at most `opts.chunk_size` bytes). CPU-bound and
/// blocking: call it from a blocking thread.
pub fn calibrate(sample: &[Vec<u8>], opts: &CalibrateOptions) -> Result<Calibration> {
    if sample.is_empty() || sample.iter().any(|c| c.is_empty()) {
        return Err(EngineError::Usage("the sample holds no data".into()));
    }
    if let Some(c) = sample.iter().find(|c| c.len() > opts.chunk_size as usize) {
        return Err(EngineError::Usage(format!(
            "a sample chunk of {} bytes exceeds the chunk size {}",
            c.len(),
            opts.chunk_size
        )));
    }
    let codec = throwaway_codec(opts, opts.compression);
    let store_only = throwaway_codec(opts, Compression::None);
    let repo_err = |e| EngineError::repo("benchmark", e);
    let t = opts.min_time;

    let zeros = vec![0u8; opts.chunk_size as usize];
    let zero_check = one_core(t, std::slice::from_ref(&zeros), |c| {
        std::hint::black_box(codec::is_all_zero(c));
        Ok(())
    })?;
    let id = one_core(t, sample, |c| {
        std::hint::black_box(codec.id(c));
        Ok(())
    })?;
    let compress = one_core(t, sample, |c| {
        std::hint::black_box(codec::compress_chunk(c, opts.compression));
        Ok(())
    })?;
    let seal = one_core(t, sample, |c| {
        std::hint::black_box(
            store_only
                .encode_with_id(ChunkId([0; 32]), c)
                .map_err(repo_err)?,
        );
        Ok(())
    })?;
    let backup_one = |c: &[u8]| -> Result<()> {
        if !codec::is_all_zero(c) {
            std::hint::black_box(codec.encode(c).map_err(repo_err)?);
        }
        Ok(())
    };
    let backup = one_core(t, sample, backup_one)?;

    let encoded: Vec<_> = sample
        .iter()
        .map(|c| codec.encode(c).map_err(repo_err))
        .collect::<Result<_>>()?;
    let stored: u64 = encoded.iter().map(|e| e.data.len() as u64).sum();
    let plain: u64 = sample.iter().map(|c| c.len() as u64).sum();
    let by_index = |i: usize| &encoded[i % encoded.len()];
    let restore_one = |i: usize| -> Result<u64> {
        let e = by_index(i);
        let p = codec.decode(&e.id, &e.data).map_err(repo_err)?;
        Ok(p.len() as u64)
    };
    let restore = one_core_indexed(t, encoded.len(), restore_one)?;

    let threads = opts.threads.max(1);
    let backup_all = all_cores(t, threads, sample.len(), |i| {
        let c = &sample[i % sample.len()];
        backup_one(c).map(|()| c.len() as u64)
    })?;
    let restore_all = all_cores(t, threads, encoded.len(), restore_one)?;

    Ok(Calibration {
        sample_bytes: plain,
        sample_chunks: sample.len(),
        chunk_size: opts.chunk_size,
        compression: match opts.compression {
            Compression::None => "none".into(),
            Compression::Lz4 => "lz4".into(),
            Compression::Zstd(l) => format!("zstd:{l}"),
        },
        encrypted: opts.encrypted,
        compression_ratio: plain as f64 / stored.max(1) as f64,
        one_core: vec![
            rate("zero-chunk check", zero_check),
            rate("chunk id (BLAKE3)", id),
            rate("compress", compress),
            rate(
                if opts.encrypted {
                    "encrypt (AES-256-GCM)"
                } else {
                    "seal (BLAKE3 MAC)"
                },
                seal,
            ),
            rate("backup pipeline", backup),
            rate("restore pipeline", restore),
        ],
        threads,
        backup_all_cores: backup_all,
        restore_all_cores: restore_all,
    })
}

/// A codec under a fixed throwaway key: nothing the benchmark seals is kept.
fn throwaway_codec(opts: &CalibrateOptions, compression: Compression) -> ChunkCodec {
    let keys = Arc::new(Keys::from_master([0x5a; 32], opts.encrypted));
    ChunkCodec::new(keys, compression, opts.chunk_size)
}

/// The sealed objects of `sample` (as a backup would upload them), for [`measure_store`].
pub fn sealed_objects(sample: &[Vec<u8>], opts: &CalibrateOptions) -> Result<Vec<Bytes>> {
    let codec = throwaway_codec(opts, opts.compression);
    sample
        .iter()
        .map(|c| {
            codec
                .encode(c)
                .map(|e| e.data)
                .map_err(|e| EngineError::repo("benchmark", e))
        })
        .collect()
}

/// Upload and download rates of a repository's storage.
#[derive(Clone, Debug, Serialize)]
pub struct StoreRates {
    /// Requests in flight.
    pub in_flight: usize,
    /// Objects written (each read back at least once, then deleted).
    pub objects: u64,
    /// Object bytes written per second.
    pub upload_bytes_per_sec: f64,
    /// Object bytes read per second.
    pub download_bytes_per_sec: f64,
}

/// Fails unless `store` holds a repository: the storage benchmark writes nowhere else.
pub async fn ensure_repository(store: &Store) -> Result<()> {
    let found = store
        .head(CONFIG_KEY)
        .await
        .map_err(|e| EngineError::repo("benchmark", e))?;
    if found.is_none() {
        return Err(EngineError::Usage(format!(
            "{} is not a Ferry repository (it has no `{CONFIG_KEY}` object); the benchmark writes \
             only into repositories",
            store.location()
        )));
    }
    Ok(())
}

/// Writes `objects` (cycled) into the repository's storage for at least `min_time`, reads them
/// back (checking every byte), then deletes them all, `in_flight` requests at a time. Only
/// writes into an existing repository, under keys of its own (`benchmark-RUN-N`) that nothing
/// else reads; they are deleted even when a step fails.
pub async fn measure_store(
    store: &Store,
    objects: &[Bytes],
    in_flight: usize,
    min_time: Duration,
) -> Result<StoreRates> {
    let repo_err = |e| EngineError::repo("benchmark", e);
    if objects.is_empty() {
        return Err(EngineError::Usage("no objects to upload".into()));
    }
    ensure_repository(store).await?;
    let mut run = [0u8; 8];
    getrandom::fill(&mut run)
        .map_err(|e| EngineError::Internal(format!("no random numbers: {e}")))?;
    let run = u64::from_le_bytes(run);
    let key = move |i: u64| format!("benchmark-{run:016x}-{i}");
    let in_flight = in_flight.max(1);
    // Which objects were written, so that exactly those are deleted.
    let written = std::sync::Mutex::new(Vec::new());

    let measured = async {
        let n = objects.len() as u64;
        let object = |i: u64| &objects[(i % n) as usize];
        let up = run_workers(in_flight, n, min_time, |i| {
            let (k, data) = (key(i), object(i).clone());
            let written = &written;
            async move {
                let len = data.len() as u64;
                // Noted before the write: one cut short may still land, and deleting a
                // missing object is fine.
                written.lock().expect("written lock").push(i);
                store.create(&k, data).await.map_err(repo_err)?;
                Ok(len)
            }
        })
        .await?;
        let mut ids = written.lock().expect("written lock").clone();
        ids.sort_unstable();
        let ids = &ids;
        let down = run_workers(in_flight, ids.len() as u64, min_time, |j| {
            let i = ids[(j % ids.len() as u64) as usize];
            async move {
                let k = key(i);
                let got = store.get(&k).await.map_err(repo_err)?;
                if got != object(i) {
                    return Err(EngineError::Usage(format!(
                        "the storage at {} returned other bytes for `{k}` than were written",
                        store.location()
                    )));
                }
                Ok(got.len() as u64)
            }
        })
        .await?;
        Ok::<_, EngineError>(StoreRates {
            in_flight,
            objects: ids.len() as u64,
            upload_bytes_per_sec: up,
            download_bytes_per_sec: down,
        })
    }
    .await;

    let ids = std::mem::take(&mut *written.lock().expect("written lock"));
    let deleted: Vec<_> = futures::stream::iter(ids)
        .map(|i| async move { store.delete(&key(i)).await })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    if let Some(Err(e)) = deleted.into_iter().find(Result::is_err) {
        return Err(EngineError::Usage(format!(
            "could not delete the benchmark's objects `benchmark-{run:016x}-*` from {}: {e}; \
             delete them by hand",
            store.location()
        )));
    }
    measured
}

/// `workers` futures take indices from one counter and run `f` until `min_time` has passed and
/// at least `n` indices were taken; total bytes per second.
async fn run_workers<F, Fut>(workers: usize, n: u64, min_time: Duration, f: F) -> Result<f64>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    // A ceiling on objects, whatever the storage's speed.
    const MAX_OBJECTS: u64 = 100_000;
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let worker = || async {
        let mut bytes = 0u64;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= MAX_OBJECTS || (i >= n && start.elapsed() >= min_time) {
                return Ok::<_, EngineError>(bytes);
            }
            bytes += f(i).await?;
        }
    };
    let totals = futures::future::try_join_all((0..workers).map(|_| worker())).await?;
    Ok(totals.iter().sum::<u64>() as f64 / start.elapsed().as_secs_f64())
}

fn rate(name: &'static str, bytes_per_sec: f64) -> Rate {
    Rate {
        name,
        bytes_per_sec,
    }
}

/// Runs `f` over the chunks, round after round, for at least `min_time`; bytes per second.
fn one_core(
    min_time: Duration,
    chunks: &[Vec<u8>],
    f: impl Fn(&[u8]) -> Result<()>,
) -> Result<f64> {
    one_core_indexed(min_time, chunks.len(), |i| {
        let c = &chunks[i % chunks.len()];
        f(c).map(|()| c.len() as u64)
    })
}

/// Runs `f(0), f(1), …` (each returns the bytes it processed) for at least `min_time` and at
/// least one round of `n`; bytes per second.
fn one_core_indexed(min_time: Duration, n: usize, f: impl Fn(usize) -> Result<u64>) -> Result<f64> {
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut i = 0usize;
    while i < n.max(1) || start.elapsed() < min_time {
        bytes += f(i)?;
        i += 1;
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64())
}

/// `threads` threads take indices from one counter and run `f` until `min_time` has passed (and
/// at least `n` indices were taken); total bytes per second.
fn all_cores(
    min_time: Duration,
    threads: usize,
    n: usize,
    f: impl Fn(usize) -> Result<u64> + Sync,
) -> Result<f64> {
    let next = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        if i >= n && start.elapsed() >= min_time {
                            return Ok(());
                        }
                        bytes.fetch_add(f(i)?, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .map_err(|_| EngineError::Internal("a benchmark thread panicked".into()))?
        })
    })?;
    Ok(bytes.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::ExtentMap;
    use ferry_core::MemSource;

    fn opts(compression: Compression) -> CalibrateOptions {
        CalibrateOptions {
            chunk_size: 256 << 10,
            compression,
            encrypted: true,
            threads: 2,
            min_time: Duration::from_millis(20),
        }
    }

    #[test]
    fn compressible_data_compresses_and_rates_are_positive() {
        let sample = generated_sample(2 << 20, 256 << 10);
        let c = calibrate(&sample, &opts(Compression::Lz4)).unwrap();
        assert_eq!(c.sample_bytes, 2 << 20);
        assert_eq!(c.sample_chunks, 8);
        assert!(c.compression_ratio > 1.5, "ratio {}", c.compression_ratio);
        assert_eq!(c.one_core.len(), 6);
        for r in &c.one_core {
            assert!(
                r.bytes_per_sec.is_finite() && r.bytes_per_sec > 0.0,
                "{r:?}"
            );
        }
        assert!(c.backup_all_cores > 0.0 && c.restore_all_cores > 0.0);
        assert!(c.one_core("compress").is_some() && c.one_core("no such stage").is_none());
    }

    #[test]
    fn incompressible_data_and_no_compression_store_one_to_one() {
        let sample: Vec<_> = (0..4)
            .map(|i| ferry_repo::testdata::incompressible(i, 256 << 10))
            .collect();
        for compression in [Compression::Lz4, Compression::Zstd(-1), Compression::None] {
            let c = calibrate(&sample, &opts(compression)).unwrap();
            // Stored raw, plus the envelope (header, nonce, tag): just under 1.
            assert!(
                (0.99..=1.0).contains(&c.compression_ratio),
                "{compression:?}: ratio {}",
                c.compression_ratio
            );
        }
    }

    #[test]
    fn bad_samples_are_refused() {
        assert!(matches!(
            calibrate(&[], &opts(Compression::Lz4)),
            Err(EngineError::Usage(_))
        ));
        let big = vec![vec![1u8; 512 << 10]];
        let err = calibrate(&big, &opts(Compression::Lz4)).unwrap_err();
        assert!(err.to_string().contains("exceeds the chunk size"), "{err}");
    }

    #[tokio::test]
    async fn source_sample_spreads_over_allocated_non_zero_chunks() {
        let chunk = 64 << 10;
        let mut data = vec![0u8; 64 * chunk];
        // Chunks 10..20 and 40..50 hold data; 30 is allocated but zero.
        for i in (10..20).chain(40..50) {
            data[i * chunk..(i + 1) * chunk].fill(i as u8);
        }
        let mut alloc = ExtentMap::default();
        alloc.insert((10 * chunk) as u64..(20 * chunk) as u64);
        alloc.insert((30 * chunk) as u64..(31 * chunk) as u64);
        alloc.insert((40 * chunk) as u64..(50 * chunk) as u64);
        let src = MemSource::with_allocation("mem", data, alloc);

        let all = sample_source(&src, 1 << 30, chunk as u32).await.unwrap();
        let firsts: Vec<u8> = all.iter().map(|c| c[0]).collect();
        let want: Vec<u8> = (10..20).chain(40..50).map(|i| i as u8).collect();
        assert_eq!(
            firsts, want,
            "every non-zero allocated chunk, the zero one skipped"
        );

        // Four chunks' worth: taken from both extents, not just the first.
        let some = sample_source(&src, 4 * chunk as u64, chunk as u32)
            .await
            .unwrap();
        assert_eq!(some.len(), 4);
        assert!(
            some.iter().any(|c| c[0] >= 40),
            "{:?}",
            some.iter().map(|c| c[0]).collect::<Vec<_>>()
        );

        let empty = MemSource::with_allocation("empty", vec![0u8; 4 * chunk], ExtentMap::default());
        let err = sample_source(&empty, 1 << 20, chunk as u32)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no non-zero data"), "{err}");
    }
}
