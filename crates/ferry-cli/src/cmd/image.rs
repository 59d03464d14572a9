//! `ferry image …`: inspect disk image files.
//!
//! `ferry image info PATH [--json]` prints the format (detected by content), virtual size,
//! allocated bytes (what the allocation tables say is present, parents included) and the
//! differencing chain. A file named like an image (`.vhdx`, …) without its signature is shown
//! as raw, with a warning.

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
    }
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
