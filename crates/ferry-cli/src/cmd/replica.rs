//! `ferry replica …`: standby VMs on another source kept up to date from a VM's changes
//! (docs/replication.md, ADRs 0130–0133).
//!
//! A cycle backs the VM up into the repository (incremental, as `ferry backup --source`),
//! writes the chunks that differ between the restore point the standby holds and the new one
//! into the standby's disks, and takes a recovery point (a snapshot on the target). The state
//! of each replica is a versioned JSON record in `<state-dir>/replicas/NAME.json`, replaced
//! atomically after every step; the step in progress is in it (`op`, `cycle`), so a command
//! killed halfway is completed by running it (or any other command of the replica) again.

use crate::cmd::hvbackup::{VmBackupOptions, backup_vm, find_vm};
use crate::cmd::repo::{open_repository, parse_duration, read_password};
use crate::cmd::restore::{resolve_snapshot, restore_plan};
use crate::cmd::source::connect;
use anyhow::{Context, bail};
use ferry_core::ExtentMap;
use ferry_hv::{FerryConfig, HypervisorDriver, ReplicaRole, ReplicaTarget, RestorePlan};
use ferry_repo::{Manifest, Repository};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Version of the replica record.
const RECORD_VERSION: u32 = 1;

/// `ferry replica …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Define a replica of VM on source SRC kept on source DST (nothing is copied yet: the
    /// first `sync` creates the standby VM, from --seed when given).
    Create(CreateArgs),
    /// Run one replication cycle: incremental backup, changes written into the standby,
    /// recovery point, pruning beyond --keep.
    Sync(NameArgs),
    /// Health of one replica or all: lag, last success, last error, bytes per cycle, points.
    Status(StatusArgs),
    /// Start the standby: --planned (primary shut down, last changes sent, replica started,
    /// direction reversed) or --unplanned (the replica at a recovery point).
    Failover(FailoverArgs),
    /// Start an isolated copy of the standby at a recovery point (replication goes on);
    /// `--cleanup` removes it.
    Test(TestArgs),
    /// After an unplanned failover: replicate back from the running replica to the old
    /// primary (which is shut down and fully resynchronized).
    Reverse(NameArgs),
    /// End replication: remove the recovery points, test copies and the record (the
    /// standby VM stays unless --delete-vm).
    Cancel(CancelArgs),
}

/// Where records live and how sources are found.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Configuration file (default: $FERRY_CONFIG, ./ferry.toml, /etc/ferry/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the replica records (default: $XDG_STATE_HOME/ferry, ~/.local/state/ferry).
    #[arg(long, env = "FERRY_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Repository password file (first line); default: the FERRY_PASSWORD variable.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Print JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// `ferry replica create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Name of the replica job.
    name: String,
    /// Source of the VM (`[sources.NAME]`).
    #[arg(long)]
    source: String,
    /// The VM (name or id).
    #[arg(long)]
    vm: String,
    /// Target source of the standby VM.
    #[arg(long)]
    to_source: String,
    /// Repository the cycles back up into.
    #[arg(long, env = "FERRY_REPO")]
    repo: String,
    /// How often the scheduler runs a cycle (s, m, h).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    every: Duration,
    /// Recovery points kept on the target.
    #[arg(long, default_value_t = 4)]
    keep: usize,
    /// Lag beyond which the replica is stale (default: twice --every).
    #[arg(long, value_parser = parse_duration)]
    rpo: Option<Duration>,
    /// Create the standby from this restore point (already in the repository) instead of
    /// the first cycle's backup.
    #[arg(long)]
    seed: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// A replica by name.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// Name of the replica job.
    name: String,
    #[command(flatten)]
    common: Common,
}

/// `ferry replica status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// One replica (default: all).
    name: Option<String>,
    #[command(flatten)]
    common: Common,
}

/// `ferry replica failover`.
#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Name of the replica job.
    name: String,
    /// The primary is shut down, its last changes sent, the replica started, the direction
    /// reversed.
    #[arg(
        long,
        conflicts_with = "unplanned",
        required_unless_present = "unplanned"
    )]
    planned: bool,
    /// The primary is lost: start the replica at a recovery point.
    #[arg(long)]
    unplanned: bool,
    /// Recovery point (its id, restore point id or a unique prefix; default: the newest).
    #[arg(long, requires = "unplanned")]
    point: Option<String>,
    /// Fail over a stale replica (lag beyond its RPO) anyway.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: Common,
}

/// `ferry replica test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Name of the replica job.
    name: String,
    /// Recovery point (default: the newest).
    #[arg(long, conflicts_with = "cleanup")]
    point: Option<String>,
    /// Remove the test copy.
    #[arg(long)]
    cleanup: bool,
    #[command(flatten)]
    common: Common,
}

/// `ferry replica cancel`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// Name of the replica job.
    name: String,
    /// Also remove the standby VM and its disks.
    #[arg(long)]
    delete_vm: bool,
    #[command(flatten)]
    common: Common,
}

/// A recovery point the replica keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Point {
    /// The snapshot's id on the target.
    pub id: String,
    /// The restore point whose content it holds.
    pub restore_point: String,
    /// Unix seconds of that restore point.
    pub time: i64,
}

/// Where the replica stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum State {
    /// Cycles keep the standby up to date.
    Replicating,
    /// The standby runs as the production VM (after an unplanned failover); `reverse`
    /// replicates back.
    FailedOver {
        /// The recovery point it was started at.
        point: String,
    },
}

/// An operation in progress: what a re-run completes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Op {
    /// Failover; `step` is the last step done.
    Failover {
        /// Planned or not.
        planned: bool,
        /// Recovery point (unplanned).
        point: Option<String>,
        /// 0 = nothing yet, 1 = primary stopped / reverted, 2 = synced, 3 = started.
        step: u8,
    },
    /// Reverse replication.
    Reverse {
        /// The old primary must be resynchronized in full.
        resync: bool,
    },
    /// Test failover at a point.
    Test {
        /// The recovery point.
        point: String,
    },
    /// End of replication.
    Cancel {
        /// Remove the standby VM too.
        delete_vm: bool,
    },
}

/// The cycle in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cycle {
    /// The restore point the cycle's backup wrote (none yet: the backup runs).
    pub restore_point: Option<String>,
    /// Bytes written into the standby so far.
    pub bytes: u64,
}

/// Health counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Health {
    /// Unix seconds of the last successful cycle.
    pub last_success: Option<i64>,
    /// Unix seconds of the last cycle attempted.
    pub last_attempt: Option<i64>,
    /// The last cycle's error (cleared by a success).
    pub last_error: Option<String>,
    /// Bytes written into the standby by the last successful cycle.
    pub last_bytes: u64,
    /// Successful cycles.
    pub cycles: u64,
}

/// The record of one replica job (`<state-dir>/replicas/NAME.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Replica {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Job name.
    pub name: String,
    /// Repository location.
    pub repo: String,
    /// Source of the primary VM.
    pub source: String,
    /// The primary VM's id.
    pub vm: String,
    /// Its name.
    pub vm_name: String,
    /// Target source.
    pub target: String,
    /// Seconds between cycles.
    pub every: u64,
    /// Recovery points kept.
    pub keep: usize,
    /// Seconds of lag beyond which the replica is stale.
    pub rpo: u64,
    /// Restore point to create the standby from.
    pub seed: Option<String>,
    /// The standby VM's id on the target.
    pub standby: Option<String>,
    /// The restore point whose content the standby's disks hold.
    pub applied: Option<String>,
    /// Unix seconds of `applied` (the lag is counted from it).
    pub applied_time: Option<i64>,
    /// The next cycle rewrites every block of the standby (it diverged).
    pub resync: bool,
    /// Recovery points, oldest first.
    pub points: Vec<Point>,
    /// Replicating or failed over.
    pub state: State,
    /// The running test copy's VM id.
    pub test_vm: Option<String>,
    /// The cycle in progress.
    pub cycle: Option<Cycle>,
    /// The operation in progress.
    pub op: Option<Op>,
    /// Health.
    pub health: Health,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Replica {
    /// A new job of `spec` for VM `vm` (id) named `vm_name`: nothing replicated yet.
    fn new(spec: &Spec, vm: &str, vm_name: &str) -> Self {
        Self {
            version: RECORD_VERSION,
            name: spec.name.clone(),
            repo: spec.repo.clone(),
            source: spec.source.clone(),
            vm: vm.into(),
            vm_name: vm_name.into(),
            target: spec.to_source.clone(),
            every: spec.every.as_secs().max(1),
            keep: spec.keep,
            rpo: spec.rpo.unwrap_or(spec.every * 2).as_secs().max(1),
            seed: None,
            standby: None,
            applied: None,
            applied_time: None,
            resync: false,
            points: vec![],
            state: State::Replicating,
            test_vm: None,
            cycle: None,
            op: None,
            health: Health::default(),
        }
    }

    /// Seconds since the restore point the standby holds was taken.
    pub fn lag(&self) -> Option<i64> {
        self.applied_time.map(|t| (now() - t).max(0))
    }

    /// Why a failover to this replica would lose more than its RPO, if it would.
    pub fn stale(&self) -> Option<String> {
        match self.lag() {
            None => Some("it holds no recovery point yet".into()),
            Some(l) if l > self.rpo as i64 => Some(format!(
                "its newest data is {} old, beyond its RPO of {}; {}",
                secs(l),
                secs(self.rpo as i64),
                match &self.health.last_error {
                    Some(e) => format!("the last cycle failed: {e}"),
                    None => "no cycle has succeeded since".into(),
                }
            )),
            Some(_) => None,
        }
    }
}

fn secs(s: i64) -> String {
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The records of a state directory.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// `<state-dir>/replicas`.
    pub fn new(state_dir: Option<&Path>) -> Self {
        let base = state_dir.map(Path::to_path_buf).unwrap_or_else(|| {
            std::env::var_os("XDG_STATE_HOME")
                .map(|x| PathBuf::from(x).join("ferry"))
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/ferry"))
                })
                .unwrap_or_else(|| PathBuf::from("/var/lib/ferry"))
        });
        Self {
            dir: base.join("replicas"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Loads replica `name`.
    pub fn load(&self, name: &str) -> anyhow::Result<Replica> {
        let p = self.path(name);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("no replica `{name}` (no {})", p.display())
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a replica record", p.display()))?;
        if v["version"] != RECORD_VERSION {
            bail!(
                "{}: record version {} is not understood by this Ferry (it writes {RECORD_VERSION})",
                p.display(),
                v["version"]
            );
        }
        serde_json::from_value(v)
            .with_context(|| format!("{} is not a replica record", p.display()))
    }

    /// Every replica, by name.
    pub fn all(&self) -> anyhow::Result<Vec<Replica>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.dir.display())),
        };
        for e in rd {
            let p = e?.path();
            if let Some(n) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            {
                out.push(self.load(n)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Replaces the record atomically: a complete temporary file, synced, renamed over it.
    pub fn save(&self, r: &Replica) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let p = self.path(&r.name);
        let tmp = self.dir.join(format!(".{}.json.tmp", r.name));
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(r)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p).with_context(|| format!("cannot replace {}", p.display()))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }

    fn remove(&self, name: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.path(name))?;
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.lock")));
        Ok(())
    }

    /// An exclusive lock on replica `name` for this process's lifetime of the guard.
    pub fn lock(&self, name: &str) -> anyhow::Result<std::fs::File> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(format!("{name}.lock")))?;
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock takes the descriptor of a file this function owns and keeps open; it
        // reads or writes no memory of ours.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!("replica `{name}` is busy: another Ferry process is working on it");
        }
        Err(e.into())
    }
}

fn valid_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("replica name `{name}`: use letters, digits, `-`, `_` and `.`");
    }
    Ok(())
}

/// Everything one command needs: the record, its store, the sources.
struct Ctx {
    store: Store,
    cfg: FerryConfig,
    common: Common,
    _lock: std::fs::File,
    rec: Replica,
}

impl Ctx {
    fn open(name: &str, common: &Common) -> anyhow::Result<Self> {
        valid_name(name)?;
        let store = Store::new(common.state_dir.as_deref());
        let lock = store.lock(name)?;
        let rec = store.load(name)?;
        let cfg = FerryConfig::load(common.config.as_deref())?;
        Ok(Self {
            store,
            cfg,
            common: common.clone(),
            _lock: lock,
            rec,
        })
    }

    fn save(&self) -> anyhow::Result<()> {
        self.store.save(&self.rec)
    }

    async fn driver(&self, source: &str) -> anyhow::Result<Arc<dyn HypervisorDriver>> {
        connect(source, self.cfg.source(source)?).await
    }

    async fn repo(&self) -> anyhow::Result<Repository> {
        let pw = read_password(self.common.password_file.as_deref(), "FERRY_PASSWORD")?;
        open_repository(&self.rec.repo, pw.as_ref()).await
    }
}

fn replica_of<'a>(
    d: &'a dyn HypervisorDriver,
    source: &str,
) -> anyhow::Result<&'a dyn ReplicaTarget> {
    d.replica().ok_or_else(|| {
        anyhow::anyhow!(
            "source `{source}` ({}) cannot hold replicas with this build of Ferry",
            kind_name(d.kind())
        )
    })
}

/// The hypervisor's name as administrators know it.
fn kind_name(k: ferry_hv::HypervisorKind) -> &'static str {
    match k {
        ferry_hv::HypervisorKind::Xen => "Xen",
        ferry_hv::HypervisorKind::Vmware => "vSphere",
        ferry_hv::HypervisorKind::HyperV => "Hyper-V",
        _ => "a plain disk source",
    }
}

/// Refuses, before anything changes, an operation that ends with the primary's source
/// holding the replica (`what`: planned failover, reverse) when that source cannot: a
/// cross-hypervisor replica whose primary's hypervisor is no replica target yet (ADR 0162).
async fn primary_must_hold_replicas(ctx: &Ctx, what: &str) -> anyhow::Result<()> {
    let src = ctx.rec.source.clone();
    let d = ctx.driver(&src).await?;
    if d.replica().is_some() {
        return Ok(());
    }
    let kind = kind_name(d.kind());
    let vm = &ctx.rec.vm_name;
    let target = &ctx.rec.target;
    let (now, after) = if what == "reverse" {
        (
            format!("the replica keeps running on `{target}`"),
            format!(
                "to move it back, back it up (`ferry backup --source {target} --vm '{vm} (replica)'`) and restore it with `ferry restore RP --to-source {src}`"
            ),
        )
    } else {
        (
            "nothing was changed".to_string(),
            format!(
                "fail over with --unplanned instead (the replica starts at a recovery point; shut `{vm}` down on `{src}` first so only one runs)"
            ),
        )
    };
    bail!(
        "{what} of replica `{}`: reverse replication to {kind} needs {kind} to hold replicas (source `{src}`), which this build of Ferry cannot yet; {now}; {after}",
        ctx.rec.name
    )
}

/// Runs a `replica` subcommand.
pub async fn run(cmd: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let (name, common, action) = match cmd {
        Command::Create(a) => return create(a).await,
        Command::Status(a) => {
            let store = Store::new(a.common.state_dir.as_deref());
            let recs = match &a.name {
                Some(n) => vec![store.load(n)?],
                None => store.all()?,
            };
            if a.common.json {
                let v: Vec<serde_json::Value> = recs.iter().map(status_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for r in &recs {
                    print_status(r, false)?;
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Sync(a) => (a.name, a.common, Action::Sync),
        Command::Failover(a) => (
            a.name,
            a.common,
            Action::Failover {
                planned: a.planned,
                point: a.point,
                force: a.force,
            },
        ),
        Command::Test(a) if a.cleanup => (a.name, a.common, Action::TestCleanup),
        Command::Test(a) => (a.name, a.common, Action::Test { point: a.point }),
        Command::Reverse(a) => (a.name, a.common, Action::Reverse),
        Command::Cancel(a) => (
            a.name,
            a.common,
            Action::Cancel {
                delete_vm: a.delete_vm,
            },
        ),
    };
    let mut ctx = Ctx::open(&name, &common)?;
    begin(&mut ctx, &action).await?;
    let r = finish(&mut ctx, &action).await;
    if !matches!(action, Action::Cancel { .. }) {
        print_status(&ctx.rec, common.json)?;
    }
    r.map(|_| ExitCode::SUCCESS)
}

/// What a command asks (`ferry replica …` and the appliance's API alike).
pub use ferry_daemon::replicas::ReplicaAction as Action;

/// Checks `action` against the replica's state and records the operation it starts: what is
/// refused is refused here, before anything changes. (An unfinished operation of another
/// kind is completed first.)
async fn begin(ctx: &mut Ctx, action: &Action) -> anyhow::Result<()> {
    let name = ctx.rec.name.clone();
    match action {
        Action::Sync => {
            if ctx.rec.op.is_none() && ctx.rec.state != State::Replicating {
                bail!(
                    "replica `{name}` is failed over: run `ferry replica reverse {name}` to replicate back"
                );
            }
        }
        Action::Failover {
            planned,
            point,
            force,
        } => {
            match &ctx.rec.op {
                Some(Op::Failover { .. }) | None => {}
                Some(_) => resume(ctx).await?,
            }
            if ctx.rec.op.is_none() {
                if ctx.rec.state != State::Replicating {
                    bail!("replica `{name}` is failed over already");
                }
                if let (false, Some(why)) = (*force, ctx.rec.stale()) {
                    bail!(
                        "replica `{name}` is stale: {why}. A failover now loses everything since; pass --force to fail over anyway"
                    );
                }
                if *planned {
                    if point.is_some() {
                        bail!(
                            "a planned failover sends the last changes: it takes no recovery point"
                        );
                    }
                    primary_must_hold_replicas(ctx, "a planned failover").await?;
                }
                let point = match (point, planned) {
                    (Some(p), _) => Some(find_point(&ctx.rec, p)?.id.clone()),
                    (None, false) => Some(
                        ctx.rec
                            .points
                            .last()
                            .map(|p| p.id.clone())
                            .context("the replica has no recovery point")?,
                    ),
                    (None, true) => None,
                };
                ctx.rec.op = Some(Op::Failover {
                    planned: *planned,
                    point,
                    step: 0,
                });
                ctx.save()?;
            }
        }
        Action::Test { point } => {
            if ctx.rec.op.is_none() {
                if ctx.rec.test_vm.is_some() {
                    bail!(
                        "replica `{name}` has a test copy running: `ferry replica test {name} --cleanup` first"
                    );
                }
                let point = match point {
                    Some(p) => find_point(&ctx.rec, p)?.id.clone(),
                    None => ctx
                        .rec
                        .points
                        .last()
                        .map(|p| p.id.clone())
                        .context("the replica has no recovery point yet")?,
                };
                ctx.rec.op = Some(Op::Test { point });
                ctx.save()?;
            }
        }
        Action::TestCleanup => {}
        Action::Reverse => {
            if ctx.rec.op.is_none() {
                if !matches!(ctx.rec.state, State::FailedOver { .. }) {
                    bail!("replica `{name}` is not failed over: nothing to reverse");
                }
                primary_must_hold_replicas(ctx, "reverse").await?;
                ctx.rec.op = Some(Op::Reverse { resync: true });
                ctx.save()?;
            }
        }
        Action::Cancel { delete_vm } => {
            ctx.rec.op = Some(Op::Cancel {
                delete_vm: *delete_vm,
            });
            ctx.save()?;
        }
    }
    Ok(())
}

/// Runs what [`begin`] accepted to its end.
async fn finish(ctx: &mut Ctx, action: &Action) -> anyhow::Result<()> {
    match action {
        Action::Sync => {
            resume(ctx).await?;
            if ctx.rec.state != State::Replicating {
                let n = &ctx.rec.name;
                bail!(
                    "replica `{n}` is failed over: run `ferry replica reverse {n}` to replicate back"
                );
            }
            sync(ctx).await
        }
        Action::TestCleanup => test_cleanup(ctx).await,
        _ => resume(ctx).await,
    }
}

/// `action` on replica `name` for the appliance's API ([`ferry_daemon::Backend`]): checked
/// now, the rest returned to run in the background. A job of `[replicas.NAME]` without a
/// record yet gets one (its first sync creates the standby).
pub async fn api_action(
    config: &Path,
    state_dir: &Path,
    name: &str,
    action: Action,
) -> Result<ferry_daemon::replicas::ReplicaRun, ferry_daemon::replicas::ReplicaRefusal> {
    use ferry_daemon::replicas::ReplicaRefusal as R;
    let conflict = |e: anyhow::Error| R::Conflict(crate::error_text(&e));
    valid_name(name).map_err(|e| R::NotFound(crate::error_text(&e)))?;
    let cfg = FerryConfig::load(Some(config)).map_err(|e| conflict(e.into()))?;
    let spec = scheduled(&cfg).remove(name);
    let store = Store::new(Some(state_dir));
    let mut common = Common {
        config: Some(config.to_path_buf()),
        state_dir: Some(state_dir.to_path_buf()),
        password_file: None,
        // Nothing goes to the service's stdout/stderr as console text: it logs.
        json: true,
    };
    let spec = match spec {
        Some(Ok((spec, repo, _))) => {
            common.password_file = repo.password_file.clone();
            Some(spec)
        }
        Some(Err(e)) if !store.path(name).exists() => return Err(conflict(e)),
        _ => None,
    };
    if !store.path(name).exists() {
        match (&spec, &action) {
            (None, _) => return Err(R::NotFound(format!("replica `{name}`"))),
            (Some(spec), Action::Sync) => {
                let (spec, common) = (spec.clone(), common.clone());
                return Ok(Box::pin(async move {
                    let r = async {
                        create_record(&spec, &common).await?;
                        let mut ctx = Ctx::open(&spec.name, &common)?;
                        finish(&mut ctx, &Action::Sync).await
                    };
                    r.await
                        .map_err(|e| ferry_daemon::BackendError(crate::error_text(&e)))
                }));
            }
            (Some(_), _) => {
                return Err(R::Conflict(format!(
                    "replica `{name}` has not run a cycle yet: sync it first"
                )));
            }
        }
    }
    let mut ctx = Ctx::open(name, &common).map_err(conflict)?;
    begin(&mut ctx, &action).await.map_err(conflict)?;
    Ok(Box::pin(async move {
        finish(&mut ctx, &action)
            .await
            .map_err(|e| ferry_daemon::BackendError(crate::error_text(&e)))
    }))
}

/// What a new replica job is (from `create` or a `[replicas.NAME]` table).
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    source: String,
    vm: String,
    to_source: String,
    repo: String,
    every: Duration,
    keep: usize,
    rpo: Option<Duration>,
    seed: Option<String>,
}

async fn create(a: CreateArgs) -> anyhow::Result<ExitCode> {
    let spec = Spec {
        name: a.name,
        source: a.source,
        vm: a.vm,
        to_source: a.to_source,
        repo: a.repo,
        every: a.every,
        keep: a.keep,
        rpo: a.rpo,
        seed: a.seed,
    };
    let rec = create_record(&spec, &a.common).await?;
    print_status(&rec, a.common.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Checks `spec` against the sources and the repository and writes the new record.
async fn create_record(a: &Spec, common: &Common) -> anyhow::Result<Replica> {
    valid_name(&a.name)?;
    if a.keep == 0 {
        bail!("--keep must be at least 1: the newest recovery point is what a failover starts");
    }
    if a.source == a.to_source {
        tracing::warn!(source = %a.source, "the replica lives on the same source as its VM");
    }
    let store = Store::new(common.state_dir.as_deref());
    let _lock = store.lock(&a.name)?;
    if store.path(&a.name).exists() {
        bail!("replica `{}` exists already", a.name);
    }
    let cfg = FerryConfig::load(common.config.as_deref())?;
    let driver = connect(&a.source, cfg.source(&a.source)?).await?;
    let target = connect(&a.to_source, cfg.source(&a.to_source)?).await?;
    replica_of(target.as_ref(), &a.to_source)?;
    if driver.kind() != target.kind() {
        // Cycles carry the normalized configuration and disks across (a whole-VM restore,
        // then changed blocks); only the way back needs the primary's side to hold replicas.
        tracing::info!(source = %a.source, target = %a.to_source,
            "a cross-hypervisor replica: {} → {}", kind_name(driver.kind()), kind_name(target.kind()));
        if driver.replica().is_none() {
            tracing::warn!(
                "{} cannot hold replicas yet: unplanned and test failover work, a planned failover and reverse replication to `{}` are refused",
                kind_name(driver.kind()),
                a.source
            );
        }
    }
    let vms = driver
        .list_vms()
        .await
        .with_context(|| format!("cannot list the VMs of source `{}`", a.source))?;
    let vm = find_vm(&vms, &a.vm)?.clone();
    let pw = read_password(common.password_file.as_deref(), "FERRY_PASSWORD")?;
    let repo = open_repository(&a.repo, pw.as_ref()).await?;
    let seed = match &a.seed {
        Some(s) => {
            let m = resolve_snapshot(&repo, s).await?;
            if m.meta.vm.id != vm.id {
                tracing::warn!(seed = %m.id, seed_vm = %m.meta.vm.name, vm = %vm.name,
                    "the seed is a restore point of another VM; the first cycle rewrites what differs");
            }
            Some(m.id)
        }
        None => None,
    };
    let rec = Replica {
        seed,
        ..Replica::new(a, &vm.id, &vm.name)
    };
    store.save(&rec)?;
    Ok(rec)
}

pub use ferry_daemon::replicas::ReplicaConfig;

/// The `[replicas.*]` tables with their repositories, each checked on its own.
fn scheduled(
    cfg: &FerryConfig,
) -> BTreeMap<String, anyhow::Result<(Spec, ferry_daemon::config::RepositoryConfig, bool)>> {
    let mut out = BTreeMap::new();
    let Some(toml::Value::Table(t)) = cfg.other.get("replicas") else {
        return out;
    };
    for (name, v) in t {
        let one = (|| {
            let rc: ReplicaConfig = v
                .clone()
                .try_into()
                .with_context(|| format!("[replicas.{name}]"))?;
            let repo: ferry_daemon::config::RepositoryConfig = match cfg
                .other
                .get("repositories")
                .and_then(|r| r.get(&rc.repository))
            {
                Some(r) => r
                    .clone()
                    .try_into()
                    .with_context(|| format!("[repositories.{}]", rc.repository))?,
                None => bail!(
                    "[replicas.{name}]: no repository `{}` in the configuration",
                    rc.repository
                ),
            };
            let every = parse_duration(&rc.every).map_err(anyhow::Error::msg)?;
            let rpo = rc
                .rpo
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let spec = Spec {
                name: name.clone(),
                source: rc.source,
                vm: rc.vm,
                to_source: rc.to_source,
                repo: repo.url.clone(),
                every,
                keep: rc.keep,
                rpo,
                seed: rc.seed,
            };
            Ok((spec, repo, rc.enabled))
        })();
        out.insert(name.clone(), one);
    }
    out
}

/// Runs the `[replicas.*]` jobs of `config` when due, until `stop`: creates a job's record the
/// first time, completes an unfinished operation, runs a cycle every `every` (a failed one is
/// tried again at the next interval). A failed-over job waits for the administrator.
pub async fn schedule(
    config: PathBuf,
    state_dir: PathBuf,
    stop: tokio_util::sync::CancellationToken,
) {
    let running: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    let mut reported: BTreeMap<String, String> = BTreeMap::new();
    loop {
        // No file yet (a fresh appliance) is no replica job; a broken one is said once.
        let cfg = match FerryConfig::load(Some(&config)) {
            Ok(c) => c,
            Err(_) if !config.exists() => FerryConfig::default(),
            Err(e) => {
                let text = e.to_string();
                if reported.get("") != Some(&text) {
                    tracing::warn!(error = %text, "replica scheduler: cannot read the configuration");
                    reported.insert(String::new(), text);
                }
                FerryConfig::default()
            }
        };
        for (name, one) in scheduled(&cfg) {
            let (spec, repo, enabled) = match one {
                Ok(x) => x,
                Err(e) => {
                    let text = crate::error_text(&e);
                    if reported.get(&name) != Some(&text) {
                        tracing::warn!(replica = %name, error = %text, "replica scheduler: job skipped");
                        reported.insert(name.clone(), text);
                    }
                    continue;
                }
            };
            if !enabled
                || !running
                    .lock()
                    .map(|mut r| r.insert(name.clone()))
                    .unwrap_or(false)
            {
                continue;
            }
            let common = Common {
                config: Some(config.clone()),
                state_dir: Some(state_dir.clone()),
                password_file: repo.password_file.clone(),
                json: false,
            };
            let running = running.clone();
            tokio::spawn(async move {
                if let Err(e) = scheduled_run(&spec, &common).await {
                    tracing::warn!(replica = %spec.name, error = %crate::error_text(&e), "replica cycle failed");
                }
                if let Ok(mut r) = running.lock() {
                    r.remove(&spec.name);
                }
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn scheduled_run(spec: &Spec, common: &Common) -> anyhow::Result<()> {
    let store = Store::new(common.state_dir.as_deref());
    if !store.path(&spec.name).exists() {
        create_record(spec, common).await?;
        tracing::info!(replica = %spec.name, "replica job created from the configuration");
    }
    let mut rec = store.load(&spec.name)?;
    // Interval, retention and RPO follow the configuration (the rest is the job's identity).
    let rpo = spec.rpo.unwrap_or(spec.every * 2).as_secs().max(1);
    let every = spec.every.as_secs().max(1);
    if (rec.every, rec.keep, rec.rpo) != (every, spec.keep.max(1), rpo) {
        if let Ok(mut ctx) = Ctx::open(&spec.name, common) {
            (ctx.rec.every, ctx.rec.keep, ctx.rec.rpo) = (every, spec.keep.max(1), rpo);
            ctx.save()?;
            rec = ctx.rec.clone();
        }
    }
    let due = rec.op.is_some()
        || rec.cycle.is_some()
        || rec
            .health
            .last_attempt
            .is_none_or(|t| now() - t >= rec.every as i64);
    if !due || (rec.op.is_none() && rec.state != State::Replicating) {
        return Ok(());
    }
    let mut ctx = match Ctx::open(&spec.name, common) {
        Ok(c) => c,
        Err(e) if e.to_string().contains("is busy") => return Ok(()),
        Err(e) => return Err(e),
    };
    resume(&mut ctx).await?;
    if ctx.rec.state == State::Replicating {
        sync(&mut ctx).await?;
        tracing::info!(replica = %spec.name, bytes = ctx.rec.health.last_bytes, "replica cycle done");
    }
    Ok(())
}

fn find_point<'a>(r: &'a Replica, spec: &str) -> anyhow::Result<&'a Point> {
    let hits: Vec<&Point> = r
        .points
        .iter()
        .filter(|p| p.id.starts_with(spec) || p.restore_point.starts_with(spec))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one),
        [] => bail!(
            "replica `{}` has no recovery point `{spec}` (points: {})",
            r.name,
            r.points
                .iter()
                .map(|p| p.restore_point.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => bail!("`{spec}` matches several recovery points; give more of it"),
    }
}

/// Completes the operation in progress, if any.
async fn resume(ctx: &mut Ctx) -> anyhow::Result<()> {
    let Some(op) = ctx.rec.op.clone() else {
        return Ok(());
    };
    tracing::info!(replica = %ctx.rec.name, ?op, "completing the operation in progress");
    match op {
        Op::Failover {
            planned,
            point,
            step,
        } => failover(ctx, planned, point, step).await,
        Op::Reverse { resync } => reverse(ctx, resync).await,
        Op::Test { point } => test_start(ctx, &point).await,
        Op::Cancel { delete_vm } => cancel(ctx, delete_vm).await,
    }
}

fn set_step(ctx: &mut Ctx, n: u8) -> anyhow::Result<()> {
    if let Some(Op::Failover { step, .. }) = &mut ctx.rec.op {
        *step = n;
    }
    ctx.save()
}

async fn failover(
    ctx: &mut Ctx,
    planned: bool,
    point: Option<String>,
    mut step: u8,
) -> anyhow::Result<()> {
    let target = ctx.driver(&ctx.rec.target.clone()).await?;
    let t = replica_of(target.as_ref(), &ctx.rec.target)?;
    let standby = ctx
        .rec
        .standby
        .clone()
        .context("the replica has no standby VM yet: run a sync first")?;
    if planned {
        if step < 1 {
            // A cycle in progress backed up the running primary: finish it first, so the
            // final cycle's backup is surely taken after the shutdown.
            if ctx.rec.cycle.is_some() {
                sync(ctx).await.context("the unfinished cycle failed")?;
            }
            let src = ctx.driver(&ctx.rec.source.clone()).await?;
            replica_of(src.as_ref(), &ctx.rec.source)?
                .power(&ctx.rec.vm, false)
                .await
                .context("cannot shut the primary down")?;
            step = 1;
            set_step(ctx, step)?;
        }
        if step < 2 {
            // The primary is off: this cycle carries its last changes.
            sync(ctx).await.context("the final cycle failed")?;
            step = 2;
            set_step(ctx, step)?;
        }
    } else if step < 1 {
        let p = point.clone().context("no recovery point chosen")?;
        t.point_revert(&standby, &p)
            .await
            .with_context(|| format!("cannot revert the standby to recovery point {p}"))?;
        if let Some(pt) = ctx.rec.points.iter().find(|x| x.id == p).cloned() {
            ctx.rec.applied = Some(pt.restore_point);
            ctx.rec.applied_time = Some(pt.time);
        }
        step = 2;
        set_step(ctx, step)?;
    }
    if step < 3 {
        t.power(&standby, true)
            .await
            .context("cannot start the replica")?;
        step = 3;
        set_step(ctx, step)?;
    }
    let at = point
        .or_else(|| ctx.rec.points.last().map(|p| p.id.clone()))
        .unwrap_or_default();
    ctx.rec.state = State::FailedOver { point: at };
    if planned {
        ctx.rec.op = Some(Op::Reverse { resync: false });
        ctx.save()?;
        return reverse(ctx, false).await;
    }
    ctx.rec.op = None;
    ctx.save()
}

/// Swaps the direction: the running replica becomes the primary, the old primary (shut
/// down) the standby. Every step can be repeated; the swap is one save.
async fn reverse(ctx: &mut Ctx, resync: bool) -> anyhow::Result<()> {
    let r = ctx.rec.clone();
    let standby = r.standby.clone().context("the replica has no standby VM")?;
    let target = ctx.driver(&r.target).await?;
    let t = replica_of(target.as_ref(), &r.target)?;
    let source = ctx.driver(&r.source).await?;
    let s = replica_of(source.as_ref(), &r.source)?;
    // The test copy and the recovery points belong to the old direction.
    if let Some(vm) = &r.test_vm {
        t.replica_remove(vm).await?;
    }
    for p in &r.points {
        t.point_delete(&p.id).await?;
    }
    t.replica_mark(&standby, None).await?;
    let old = s.replica_vm(&r.vm).await?;
    if old.is_some() {
        s.power(&r.vm, false)
            .await
            .context("cannot shut the old primary down")?;
        s.replica_mark(&r.vm, Some(&r.name)).await?;
    } else {
        tracing::warn!(replica = %r.name, vm = %r.vm_name,
            "the old primary is gone: the next cycle creates a new standby on `{}`", r.source);
    }
    let new_name = target
        .list_vms()
        .await?
        .into_iter()
        .find(|v| v.id == standby)
        .map(|v| v.name)
        .unwrap_or_else(|| r.vm_name.clone());
    let rec = &mut ctx.rec;
    rec.source = r.target.clone();
    rec.target = r.source.clone();
    rec.vm = standby;
    rec.vm_name = new_name;
    rec.standby = old.map(|v| v.id);
    rec.resync = resync;
    if rec.standby.is_none() {
        rec.applied = None;
    }
    rec.seed = None;
    rec.points.clear();
    rec.test_vm = None;
    rec.cycle = None;
    rec.state = State::Replicating;
    rec.op = None;
    ctx.save()
}

async fn test_start(ctx: &mut Ctx, point: &str) -> anyhow::Result<()> {
    let target = ctx.driver(&ctx.rec.target.clone()).await?;
    let t = replica_of(target.as_ref(), &ctx.rec.target)?;
    // A killed run may have left a copy: start over.
    for vm in t.replica_marked(&ctx.rec.name, ReplicaRole::Test).await? {
        t.replica_remove(&vm.id).await?;
    }
    let name = format!("{} (test failover)", ctx.rec.vm_name);
    let vm = t
        .test_copy(point, &name, &ctx.rec.name)
        .await
        .context("cannot make the test copy")?;
    ctx.rec.test_vm = Some(vm.id.clone());
    ctx.save()?;
    t.power(&vm.id, true)
        .await
        .context("cannot start the test copy")?;
    ctx.rec.op = None;
    ctx.save()
}

async fn test_cleanup(ctx: &mut Ctx) -> anyhow::Result<()> {
    let target = ctx.driver(&ctx.rec.target.clone()).await?;
    let t = replica_of(target.as_ref(), &ctx.rec.target)?;
    let mut vms: Vec<String> = t
        .replica_marked(&ctx.rec.name, ReplicaRole::Test)
        .await?
        .into_iter()
        .map(|v| v.id)
        .collect();
    vms.extend(ctx.rec.test_vm.clone());
    vms.dedup();
    for vm in vms {
        t.replica_remove(&vm).await?;
    }
    ctx.rec.test_vm = None;
    if matches!(ctx.rec.op, Some(Op::Test { .. })) {
        ctx.rec.op = None;
    }
    ctx.save()
}

async fn cancel(ctx: &mut Ctx, delete_vm: bool) -> anyhow::Result<()> {
    let target = ctx.driver(&ctx.rec.target.clone()).await?;
    let t = replica_of(target.as_ref(), &ctx.rec.target)?;
    test_cleanup(ctx).await?;
    for p in ctx.rec.points.clone() {
        t.point_delete(&p.id).await?;
        ctx.rec.points.retain(|x| x.id != p.id);
        ctx.save()?;
    }
    if let Some(vm) = ctx.rec.standby.clone() {
        if t.replica_vm(&vm).await?.is_some() {
            if delete_vm {
                t.replica_remove(&vm).await?;
            } else {
                t.replica_mark(&vm, None).await?;
            }
        }
    }
    ctx.store.remove(&ctx.rec.name)?;
    if !ctx.common.json && !crate::logging::quiet() {
        eprintln!(
            "replica `{}` ended{}",
            ctx.rec.name,
            if delete_vm {
                ": standby VM removed"
            } else {
                "; the standby VM stays"
            }
        );
    }
    Ok(())
}

/// The chunks of `disk` that differ between restore points `from` and `to` (every byte
/// when `from` has no such disk of the same geometry).
async fn changed_between(
    repo: &Repository,
    from: Option<&Manifest>,
    to: &Manifest,
    disk: &str,
) -> anyhow::Result<ExtentMap> {
    let new = repo.load_index(to, disk).await?;
    let all = ExtentMap::from_range(0..new.disk_size);
    let Some(from) = from.filter(|f| f.disks.iter().any(|d| d.name == disk)) else {
        return Ok(all);
    };
    let old = repo.load_index(from, disk).await?;
    if old.disk_size != new.disk_size || old.chunk_size != new.chunk_size {
        return Ok(all);
    }
    let mut m = ExtentMap::default();
    for (i, (a, b)) in old.chunks.iter().zip(&new.chunks).enumerate() {
        if a != b {
            m.insert(new.chunk_range(i));
        }
    }
    Ok(m)
}

/// One cycle (resumed where a killed one stopped): backup, standby created or updated,
/// recovery point, pruning.
async fn sync(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.rec.health.last_attempt = Some(now());
    let r = cycle(ctx).await;
    match &r {
        Ok(()) => {
            let bytes = ctx.rec.cycle.take().map(|c| c.bytes).unwrap_or(0);
            let h = &mut ctx.rec.health;
            h.last_success = Some(now());
            h.last_error = None;
            h.last_bytes = bytes;
            h.cycles += 1;
        }
        Err(e) => ctx.rec.health.last_error = Some(crate::error_text(e)),
    }
    ctx.save()?;
    r
}

async fn cycle(ctx: &mut Ctx) -> anyhow::Result<()> {
    let repo = ctx.repo().await?;
    let source = ctx.driver(&ctx.rec.source.clone()).await?;
    let target = ctx.driver(&ctx.rec.target.clone()).await?;
    let t = replica_of(target.as_ref(), &ctx.rec.target)?;
    let name = ctx.rec.name.clone();
    // 1. The backup (a killed one is started again; its driver removes the old snapshot).
    let rp = match ctx.rec.cycle.as_ref().and_then(|c| c.restore_point.clone()) {
        Some(rp) => rp,
        None => {
            ctx.rec.cycle = Some(Cycle {
                restore_point: None,
                bytes: 0,
            });
            ctx.save()?;
            let vms = source.list_vms().await?;
            let vm = find_vm(&vms, &ctx.rec.vm)?.clone();
            let b = backup_vm(
                source.as_ref(),
                &ctx.rec.source,
                &repo,
                &vm,
                &VmBackupOptions::default(),
            )
            .await?;
            let rp = b.report.snapshot.clone();
            ctx.rec.cycle = Some(Cycle {
                restore_point: Some(rp.clone()),
                bytes: 0,
            });
            ctx.save()?;
            rp
        }
    };
    let m = repo.load_manifest(&rp).await?;
    // 2. The standby: created (from the seed, else this restore point) when there is none.
    let standby = match &ctx.rec.standby {
        Some(s) if t.replica_vm(s).await?.is_some() => s.clone(),
        stale => {
            if let Some(s) = stale {
                tracing::warn!(replica = %name, vm = %s, "the standby VM is gone: creating it again");
            }
            for vm in t.replica_marked(&name, ReplicaRole::Standby).await? {
                tracing::warn!(replica = %name, vm = %vm.id, "removing the standby a killed run left half-made");
                t.replica_remove(&vm.id).await?;
            }
            let base = match ctx.rec.seed.clone() {
                Some(s) => repo.load_manifest(&s).await?,
                None => m.clone(),
            };
            let plan = restore_plan(
                &repo,
                &base,
                target.kind(),
                format!("{} (replica)", ctx.rec.vm_name),
                false,
            )
            .await?;
            let vm = t
                .replica_create(&plan, &name)
                .await
                .context("cannot create the standby VM")?;
            ctx.rec.standby = Some(vm.id.clone());
            ctx.rec.applied = Some(base.id.clone());
            ctx.rec.applied_time = Some(base.time);
            ctx.rec.resync = false;
            ctx.rec.points.clear();
            if let Some(c) = &mut ctx.rec.cycle {
                c.bytes += plan.disks.iter().map(|d| d.source.size()).sum::<u64>();
            }
            ctx.save()?;
            vm.id
        }
    };
    // 3. What changed since the restore point the standby holds, written into its disks.
    if ctx.rec.applied.as_deref() != Some(rp.as_str()) || ctx.rec.resync {
        let from = match (&ctx.rec.applied, ctx.rec.resync) {
            (Some(a), false) => Some(repo.load_manifest(a).await?),
            _ => None,
        };
        let plan: RestorePlan =
            restore_plan(&repo, &m, target.kind(), String::new(), false).await?;
        t.power(&standby, false).await?;
        let mut bytes = 0;
        for (i, d) in plan.disks.iter().enumerate() {
            let ext = changed_between(&repo, from.as_ref(), &m, &d.name).await?;
            bytes += t
                .replica_write(&standby, i, d.source.as_ref(), &ext)
                .await
                .with_context(|| format!("cannot write disk `{}` of the standby", d.name))?;
        }
        ctx.rec.applied = Some(rp.clone());
        ctx.rec.applied_time = Some(m.time);
        ctx.rec.resync = false;
        if let Some(c) = &mut ctx.rec.cycle {
            c.bytes += bytes;
        }
        ctx.save()?;
    }
    // 4. The recovery point (one a killed run took already is adopted).
    if !ctx.rec.points.iter().any(|p| p.restore_point == rp) {
        let pname = format!("ferry-replica {name} {rp}");
        let existing = t
            .points(&standby)
            .await?
            .into_iter()
            .find(|p| p.name == pname);
        let p = match existing {
            Some(p) => p,
            None => t.point_create(&standby, &pname).await?,
        };
        ctx.rec.points.push(Point {
            id: p.id,
            restore_point: rp.clone(),
            time: m.time,
        });
        ctx.save()?;
    }
    // 5. Retention.
    while ctx.rec.points.len() > ctx.rec.keep {
        let old = ctx.rec.points[0].clone();
        t.point_delete(&old.id).await?;
        ctx.rec.points.remove(0);
        ctx.save()?;
    }
    Ok(())
}

fn status_json(r: &Replica) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("lag".into(), r.lag().into());
        o.insert("stale".into(), r.stale().into());
    }
    v
}

fn print_status(r: &Replica, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&status_json(r))?);
        return Ok(());
    }
    let state = match &r.state {
        State::Replicating => format!("replicating {} → {}", r.source, r.target),
        State::FailedOver { point } => format!("failed over to {} (point {point})", r.target),
    };
    println!(
        "{}: VM `{}` {state}; lag {}; last success {}; last cycle {}; {} point(s){}{}{}",
        r.name,
        r.vm_name,
        r.lag().map_or("-".into(), secs),
        r.health
            .last_success
            .map_or("never".into(), |t| format!("{} ago", secs(now() - t))),
        ferry_core::size::human_bytes(r.health.last_bytes),
        r.points.len(),
        r.health
            .last_error
            .as_ref()
            .map_or(String::new(), |e| format!("; last error: {e}")),
        r.op.as_ref()
            .map_or(String::new(), |o| format!("; unfinished: {o:?}")),
        r.test_vm
            .as_ref()
            .map_or(String::new(), |v| format!("; test copy {v} running")),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("web-1.prod").is_ok());
        for bad in ["", ".hidden", "a/b", "x y"] {
            assert!(valid_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stale_after_the_rpo() {
        let spec = Spec {
            name: "r".into(),
            source: "a".into(),
            vm: "v".into(),
            to_source: "b".into(),
            repo: "/r".into(),
            every: Duration::from_secs(60),
            keep: 2,
            rpo: None,
            seed: None,
        };
        let mut r = Replica::new(&spec, "v", "v");
        assert_eq!(r.rpo, 120);
        assert!(r.stale().unwrap().contains("no recovery point"));
        r.applied_time = Some(now() - 10);
        assert!(r.stale().is_none());
        r.applied_time = Some(now() - 600);
        r.health.last_error = Some("boom".into());
        let why = r.stale().unwrap();
        assert!(why.contains("10m00s old") && why.contains("boom"), "{why}");
    }
}
