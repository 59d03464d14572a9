//! `ferry`: the command-line face of the Ferry backup proxy.
//!
//! Data (ids, tables, JSON) goes to stdout; logs and progress go to stderr. Each subcommand lives
//! in its own module under `cmd/` and exposes `Args` (clap) plus `async fn run(args, &Global)`.

mod cmd;
mod logging;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Ferry — cross-hypervisor VM backup proxy.
///
/// Backs up VMs from Hyper-V, VMware vSphere and Citrix Hypervisor / XCP-ng (or plain disks, files
/// and NBD exports) into a deduplicated, encrypted repository on a local disk, S3 or Azure Blob,
/// and restores them anywhere.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,

    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand understands.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// Show the log on stderr: -v Ferry's info events, -vv debug, -vvv trace (by default only
    /// warnings and errors). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Errors only: no warnings, progress bars or summaries on stderr (data on stdout stays).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Log line format (stderr and --log-file): `json` for one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text, env = "FERRY_LOG_FORMAT")]
    pub log_format: logging::LogFormat,

    /// Also append the log to this file, at least Ferry's info events (more with -v), whatever
    /// the terminal shows.
    #[arg(long, global = true, env = "FERRY_LOG_FILE", value_name = "PATH")]
    pub log_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show what this build of Ferry supports (formats, transports, backends).
    Features(cmd::features::Args),
    /// Inspect disk image files (raw, VHD, VHDX, VMDK).
    #[command(subcommand)]
    Image(cmd::image::Command),
    /// Back up disks (files, images, NBD exports) into a new restore point.
    Backup(cmd::backup::Args),
    /// Restore a disk of a restore point to a file, image, block device or NBD export.
    Restore(cmd::restore::Args),
    /// Serve a restore point's disk over NBD (read-only or with a write overlay).
    Export(cmd::export::Args),
    /// Instant recovery: run a VM on a hypervisor source straight from a restore point while
    /// it is restored there; then switch it to the restored disks (`finish`) or remove it.
    #[command(subcommand)]
    InstantRecover(cmd::instant::Command),
    /// Replication: standby VMs on another source kept up to date from the source's changes,
    /// recovery points, planned / unplanned / test failover, reverse replication.
    #[command(subcommand)]
    Replica(cmd::replica::Command),
    /// File-level restore: list and copy files out of a restore point (ext4, NTFS; MBR, GPT)
    /// without restoring the disk.
    #[command(subcommand)]
    Files(cmd::files::Command),
    /// Run the main job end to end on this machine: backup, incremental, restore, check.
    Demo(cmd::demo::Args),
    /// List the VMs of a hypervisor source (ferry.toml).
    Vms(cmd::vms::Args),
    /// Run a hypervisor simulator (tests, demos).
    #[command(subcommand)]
    Sim(cmd::sim::Command),
    /// Maintain a hypervisor source: `cleanup` removes what killed backups left behind;
    /// `agent-pin` prints the certificate fingerprint the Hyper-V host agents pin.
    #[command(subcommand)]
    Source(cmd::cleanup::Command),
    /// Inspect NBD exports: negotiated info, export list, block status.
    #[command(subcommand)]
    Nbd(cmd::nbd::Command),
    /// Create and inspect backup repositories.
    #[command(subcommand)]
    Repo(cmd::repo::Command),
    /// List the restore points in a repository.
    Snapshots(cmd::repo::SnapshotsArgs),
    /// Re-read and authenticate restore points; names every bad object.
    Verify(cmd::repo::VerifyArgs),
    /// Remove restore points by retention rules (GFS).
    Prune(cmd::repo::PruneArgs),
    /// Copy restore points to another repository (only the chunks it lacks), then apply
    /// that repository's retention.
    Copy(cmd::copy::Args),
    /// Delete chunks no restore point references.
    Gc(cmd::repo::GcArgs),
    /// Run the appliance service: HTTPS REST API, users, scheduler, sessions, catalog, metrics.
    Serve(cmd::serve::Args),
    /// Measure this machine's CPU ceiling for backups and restores (hashing, compression,
    /// encryption; one core and all), on a sample of a disk or on generated data.
    Benchmark(cmd::benchmark::Args),
}

/// Keeps freed buffers mapped. Backups and restores cycle megabyte-sized chunk and object
/// buffers through every thread; with glibc's adaptive thresholds the allocator kept returning
/// them to the kernel and faulting fresh zeroed pages back in: 40–90 thousand page faults per
/// W16 backup, 13 thousand with these settings, at the same peak RSS (the wall time difference
/// was within this machine's noise).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists, and a refused setting just leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// An error and its causes on one line, like `{:#}`, but leaving out a cause whose text the
/// line already holds: many library errors (object_store's HTTP errors among them) repeat
/// their source in their own message, which `{:#}` then printed again and again.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim_end_matches([' ', ':']);
        if text.is_empty() || line.contains(text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if let Err(err) = logging::init(
        cli.global.verbose,
        cli.global.quiet,
        cli.global.log_format,
        cli.global.log_file.as_deref(),
    ) {
        eprintln!("error: {err:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Features(args) => cmd::features::run(args, &cli.global).await,
            Command::Image(c) => cmd::image::run(c, &cli.global).await,
            Command::Backup(a) => cmd::backup::run(a, &cli.global).await,
            Command::Restore(a) => cmd::restore::run(a, &cli.global).await,
            Command::Export(a) => cmd::export::run(a, &cli.global).await,
            Command::InstantRecover(c) => cmd::instant::run(c, &cli.global).await,
            Command::Replica(c) => cmd::replica::run(c, &cli.global).await,
            Command::Files(c) => cmd::files::run(c, &cli.global).await,
            Command::Demo(a) => cmd::demo::run(a, &cli.global).await,
            Command::Vms(a) => cmd::vms::run(a, &cli.global).await,
            Command::Sim(c) => cmd::sim::run(c, &cli.global).await,
            Command::Source(c) => cmd::cleanup::run(c, &cli.global).await,
            Command::Nbd(c) => cmd::nbd::run(c, &cli.global).await,
            Command::Repo(c) => cmd::repo::run(c, &cli.global).await,
            Command::Snapshots(a) => cmd::repo::snapshots(a, &cli.global).await,
            Command::Verify(a) => cmd::repo::verify(a, &cli.global).await,
            Command::Prune(a) => cmd::repo::prune(a, &cli.global).await,
            Command::Copy(a) => cmd::copy::run(a, &cli.global).await,
            Command::Gc(a) => cmd::repo::gc(a, &cli.global).await,
            Command::Benchmark(a) => cmd::benchmark::run(a, &cli.global).await,
            Command::Serve(a) => cmd::serve::run(a, &cli.global).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::debug!(error = ?err, "command failed");
            eprintln!("error: {}", error_text(&err));
            ExitCode::FAILURE
        }
    }
}
