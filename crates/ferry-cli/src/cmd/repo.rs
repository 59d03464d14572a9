//! Repository commands: `ferry repo init|info|add-password`, `ferry snapshots`, `ferry verify`,
//! `ferry prune`, `ferry gc`.
//!
//! The repository comes from `--repo` or `FERRY_REPO` (a path, `file://`, `s3://bucket/prefix`,
//! `az://container/prefix`; cloud credentials from the usual `AWS_*` / `AZURE_*` variables), the
//! password from `FERRY_PASSWORD` or `--password-file`.

use anyhow::{Context, bail};
use ferry_core::Secret;
use ferry_core::size::{human_bytes, parse_size};
use ferry_repo::{
    CompressionMethod, Encryption, GcOptions, InitOptions, KdfParams, Repository, Retention, Store,
    VerifyOptions,
};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Where the repository is and how to unlock it.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArgs {
    /// Repository location: a path, file://PATH, s3://BUCKET/PREFIX or az://CONTAINER/PREFIX.
    #[arg(long = "repo", env = "FERRY_REPO")]
    repo: String,
    /// Read the password from this file (first line); default: the FERRY_PASSWORD variable.
    #[arg(long)]
    password_file: Option<PathBuf>,
}

/// A password from the first line of `file`, else from the environment variable `var`.
pub(crate) fn read_password(file: Option<&Path>, var: &str) -> anyhow::Result<Option<Secret>> {
    if let Some(p) = file {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read password file {}", p.display()))?;
        let line = text.lines().next().unwrap_or("").to_string();
        return Ok(Some(Secret::new(line)));
    }
    Ok(std::env::var(var).ok().map(Secret::new))
}

/// Opens the repository at `location`, unlocking it with `password`.
pub(crate) async fn open_repository(
    location: &str,
    password: Option<&Secret>,
) -> anyhow::Result<Repository> {
    let store = Store::open(location, false)
        .with_context(|| format!("cannot open repository {location}"))?;
    Repository::open(store, password)
        .await
        .with_context(|| format!("cannot open repository {location}"))
}

impl RepoArgs {
    fn password(&self) -> anyhow::Result<Option<Secret>> {
        read_password(self.password_file.as_deref(), "FERRY_PASSWORD")
    }

    /// Opens the repository, unlocking it with the password.
    pub(crate) async fn open(&self) -> anyhow::Result<Repository> {
        open_repository(&self.repo, self.password()?.as_ref()).await
    }
}

/// `ferry repo` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a repository.
    Init(InitArgs),
    /// Show a repository's settings and contents.
    Info(InfoArgs),
    /// Add another password (key slot).
    AddPassword(AddPasswordArgs),
}

/// Arguments of `ferry repo init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Chunk size (power of two, 64K..16M).
    #[arg(long, default_value = "1M", value_parser = parse_chunk_size)]
    chunk_size: u32,
    /// Chunk compression: `lz4` (default: the fastest to back up and to restore, about 2.0:1
    /// on OS data), `zstd` (about 10 % smaller at two thirds of the speed; 20 % smaller at
    /// level 3, at a third) or `none`. Fixed for the repository's life.
    #[arg(long, value_enum)]
    compression: Option<CompressionArg>,
    /// zstd level (-7..22, default -1); implies `--compression zstd`.
    #[arg(long, allow_negative_numbers = true)]
    compression_level: Option<i32>,
    /// Store data unencrypted (anyone with access to the storage can read it).
    #[arg(long)]
    insecure_no_encryption: bool,
}

/// `--compression` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CompressionArg {
    Lz4,
    Zstd,
    None,
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    parse_size(s)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("`{s}` is not a size such as 1M or 4M"))
}

/// Arguments of `ferry repo info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `ferry repo add-password`.
#[derive(Debug, clap::Args)]
pub struct AddPasswordArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// File holding the new password (first line); default: the FERRY_NEW_PASSWORD variable.
    #[arg(long)]
    new_password_file: Option<PathBuf>,
}

/// Arguments of `ferry snapshots`.
#[derive(Debug, clap::Args)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Print JSON (the full manifests).
    #[arg(long)]
    json: bool,
}

/// Arguments of `ferry verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Only this restore point.
    snapshot: Option<String>,
    /// Re-read this percentage of the chunks (manifests and indexes are always read in full).
    #[arg(long, default_value_t = 100.0)]
    sample: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `ferry prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    keep: RetentionArgs,
    /// Show the plan, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// GFS retention rules (`ferry prune`, and `ferry copy` for its destination).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct RetentionArgs {
    /// Keep the N newest restore points of each VM.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest of each of the last N days.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// Keep the newest of each of the last N ISO weeks.
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// Keep the newest of each of the last N months.
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// Keep the newest of each of the last N years.
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
}

impl RetentionArgs {
    /// The rules; `None` when no rule is given.
    pub fn policy(&self) -> Option<Retention> {
        let p = Retention {
            last: self.keep_last,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
        };
        (p != Retention::default()).then_some(p)
    }
}

/// Arguments of `ferry gc`.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Keep unreferenced chunks younger than this (e.g. 0, 30m, 24h, 7d).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    grace: Duration,
    /// Give up if backups are still running after this long.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    wait: Duration,
    /// Report what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 30m, 24h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}`: unknown unit (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// Runs a `repo` subcommand.
pub async fn run(cmd: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Init(a) => init(a).await,
        Command::Info(a) => info(a).await,
        Command::AddPassword(a) => add_password(a).await,
    }
}

async fn init(a: InitArgs) -> anyhow::Result<ExitCode> {
    let password = a.repo.password()?;
    if !a.insecure_no_encryption && password.as_ref().is_none_or(Secret::is_empty) {
        bail!(
            "a password is required to create an encrypted repository (FERRY_PASSWORD or --password-file); or pass --insecure-no-encryption"
        );
    }
    let compression = match (a.compression, a.compression_level) {
        (Some(CompressionArg::Zstd) | None, Some(_)) | (Some(CompressionArg::Zstd), None) => {
            CompressionMethod::Zstd
        }
        (Some(CompressionArg::Lz4) | None, None) => CompressionMethod::Lz4,
        (Some(CompressionArg::None), None) => CompressionMethod::None,
        (Some(other), Some(_)) => {
            let name = clap::ValueEnum::to_possible_value(&other)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            bail!("--compression-level applies to zstd only, not to --compression {name}")
        }
    };
    let opts = InitOptions {
        chunk_size: a.chunk_size,
        compression,
        compression_level: a
            .compression_level
            .unwrap_or(ferry_repo::DEFAULT_COMPRESSION_LEVEL),
        encrypted: !a.insecure_no_encryption,
        kdf: KdfParams::default(),
    };
    let store = Store::open(&a.repo.repo, true)
        .with_context(|| format!("cannot create repository {}", a.repo.repo))?;
    let repo = Repository::init(store, password.as_ref(), opts).await?;
    println!(
        "created repository {} at {} (chunk size {}, {})",
        repo.config().id,
        a.repo.repo,
        human_bytes(u64::from(repo.config().chunk_size)),
        if a.insecure_no_encryption {
            "NOT encrypted"
        } else {
            "AES-256-GCM"
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct Info {
    location: String,
    id: String,
    created: String,
    format_version: u16,
    chunk_size: u32,
    compression: CompressionMethod,
    compression_level: i32,
    encryption: Encryption,
    key_slots: usize,
    snapshots: usize,
    chunks: usize,
    chunk_bytes: u64,
}

async fn info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let c = repo.config();
    let chunks = repo.store().list("chunks").await?;
    let info = Info {
        location: a.repo.repo.clone(),
        id: c.id.clone(),
        created: c.created.clone(),
        format_version: ferry_repo::codec::FORMAT_VERSION,
        chunk_size: c.chunk_size,
        compression: c.compression,
        compression_level: c.compression_level,
        encryption: c.encryption,
        key_slots: repo.store().list("keys").await?.len(),
        snapshots: repo.snapshot_ids().await?.len(),
        chunks: chunks.len(),
        chunk_bytes: chunks.iter().map(|o| o.size).sum(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("location:     {}", info.location);
        println!("id:           {}", info.id);
        println!("created:      {}", info.created);
        println!("format:       v{}", info.format_version);
        println!("chunk size:   {}", human_bytes(u64::from(info.chunk_size)));
        match info.compression {
            CompressionMethod::Zstd => {
                println!("compression:  zstd level {}", info.compression_level)
            }
            CompressionMethod::Lz4 => println!("compression:  lz4"),
            CompressionMethod::None => println!("compression:  none"),
        }
        println!(
            "encryption:   {}",
            match info.encryption {
                Encryption::Aes256Gcm => "AES-256-GCM",
                Encryption::None => "none",
            }
        );
        println!("key slots:    {}", info.key_slots);
        println!("snapshots:    {}", info.snapshots);
        println!(
            "chunks:       {} ({})",
            info.chunks,
            human_bytes(info.chunk_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn add_password(a: AddPasswordArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let new = match &a.new_password_file {
        Some(p) => Secret::new(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read password file {}", p.display()))?
                .lines()
                .next()
                .unwrap_or(""),
        ),
        None => Secret::new(
            std::env::var("FERRY_NEW_PASSWORD")
                .context("no new password: set FERRY_NEW_PASSWORD or pass --new-password-file")?,
        ),
    };
    let key = repo.add_password(&new, KdfParams::default()).await?;
    println!("added key slot {key}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct SnapshotRow<'a> {
    id: &'a str,
    time: &'a str,
    vm: &'a str,
    vm_name: &'a str,
    hypervisor: ferry_core::vm::HypervisorKind,
    consistency: ferry_core::vm::ConsistencyLevel,
    disks: usize,
    size: u64,
}

/// `ferry snapshots`.
pub async fn snapshots(a: SnapshotsArgs, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let ms = repo.snapshots().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ms)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<SnapshotRow> = ms
        .iter()
        .map(|m| SnapshotRow {
            id: &m.id,
            time: &m.started,
            vm: &m.meta.vm.id,
            vm_name: &m.meta.vm.name,
            hypervisor: m.meta.hypervisor,
            consistency: m.meta.consistency,
            disks: m.disks.len(),
            size: m.disks.iter().map(|d| d.size).sum(),
        })
        .collect();
    println!(
        "{:<32} {:<20} {:<24} {:<10} {:<12} {:>5} {:>10}",
        "ID", "TIME", "VM", "HYPERVISOR", "CONSISTENCY", "DISKS", "SIZE"
    );
    for r in rows {
        let hv = serde_json::to_value(r.hypervisor)?;
        let cl = serde_json::to_value(r.consistency)?;
        println!(
            "{:<32} {:<20} {:<24} {:<10} {:<12} {:>5} {:>10}",
            r.id,
            r.time,
            r.vm,
            hv.as_str().unwrap_or("?"),
            cl.as_str().unwrap_or("?"),
            r.disks,
            human_bytes(r.size)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry verify`: exit status 1 when anything is bad.
pub async fn verify(a: VerifyArgs, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    if !(0.0..=100.0).contains(&a.sample) {
        bail!("--sample must be a percentage between 0 and 100");
    }
    let repo = a.repo.open().await?;
    let report = repo
        .verify(&VerifyOptions {
            snapshot: a.snapshot.clone(),
            sample_percent: a.sample,
        })
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for b in &report.bad {
            println!("BAD {}: {}", b.key, b.error);
            if !b.snapshots.is_empty() {
                println!("    affects restore points: {}", b.snapshots.join(", "));
            }
        }
        println!(
            "{}: {} restore points, {} of {} chunks checked, {} bad objects",
            if report.ok() { "OK" } else { "FAILED" },
            report.snapshots,
            report.chunks_checked,
            report.chunks_referenced,
            report.bad.len()
        );
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `ferry prune`.
pub async fn prune(a: PruneArgs, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    // No rule: the library refuses with the message that names the flags.
    let policy = a.keep.policy().unwrap_or_default();
    let plan = repo.prune(policy, a.dry_run).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        for d in &plan {
            let action = match (d.keep, a.dry_run) {
                (true, _) => "keep",
                (false, true) => "would remove",
                (false, false) => "removed",
            };
            println!(
                "{action:<13} {} {} {} {}",
                d.id,
                d.time,
                d.vm,
                d.reasons.join(",")
            );
        }
        let removed = plan.iter().filter(|d| !d.keep).count();
        println!(
            "{} {removed} of {} restore points{}",
            if a.dry_run { "would remove" } else { "removed" },
            plan.len(),
            if a.dry_run || removed == 0 {
                ""
            } else {
                "; run `ferry gc` to free their chunks"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry gc`.
pub async fn gc(a: GcArgs, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let report = repo
        .gc(GcOptions {
            grace: a.grace,
            wait_for_backups: a.wait,
            dry_run: a.dry_run,
        })
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} {} unreferenced chunks ({}); {} live, {} kept within the grace period, {} orphan indexes, {} expired leases",
            if a.dry_run { "would delete" } else { "deleted" },
            report.deleted_chunks,
            human_bytes(report.freed_bytes),
            report.live_chunks,
            report.kept_young,
            report.orphan_indexes,
            report.expired_leases
        );
    }
    Ok(ExitCode::SUCCESS)
}
