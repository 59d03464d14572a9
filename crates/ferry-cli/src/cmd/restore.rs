//! `ferry restore SNAPSHOT [--disk NAME] --to PATH|NBD-URI [--format F]`: a restore point's
//! disk to a sparse raw file, an image file (VHD, VHDX, VMDK), a block device or an NBD export.
//! Every chunk is authenticated before it is written; a new file appears under its name only
//! when complete. Prints what was written on stdout (`--json`: the reports).
//!
//! `ferry restore SNAPSHOT --to-source NAME [--name NEW] [--power-on]`: the whole VM onto a
//! hypervisor source through its driver; a failed or cancelled restore removes what it created.

use crate::cmd::backup::{EXIT_CANCELLED, TlsArgs, cancel_on_signal, progress_bar};
use crate::cmd::repo::RepoArgs;
use crate::cmd::source::SourceArgs;
use anyhow::{Context, bail};
use ferry_core::size::{human_bytes, human_rate};
use ferry_core::vm::{DiskConfig, HypervisorKind};
use ferry_core::{BlockError, BlockSource, ExtentMap};
use ferry_engine::source;
use ferry_engine::{EngineError, Progress, RestoreOptions, RestoreReport, RestoreTo};
use ferry_hv::{RestoreDisk, RestorePlan};
use ferry_image::OutputFormat;
use ferry_nbd::NbdClient;
use ferry_repo::{Manifest, Repository};
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// Arguments of `ferry restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Restore point: an id (or a unique prefix of one), `latest`, or `VM@latest`.
    pub snapshot: String,
    /// Disk to restore; default: every disk (then --to is a directory unless there is one disk).
    #[arg(long)]
    pub disk: Option<String>,
    /// Output path (file, block device, or directory for several disks) or NBD URI.
    #[arg(
        long,
        required_unless_present = "to_source",
        conflicts_with = "to_source"
    )]
    pub to: Option<String>,
    /// Restore the whole VM (configuration, disks, network adapters) onto this hypervisor
    /// source (a `[sources.NAME]` table of ferry.toml). Prints the new VM's id.
    #[arg(long, conflicts_with = "disk")]
    pub to_source: Option<String>,
    /// Configuration file (default: $FERRY_CONFIG, ./ferry.toml, /etc/ferry/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG", requires = "to_source")]
    pub config: Option<PathBuf>,
    /// With --to-source: name of the new VM (default: "<VM> (restore point <id>)").
    #[arg(long, requires = "to_source")]
    pub name: Option<String>,
    /// With --to-source: start the VM once it is complete.
    #[arg(long, requires = "to_source")]
    pub power_on: bool,
    /// With --to-source: attach the NICs of network (switch, port group) OLD to NEW instead;
    /// repeatable.
    #[arg(long = "network-map", value_name = "OLD=NEW", requires = "to_source")]
    pub network_map: Vec<String>,
    /// Output format for files: raw, vhd, vhd-fixed, vhdx, vmdk, vmdk-stream.
    #[arg(long, default_value = "raw")]
    pub format: String,
    /// Chunks fetched and written concurrently.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print the reports as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Finds the restore point `spec` names: an id, a unique id prefix, `latest` or `VM@latest`.
pub async fn resolve_snapshot(repo: &Repository, spec: &str) -> anyhow::Result<Manifest> {
    let ids = repo.snapshot_ids().await?;
    if let Some(vm) = spec.strip_suffix("@latest") {
        for id in ids.iter().rev() {
            let m = repo.load_manifest(id).await?;
            if m.meta.vm.id == vm || m.meta.vm.name == vm {
                return Ok(m);
            }
        }
        bail!("VM `{vm}` has no restore point in this repository");
    }
    if spec == "latest" {
        let Some(id) = ids.last() else {
            bail!("the repository holds no restore point");
        };
        return Ok(repo.load_manifest(id).await?);
    }
    let hits: Vec<&String> = ids.iter().filter(|i| i.starts_with(spec)).collect();
    match hits.as_slice() {
        [one] => Ok(repo.load_manifest(one).await?),
        [] => bail!("no restore point `{spec}` in this repository (see `ferry snapshots`)"),
        many => bail!(
            "`{spec}` matches {} restore points; give more of the id",
            many.len()
        ),
    }
}

fn extension(f: OutputFormat) -> &'static str {
    match f {
        OutputFormat::Raw => "raw",
        OutputFormat::VhdFixed | OutputFormat::VhdDynamic => "vhd",
        OutputFormat::Vhdx => "vhdx",
        OutputFormat::VmdkSparse | OutputFormat::VmdkStream => "vmdk",
    }
}

/// The disk configuration of a restore point that captured none: its disks in order, the
/// first one bootable.
pub fn disks_of(m: &Manifest) -> Vec<DiskConfig> {
    m.disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskConfig {
            name: d.name.clone(),
            size: d.size,
            controller: None,
            bootable: i == 0,
        })
        .collect()
}

/// Builds the plan to recreate the VM of restore point `m` on a hypervisor of kind `kind`:
/// its configuration (and native record when the kind matches) and its disks read straight
/// from the repository, in configuration order.
pub async fn restore_plan(
    repo: &Repository,
    m: &Manifest,
    kind: HypervisorKind,
    name: String,
    power_on: bool,
) -> anyhow::Result<RestorePlan> {
    let meta = &m.meta;
    let mut config = meta.config.clone();
    if config.cpus == 0 || config.memory == 0 {
        bail!(
            "restore point {} holds no VM configuration (CPUs, memory): it was backed up from disks, not from a hypervisor; restore its disks with --to",
            m.id
        );
    }
    if config.disks.is_empty() {
        config.disks = disks_of(m);
    }
    let mut disks = Vec::new();
    for d in &config.disks {
        if !m.disks.iter().any(|x| x.name == d.name) {
            bail!(
                "restore point {} describes disk `{}` in its configuration but holds no data for it",
                m.id,
                d.name
            );
        }
        let source = repo
            .open_disk(&m.id, &d.name)
            .await
            .with_context(|| format!("cannot open disk `{}` of restore point {}", d.name, m.id))?;
        disks.push(RestoreDisk {
            name: d.name.clone(),
            source,
        });
    }
    Ok(RestorePlan {
        name,
        config,
        native: meta
            .native_config
            .clone()
            .filter(|_| meta.hypervisor == kind),
        disks,
        power_on,
    })
}

/// Applies `--network-map OLD=NEW` to the NICs of `config`; a mapping no NIC uses is an error
/// (a typo would otherwise go unnoticed).
pub fn map_networks(config: &mut ferry_core::vm::VmConfig, maps: &[String]) -> anyhow::Result<()> {
    for m in maps {
        let Some((old, new)) = m
            .split_once('=')
            .filter(|(o, n)| !o.is_empty() && !n.is_empty())
        else {
            bail!("--network-map `{m}`: expected OLD=NEW");
        };
        let mut hit = false;
        for n in &mut config.nics {
            if n.network.as_deref() == Some(old) {
                n.network = Some(new.to_string());
                hit = true;
            }
        }
        if !hit {
            let known: Vec<&str> = config
                .nics
                .iter()
                .filter_map(|n| n.network.as_deref())
                .collect();
            bail!(
                "--network-map `{m}`: no NIC of the restore point is on `{old}` (its networks: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        }
    }
    Ok(())
}

/// A source that fails every read once `cancel` fires, so a driver's upload stops at the next
/// read and takes its own error path (which removes the half-created VM); it counts the bytes
/// read into `read` (the appliance's progress of a VM restore).
#[derive(Debug)]
struct Cancellable {
    inner: Arc<dyn BlockSource>,
    cancel: CancellationToken,
    read: Option<Arc<AtomicU64>>,
}

/// Wraps every disk of `plan` in a [`Cancellable`].
pub fn guard_plan(
    plan: &mut RestorePlan,
    cancel: &CancellationToken,
    read: Option<Arc<AtomicU64>>,
) {
    for d in &mut plan.disks {
        d.source = Arc::new(Cancellable {
            inner: d.source.clone(),
            cancel: cancel.clone(),
            read: read.clone(),
        });
    }
}

#[async_trait::async_trait]
impl BlockSource for Cancellable {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        if self.cancel.is_cancelled() {
            return Err(BlockError::Unsupported {
                disk: self.inner.name(),
                message: "restore cancelled".into(),
            });
        }
        self.inner.read_at(offset, buf).await?;
        if let Some(r) = &self.read {
            r.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        self.inner.allocated(range).await
    }
    fn preferred_read_size(&self) -> u64 {
        self.inner.preferred_read_size()
    }
}

/// `ferry restore SNAPSHOT --to-source NAME [--name NEW] [--power-on]`.
async fn run_to_source(a: Args, source: String) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let manifest = resolve_snapshot(&repo, &a.snapshot).await?;
    let driver = SourceArgs {
        source: source.clone(),
        config: a.config.clone(),
    }
    .connect()
    .await?;
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("{} (restore point {})", manifest.meta.vm.name, manifest.id));
    let mut plan = restore_plan(&repo, &manifest, driver.kind(), name, a.power_on).await?;
    map_networks(&mut plan.config, &a.network_map)?;
    if manifest.meta.hypervisor != driver.kind()
        && let Some(n) = &manifest.meta.native_config
    {
        for w in ferry_hv_hyperv::restore::not_carried(n) {
            tracing::warn!(source = %source, vm = %plan.name, "restore: {w}");
        }
    }
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    guard_plan(&mut plan, &cancel, None);
    let t0 = std::time::Instant::now();
    let r = driver.restore_vm(&plan).await;
    if cancel.is_cancelled() {
        eprintln!("restore cancelled: the partial VM was removed");
        return Ok(ExitCode::from(EXIT_CANCELLED));
    }
    let vm = r.with_context(|| {
        format!(
            "cannot restore VM `{}` of restore point {} onto source `{source}`",
            manifest.meta.vm.name, manifest.id
        )
    })?;
    let size: u64 = plan.disks.iter().map(|d| d.source.size()).sum();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "snapshot": manifest.id,
                "source": source,
                "vm": vm,
                "disks": plan.disks.iter().map(|d| &d.name).collect::<Vec<_>>(),
                "seconds": t0.elapsed().as_secs_f64(),
            }))?
        );
    } else if !crate::logging::quiet() {
        eprintln!(
            "restored VM `{}` of restore point {} onto source `{source}` as `{}` ({}): {} disk(s), {} in {:.2} s via {}{}",
            manifest.meta.vm.name,
            manifest.id,
            vm.name,
            vm.id,
            plan.disks.len(),
            human_bytes(size),
            t0.elapsed().as_secs_f64(),
            vm.transport,
            if a.power_on { ", powered on" } else { "" }
        );
        println!("{}", vm.id);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `ferry restore`.
pub async fn run(a: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    if let Some(source) = a.to_source.clone() {
        return run_to_source(a, source).await;
    }
    let Some(to) = a.to.clone() else {
        bail!("pass --to PATH or --to-source NAME");
    };
    let format: OutputFormat = a.format.parse().map_err(anyhow::Error::msg)?;
    let repo = a.repo.open().await?;
    let manifest = resolve_snapshot(&repo, &a.snapshot).await?;
    let disks: Vec<String> = match &a.disk {
        Some(d) => {
            if !manifest.disks.iter().any(|x| &x.name == d) {
                bail!(
                    "restore point {} has no disk `{d}` (disks: {})",
                    manifest.id,
                    manifest
                        .disks
                        .iter()
                        .map(|x| x.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            vec![d.clone()]
        }
        None => manifest.disks.iter().map(|d| d.name.clone()).collect(),
    };
    let nbd = source::is_nbd_uri(&to);
    if nbd && disks.len() != 1 {
        bail!("an NBD target takes one disk: pass --disk");
    }
    let mut targets = Vec::new();
    if nbd {
        let cfg = source::nbd_config(&to, &a.tls.source_options()?)?;
        let label = cfg.uri_redacted();
        let client = NbdClient::connect(cfg)
            .await
            .with_context(|| format!("cannot open NBD target {label}"))?;
        targets.push((disks[0].clone(), RestoreTo::Nbd(Arc::new(client))));
    } else if disks.len() == 1 {
        targets.push((
            disks[0].clone(),
            RestoreTo::File {
                path: PathBuf::from(&to),
                format,
            },
        ));
    } else {
        let dir = PathBuf::from(&to);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
        for d in &disks {
            targets.push((
                d.clone(),
                RestoreTo::File {
                    path: dir.join(format!("{d}.{}", extension(format))),
                    format,
                },
            ));
        }
    }
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let mut reports: Vec<RestoreReport> = Vec::new();
    for (disk, to) in targets {
        let progress = Arc::new(Progress::new());
        let opts = RestoreOptions {
            fetches_in_flight: a.in_flight.max(1),
            cancel: cancel.clone(),
            progress: progress.clone(),
        };
        let bar = if a.json {
            None
        } else {
            progress_bar(progress, "restore")
        };
        let r = ferry_engine::restore_disk(&repo, &manifest, &disk, to, &opts).await;
        if let Some(b) = bar {
            b.finish().await;
        }
        let r = match r {
            Err(EngineError::Cancelled) => {
                eprintln!("restore cancelled");
                return Ok(ExitCode::from(EXIT_CANCELLED));
            }
            other => other?,
        };
        if !a.json && !crate::logging::quiet() {
            eprintln!(
                "restored disk {} of {} to {}: {} in {:.2} s ({}), fetched {}, wrote {}, zero {}; time: repository {:.0}% / CPU {:.0}% / target {:.0}%",
                r.disk,
                r.snapshot,
                r.target,
                human_bytes(r.size),
                r.seconds,
                human_rate(r.size, r.seconds),
                human_bytes(r.fetched_bytes),
                human_bytes(r.written_bytes),
                human_bytes(r.zero_bytes),
                r.time.source_pct,
                r.time.cpu_pct,
                r.time.target_pct,
            );
            println!("{}", r.target);
        }
        reports.push(r);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(ExitCode::SUCCESS)
}
