//! `ferry image …`: inspect disk image files.
//!
//! `ferry image info PATH [--json]` prints the format (detected by content), virtual size,
//! allocated bytes (what the allocation tables say is present, parents included) and the
//! differencing chain. A file named like an image (`.vhdx`, …) without its signature is shown
//! as raw, with a warning.
//!
//! `ferry image convert SRC DST --format F [--uuid U]` copies a disk (any format Ferry reads) into
//! a new image with Ferry's writers, allocated data only. `--uuid` and `SOURCE_DATE_EPOCH` make the
//! output reproducible (fixed identity fields and time stamps; ADR 0122).

use anyhow::Context;
use ferry_core::size::human_bytes;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;

/// `ferry image` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show an image's format, virtual size, allocated bytes and parent chain.
    Info(InfoArgs),
    /// Convert a disk image (raw, VHD, VHDX, VMDK) into another format with Ferry's writers.
    Convert(ConvertArgs),
}

/// Arguments of `ferry image convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// The source image (format detected by content).
    src: PathBuf,
    /// The image to write (replaced atomically when complete).
    dst: PathBuf,
    /// Output format: raw, vhd (dynamic), vhd-fixed, vhdx, vmdk (monolithicSparse), vmdk-stream
    /// (streamOptimized, for OVA).
    #[arg(long)]
    format: String,
    /// Block (VHD/VHDX) or grain (VMDK) size in bytes; the format's default if absent.
    #[arg(long)]
    block_size: Option<u64>,
    /// Derive the image's identity fields (VHD unique id, VHDX GUIDs, VMDK CID) from this UUID
    /// instead of random ones; with SOURCE_DATE_EPOCH set, the output is reproducible.
    #[arg(long, value_name = "UUID")]
    uuid: Option<String>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Converted {
    file: String,
    format: String,
    virtual_size: u64,
    data_bytes: u64,
}

/// Arguments of `ferry image info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The image file (raw, VHD, VHDX, VMDK descriptor or extent, AVHDX).
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Layer {
    file: String,
    format: ferry_image::Format,
    subformat: String,
    virtual_size: u64,
    block_size: u64,
    files: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Info {
    file: String,
    format: ferry_image::Format,
    subformat: String,
    virtual_size: u64,
    allocated_bytes: u64,
    block_size: u64,
    /// This image first, its base last.
    chain: Vec<Layer>,
}

/// Runs an `image` subcommand.
pub async fn run(cmd: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Info(args) => info(args).await,
        Command::Convert(args) => convert(args).await,
    }
}

/// Parses `8-4-4-4-12` (or 32 bare) hex digits.
fn parse_uuid(s: &str) -> anyhow::Result<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let bad = || {
        anyhow::anyhow!(
            "`{s}` is not a UUID (32 hex digits, e.g. 1b4e28ba-2fa1-11d2-883f-0016d3cca427)"
        )
    };
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// `SOURCE_DATE_EPOCH` (reproducible-builds.org), if set.
fn source_date_epoch() -> anyhow::Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => v.trim().parse().map(Some).map_err(|_| {
            anyhow::anyhow!("SOURCE_DATE_EPOCH must be seconds since 1970, not `{v}`")
        }),
        _ => Ok(None),
    }
}

/// Pieces read from the source at once (and handed to the writer).
const CONVERT_PIECE: u64 = 4 << 20;

async fn convert(a: ConvertArgs) -> anyhow::Result<ExitCode> {
    let format: ferry_image::OutputFormat = a.format.parse().map_err(anyhow::Error::msg)?;
    let fixed = ferry_image::Reproducible {
        id_seed: a.uuid.as_deref().map(parse_uuid).transpose()?,
        unix_time: source_date_epoch()?,
    };
    if a.src == a.dst {
        anyhow::bail!(
            "source and destination are the same file: {}",
            a.src.display()
        );
    }
    let img = ferry_image::open_image(&a.src)
        .await
        .with_context(|| format!("cannot open image {}", a.src.display()))?;
    let src = img.source;
    let size = src.size();
    let opts = ferry_image::WriterOptions {
        block_size: a.block_size,
        parent: None,
    };
    let writer = ferry_image::ImageWriter::create_with(&a.dst, format, size, &opts)
        .with_context(|| format!("cannot create {}", a.dst.display()))?
        .reproducible(fixed);
    let map = src
        .allocated(0..size)
        .await
        .with_context(|| format!("cannot map the allocation of {}", a.src.display()))?;
    // Reads here, writes on a blocking thread: the writer is synchronous.
    // `None` ends a complete feed; a closed channel without it means the source failed, and the
    // writer is dropped unfinished (which removes its temporary file): nothing half-written.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<(u64, Vec<u8>)>>(4);
    let sink = tokio::task::spawn_blocking(move || {
        let mut w = writer;
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Some((off, data)) => w.write(off, &data)?,
                None => return w.finish().map(Some),
            }
        }
        Ok(None)
    });
    let mut data_bytes = 0u64;
    let feed = async {
        for e in map.iter() {
            let mut off = e.offset;
            let end = e.offset + e.length;
            while off < end {
                let n = (end - off).min(CONVERT_PIECE);
                let mut buf = vec![0u8; n as usize];
                src.read_at(off, &mut buf)
                    .await
                    .with_context(|| format!("cannot read {} at offset {off}", a.src.display()))?;
                if tx.send(Some((off, buf))).await.is_err() {
                    // The writer stopped: its error is reported below.
                    return Ok(());
                }
                data_bytes += n;
                off += n;
            }
        }
        // The writer may have stopped already: its error is reported below.
        let _ = tx.send(None).await;
        Ok::<_, anyhow::Error>(())
    };
    let fed = feed.await;
    drop(tx);
    let written = sink
        .await
        .context("image writer task failed")?
        .with_context(|| format!("cannot write {}", a.dst.display()))?;
    fed?;
    let written = written.ok_or_else(|| anyhow::anyhow!("the image writer stopped early"))?;
    let out = Converted {
        file: written.display().to_string(),
        format: format.to_string(),
        virtual_size: size,
        data_bytes,
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", out.file);
        eprintln!(
            "{} ({}): {} virtual, {} of data",
            out.file,
            out.format,
            human_bytes(size),
            human_bytes(data_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let img = match ferry_image::open_image(&args.path).await {
        Err(e @ ferry_image::ImageError::NotTheNamedFormat { .. }) => {
            // Showing what the file is (plain bytes) helps more than refusing; the warning
            // says why a backup refuses it.
            tracing::warn!(
                "{e}; showing it as raw (a backup refuses it unless forced with `--format raw` or a `raw:` prefix)"
            );
            let raw = ferry_image::OpenOptions {
                format: Some(ferry_image::Format::Raw),
                direct_io: false,
            };
            ferry_image::open_image_with(&args.path, &raw).await
        }
        other => other,
    }
    .with_context(|| format!("cannot open image {}", args.path.display()))?;
    let size = img.source.size();
    let allocated = img
        .source
        .allocated(0..size)
        .await
        .with_context(|| format!("cannot map the allocation of {}", args.path.display()))?
        .total_len();
    let chain: Vec<Layer> = img
        .info
        .chain()
        .into_iter()
        .map(|i| Layer {
            file: i.file.clone(),
            format: i.format,
            subformat: i.subformat.clone(),
            virtual_size: i.virtual_size,
            block_size: i.block_size,
            files: i.files.clone(),
        })
        .collect();
    let out = Info {
        file: img.info.file.clone(),
        format: img.info.format,
        subformat: img.info.subformat.clone(),
        virtual_size: size,
        allocated_bytes: allocated,
        block_size: img.info.block_size,
        chain,
    };
    tracing::debug!(file = %out.file, format = %out.format, "image inspected");
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("file:         {}", out.file);
    println!("format:       {} ({})", out.format, out.subformat);
    println!(
        "virtual size: {} ({} bytes)",
        human_bytes(out.virtual_size),
        out.virtual_size
    );
    println!(
        "allocated:    {} ({} bytes)",
        human_bytes(out.allocated_bytes),
        out.allocated_bytes
    );
    if out.block_size > 0 {
        println!("block size:   {}", human_bytes(out.block_size));
    }
    if out.chain.len() > 1 {
        println!("chain:");
        for (depth, l) in out.chain.iter().enumerate() {
            println!("  {depth}: {} ({} {})", l.file, l.format, l.subformat);
        }
    }
    for l in &out.chain {
        if l.files.len() > 1 || l.files.first() != Some(&l.file) {
            println!("extents of {}:", l.file);
            for f in &l.files {
                println!("  {f}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
