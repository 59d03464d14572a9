//! `ferry copy`: restore points from one repository into another (local → S3, S3 → Azure, …),
//! sending only the chunks the destination lacks, then applying the destination's own
//! retention. The summary goes to stderr; `--json` prints the report on stdout (ADR 0061).

use crate::cmd::repo::{RetentionArgs, open_repository, read_password};
use crate::cmd::restore::resolve_snapshot;
use anyhow::Context;
use ferry_core::size::{human_bytes, human_rate, parse_size};
use ferry_engine::copy::{CopyOptions, CopyReport};
use ferry_repo::PruneDecision;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `ferry copy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source repository: a path, file://PATH, s3://BUCKET/PREFIX or az://CONTAINER/PREFIX.
    #[arg(long = "from", env = "FERRY_REPO")]
    pub from: String,
    /// Read the source's password from this file (first line); default: FERRY_PASSWORD.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Destination repository (created beforehand with `ferry repo init`).
    #[arg(long = "to", env = "FERRY_TO_REPO")]
    pub to: String,
    /// Read the destination's password from this file (first line); default:
    /// FERRY_TO_PASSWORD.
    #[arg(long)]
    pub to_password_file: Option<PathBuf>,
    /// Restore points to copy: ids (or unique prefixes), `latest`, `VM@latest`. Default: every
    /// restore point of the source that the destination lacks.
    pub snapshots: Vec<String>,
    /// Only restore points of this VM (id or name); repeatable.
    #[arg(long)]
    pub vm: Vec<String>,
    #[command(flatten)]
    pub keep: RetentionArgs,
    /// Chunks in flight per disk.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// Cap on the bytes read from the source per second, e.g. `50M`.
    #[arg(long, value_parser = parse_rate)]
    pub limit_rate: Option<u64>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s.trim_end_matches("/s")) {
        Some(0) | None => Err(format!(
            "`{s}` is not a positive size per second (e.g. 100M)"
        )),
        Some(n) => Ok(n),
    }
}

#[derive(Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    copy: &'a CopyReport,
    /// The destination's retention plan, when rules were given.
    pruned: Option<&'a [PruneDecision]>,
}

/// Runs `ferry copy`.
pub async fn run(a: Args, global: &crate::Global) -> anyhow::Result<ExitCode> {
    let src_pw = read_password(a.password_file.as_deref(), "FERRY_PASSWORD")?;
    let dst_pw = read_password(a.to_password_file.as_deref(), "FERRY_TO_PASSWORD")?;
    let src = open_repository(&a.from, src_pw.as_ref())
        .await
        .context("copy source")?;
    let dst = open_repository(&a.to, dst_pw.as_ref())
        .await
        .context("copy destination (password from FERRY_TO_PASSWORD or --to-password-file)")?;
    if src.config().id == dst.config().id {
        anyhow::bail!("--from and --to are the same repository ({})", a.from);
    }
    let manifests = src
        .snapshots()
        .await
        .with_context(|| format!("cannot list the restore points of {}", a.from))?;
    let mut selected: Vec<String> = if a.snapshots.is_empty() {
        manifests.iter().map(|m| m.id.clone()).collect()
    } else {
        let mut ids = Vec::new();
        for spec in &a.snapshots {
            ids.push(resolve_snapshot(&src, spec).await?.id);
        }
        ids
    };
    if !a.vm.is_empty() {
        selected.retain(|id| {
            manifests.iter().any(|m| {
                &m.id == id
                    && a.vm
                        .iter()
                        .any(|v| *v == m.meta.vm.id || *v == m.meta.vm.name)
            })
        });
    }
    let report = ferry_engine::copy::copy(
        &src,
        &dst,
        &manifests,
        &selected,
        CopyOptions {
            in_flight: a.in_flight,
            limit_rate: a.limit_rate,
        },
    )
    .await
    .with_context(|| format!("copy from {} to {}", a.from, a.to))?;
    let pruned = match a.keep.policy() {
        Some(p) => Some(
            dst.prune(p, false)
                .await
                .with_context(|| format!("retention on {}", a.to))?,
        ),
        None => None,
    };
    if !global.quiet {
        eprintln!(
            "copied {} restore points ({} already present), {} boot verifications: {} chunks sent, {} skipped ({} not even read), {} zero; read {}, wrote {} in {:.1} s (read at {})",
            report.copied.len(),
            report.already_present.len(),
            report.verifications_copied,
            report.chunks_sent,
            report.chunks_skipped,
            report.chunks_not_fetched,
            report.zero_chunks,
            human_bytes(report.bytes_read),
            human_bytes(report.bytes_written),
            report.seconds,
            human_rate(report.bytes_read, report.seconds),
        );
        if let Some(plan) = &pruned {
            let removed: Vec<&str> = plan
                .iter()
                .filter(|d| !d.keep)
                .map(|d| d.id.as_str())
                .collect();
            eprintln!(
                "retention on the destination removed {} of {} restore points{}",
                removed.len(),
                plan.len(),
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({}); run `ferry gc` there to free their chunks",
                        removed.join(", ")
                    )
                }
            );
        }
    }
    if a.json {
        let out = Output {
            copy: &report,
            pruned: pruned.as_deref(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for id in &report.copied {
            println!("{id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
