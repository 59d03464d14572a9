//! `ferry backup`: disks (files, block devices, image files, NBD exports) into a new restore
//! point. Prints the restore point id on stdout (or the full report with `--json`); the summary
//! and a progress bar (on a terminal) go to stderr. Ctrl-C stops cleanly: no restore point
//! becomes visible.

use crate::cmd::hvbackup::{VmBackupOptions, backup_vm, find_vm};
use crate::cmd::repo::RepoArgs;
use crate::cmd::source::SourceArgs;
use anyhow::{Context, bail};
use ferry_core::size::{human_bytes, human_rate, parse_size};
use ferry_core::vm::{ConsistencyLevel, DiskConfig, HypervisorKind, VmConfig};
use ferry_engine::source::{self, SourceOptions};
use ferry_engine::{BackupDisk, BackupOptions, BackupReport, EngineError, Progress};
use ferry_repo::{SnapshotMeta, VmIdentity};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Exit code of a command stopped by Ctrl-C.
pub const EXIT_CANCELLED: u8 = 130;

/// TLS trust for `nbds://` sources and targets.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) that signed the NBD server's certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// SHA-256 fingerprint of the NBD server's certificate (`sha256:AB:CD:…`).
    #[arg(long)]
    pub tls_fingerprint: Option<String>,
}

impl TlsArgs {
    /// Source options with this TLS trust.
    pub fn source_options(&self) -> anyhow::Result<SourceOptions> {
        let tls_ca_pem = match &self.tls_ca {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read CA certificate {}", p.display()))?,
            ),
            None => None,
        };
        Ok(SourceOptions {
            tls_ca_pem,
            tls_fingerprint: self.tls_fingerprint.clone(),
            bitmap: None,
            format: None,
        })
    }
}

/// Arguments of `ferry backup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// With --disk: the VM these disks belong to (restore points of one VM form its chain).
    /// With --source: a VM of that source (name or id); repeat for more VMs, one restore
    /// point each.
    #[arg(long, required = true)]
    pub vm: Vec<String>,
    /// A disk: `[NAME=][FORMAT:]SOURCE`, SOURCE being a file or block device (raw, VHD, VHDX,
    /// VMDK, detected by content; a `raw:`, `vhd:`, `vhdx:` or `vmdk:` prefix forces the format)
    /// or an nbd://, nbds://, nbd+unix:// URI. Repeat for more disks; unnamed disks are called
    /// disk0, disk1, … in order.
    #[arg(
        long = "disk",
        required_unless_present = "source",
        conflicts_with = "source"
    )]
    pub disks: Vec<String>,
    /// Back up VMs of this hypervisor source (a `[sources.NAME]` table of ferry.toml): the
    /// driver snapshots each VM, reads its disks (changed blocks since its previous restore
    /// point where change tracking allows) and removes the snapshot.
    #[arg(long, conflicts_with = "bitmap")]
    pub source: Option<String>,
    /// Configuration file (default: $FERRY_CONFIG, ./ferry.toml, /etc/ferry/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG", requires = "source")]
    pub config: Option<PathBuf>,
    /// With --source: read every disk in full even where change tracking could be used.
    #[arg(long, requires = "source")]
    pub full: bool,
    /// With --source: leave out this disk (key, name or position); repeatable.
    #[arg(long, requires = "source")]
    pub exclude_disk: Vec<String>,
    /// Take changed extents from the NBD context `qemu:dirty-bitmap:BITMAP` (changes since
    /// the previous restore point of the VM); other chunks are reused from it.
    #[arg(long)]
    pub bitmap: Option<String>,
    /// Percentage of chunks change tracking calls unchanged to re-read and verify (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub verify_sample: f64,
    /// Cap on the source read rate, e.g. `100M` (bytes per second).
    #[arg(long, value_parser = parse_rate)]
    pub limit_rate: Option<u64>,
    /// Chunks in flight per disk (reads, CPU work and uploads overlap).
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// Threads hashing, compressing and encrypting (default: one per CPU core).
    #[arg(long)]
    pub cpu_workers: Option<usize>,
    /// Format of the --disk files without a `FORMAT:` prefix: `auto` detects it by content and
    /// refuses a file named like an image (.vhd, .vhdx, .avhdx, .vmdk) that holds none; `raw`
    /// reads every file as plain bytes.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto, conflicts_with = "source")]
    pub format: InputFormat,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print the whole report as JSON on stdout instead of the restore point id.
    #[arg(long)]
    pub json: bool,
    /// Store swap partitions, swap files and NTFS pagefile.sys / hiberfil.sys / swapfile.sys
    /// like any data (by default they are read as zeros and not stored; swap headers are kept).
    #[arg(long)]
    pub no_exclude_swap: bool,
}

/// `--format` of `ferry backup` (and of other commands reading disks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Detect by content.
    Auto,
    /// Plain bytes, whatever the file's name.
    Raw,
    /// VHD.
    Vhd,
    /// VHDX (also `.avhdx`).
    Vhdx,
    /// VMDK (descriptor or sparse).
    Vmdk,
}

impl InputFormat {
    /// The forced image format, `None` for `auto`.
    pub fn forced(self) -> Option<ferry_image::Format> {
        match self {
            Self::Auto => None,
            Self::Raw => Some(ferry_image::Format::Raw),
            Self::Vhd => Some(ferry_image::Format::Vhd),
            Self::Vhdx => Some(ferry_image::Format::Vhdx),
            Self::Vmdk => Some(ferry_image::Format::Vmdk),
        }
    }
}

/// Adds how to force a raw read (`how`, e.g. "`--disk d=raw:PATH`") to an error that refused a
/// file named like an image; other errors come back unchanged.
pub fn with_raw_hint(err: anyhow::Error, how: &str) -> anyhow::Error {
    let refused = err.chain().any(|c| {
        let image = c.downcast_ref::<ferry_image::ImageError>().or_else(|| {
            c.downcast_ref::<Box<ferry_image::ImageError>>()
                .map(|b| &**b)
        });
        matches!(
            image,
            Some(ferry_image::ImageError::NotTheNamedFormat { .. })
        )
    });
    if !refused {
        return err;
    }
    anyhow::anyhow!(
        "{}; not reading it as a raw disk: if it really is one, force it with {how}",
        crate::error_text(&err)
    )
}

impl Args {
    fn cpu_workers(&self) -> usize {
        self.cpu_workers
            .unwrap_or_else(|| BackupOptions::default().cpu_workers)
            .max(1)
    }
}

fn parse_rate(s: &str) -> Result<u64, String> {
    match parse_size(s.trim_end_matches("/s")) {
        Some(0) | None => Err(format!(
            "`{s}` is not a positive size per second (e.g. 100M)"
        )),
        Some(n) => Ok(n),
    }
}

/// Splits `[NAME=]SOURCE`. A prefix counts as a name only if it is a plain word, so
/// `nbd+unix:///d?socket=/x` is a source.
pub fn split_disk(spec: &str, position: usize) -> (String, String) {
    if let Some((name, src)) = spec.split_once('=') {
        let plain = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if plain && !src.is_empty() {
            return (name.to_string(), src.to_string());
        }
    }
    (format!("disk{position}"), spec.to_string())
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("stopping…");
        token.cancel();
    });
}

/// Draws a progress bar on stderr while the job runs (terminals only; plain lines are left
/// to the summary). Returns a guard that clears the line when dropped.
pub fn progress_bar(progress: Arc<Progress>, verb: &'static str) -> Option<ProgressGuard> {
    if !std::io::stderr().is_terminal() || crate::logging::quiet() {
        return None;
    }
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = s.cancelled() => break,
                _ = tick.tick() => {}
            }
            let p = progress.snapshot();
            if p.total == 0 {
                continue;
            }
            let frac = (p.done as f64 / p.total as f64).min(1.0);
            let secs = start.elapsed().as_secs_f64();
            let eta = if frac > 0.0 {
                format!("{:.0}s", secs / frac - secs)
            } else {
                "?".into()
            };
            let width = 24;
            let fill = (frac * width as f64) as usize;
            let line = format!(
                "\r{verb} {} [{}{}] {:>3.0}% {} / {}  {}  ETA {eta}   ",
                p.current,
                "#".repeat(fill),
                "-".repeat(width - fill),
                frac * 100.0,
                human_bytes(p.done),
                human_bytes(p.total),
                human_rate(p.read, secs),
            );
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(line.as_bytes());
            let _ = e.flush();
        }
        let _ = std::io::stderr().write_all(b"\r\x1b[2K");
    });
    Some(ProgressGuard { stop, task })
}

/// Stops the progress bar.
pub struct ProgressGuard {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressGuard {
    /// Stops drawing and clears the line.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Runs `ferry backup`.
pub async fn run(a: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    if !(0.0..=100.0).contains(&a.verify_sample) {
        bail!("--verify-sample must be a percentage between 0 and 100");
    }
    if a.source.is_some() {
        return run_source(a).await;
    }
    let [vm] = a.vm.as_slice() else {
        bail!("backing up disks takes one --vm (several need --source)");
    };
    let repo = a.repo.open().await?;
    let mut opts = a.tls.source_options()?;
    opts.bitmap = a.bitmap.clone();
    opts.format = a.format.forced();
    let mut disks = Vec::new();
    let mut transports = Vec::new();
    for (i, spec) in a.disks.iter().enumerate() {
        let (name, location) = split_disk(spec, i);
        let mut o = opts.clone();
        if !source::is_nbd_uri(&location) {
            if a.bitmap.is_some() {
                bail!("disk `{name}`: --bitmap needs an NBD source, not {location}");
            }
            o.bitmap = None;
        }
        let opened = source::open(&location, &o)
            .await
            .with_context(|| format!("disk `{name}`"))
            .map_err(|e| {
                with_raw_hint(
                    e,
                    &format!("`--disk {name}=raw:{location}` or `--format raw`"),
                )
            })?;
        let changed = match &a.bitmap {
            Some(b) => Some(
                source::changed_extents(&opened, b)
                    .await
                    .with_context(|| format!("disk `{name}`"))?,
            ),
            None => None,
        };
        transports.push(opened.kind.clone());
        disks.push(BackupDisk {
            name,
            change_token: a.bitmap.as_ref().map(|b| format!("qemu-dirty-bitmap:{b}")),
            source: opened.source,
            changed,
        });
    }
    let meta = SnapshotMeta {
        vm: VmIdentity {
            id: vm.clone(),
            name: vm.clone(),
        },
        source: if transports.iter().any(|t| t == "nbd") {
            "nbd".into()
        } else {
            "file".into()
        },
        hypervisor: HypervisorKind::Generic,
        consistency: ConsistencyLevel::Crash,
        config: VmConfig {
            disks: disks
                .iter()
                .map(|d| DiskConfig {
                    name: d.name.clone(),
                    size: d.source.size(),
                    controller: None,
                    bootable: false,
                })
                .collect(),
            ..VmConfig::default()
        },
        native_config: None,
        transport: Some(transports.join(",")),
        labels: Default::default(),
    };
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let progress = Arc::new(Progress::new());
    let bopts = BackupOptions {
        reads_in_flight: a.in_flight.max(1),
        cpu_workers: a.cpu_workers(),
        verify_fraction: a.verify_sample / 100.0,
        limit_rate: a.limit_rate,
        cancel,
        progress: progress.clone(),
        exclude_swap: !a.no_exclude_swap,
        ..BackupOptions::default()
    };
    let bar = if a.json {
        None
    } else {
        progress_bar(progress, "backup")
    };
    let r = ferry_engine::backup(&repo, meta, disks, &bopts).await;
    if let Some(b) = bar {
        b.finish().await;
    }
    let report = match r {
        Err(EngineError::Cancelled) => {
            eprintln!("backup cancelled: no restore point was written");
            return Ok(ExitCode::from(EXIT_CANCELLED));
        }
        other => other?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if !crate::logging::quiet() {
            eprint!("{}", summary(&report));
        }
        println!("{}", report.snapshot);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry backup --source NAME --vm VM [--vm …]`: one restore point per VM. A VM that fails
/// does not stop the others; the exit code is non-zero if any failed.
async fn run_source(a: Args) -> anyhow::Result<ExitCode> {
    let name = a.source.clone().unwrap_or_default();
    let src = SourceArgs {
        source: name.clone(),
        config: a.config.clone(),
    };
    let repo = a.repo.open().await?;
    let driver = src.connect().await?;
    let exclude_swap = !a.no_exclude_swap && src.exclude_swap()?;
    let inventory = driver
        .list_vms()
        .await
        .with_context(|| format!("cannot list the VMs of source `{name}`"))?;
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let mut json = Vec::new();
    let mut failed = Vec::new();
    for want in &a.vm {
        if cancel.is_cancelled() {
            break;
        }
        let vm = match find_vm(&inventory, want) {
            Ok(v) => v.clone(),
            Err(e) => {
                eprintln!("error: VM `{want}`: {}", crate::error_text(&e));
                json.push(serde_json::json!({"vm_name": want, "error": format!("{e:#}")}));
                failed.push(want.clone());
                continue;
            }
        };
        let progress = Arc::new(Progress::new());
        let opts = VmBackupOptions {
            engine: BackupOptions {
                reads_in_flight: a.in_flight.max(1),
                cpu_workers: a.cpu_workers(),
                verify_fraction: a.verify_sample / 100.0,
                limit_rate: a.limit_rate,
                cancel: cancel.clone(),
                progress: progress.clone(),
                exclude_swap,
                ..BackupOptions::default()
            },
            force_full: a.full,
            exclude_disks: a.exclude_disk.clone(),
        };
        let bar = if a.json {
            None
        } else {
            progress_bar(progress, "backup")
        };
        let r = backup_vm(driver.as_ref(), &name, &repo, &vm, &opts).await;
        if let Some(b) = bar {
            b.finish().await;
        }
        match r {
            Ok(done) => {
                if a.json {
                    json.push(done.to_json());
                } else {
                    if !crate::logging::quiet() {
                        eprint!("{}{}", summary(&done.report), done.summary());
                    }
                    println!("{}", done.report.snapshot);
                }
            }
            Err(e) if is_cancelled(&e) => {
                eprintln!(
                    "backup of VM `{}` cancelled: no restore point was written",
                    vm.name
                );
                return Ok(ExitCode::from(EXIT_CANCELLED));
            }
            Err(e) => {
                eprintln!("error: {}", crate::error_text(&e));
                json.push(
                    serde_json::json!({"vm_name": vm.name, "vm": vm.id, "error": format!("{e:#}")}),
                );
                failed.push(vm.name.clone());
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{} of {} VM backup(s) failed: {}",
            failed.len(),
            a.vm.len(),
            failed.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}

fn is_cancelled(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<EngineError>(),
            Some(EngineError::Cancelled)
        )
    })
}

/// The human summary of a backup.
pub fn summary(r: &BackupReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "restore point {} of VM {}{}",
        r.snapshot,
        r.vm,
        r.previous
            .as_ref()
            .map(|p| format!(" (previous {p})"))
            .unwrap_or_default()
    );
    for d in &r.disks {
        let _ = writeln!(
            s,
            "  {} ({}, {}): read {}, holes {}, zero {}, unchanged {}, reused {}, new {}, uploaded {}",
            d.name,
            human_bytes(d.size),
            serde_json::to_value(d.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            human_bytes(d.read_bytes),
            human_bytes(d.hole_bytes),
            human_bytes(d.zero_bytes),
            human_bytes(d.unchanged_bytes),
            human_bytes(d.reused_bytes),
            human_bytes(d.new_bytes),
            human_bytes(d.uploaded_bytes),
        );
        for e in &d.excluded {
            let _ = writeln!(
                s,
                "    excluded {} ({}): {} read as zeros, not stored",
                e.what,
                match e.kind {
                    ferry_fs::ExclusionKind::SwapPartition => "swap partition",
                    ferry_fs::ExclusionKind::SwapFile => "swap file",
                    ferry_fs::ExclusionKind::Pagefile => "paging file",
                },
                human_bytes(e.bytes()),
            );
        }
        if let Some(v) = &d.verify {
            if v.mismatched_offsets.is_empty() {
                let _ = writeln!(
                    s,
                    "    change tracking verified on {} sampled unchanged chunk(s)",
                    v.sampled
                );
            } else {
                let _ = writeln!(
                    s,
                    "    WARNING: CHANGE TRACKING IS BROKEN on disk {}: {} of {} sampled unchanged chunk(s) differ (first at offset {}); the whole disk was read, and the next backup will read it all again",
                    d.name,
                    v.mismatched_offsets.len(),
                    v.sampled,
                    v.mismatched_offsets[0]
                );
            }
        }
    }
    let size = r.total(|d| d.size);
    let read = r.total(|d| d.read_bytes);
    let _ = writeln!(
        s,
        "  {:.2} s, {} virtual, {} read; time: source {:.0}% / CPU {:.0}% / target {:.0}% (bottleneck: {})",
        r.seconds,
        human_rate(size, r.seconds),
        human_rate(read, r.seconds),
        r.time.source_pct,
        r.time.cpu_pct,
        r.time.target_pct,
        r.time.bottleneck()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        assert_eq!(
            split_disk("root=/d/a.vhdx", 0),
            ("root".into(), "/d/a.vhdx".into())
        );
        assert_eq!(
            split_disk("/d/a.raw", 2),
            ("disk2".into(), "/d/a.raw".into())
        );
        assert_eq!(
            split_disk("nbd+unix:///e?socket=/tmp/s", 1),
            ("disk1".into(), "nbd+unix:///e?socket=/tmp/s".into())
        );
        assert_eq!(
            split_disk("d=nbd+unix:///e?socket=/tmp/s", 0),
            ("d".into(), "nbd+unix:///e?socket=/tmp/s".into())
        );
        assert_eq!(parse_rate("10M/s"), Ok(10 << 20));
        assert!(parse_rate("0").is_err());
    }
}
