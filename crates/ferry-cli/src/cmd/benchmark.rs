//! `ferry benchmark`: this machine's CPU ceiling for backups and restores, on a sample of a real
//! disk (`--sample`) or on generated data.

use super::backup::TlsArgs;
use anyhow::Context;
use ferry_core::size::{human_bytes, parse_size};
use ferry_engine::calibrate::{self, CalibrateOptions, Calibration};
use ferry_repo::Compression;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `ferry benchmark`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measure on data from this disk: a file or block device (raw, VHD, VHDX, VMDK) or an
    /// `nbd://`, `nbds://`, `nbd+unix://` URI. Non-zero chunks are read evenly across its
    /// allocated data. Without it: generated file-system-like data.
    #[arg(long, value_name = "SOURCE")]
    sample: Option<String>,
    /// How much sample data to read or generate (held in memory; at most 4G).
    #[arg(long, default_value = "128M", value_parser = parse_bytes)]
    sample_size: u64,
    /// Chunk size, as the repository uses it.
    #[arg(long, default_value = "1M", value_parser = parse_bytes)]
    chunk_size: u64,
    /// Chunk compression, as the repository uses it: lz4, zstd[:LEVEL] or none.
    #[arg(long, default_value = "lz4", value_parser = parse_compression)]
    compression: Compression,
    /// Measure without encryption (as `repo init --insecure-no-encryption`).
    #[arg(long)]
    no_encryption: bool,
    /// Threads for the all-core figures (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Also measure uploads to and downloads from this repository's storage (a path, file://,
    /// s3:// or az:// URL of an initialized repository). Test objects are written beside its
    /// data and deleted afterwards; no password is needed.
    #[arg(long)]
    repo: Option<String>,
    /// Storage requests in flight (as `ferry backup --in-flight`).
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size(s)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("`{s}` is not a size such as 128M or 1G"))
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    match s.split_once(':') {
        None if s == "lz4" => Ok(Compression::Lz4),
        None if s == "none" => Ok(Compression::None),
        None if s == "zstd" => Ok(Compression::Zstd(ferry_repo::DEFAULT_COMPRESSION_LEVEL)),
        Some(("zstd", l)) => l
            .parse::<i32>()
            .ok()
            .filter(|l| (-7..=22).contains(l))
            .map(Compression::Zstd)
            .ok_or_else(|| format!("`{l}` is not a zstd level (-7..22)")),
        _ => Err(format!("`{s}` is not lz4, zstd, zstd:LEVEL or none")),
    }
}

/// Measures and prints.
pub async fn run(args: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let chunk_size = u32::try_from(args.chunk_size)
        .ok()
        .filter(|c| c.is_power_of_two() && (64 << 10..=16 << 20).contains(c))
        .context("--chunk-size must be a power of two from 64K to 16M")?;
    if args.sample_size > 4 << 30 {
        anyhow::bail!("--sample-size is at most 4G: the sample is held in memory");
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        anyhow::bail!("--seconds must be a positive number");
    }
    let store = match &args.repo {
        Some(loc) => {
            let st = ferry_repo::Store::open(loc, false)
                .with_context(|| format!("cannot open repository {loc}"))?;
            // Before the CPU work, not after it.
            calibrate::ensure_repository(&st).await?;
            Some(st)
        }
        None => None,
    };
    let (sample, origin) = match &args.sample {
        Some(loc) => {
            let opened = ferry_engine::source::open(loc, &args.tls.source_options()?)
                .await
                .context("cannot open the sample") // the cause names it, without secrets
                .map_err(|e| {
                    crate::cmd::backup::with_raw_hint(e, &format!("`--sample raw:{loc}`"))
                })?;
            let s = calibrate::sample_source(&*opened.source, args.sample_size, chunk_size)
                .await
                .with_context(|| format!("cannot sample {}", opened.source.name()))?;
            (s, opened.source.name())
        }
        None => (
            calibrate::generated_sample(args.sample_size, chunk_size),
            "generated file-system-like data".to_string(),
        ),
    };
    let opts = CalibrateOptions {
        chunk_size,
        compression: args.compression,
        encrypted: !args.no_encryption,
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        }),
        min_time: Duration::from_secs_f64(args.seconds),
    };
    tracing::info!(sample = %origin, bytes = sample.iter().map(Vec::len).sum::<usize>(),
        "measuring");
    let want_objects = store.is_some();
    let (c, objects) = tokio::task::spawn_blocking(move || {
        let c = calibrate::calibrate(&sample, &opts)?;
        let objects = if want_objects {
            calibrate::sealed_objects(&sample, &opts)?
        } else {
            Vec::new()
        };
        Ok::<_, anyhow::Error>((c, objects))
    })
    .await
    .context("the benchmark thread failed")??;
    let storage = match &store {
        Some(st) => Some(
            calibrate::measure_store(
                st,
                &objects,
                args.in_flight,
                Duration::from_secs_f64(args.seconds),
            )
            .await
            .context("storage benchmark")?,
        ),
        None => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&c)?;
        v["sample"] = serde_json::Value::String(origin);
        v["storage"] = serde_json::to_value(&storage)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_human(&c, &origin);
        if let (Some(st), Some(r)) = (&store, &storage) {
            println!(
                "storage {} ({} requests in flight, {} objects): upload {} download {}",
                st.location(),
                r.in_flight,
                r.objects,
                mbs(r.upload_bytes_per_sec).trim(),
                mbs(r.download_bytes_per_sec).trim()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn mbs(bytes_per_sec: f64) -> String {
    format!("{:>8.0} MB/s", bytes_per_sec / 1e6)
}

fn print_human(c: &Calibration, origin: &str) {
    println!(
        "sample: {} of {origin} in {} chunks of {}; {} {}, ratio {:.2}:1",
        human_bytes(c.sample_bytes),
        c.sample_chunks,
        human_bytes(u64::from(c.chunk_size)),
        c.compression,
        if c.encrypted {
            "encrypted"
        } else {
            "unencrypted"
        },
        c.compression_ratio
    );
    println!("one core:");
    for r in &c.one_core {
        println!("  {:<24}{}", r.name, mbs(r.bytes_per_sec));
    }
    println!("{} threads:", c.threads);
    println!("  {:<24}{}", "backup pipeline", mbs(c.backup_all_cores));
    println!("  {:<24}{}", "restore pipeline", mbs(c.restore_all_cores));
    // What a backup admin sizes a proxy with: the CPU ceiling, before source and target I/O.
    let per_tib = |rate: f64| (1u64 << 40) as f64 / rate / 3600.0;
    println!(
        "This proxy's CPU can take new data at most at {:.0} MB/s ({:.1} h per TiB of such data) and \
         restore it at {:.0} MB/s; holes, zero and unchanged chunks cost next to nothing.",
        c.backup_all_cores / 1e6,
        per_tib(c.backup_all_cores),
        c.restore_all_cores / 1e6
    );
}
