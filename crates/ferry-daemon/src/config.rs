//! The appliance's part of `ferry.toml` and the store that changes it.
//!
//! `ferry.toml` stays the one configuration file (the CLI reads the same sources): the
//! appliance adds `[repositories.NAME]`, `[jobs.NAME]` and `[appliance]` tables beside the
//! `[sources.NAME]` ones. Every change through the API reads the file, checks the resource's
//! ETag (a hash of its table), applies the change to the whole document, validates the whole
//! document with the same typed parsers that read it, and replaces the file atomically. A
//! secret given to the API goes to its own 0600 file under `STATE/secrets/` and the table gets
//! a `password-file` key, so `ferry.toml` never holds it in clear and the API never returns it.

use crate::fsutil::write_atomic;
use crate::problem::{ApiResult, Problem};
use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use ferry_hv::FerryConfig;
use serde::Deserialize;
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `[appliance]`: limits of this appliance.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ApplianceConfig {
    /// VMs backed up at once by this appliance, all jobs together.
    #[serde(default = "default_max_vms")]
    pub max_concurrent_vms: usize,
    /// VMs backed up at once from one source.
    #[serde(default = "default_per_source")]
    pub per_source_vms: usize,
    /// VMs backed up at once from one hypervisor host, all sources (unlimited if absent).
    #[serde(default)]
    pub per_host_vms: Option<usize>,
    /// This appliance's name in work leases and sessions (default: the host name); appliances
    /// sharing a repository need different names.
    #[serde(default)]
    pub name: Option<String>,
    /// Seconds a work lease lives without renewal: how long a dead appliance's VMs wait before
    /// another appliance takes them over (renewed every third of it).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: u64,
    /// Seconds between two checks of the jobs' RPOs.
    #[serde(default = "default_rpo_check")]
    pub rpo_check_seconds: u64,
    /// Events held for the event streams' clients (ADR 0178): a client further behind gets a
    /// `resync` instead of what it missed.
    #[serde(default = "crate::events::default_buffer")]
    pub events_buffer: usize,
    /// Milliseconds between two samples of running VMs' progress for the event streams.
    #[serde(default = "crate::events::default_progress_ms")]
    pub events_progress_ms: u64,
}

fn default_rpo_check() -> u64 {
    300
}

fn default_lease_ttl() -> u64 {
    300
}

fn default_max_vms() -> usize {
    4
}
fn default_per_source() -> usize {
    2
}

impl Default for ApplianceConfig {
    fn default() -> Self {
        Self {
            max_concurrent_vms: default_max_vms(),
            per_source_vms: default_per_source(),
            per_host_vms: None,
            name: None,
            lease_ttl_seconds: default_lease_ttl(),
            rpo_check_seconds: default_rpo_check(),
            events_buffer: crate::events::default_buffer(),
            events_progress_ms: crate::events::default_progress_ms(),
        }
    }
}

/// `[repositories.NAME]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A path, `file://`, `s3://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
    pub url: String,
    /// File holding the repository password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// AWS KMS key whose key slot unlocks the repository when no password is configured
    /// (`kms = { key-id = "…", region = "…", endpoint = "…" }`; ADR 0182). `init` wraps the
    /// new repository's key with it.
    #[serde(default)]
    pub kms: Option<ferry_repo::KmsKey>,
}

impl RepositoryConfig {
    /// How to unlock the repository: the password if one is configured, else a KMS key slot
    /// (of the configured key, through its endpoint, if one is configured).
    pub fn unlock(&self) -> Result<ferry_repo::Unlock, String> {
        Ok(ferry_repo::Unlock {
            password: self.password()?,
            kms: ferry_repo::KmsUnlock {
                force: false,
                key_id: self.kms.as_ref().map(|k| k.key_id.clone()),
                endpoint: self.kms.as_ref().and_then(|k| k.endpoint.clone()),
            },
        })
    }

    /// The password, if any.
    pub fn password(&self) -> Result<Option<ferry_core::Secret>, String> {
        match &self.password_file {
            None => Ok(None),
            Some(p) => std::fs::read_to_string(p)
                .map(|t| Some(ferry_core::Secret::new(t.lines().next().unwrap_or(""))))
                .map_err(|e| format!("cannot read password file {}: {e}", p.display())),
        }
    }
}

/// GFS retention of a job's VMs, applied after each run.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// The N newest restore points.
    #[serde(default)]
    pub last: u32,
    /// The newest of each of the last N days.
    #[serde(default)]
    pub daily: u32,
    /// … ISO weeks.
    #[serde(default)]
    pub weekly: u32,
    /// … months.
    #[serde(default)]
    pub monthly: u32,
    /// … years.
    #[serde(default)]
    pub yearly: u32,
}

impl RetentionConfig {
    /// The repository's policy.
    pub fn policy(&self) -> ferry_repo::Retention {
        ferry_repo::Retention {
            last: self.last,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
            yearly: self.yearly,
        }
    }
}

/// A daily time window (`start` to `end` in the job's time zone; `end` before `start` spans
/// midnight).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// `HH:MM`.
    pub start: String,
    /// `HH:MM`.
    pub end: String,
}

/// A bandwidth limit for part of the day (`start` to `end` in the job's time zone).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ThrottleConfig {
    /// `HH:MM`.
    pub start: String,
    /// `HH:MM`.
    pub end: String,
    /// Cap on the bytes read from the source, in MiB per second (one word: nested keys are
    /// the same in the file and the API).
    pub rate: u64,
}

/// `[jobs.NAME]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JobConfig {
    /// The source's name.
    pub source: String,
    /// The repository's name.
    pub repository: String,
    /// VM names or ids; `*` and `?` match like shell globs.
    pub vms: Vec<String>,
    /// Cron expression (5 or 6 fields); absent: run by hand only.
    #[serde(default)]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule` and `window` (default UTC).
    #[serde(default)]
    pub timezone: Option<String>,
    /// VMs start only inside this window.
    #[serde(default)]
    pub window: Option<WindowConfig>,
    /// Applied to the job's VMs after each run.
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    /// Attempts after a VM's first failure.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Wait before the first retry; doubles with each further one.
    #[serde(default = "default_retry_delay")]
    pub retry_delay_seconds: u64,
    /// VMs of this job backed up at once.
    #[serde(default = "default_parallel")]
    pub parallel_vms: usize,
    /// VMs with a disk on one datastore/SR at once (their snapshots and reads load it);
    /// shared by the jobs that ask the same number (ADR 0142). Unset: no limit.
    #[serde(default)]
    pub per_datastore_vms: Option<usize>,
    /// Disks of this job in flight at once: a VM takes one slot per disk (all of a VM's
    /// disks are snapshotted together), at most this many (ADR 0142). Unset: no limit.
    #[serde(default)]
    pub parallel_disks: Option<usize>,
    /// Scheduled runs happen only when enabled (runs by hand always can).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Alert when a VM's newest restore point is older than this (hours).
    #[serde(default)]
    pub rpo_hours: Option<f64>,
    /// Run this job whenever job `after` ends with success (a chain; ADR 0107).
    #[serde(default)]
    pub after: Option<String>,
    /// Bandwidth limits by time of day: the first rule whose window holds a VM's start caps
    /// that VM's reads (ADR 0107).
    #[serde(default)]
    pub throttle: Vec<ThrottleConfig>,
}

fn default_retries() -> u32 {
    2
}
fn default_retry_delay() -> u64 {
    60
}
fn default_parallel() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl Schedule {
    /// Parses `expr` in `tz`; an expression that never fires is refused.
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<Self, Problem> {
        let tz = parse_tz(tz)?;
        let cron: croner::Cron = expr.parse().map_err(|e: croner::errors::CronError| {
            Problem::invalid("schedule", format!("cron expression `{expr}`: {e}"))
        })?;
        let s = Self { cron, tz };
        if s.next_after(Utc::now()).is_none() {
            return Err(Problem::invalid(
                "schedule",
                format!("cron expression `{expr}` never fires (no time matches it)"),
            ));
        }
        Ok(s)
    }

    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }
}

fn parse_tz(tz: Option<&str>) -> Result<chrono_tz::Tz, Problem> {
    match tz {
        None => Ok(chrono_tz::UTC),
        Some(z) => z.parse().map_err(|_| {
            Problem::invalid(
                "timezone",
                format!("`{z}` is not an IANA time zone (such as UTC or Europe/Berlin)"),
            )
        }),
    }
}

fn parse_hhmm(field: &str, s: &str) -> Result<NaiveTime, Problem> {
    NaiveTime::parse_from_str(s, "%H:%M")
        .map_err(|_| Problem::invalid(field, format!("`{s}` is not a time of day as HH:MM")))
}

/// A parsed window.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    start: NaiveTime,
    end: NaiveTime,
    tz: chrono_tz::Tz,
}

impl Window {
    fn parse(field: &str, start: &str, end: &str, tz: chrono_tz::Tz) -> Result<Self, Problem> {
        let (start, end) = (
            parse_hhmm(&format!("{field}.start"), start)?,
            parse_hhmm(&format!("{field}.end"), end)?,
        );
        if start == end {
            return Err(Problem::invalid(
                field,
                format!("{field} start and end are equal: the window would be empty"),
            ));
        }
        Ok(Self { start, end, tz })
    }

    /// Whether `t` is inside the window.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        let local = self.tz.from_utc_datetime(&t.naive_utc()).time();
        if self.start <= self.end {
            local >= self.start && local < self.end
        } else {
            local >= self.start || local < self.end
        }
    }
}

impl JobConfig {
    /// The schedule, if any.
    pub fn schedule(&self) -> Result<Option<Schedule>, Problem> {
        self.schedule
            .as_deref()
            .map(|s| Schedule::parse(s, self.timezone.as_deref()))
            .transpose()
    }

    /// The window, if any.
    pub fn window(&self) -> Result<Option<Window>, Problem> {
        let tz = parse_tz(self.timezone.as_deref())?;
        self.window
            .as_ref()
            .map(|w| Window::parse("window", &w.start, &w.end, tz))
            .transpose()
    }

    /// The read-rate cap (bytes per second) for a VM starting at `t`: the first throttle rule
    /// whose window holds `t`.
    pub fn throttle_at(&self, t: DateTime<Utc>) -> Result<Option<u64>, Problem> {
        let tz = parse_tz(self.timezone.as_deref())?;
        for r in &self.throttle {
            if Window::parse("throttle", &r.start, &r.end, tz)?.contains(t) {
                return Ok(Some(r.rate << 20));
            }
        }
        Ok(None)
    }

    /// Whether `vm` (name and id) is selected.
    pub fn selects(&self, name: &str, id: &str) -> bool {
        self.vms.iter().any(|p| glob(p, name) || p == id)
    }

    fn validate(&self, name: &str, doc: &Document) -> Result<(), Problem> {
        if !doc.ferry.sources.contains_key(&self.source) {
            return Err(Problem::invalid(
                "source",
                format!("job `{name}`: no source `{}`", self.source),
            ));
        }
        if !doc.repositories.contains_key(&self.repository) {
            return Err(Problem::invalid(
                "repository",
                format!("job `{name}`: no repository `{}`", self.repository),
            ));
        }
        if self.vms.is_empty() || self.vms.iter().any(|v| v.trim().is_empty()) {
            return Err(Problem::invalid(
                "vms",
                format!("job `{name}`: list at least one VM name, id or pattern (no empty ones)"),
            ));
        }
        self.schedule()?;
        self.window()?;
        self.throttle_at(Utc::now())?;
        if self.throttle.iter().any(|r| r.rate == 0) {
            return Err(Problem::invalid(
                "throttle",
                format!("job `{name}`: a throttle needs a rate of at least 1 (MiB/s)"),
            ));
        }
        if let Some(after) = &self.after {
            if !doc.jobs.contains_key(after) {
                return Err(Problem::invalid(
                    "after",
                    format!("job `{name}`: no job `{after}` to run after"),
                ));
            }
            // Follow the chain upwards: it must end, not come back here.
            let mut seen = vec![name.to_string()];
            let mut cur = Some(after.clone());
            while let Some(j) = cur {
                if seen.contains(&j) {
                    return Err(Problem::invalid(
                        "after",
                        format!(
                            "job `{name}`: the chain {} → {j} is a loop",
                            seen.join(" → ")
                        ),
                    ));
                }
                cur = doc.jobs.get(&j).and_then(|x| x.after.clone());
                seen.push(j);
            }
        }
        if self.parallel_vms == 0 || self.parallel_vms > 64 {
            return Err(Problem::invalid(
                "parallel_vms",
                format!("job `{name}`: parallel_vms must be 1..=64"),
            ));
        }
        for (field, v) in [
            ("per_datastore_vms", self.per_datastore_vms),
            ("parallel_disks", self.parallel_disks),
        ] {
            if v.is_some_and(|n| n == 0 || n > 1024) {
                return Err(Problem::invalid(
                    field,
                    format!("job `{name}`: {field} must be 1..=1024"),
                ));
            }
        }
        if self
            .rpo_hours
            .is_some_and(|h| !h.is_finite() || h <= 0.0 || h > 24.0 * 366.0)
        {
            return Err(Problem::invalid(
                "rpo_hours",
                format!("job `{name}`: rpo_hours must be more than 0 and at most a year"),
            ));
        }
        if self.retries > 10 {
            return Err(Problem::invalid(
                "retries",
                format!("job `{name}`: at most 10 retries"),
            ));
        }
        if self
            .retention
            .is_some_and(|r| r.policy() == ferry_repo::Retention::default())
        {
            return Err(Problem::invalid(
                "retention",
                format!(
                    "job `{name}`: a retention with every count 0 would remove every restore point; give at least one count or leave retention out"
                ),
            ));
        }
        Ok(())
    }
}

/// `*` any run, `?` one character. Greedy with backtracking to the last `*` only: linear-ish,
/// never exponential, whatever the pattern.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The whole file, parsed.
#[derive(Clone, Debug)]
pub struct Document {
    /// The raw tables (what is written back).
    pub raw: toml::Table,
    /// Sources (the CLI's parser).
    pub ferry: FerryConfig,
    /// Repositories.
    pub repositories: BTreeMap<String, RepositoryConfig>,
    /// Jobs.
    pub jobs: BTreeMap<String, JobConfig>,
    /// Limits.
    pub appliance: ApplianceConfig,
    /// Where alerts go.
    pub alert_targets: BTreeMap<String, crate::alerts::AlertTargetConfig>,
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Parses each `[TABLE.NAME]` on its own, so an error names the resource.
fn parse_each<T: serde::de::DeserializeOwned>(
    raw: &toml::Table,
    kind: Kind,
) -> Result<BTreeMap<String, T>, Problem> {
    let mut out = BTreeMap::new();
    let Some(v) = raw.get(kind.table()) else {
        return Ok(out);
    };
    let t = v.as_table().ok_or_else(|| {
        Problem::invalid("ferry.toml", format!("`{}` must be a table", kind.table()))
    })?;
    for (name, v) in t {
        let parsed: T = v.clone().try_into().map_err(|e: toml::de::Error| {
            Problem::invalid(
                kind.noun(),
                format!("{} `{name}`: {}", kind.noun(), one_line(&e.to_string())),
            )
        })?;
        out.insert(name.clone(), parsed);
    }
    Ok(out)
}

/// The three kinds of resource kept in `ferry.toml`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `[sources.NAME]`.
    Source,
    /// `[repositories.NAME]`.
    Repository,
    /// `[jobs.NAME]`.
    Job,
    /// `[alert-targets.NAME]`.
    AlertTarget,
    /// `[replicas.NAME]`.
    Replica,
}

impl Kind {
    /// The top-level table.
    pub fn table(self) -> &'static str {
        match self {
            Kind::Source => "sources",
            Kind::Repository => "repositories",
            Kind::Job => "jobs",
            Kind::AlertTarget => "alert-targets",
            Kind::Replica => "replicas",
        }
    }
    /// For messages.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Source => "source",
            Kind::Repository => "repository",
            Kind::Job => "job",
            Kind::AlertTarget => "alert target",
            Kind::Replica => "replica",
        }
    }
}

impl Document {
    /// Parses and validates `text`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Problem> {
        let raw: toml::Table = text
            .parse()
            .map_err(|e| Problem::invalid("ferry.toml", format!("{}: {e}", path.display())))?;
        Self::from_table(raw, path)
    }

    fn from_table(raw: toml::Table, path: &Path) -> Result<Self, Problem> {
        let text = toml::to_string(&raw).map_err(|e| Problem::internal(e.to_string()))?;
        let ferry = FerryConfig::parse(&text, path).map_err(|e| {
            Problem::invalid(
                "source",
                e.to_string()
                    .replace(&format!("config {}: ", path.display()), ""),
            )
        })?;
        let appliance = match raw.get("appliance") {
            None => ApplianceConfig::default(),
            Some(v) => v.clone().try_into().map_err(|e: toml::de::Error| {
                Problem::invalid(
                    "appliance",
                    format!("[appliance]: {}", one_line(&e.to_string())),
                )
            })?,
        };
        let doc = Self {
            repositories: parse_each(&raw, Kind::Repository)?,
            jobs: parse_each(&raw, Kind::Job)?,
            alert_targets: parse_each(&raw, Kind::AlertTarget)?,
            raw,
            ferry,
            appliance,
        };
        for (name, j) in &doc.jobs {
            j.validate(name, &doc)?;
        }
        for (name, t) in &doc.alert_targets {
            t.validate(name)?;
        }
        if doc.appliance.max_concurrent_vms == 0
            || doc.appliance.per_source_vms == 0
            || doc.appliance.per_host_vms == Some(0)
        {
            return Err(Problem::invalid(
                "appliance",
                "max-concurrent-vms, per-source-vms and per-host-vms must be at least 1",
            ));
        }
        if doc.appliance.lease_ttl_seconds < 3 {
            return Err(Problem::invalid(
                "appliance",
                "lease-ttl-seconds must be at least 3 (the lease is renewed every third of it)",
            ));
        }
        crate::events::validate(&doc.appliance)?;
        if let Some(n) = &doc.appliance.name {
            valid_name(Kind::Job, n).map_err(|_| {
                Problem::invalid(
                    "appliance",
                    format!("[appliance] name `{n}`: use 1 to 64 letters, digits, - and _"),
                )
            })?;
        }
        Ok(doc)
    }

    /// The enabled jobs chained after `job` (`after = "job"`).
    pub fn chained(&self, job: &str) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|(_, j)| j.enabled && j.after.as_deref() == Some(job))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The table of resource `name`.
    pub fn table(&self, kind: Kind, name: &str) -> Option<&toml::Table> {
        self.raw
            .get(kind.table())?
            .as_table()?
            .get(name)?
            .as_table()
    }

    /// Names of `kind`.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        self.raw
            .get(kind.table())
            .and_then(|t| t.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// The ETag of a resource's table.
pub fn etag(table: &toml::Table) -> String {
    let text = toml::to_string(table).unwrap_or_default();
    let d = sha2::Sha256::digest(text.as_bytes());
    format!(
        "\"{}\"",
        d[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The request's precondition.
#[derive(Clone, Debug, Default)]
pub struct Precondition {
    /// `If-Match`.
    pub if_match: Option<String>,
}

/// `ferry.toml` and the secrets directory, changed one request at a time.
#[derive(Debug)]
pub struct ConfigStore {
    path: PathBuf,
    secrets: PathBuf,
    write: tokio::sync::Mutex<()>,
}

/// A secret to store with a change: (key in the table, value).
pub type NewSecret = (&'static str, ferry_core::Secret);

impl ConfigStore {
    /// The store of `path`, keeping secrets in `secrets`.
    pub fn new(path: PathBuf, secrets: PathBuf) -> Self {
        Self {
            path,
            secrets,
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and validates the file (absent: empty).
    pub fn load(&self) -> Result<Document, Problem> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(Problem::internal(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )));
            }
        };
        Document::parse(&text, &self.path)
    }

    /// Creates or replaces resource `name` with `table` (secrets `secret` stored beside it),
    /// checking `pre`: an existing resource needs `If-Match` with its ETag (428 without,
    /// 412 on a mismatch); a new one needs no `If-Match` (412 with one). `check` validates the
    /// candidate document further (e.g. opening a repository) before anything is written.
    /// Returns the new ETag and whether the resource was created.
    pub async fn put<F, Fut>(
        &self,
        kind: Kind,
        name: &str,
        mut table: toml::Table,
        secret: Option<NewSecret>,
        pre: &Precondition,
        check: F,
    ) -> ApiResult<(String, bool)>
    where
        F: FnOnce(Document) -> Fut,
        Fut: std::future::Future<Output = ApiResult<()>>,
    {
        valid_name(kind, name)?;
        let _guard = self.write.lock().await;
        let doc = self.load()?;
        let existing = doc.table(kind, name).cloned();
        check_precondition(kind, name, existing.as_ref(), pre)?;
        // A secret kept from before when none is given (write-only fields).
        let mut new_secret_file = None;
        if let Some((key, value)) = secret {
            std::fs::create_dir_all(&self.secrets).map_err(|e| {
                Problem::internal(format!("cannot create {}: {e}", self.secrets.display()))
            })?;
            let mut rnd = [0u8; 4];
            getrandom::fill(&mut rnd).map_err(|e| Problem::internal(e.to_string()))?;
            let file = self.secrets.join(format!(
                "{}-{name}-{}.password",
                kind.noun().replace(' ', "-"),
                rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ));
            write_atomic(&file, format!("{}\n", value.expose()).as_bytes(), 0o600)
                .map_err(|e| Problem::internal(format!("cannot write {}: {e}", file.display())))?;
            table.insert(key.into(), toml::Value::String(file.display().to_string()));
            table.remove("password");
            new_secret_file = Some(file);
        } else if let Some(old) = &existing {
            for key in ["password-file", "password"] {
                if let (Some(v), false) = (old.get(key), table.contains_key(key)) {
                    table.insert(key.into(), v.clone());
                }
            }
        }
        let result = async {
            let mut raw = doc.raw.clone();
            raw.entry(kind.table())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| {
                    Problem::internal(format!("`{}` in ferry.toml is not a table", kind.table()))
                })?
                .insert(name.into(), toml::Value::Table(table.clone()));
            let next = Document::from_table(raw, &self.path)?;
            let text =
                toml::to_string_pretty(&next.raw).map_err(|e| Problem::internal(e.to_string()))?;
            check(next).await?;
            self.write_file(&text)
        }
        .await;
        match result {
            Ok(()) => {
                // The previous secret file is replaced.
                if let (Some(old), Some(_)) = (&existing, &new_secret_file) {
                    self.remove_own_secret(old);
                }
                Ok((etag(&table), existing.is_none()))
            }
            Err(e) => {
                if let Some(f) = new_secret_file {
                    let _ = std::fs::remove_file(f);
                }
                Err(e)
            }
        }
    }

    /// Deletes resource `name` (`If-Match` required); `check` refuses when others use it.
    pub async fn delete(&self, kind: Kind, name: &str, pre: &Precondition) -> ApiResult<()> {
        let _guard = self.write.lock().await;
        let doc = self.load()?;
        let Some(existing) = doc.table(kind, name).cloned() else {
            return Err(Problem::not_found(format!("{} `{name}`", kind.noun())));
        };
        check_precondition(kind, name, Some(&existing), pre)?;
        let users: Vec<&String> = doc
            .jobs
            .iter()
            .filter(|(_, j)| match kind {
                Kind::Source => j.source == name,
                Kind::Repository => j.repository == name,
                Kind::Job | Kind::AlertTarget | Kind::Replica => false,
            })
            .map(|(n, _)| n)
            .collect();
        if !users.is_empty() {
            return Err(Problem::conflict(format!(
                "{} `{name}` is used by job(s) {}; change or delete them first",
                kind.noun(),
                users
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let replicas = crate::replicas::users_of(&doc, kind, name);
        if !replicas.is_empty() {
            return Err(Problem::conflict(format!(
                "{} `{name}` is used by replica(s) {}; change or delete them first",
                kind.noun(),
                replicas.join(", ")
            )));
        }
        let mut raw = doc.raw.clone();
        if let Some(t) = raw.get_mut(kind.table()).and_then(|t| t.as_table_mut()) {
            t.remove(name);
        }
        let next = Document::from_table(raw, &self.path)?;
        let text =
            toml::to_string_pretty(&next.raw).map_err(|e| Problem::internal(e.to_string()))?;
        self.write_file(&text)?;
        self.remove_own_secret(&existing);
        Ok(())
    }

    fn write_file(&self, text: &str) -> ApiResult<()> {
        write_atomic(&self.path, text.as_bytes(), 0o600)
            .map_err(|e| Problem::internal(format!("cannot write {}: {e}", self.path.display())))
    }

    /// Removes a password file only if it is one this store wrote.
    fn remove_own_secret(&self, table: &toml::Table) {
        if let Some(p) = table.get("password-file").and_then(|v| v.as_str()) {
            let p = Path::new(p);
            if p.parent() == Some(self.secrets.as_path()) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn valid_name(kind: Kind, name: &str) -> ApiResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Problem::invalid(
            "name",
            format!(
                "{} name `{name}`: use 1 to 64 letters, digits, `-` or `_`",
                kind.noun()
            ),
        ));
    }
    Ok(())
}

fn check_precondition(
    kind: Kind,
    name: &str,
    existing: Option<&toml::Table>,
    pre: &Precondition,
) -> ApiResult<()> {
    use axum::http::StatusCode;
    match (existing, &pre.if_match) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(Problem::new(
            StatusCode::PRECONDITION_FAILED,
            format!(
                "{} `{name}` does not exist, so If-Match cannot match",
                kind.noun()
            ),
        )),
        (Some(_), None) => Err(Problem::new(
            StatusCode::PRECONDITION_REQUIRED,
            format!(
                "{} `{name}` exists: send If-Match with the ETag from GET to change it",
                kind.noun()
            ),
        )),
        (Some(t), Some(m)) => {
            let current = etag(t);
            if m.split(',').any(|x| {
                let x = x.trim();
                x == "*" || x == current || x.trim_start_matches("W/") == current
            }) {
                Ok(())
            } else {
                Err(Problem::new(
                    StatusCode::PRECONDITION_FAILED,
                    format!(
                        "{} `{name}` was changed since you read it (ETag now {current}); read it again",
                        kind.noun()
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("web-*", "web-01"));
        assert!(glob("*", ""));
        assert!(glob("db?", "db1"));
        assert!(!glob("db?", "db10"));
        assert!(!glob("web-*", "db"));
        assert!(glob("*a*b", "xxaxxab"));
        assert!(!glob("*a*b", "xxaxxa"));
        assert!(glob("a*", "a"));
        let long = "a".repeat(5000);
        assert!(!glob(&"*a".repeat(40).replace("a*a", "a*b"), &long));
    }

    #[test]
    fn schedules_in_time_zones_and_ones_that_never_fire() {
        let s = Schedule::parse("30 22 * * *", Some("Europe/Berlin")).unwrap();
        // 2026-07-01 12:00 UTC → 22:30 CEST = 20:30 UTC.
        let t = Utc.with_ymd_and_hms(2026, 7, 1, 12, 0, 0).unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 7, 1, 20, 30, 0).unwrap()
        );
        // In winter CET is UTC+1.
        let t = Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 10, 21, 30, 0).unwrap()
        );
        let e = Schedule::parse("0 0 30 2 *", None).unwrap_err();
        assert!(e.detail.contains("never fires"), "{}", e.detail);
        assert_eq!(e.field.as_deref(), Some("schedule"));
        let e = Schedule::parse("61 * * * *", None).unwrap_err();
        assert_eq!(e.status, 422);
        let e = Schedule::parse("0 * * * *", Some("Mars/Olympus")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("timezone"));
    }

    #[test]
    fn windows_span_midnight() {
        let j: JobConfig = toml::from_str(
            "source = \"s\"\nrepository = \"r\"\nvms = [\"*\"]\nwindow = { start = \"22:00\", end = \"06:00\" }\ntimezone = \"UTC\"\n",
        )
        .unwrap();
        let w = j.window().unwrap().unwrap();
        let at = |h, m| Utc.with_ymd_and_hms(2026, 3, 3, h, m, 0).unwrap();
        assert!(w.contains(at(23, 0)) && w.contains(at(5, 59)));
        assert!(!w.contains(at(6, 0)) && !w.contains(at(12, 0)));
    }

    #[test]
    fn throttles_apply_by_time_of_day() {
        let j: JobConfig = toml::from_str(
            "source = \"s\"\nrepository = \"r\"\nvms = [\"*\"]\ntimezone = \"Europe/Berlin\"\nthrottle = [{ start = \"08:00\", end = \"18:00\", rate = 10 }, { start = \"07:00\", end = \"20:00\", rate = 50 }]\n",
        )
        .unwrap();
        // 2026-03-03 is in CET (UTC+1).
        let at = |h, m| Utc.with_ymd_and_hms(2026, 3, 3, h, m, 0).unwrap();
        assert_eq!(j.throttle_at(at(9, 0)).unwrap(), Some(10 << 20));
        assert_eq!(j.throttle_at(at(6, 30)).unwrap(), Some(50 << 20));
        assert_eq!(j.throttle_at(at(19, 0)).unwrap(), None);
        assert_eq!(j.throttle_at(at(5, 0)).unwrap(), None);
    }

    #[test]
    fn chains_are_checked_and_followed() {
        let text = |a_after: &str| {
            format!(
                "[sources.s]\nkind = \"xen\"\nurl = \"https://x\"\nusername = \"u\"\ntls-insecure = true\n\
                 [repositories.r]\nurl = \"/tmp/r\"\n\
                 [jobs.a]\nsource = \"s\"\nrepository = \"r\"\nvms = [\"*\"]\n{a_after}\n\
                 [jobs.b]\nsource = \"s\"\nrepository = \"r\"\nvms = [\"*\"]\nafter = \"a\"\n\
                 [jobs.c]\nsource = \"s\"\nrepository = \"r\"\nvms = [\"*\"]\nafter = \"b\"\nenabled = false\n"
            )
        };
        let doc = Document::parse(&text(""), Path::new("ferry.toml")).unwrap();
        assert_eq!(doc.chained("a"), vec!["b".to_string()]);
        // Disabled jobs do not run in a chain.
        assert!(doc.chained("b").is_empty());
        let e = Document::parse(&text("after = \"c\""), Path::new("ferry.toml")).unwrap_err();
        assert!(e.detail.contains("is a loop"), "{}", e.detail);
        let e = Document::parse(&text("after = \"zz\""), Path::new("ferry.toml")).unwrap_err();
        assert!(e.detail.contains("no job `zz`"), "{}", e.detail);
    }

    fn store() -> (tempfile::TempDir, ConfigStore) {
        let d = tempfile::tempdir().unwrap();
        let s = ConfigStore::new(d.path().join("ferry.toml"), d.path().join("secrets"));
        (d, s)
    }

    fn table(t: &str) -> toml::Table {
        t.parse().unwrap()
    }

    #[tokio::test]
    async fn etags_guard_every_change_and_secrets_live_apart() {
        let (d, s) = store();
        let ok = |_: Document| async { Ok(()) };
        let src = table(
            "kind = \"xen\"\nurl = \"https://h\"\nusername = \"root\"\ntls-insecure = true\n",
        );
        let (tag, created) = s
            .put(
                Kind::Source,
                "x",
                src.clone(),
                Some(("password-file", ferry_core::Secret::new("s3cret"))),
                &Precondition::default(),
                ok,
            )
            .await
            .unwrap();
        assert!(created);
        let text = std::fs::read_to_string(d.path().join("ferry.toml")).unwrap();
        assert!(
            !text.contains("s3cret") && text.contains("password-file"),
            "{text}"
        );
        // Changing without If-Match: 428; with a stale one: 412; nothing written either time.
        let e = s
            .put(
                Kind::Source,
                "x",
                src.clone(),
                None,
                &Precondition::default(),
                ok,
            )
            .await
            .unwrap_err();
        assert_eq!(e.status, 428);
        let stale = Precondition {
            if_match: Some("\"0000\"".into()),
        };
        let e = s
            .put(Kind::Source, "x", src.clone(), None, &stale, ok)
            .await
            .unwrap_err();
        assert_eq!(e.status, 412);
        assert_eq!(
            std::fs::read_to_string(d.path().join("ferry.toml")).unwrap(),
            text
        );
        // The right ETag: changed; the secret is kept although not sent again.
        let mut src2 = src.clone();
        src2.insert("username".into(), "admin".into());
        let pre = Precondition {
            if_match: Some(tag.clone()),
        };
        let (tag2, created) = s
            .put(Kind::Source, "x", src2, None, &pre, ok)
            .await
            .unwrap();
        assert!(!created && tag2 != tag);
        let doc = s.load().unwrap();
        let pw = doc.ferry.source("x").unwrap().password("x").unwrap();
        assert_eq!(pw.expose(), "s3cret");
        // A bad job is refused whole: the file is unchanged.
        let before = std::fs::read_to_string(d.path().join("ferry.toml")).unwrap();
        for (job, field) in [
            (
                "source = \"x\"\nrepository = \"nope\"\nvms = [\"a\"]\n",
                "repository",
            ),
            (
                "source = \"x\"\nrepository = \"r\"\nvms = [\"a\"]\nschedule = \"0 0 31 4 *\"\n",
                "schedule",
            ),
            (
                "source = \"x\"\nrepository = \"r\"\nvms = [\"a\"]\nbogus = 1\n",
                "job",
            ),
        ] {
            s.put(
                Kind::Repository,
                "r",
                table("url = \"/tmp/r\"\n"),
                None,
                &Precondition {
                    if_match: s.load().unwrap().table(Kind::Repository, "r").map(etag),
                },
                ok,
            )
            .await
            .unwrap();
            let before = std::fs::read_to_string(d.path().join("ferry.toml")).unwrap();
            let e = s
                .put(
                    Kind::Job,
                    "j",
                    table(job),
                    None,
                    &Precondition::default(),
                    ok,
                )
                .await
                .unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{job}: {e:?}");
            assert_eq!(
                std::fs::read_to_string(d.path().join("ferry.toml")).unwrap(),
                before
            );
        }
        let _ = before;
        // A failing check leaves neither the file nor a new secret behind.
        let secrets_before = std::fs::read_dir(d.path().join("secrets")).unwrap().count();
        let cur = Precondition {
            if_match: s.load().unwrap().table(Kind::Source, "x").map(etag),
        };
        let e = s
            .put(
                Kind::Source,
                "x",
                src.clone(),
                Some(("password-file", ferry_core::Secret::new("new"))),
                &cur,
                |_| async { Err(Problem::invalid("url", "refused")) },
            )
            .await
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("url"));
        assert_eq!(
            std::fs::read_dir(d.path().join("secrets")).unwrap().count(),
            secrets_before
        );
        // A source used by a job cannot go.
        s.put(
            Kind::Job,
            "j",
            table("source = \"x\"\nrepository = \"r\"\nvms = [\"a\"]\n"),
            None,
            &Precondition::default(),
            ok,
        )
        .await
        .unwrap();
        let e = s.delete(Kind::Source, "x", &cur).await.unwrap_err();
        assert_eq!(e.status, 409);
        let e = s
            .delete(Kind::Job, "j", &Precondition::default())
            .await
            .unwrap_err();
        assert_eq!(e.status, 428);
        let jt = Precondition {
            if_match: s.load().unwrap().table(Kind::Job, "j").map(etag),
        };
        s.delete(Kind::Job, "j", &jt).await.unwrap();
        s.delete(Kind::Source, "x", &cur).await.unwrap();
        assert_eq!(
            std::fs::read_dir(d.path().join("secrets")).unwrap().count(),
            0
        );
    }
}
