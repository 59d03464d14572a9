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
    CompressionMethod, Encryption, GcOptions, Immutability, InitOptions, KdfParams, LockMode,
    Repository, Retention, Store, VerifyOptions,
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
    /// Boxed: every command embeds these arguments, and their enums stay small.
    #[command(flatten)]
    unlock: Box<UnlockArgs>,
}

/// How to unlock the repository: password file, AWS KMS options.
#[derive(Debug, Clone, clap::Args)]
struct UnlockArgs {
    /// Read the password from this file (first line); default: the FERRY_PASSWORD variable.
    #[arg(long)]
    password_file: Option<PathBuf>,
    #[command(flatten)]
    kms: crate::cmd::repo_key::KmsArgs,
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
    /// The location as given.
    pub(crate) fn location(&self) -> &str {
        &self.repo
    }

    pub(crate) fn password(&self) -> anyhow::Result<Option<Secret>> {
        read_password(self.unlock.password_file.as_deref(), "FERRY_PASSWORD")
    }

    /// The `--kms` options.
    pub(crate) fn kms(&self) -> &crate::cmd::repo_key::KmsArgs {
        &self.unlock.kms
    }

    /// Opens the repository, unlocking it with the password, else (or with `--kms`) with a KMS
    /// key slot.
    pub(crate) async fn open(&self) -> anyhow::Result<Repository> {
        let store = Store::open(&self.repo, false)
            .with_context(|| format!("cannot open repository {}", self.repo))?;
        Repository::open_with(store, &self.kms().unlock(self.password()?))
            .await
            .with_context(|| format!("cannot open repository {}", self.repo))
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
    /// Key slots: list, add (password or AWS KMS key), remove.
    #[command(subcommand)]
    Key(crate::cmd::repo_key::KeyCommand),
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
    /// Make every restore point undeletable for N days: with S3 Object Lock (the bucket must
    /// have Object Lock enabled) or, for a local directory, with the inode immutable flag
    /// (`chattr +i`; needs ext4/XFS/btrfs and CAP_LINUX_IMMUTABLE). Prune and GC then delete
    /// only what is past its retention.
    #[arg(long, value_name = "N")]
    immutable_days: Option<u64>,
    /// Object Lock mode: `compliance` (default: nobody can delete early, not even the
    /// account's root) or `governance` (users allowed to bypass governance retention can).
    #[arg(long, value_enum)]
    lock_mode: Option<LockModeArg>,
    /// Retention generation in days (default 10): retain-until dates are rounded up to
    /// generations plus one generation of lead, so a reused chunk's retention is extended at
    /// most once per generation.
    #[arg(long, value_name = "N")]
    generation_days: Option<u64>,
    /// Retention in seconds instead of days (tests).
    #[arg(long, hide = true, conflicts_with = "immutable_days")]
    immutable_seconds: Option<u64>,
    /// Generation in seconds instead of days (tests).
    #[arg(long, hide = true, conflicts_with = "generation_days")]
    generation_seconds: Option<u64>,
}

/// `--lock-mode` values.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LockModeArg {
    Governance,
    Compliance,
}

impl InitArgs {
    /// The immutability settings the flags ask for.
    fn immutability(&self) -> anyhow::Result<Option<Immutability>> {
        let retention = match (self.immutable_days, self.immutable_seconds) {
            (Some(d), _) => d.checked_mul(86_400),
            (None, Some(s)) => Some(s),
            (None, None) => {
                if self.lock_mode.is_some()
                    || self.generation_days.is_some()
                    || self.generation_seconds.is_some()
                {
                    bail!("--lock-mode and --generation-days need --immutable-days");
                }
                return Ok(None);
            }
        };
        let Some(retention_secs) = retention.filter(|r| *r > 0) else {
            bail!("--immutable-days must be at least 1");
        };
        let generation_secs = match (self.generation_days, self.generation_seconds) {
            (Some(d), _) => d.saturating_mul(86_400),
            (None, Some(s)) => s,
            (None, None) => ferry_repo::immutable::DEFAULT_GENERATION_SECS,
        };
        if generation_secs == 0 {
            bail!("--generation-days must be at least 1");
        }
        Ok(Some(Immutability {
            mode: match self.lock_mode {
                Some(LockModeArg::Governance) => LockMode::Governance,
                Some(LockModeArg::Compliance) | None => LockMode::Compliance,
            },
            retention_secs,
            generation_secs,
        }))
    }
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
    /// Boot verification instead: boot this restore point (an id, a unique prefix, `latest`,
    /// `VM@latest`) in qemu under TCG from an NBD export with a write overlay (the repository
    /// never changes), wait for the heartbeat on the serial console, take a screenshot, and
    /// attach the result to the restore point.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with = "snapshot")]
    boot: Option<String>,
    /// Disk to boot; may be omitted when the restore point has one disk.
    #[arg(long, requires = "boot")]
    disk: Option<String>,
    /// Verdict `failed` when no heartbeat appeared after this long (e.g. 90s, 5m).
    #[arg(long, requires = "boot", default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Regular expression the serial console must show (default: a login prompt).
    #[arg(long, requires = "boot", default_value = ferry_engine::boot::DEFAULT_HEARTBEAT)]
    heartbeat: String,
    /// Guest memory in MiB.
    #[arg(long, requires = "boot", default_value_t = 512)]
    memory: u32,
    /// Also write the screenshot (PNG) to this file.
    #[arg(long, requires = "boot")]
    screenshot: Option<PathBuf>,
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

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    ferry_daemon::replicas::parse_duration(s)
}

/// Runs a `repo` subcommand.
pub async fn run(cmd: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Init(a) => init(a).await,
        Command::Info(a) => info(a).await,
        Command::AddPassword(a) => add_password(a).await,
        Command::Key(c) => crate::cmd::repo_key::run(c).await,
    }
}

async fn init(a: InitArgs) -> anyhow::Result<ExitCode> {
    let password = a.repo.password()?;
    let kms = a.repo.kms().new_slot_key()?;
    if kms.is_some() && a.insecure_no_encryption {
        bail!(
            "--kms wraps the key of an encrypted repository; it does not go with --insecure-no-encryption"
        );
    }
    if !a.insecure_no_encryption && kms.is_none() && password.as_ref().is_none_or(Secret::is_empty)
    {
        bail!(
            "a password is required to create an encrypted repository (FERRY_PASSWORD or --password-file), or an AWS KMS key (--kms KEYID); or pass --insecure-no-encryption"
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
        immutability: a.immutability()?,
    };
    let store = Store::open(&a.repo.repo, true)
        .with_context(|| format!("cannot create repository {}", a.repo.repo))?;
    if opts.immutability.is_some() && a.lock_mode.is_some() && store.local_lock().is_some() {
        bail!(
            "--lock-mode applies to S3 Object Lock only: a hardened local repository's inode flag \
             has a single mode (only a process with CAP_LINUX_IMMUTABLE can clear it)"
        );
    }
    let repo = match &kms {
        Some(k) => Repository::init_kms(store, password.as_ref(), k, opts).await?,
        None => Repository::init(store, password.as_ref(), opts).await?,
    };
    println!(
        "created repository {} at {} (chunk size {}, {}{}{})",
        repo.config().id,
        a.repo.repo,
        human_bytes(u64::from(repo.config().chunk_size)),
        if a.insecure_no_encryption {
            "NOT encrypted"
        } else {
            "AES-256-GCM"
        },
        repo.config()
            .immutability
            .map(|i| format!(
                ", immutable: {}",
                describe_immutability(&i, repo.store().local_lock().is_some())
            ))
            .unwrap_or_default(),
        kms.as_ref()
            .map(|k| format!(", key wrapped by AWS KMS key {}", k.key_id))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// `S3 Object Lock compliance, 30 days (generation 10 days)`, or for a hardened local
/// repository `inode immutable flag (chattr +i), 30 days (generation 10 days)`.
fn describe_immutability(i: &Immutability, local: bool) -> String {
    let span = |s: u64| {
        if s % 86_400 == 0 {
            format!("{} days", s / 86_400)
        } else {
            format!("{s} s")
        }
    };
    let how = match i.mode {
        _ if local => "inode immutable flag (chattr +i)",
        LockMode::Governance => "S3 Object Lock governance",
        LockMode::Compliance => "S3 Object Lock compliance",
    };
    format!(
        "{how}, {} (generation {})",
        span(i.retention_secs),
        span(i.generation_secs)
    )
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
    /// AWS KMS keys that wrap a slot (ADR 0182).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    kms_keys: Vec<String>,
    snapshots: usize,
    chunks: usize,
    chunk_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    immutability: Option<Immutability>,
    /// What enforces it: `s3-object-lock` or `inode-flag` (hardened local repository).
    #[serde(skip_serializing_if = "Option::is_none")]
    immutable_by: Option<&'static str>,
}

async fn info(a: InfoArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let c = repo.config();
    let chunks = repo.store().list("chunks").await?;
    let slots = repo.key_slots().await?;
    let info = Info {
        location: a.repo.repo.clone(),
        id: c.id.clone(),
        created: c.created.clone(),
        format_version: ferry_repo::codec::FORMAT_VERSION,
        chunk_size: c.chunk_size,
        compression: c.compression,
        compression_level: c.compression_level,
        encryption: c.encryption,
        key_slots: slots.len(),
        kms_keys: slots.iter().filter_map(|s| s.kms_key_id.clone()).collect(),
        snapshots: repo.snapshot_ids().await?.len(),
        chunks: chunks.len(),
        chunk_bytes: chunks.iter().map(|o| o.size).sum(),
        immutability: c.immutability,
        immutable_by: c.immutability.map(|_| {
            if repo.store().local_lock().is_some() {
                "inode-flag"
            } else {
                "s3-object-lock"
            }
        }),
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
        if let Some(i) = &info.immutability {
            println!(
                "immutable:    {}",
                describe_immutability(i, repo.store().local_lock().is_some())
            );
        }
        println!("key slots:    {}", info.key_slots);
        if !info.kms_keys.is_empty() {
            println!("AWS KMS keys: {}", info.kms_keys.join(", "));
        }
        println!("snapshots:    {}", info.snapshots);
        println!(
            "chunks:       {} ({})",
            info.chunks,
            human_bytes(info.chunk_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The new password of `repo add-password` / `repo key add`.
pub(crate) fn read_new_password(file: Option<&Path>) -> anyhow::Result<Secret> {
    Ok(match file {
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
    })
}

async fn add_password(a: AddPasswordArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let new = read_new_password(a.new_password_file.as_deref())?;
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
    let boots = repo.latest_boot_verifications().await?;
    if a.json {
        let mut list = Vec::with_capacity(ms.len());
        for m in &ms {
            let mut v = serde_json::to_value(m)?;
            if let Some(b) = boots.get(&m.id) {
                let mut bv = serde_json::to_value(b)?;
                bv["key"] = serde_json::Value::String(b.key.clone());
                v["boot-verification"] = bv;
            }
            list.push(v);
        }
        println!("{}", serde_json::to_string_pretty(&list)?);
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
        "{:<32} {:<20} {:<24} {:<10} {:<12} {:>5} {:>10}  BOOT",
        "ID", "TIME", "VM", "HYPERVISOR", "CONSISTENCY", "DISKS", "SIZE"
    );
    for r in rows {
        let hv = serde_json::to_value(r.hypervisor)?;
        let cl = serde_json::to_value(r.consistency)?;
        let boot = match boots.get(r.id) {
            Some(b) => match (b.result, b.seconds_to_heartbeat) {
                (ferry_repo::BootResult::Ok, Some(s)) => format!("ok ({s:.0} s)"),
                (ferry_repo::BootResult::Ok, None) => "ok".into(),
                (ferry_repo::BootResult::Failed, _) => "failed".into(),
            },
            None => "-".into(),
        };
        println!(
            "{:<32} {:<20} {:<24} {:<10} {:<12} {:>5} {:>10}  {boot}",
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
    if a.boot.is_some() {
        return verify_boot(a).await;
    }
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
        if let Some(n) = report.sealed.filter(|n| *n > 0) {
            println!("sealed {n} data objects that lacked the immutable flag (left by a crash)");
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

/// `ferry verify --boot SNAPSHOT`.
async fn verify_boot(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let spec = a.boot.clone().unwrap_or_default();
    let repo = a.repo.open().await?;
    let manifest = crate::cmd::restore::resolve_snapshot(&repo, &spec).await?;
    let disk = match (&a.disk, manifest.disks.as_slice()) {
        (Some(d), disks) if disks.iter().any(|x| &x.name == d) => d.clone(),
        (Some(d), _) => bail!("restore point {} has no disk `{d}`", manifest.id),
        (None, [one]) => one.name.clone(),
        (None, _) => bail!(
            "restore point {} has {} disks: pass --disk",
            manifest.id,
            manifest.disks.len()
        ),
    };
    let opts = ferry_engine::boot::BootOptions {
        timeout: a.timeout,
        heartbeat: a.heartbeat.clone(),
        memory_mib: a.memory,
        ..Default::default()
    };
    if !a.json && !crate::logging::quiet() {
        eprintln!(
            "booting disk {disk} of restore point {} in qemu (TCG), waiting up to {} s for `{}`…",
            manifest.id,
            a.timeout.as_secs(),
            a.heartbeat
        );
    }
    let started = ferry_repo::time::now_rfc3339();
    let outcome = ferry_engine::boot::verify_boot(&repo, &manifest.id, &disk, &opts).await?;
    let record = ferry_repo::BootVerification {
        version: ferry_repo::verification::VERIFICATION_VERSION,
        snapshot: manifest.id.clone(),
        disk: disk.clone(),
        started,
        result: if outcome.ok {
            ferry_repo::BootResult::Ok
        } else {
            ferry_repo::BootResult::Failed
        },
        seconds_to_heartbeat: outcome.seconds_to_heartbeat,
        seconds: outcome.seconds,
        reason: outcome.reason.clone(),
        heartbeat: a.heartbeat.clone(),
        timeout_secs: a.timeout.as_secs(),
        emulator: outcome.emulator.clone(),
        console_tail: outcome.console_tail.clone(),
        screenshot: None,
        key: String::new(),
    };
    let record = repo
        .attach_boot_verification(record, outcome.screenshot.as_deref())
        .await?;
    if let (Some(path), Some(png)) = (&a.screenshot, &outcome.screenshot) {
        std::fs::write(path, png)
            .with_context(|| format!("cannot write the screenshot to {}", path.display()))?;
    }
    if a.json {
        let mut v = serde_json::to_value(&record)?;
        v["key"] = serde_json::Value::String(record.key.clone());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: restore point {} disk {} {}",
            if outcome.ok { "OK" } else { "FAILED" },
            record.snapshot,
            record.disk,
            match record.seconds_to_heartbeat {
                Some(s) => format!("booted, heartbeat after {s:.1} s"),
                None => "did not boot".into(),
            }
        );
        println!("  {}", record.reason);
        println!("  emulator: {}", record.emulator);
        match (&record.screenshot, &a.screenshot) {
            (Some(k), Some(p)) => println!("  screenshot: {k} (saved to {})", p.display()),
            (Some(k), None) => println!("  screenshot: {k}"),
            (None, _) => println!("  screenshot: none (qemu could not take one)"),
        }
        if !outcome.ok {
            let tail: Vec<&str> = record.console_tail.lines().rev().take(5).collect();
            if !tail.is_empty() {
                println!("  serial console (last lines):");
                for l in tail.into_iter().rev() {
                    println!("    {l}");
                }
            }
        }
    }
    Ok(if outcome.ok {
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
        let locked: Vec<&str> = plan
            .iter()
            .filter_map(|d| d.locked_until.as_deref())
            .collect();
        if let Some(first) = locked.iter().min() {
            println!(
                "kept {} restore points under retention (immutable; the earliest expires {first})",
                locked.len()
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
        let k = &report.kept_locked;
        if k.count > 0 {
            println!(
                "kept {} objects ({}) still under retention{}{}",
                k.count,
                human_bytes(k.bytes),
                k.earliest_expiry
                    .as_deref()
                    .map(|e| format!("; the earliest expires {e}"))
                    .unwrap_or_default(),
                if k.refused_by_store > 0 {
                    format!("; {} refused by the store", k.refused_by_store)
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
