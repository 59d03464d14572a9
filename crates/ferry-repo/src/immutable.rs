//! Immutability: S3 Object Lock retention on every data object, extended per *generation*
//! (ADR 0075).
//!
//! * Every data object (`config`, `keys/`, `chunks/`, `indexes/`, `snapshots/`) is written with
//!   `x-amz-object-lock-mode` and `x-amz-object-lock-retain-until-date` in the same PUT that
//!   creates it: no object is ever visible without its lock.
//! * Retain-until dates are quantized to the *generation* length `L`: an object written at `t`
//!   is locked until `G(t) = ceil((t + R + L) / L) · L` (`R` = the retention). So it needs no
//!   extension for any restore point committed before `t + L`.
//! * The **ledger** (`retention/<until>-<tag>`, sealed chunk-id lists like catalog segments)
//!   records which chunks a commit locked or extended, and until when. At commit a backup
//!   extends only the chunks it references that no ledger segment covers until `now + R`:
//!   at most one `PutObjectRetention` per chunk per generation, however many restore points
//!   reuse it (Veeam's "block generation").
//! * GC and prune delete only object versions past their retention (asking the store for the
//!   lock of each candidate) and report what they kept.
//!
//! Requests beyond what `object_store` offers (lock headers on PUT, `?retention`, `?versionId`
//! deletes, `?object-lock`) are signed with `object_store`'s own SigV4 signer
//! ([`object_store::aws::AwsAuthorizer`]) and sent with ferry-http's reqwest client.

use crate::codec::{ChunkId, Keys, open_catalog, seal_catalog};
use crate::error::{RepoError, Result};
use crate::store::Created;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{SecondsFormat, TimeZone, Utc};
use ferry_http::{ClientOptions, HttpClient};
use object_store::aws::AwsCredentialProvider;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Environment variable that shifts the clock used for retention arithmetic by this many
/// seconds (tests simulate a later generation with it; never set it in production).
pub const CLOCK_OFFSET_ENV: &str = "FERRY_CLOCK_OFFSET_SECS";

/// Default generation length: Veeam's "block generation" of 10 days.
pub const DEFAULT_GENERATION_SECS: u64 = 10 * 86_400;

/// Prefix of the retention ledger.
pub const LEDGER_PREFIX: &str = "retention";

/// S3 Object Lock retention mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` can still delete or shorten.
    Governance,
    /// Nobody, not even the root account, can delete before the date.
    Compliance,
}

impl LockMode {
    /// The S3 spelling.
    pub fn as_s3(self) -> &'static str {
        match self {
            Self::Governance => "GOVERNANCE",
            Self::Compliance => "COMPLIANCE",
        }
    }
}

/// The repository's immutability settings (in `config`, fixed at init).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Immutability {
    /// Retention mode.
    pub mode: LockMode,
    /// Every restore point stays undeletable at least this long after it was written.
    pub retention_secs: u64,
    /// Generation length: retain-until dates are rounded up to a multiple of it, plus one
    /// generation of lead, so a reused chunk is extended at most once per generation.
    pub generation_secs: u64,
}

impl Immutability {
    /// Checks the numbers (a hostile config cannot make dates overflow).
    pub fn validate(&self) -> Result<()> {
        const MAX: u64 = 100 * 365 * 86_400;
        if self.retention_secs == 0 || self.retention_secs > MAX {
            return Err(RepoError::Usage(format!(
                "immutability retention of {} s is out of range (1 s .. 100 years)",
                self.retention_secs
            )));
        }
        if self.generation_secs == 0 || self.generation_secs > MAX {
            return Err(RepoError::Usage(format!(
                "immutability generation of {} s is out of range (1 s .. 100 years)",
                self.generation_secs
            )));
        }
        Ok(())
    }

    /// Retain-until date (Unix seconds) for an object written or extended at `t`.
    pub fn retain_until(&self, t: i64) -> i64 {
        let l = self.generation_secs as i64;
        let min = t + self.retention_secs as i64 + l;
        min.div_euclid(l) * l + if min.rem_euclid(l) == 0 { 0 } else { l }
    }

    /// The date a restore point committed at `t` needs its objects locked until.
    pub fn needed_until(&self, t: i64) -> i64 {
        t + self.retention_secs as i64
    }
}

/// The clock for retention arithmetic (Unix seconds), shifted by [`CLOCK_OFFSET_ENV`].
pub fn now() -> i64 {
    let offset = std::env::var(CLOCK_OFFSET_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    crate::time::now_unix() + offset
}

/// Whether objects under `key` carry retention: what a restore needs. Coordination objects
/// (`locks/`, `catalog/`, `retention/`) are rewritten or deleted by design, and anything else
/// (e.g. `ferry benchmark --repo`'s scratch objects) must stay deletable.
pub fn is_data_key(key: &str) -> bool {
    key == crate::config::CONFIG_KEY
        || ["keys/", "chunks/", "indexes/", "snapshots/"]
            .iter()
            .any(|p| key.starts_with(p))
}

fn rfc3339(t: i64) -> String {
    Utc.timestamp_opt(t, 0)
        .single()
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "?".into())
}

/// The lock state of the current version of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// Version id (`None` on an unversioned bucket).
    pub version: Option<String>,
    /// Retention mode, if any.
    pub mode: Option<String>,
    /// Retain-until date (Unix seconds), if any.
    pub until: Option<i64>,
    /// Stored size.
    pub size: u64,
}

/// Outcome of deleting an object version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// Gone.
    Deleted,
    /// The store refused: still under retention (or a legal hold).
    Refused,
}

/// Settings of the S3 endpoint, taken from the same builder `object_store` uses.
#[derive(Clone, Debug)]
pub(crate) struct S3Target {
    /// Base URL of the bucket (path style: `endpoint/bucket`; virtual-hosted: the endpoint).
    pub bucket_url: String,
    pub bucket: String,
    pub prefix: String,
    pub region: String,
}

/// The S3 requests `object_store` cannot make: Object Lock headers, retention, versions.
pub struct S3Lock {
    target: S3Target,
    credentials: AwsCredentialProvider,
    http: HttpClient,
    /// `PutObjectRetention` calls made through this handle.
    retention_calls: AtomicU64,
}

impl std::fmt::Debug for S3Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Lock")
            .field("bucket", &self.target.bucket)
            .finish_non_exhaustive()
    }
}

fn md5_b64(data: &[u8]) -> String {
    use md5::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
}

fn http_err(
    op: &'static str,
    key: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> RepoError {
    RepoError::Backend {
        op,
        key: key.into(),
        source: object_store::Error::Generic {
            store: "S3",
            source: Box::new(e),
        },
    }
}

#[derive(Debug, thiserror::Error)]
#[error("answered HTTP {status}: {detail}")]
struct StatusError {
    status: u16,
    detail: String,
}

impl S3Lock {
    pub(crate) fn new(target: S3Target, credentials: AwsCredentialProvider) -> Result<Self> {
        let http = HttpClient::new(&ClientOptions::new(
            format!("s3://{}", target.bucket),
            ferry_tls::Trust::System,
        ))
        .map_err(|e| http_err("connect", "", e))?;
        Ok(Self {
            target,
            credentials,
            http,
            retention_calls: AtomicU64::new(0),
        })
    }

    /// `PutObjectRetention` calls made so far.
    pub fn retention_calls(&self) -> u64 {
        self.retention_calls.load(Ordering::Relaxed)
    }

    fn url(&self, key: Option<&str>, query: &str) -> Result<url::Url> {
        let mut u =
            url::Url::parse(&self.target.bucket_url).map_err(|e| RepoError::InvalidLocation {
                location: format!("s3://{}", self.target.bucket),
                reason: format!("bad S3 endpoint URL: {e}"),
            })?;
        if let Some(key) = key {
            let full = if self.target.prefix.is_empty() {
                key.to_string()
            } else {
                format!("{}/{key}", self.target.prefix)
            };
            if let Ok(mut segs) = u.path_segments_mut() {
                segs.pop_if_empty();
                for s in full.split('/') {
                    segs.push(s);
                }
            }
        }
        if !query.is_empty() {
            u.set_query(Some(query));
        }
        Ok(u)
    }

    /// Signs and sends one request, retrying transient failures.
    async fn send(
        &self,
        op: &'static str,
        key: &str,
        method: http::Method,
        url: url::Url,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<reqwest::Response> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let cred = self
                .credentials
                .get_credential()
                .await
                .map_err(|e| RepoError::backend("sign", key, e))?;
            let rb = crate::sigv4::signed_request(
                &self.http,
                &cred,
                "s3",
                &self.target.region,
                method.clone(),
                &url,
                headers,
                body.clone(),
            )
            .map_err(|e| http_err(op, key, e))?;
            match self.http.send(op, rb).await {
                Ok(r)
                    if (r.status().is_server_error() || r.status().as_u16() == 429)
                        && attempt < 5 => {}
                Ok(r) => return Ok(r),
                Err(e) if e.is_retryable() && attempt < 5 => {
                    tracing::debug!(error = %e, op, key, "retrying S3 request");
                }
                Err(e) => return Err(http_err(op, key, e)),
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
    }

    async fn fail(op: &'static str, key: &str, r: reqwest::Response) -> RepoError {
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let detail: String = text.trim().chars().take(300).collect();
        http_err(op, key, StatusError { status, detail })
    }

    /// Whether the bucket has Object Lock enabled.
    pub async fn bucket_lock_enabled(&self) -> Result<bool> {
        let url = self.url(None, "object-lock")?;
        let r = self
            .send(
                "get object-lock configuration of",
                "",
                http::Method::GET,
                url,
                &[],
                Bytes::new(),
            )
            .await?;
        match r.status().as_u16() {
            200 => {
                let text = r
                    .text()
                    .await
                    .map_err(|e| http_err("get", "?object-lock", e))?;
                Ok(parse_lock_configuration(&text)?
                    .object_lock_enabled
                    .as_deref()
                    == Some("Enabled"))
            }
            // ObjectLockConfigurationNotFoundError
            404 => Ok(false),
            _ => Err(Self::fail("get object-lock configuration of", "", r).await),
        }
    }

    /// Creates `key` only if absent, locked until `until`.
    pub async fn put_create(
        &self,
        key: &str,
        data: Bytes,
        mode: LockMode,
        until: i64,
    ) -> Result<Created> {
        let url = self.url(Some(key), "")?;
        let headers = [
            ("if-none-match", "*".to_string()),
            ("content-md5", md5_b64(&data)),
            ("x-amz-object-lock-mode", mode.as_s3().to_string()),
            ("x-amz-object-lock-retain-until-date", rfc3339(until)),
        ];
        let r = self
            .send("put", key, http::Method::PUT, url, &headers, data)
            .await?;
        match r.status().as_u16() {
            200..=299 => Ok(Created::Written),
            412 => Ok(Created::AlreadyExists),
            _ => Err(Self::fail("put", key, r).await),
        }
    }

    /// Sets the retention of the current version of `key` (extensions only).
    pub async fn put_retention(&self, key: &str, mode: LockMode, until: i64) -> Result<()> {
        let url = self.url(Some(key), "retention")?;
        let body = Bytes::from(retention_xml(mode, until));
        let headers = [
            ("content-md5", md5_b64(&body)),
            ("content-type", "application/xml".to_string()),
        ];
        self.retention_calls.fetch_add(1, Ordering::Relaxed);
        let r = self
            .send(
                "put retention of",
                key,
                http::Method::PUT,
                url,
                &headers,
                body,
            )
            .await?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(Self::fail("put retention of", key, r).await)
        }
    }

    /// The lock state of the current version of `key`; `None` if there is none.
    pub async fn head(&self, key: &str) -> Result<Option<LockInfo>> {
        let url = self.url(Some(key), "")?;
        let r = self
            .send("head", key, http::Method::HEAD, url, &[], Bytes::new())
            .await?;
        match r.status().as_u16() {
            200 => {
                let h = r.headers();
                let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
                let until = match get("x-amz-object-lock-retain-until-date") {
                    Some(s) => Some(parse_date(&s).ok_or_else(|| RepoError::Corrupt {
                        key: key.into(),
                        reason: format!("the store reports an unreadable retain-until date `{s}`"),
                    })?),
                    None => None,
                };
                Ok(Some(LockInfo {
                    version: get("x-amz-version-id").filter(|v| v != "null"),
                    mode: get("x-amz-object-lock-mode"),
                    until,
                    size: get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0),
                }))
            }
            404 => Ok(None),
            _ => Err(Self::fail("head", key, r).await),
        }
    }

    /// Deletes one version of `key` for good (the current one when `version` is `None`).
    pub async fn delete_version(&self, key: &str, version: Option<&str>) -> Result<Deleted> {
        let query = match version {
            Some(v) => url::form_urlencoded::Serializer::new(String::new())
                .append_pair("versionId", v)
                .finish(),
            None => String::new(),
        };
        let url = self.url(Some(key), &query)?;
        let r = self
            .send("delete", key, http::Method::DELETE, url, &[], Bytes::new())
            .await?;
        match r.status().as_u16() {
            200..=299 | 404 => Ok(Deleted::Deleted),
            403 => Ok(Deleted::Refused),
            _ => Err(Self::fail("delete", key, r).await),
        }
    }
}

/// `GetObjectLockConfiguration` response (the fields we read).
#[derive(Debug, Default, Deserialize)]
pub struct LockConfiguration {
    /// `Enabled` when the bucket has Object Lock.
    #[serde(rename = "ObjectLockEnabled", default)]
    pub object_lock_enabled: Option<String>,
}

/// Parses a `GetObjectLockConfiguration` response (sans-I/O; fuzzed).
pub fn parse_lock_configuration(xml: &str) -> Result<LockConfiguration> {
    quick_xml::de::from_str(xml).map_err(|e| RepoError::Corrupt {
        key: "?object-lock".into(),
        reason: format!("unreadable Object Lock configuration: {e}"),
    })
}

/// Parses an S3 date (`2026-01-02T03:04:05Z` or with fractions) to Unix seconds.
pub fn parse_date(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.timestamp())
}

fn retention_xml(mode: LockMode, until: i64) -> String {
    // Both values are ours (an enum and a formatted date): nothing to escape.
    format!(
        "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
        mode.as_s3(),
        rfc3339(until)
    )
}

/// The retention ledger: chunk id → the latest retain-until any segment records.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Known lower bound of each listed chunk's retain-until.
    pub until: HashMap<ChunkId, i64>,
    /// Segment keys with their dates.
    pub segments: Vec<(String, i64)>,
    /// Segment tag (the restore point id of the commit that wrote it) → its latest date:
    /// what a hardened local repository keeps that restore point's own objects until.
    pub by_tag: HashMap<String, i64>,
}

/// Key of a ledger segment.
pub fn ledger_key(until: i64, tag: &str) -> String {
    format!("{LEDGER_PREFIX}/{until:012}-{tag}")
}

/// The date encoded in a ledger key.
pub fn ledger_until(key: &str) -> Option<i64> {
    key.strip_prefix("retention/")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

impl Ledger {
    /// Loads the segments whose date is at least `min_until` (older ones cannot help).
    pub async fn load(store: &crate::Store, keys: &Keys, min_until: i64) -> Result<Self> {
        let mut out = Self::default();
        for o in store.list(LEDGER_PREFIX).await? {
            let key = o.location.to_string();
            let Some(until) = ledger_until(&key) else {
                tracing::warn!(object = %key, "ignoring a foreign object under retention/");
                continue;
            };
            out.segments.push((key.clone(), until));
            if let Some((_, tag)) = key
                .strip_prefix("retention/")
                .and_then(|r| r.split_once('-'))
            {
                let e = out.by_tag.entry(tag.to_string()).or_insert(until);
                *e = (*e).max(until);
            }
            if until < min_until {
                continue;
            }
            let data = match store.get(&key).await {
                Ok(d) => d,
                Err(RepoError::Missing { .. }) => continue, // removed by GC meanwhile
                Err(e) => return Err(e),
            };
            // A damaged segment only costs extensions: skip it, loudly.
            match open_catalog(keys, &key, &data) {
                Ok(ids) => {
                    for id in ids {
                        let e = out.until.entry(id).or_insert(until);
                        *e = (*e).max(until);
                    }
                }
                Err(e) => {
                    tracing::warn!(object = %key, error = %e, "ignoring an unreadable retention ledger segment")
                }
            }
        }
        Ok(out)
    }

    /// Writes a segment: `ids` are locked until at least `until` (an empty segment only when
    /// `always`: it still dates its restore point's own objects).
    pub async fn write(
        store: &crate::Store,
        keys: &Keys,
        until: i64,
        tag: &str,
        ids: &[ChunkId],
        always: bool,
    ) -> Result<()> {
        if ids.is_empty() && !always {
            return Ok(());
        }
        let key = ledger_key(until, tag);
        store.create(&key, seal_catalog(keys, &key, ids)?).await?;
        Ok(())
    }
}

/// What GC or prune kept because of retention.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KeptLocked {
    /// Objects kept.
    pub count: usize,
    /// Their stored bytes.
    pub bytes: u64,
    /// The earliest retain-until date among them (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub earliest_expiry: Option<String>,
    /// Of those, objects ferry thought expired but the store refused to delete (clock skew,
    /// a legal hold, or a retention set by someone else).
    pub refused_by_store: usize,
    #[serde(skip)]
    earliest: Option<i64>,
}

impl KeptLocked {
    /// Counts one kept object.
    pub fn add(&mut self, bytes: u64, until: Option<i64>) {
        self.count += 1;
        self.bytes += bytes;
        if let Some(u) = until {
            if self.earliest.is_none_or(|e| u < e) {
                self.earliest = Some(u);
                self.earliest_expiry = Some(rfc3339(u));
            }
        }
    }
}

/// What to do with an object GC or prune wants gone.
pub(crate) enum Removal {
    /// Delete this version (`None`: unversioned).
    Delete(Option<String>),
    /// Keep: locked until this date.
    Keep(Option<i64>, u64),
    /// Already gone.
    Gone,
}

/// Wraps an I/O error of the local backend.
pub(crate) fn local_err(op: &'static str, key: &str, e: std::io::Error) -> RepoError {
    RepoError::backend(
        op,
        key,
        object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        },
    )
}

/// Retain-until of an object of a hardened local repository written at `mtime` (which the
/// flag freezes) and named by ledger segments with `dates`: its own write's date, extended by
/// every segment (segments only ever add time).
pub fn local_until(policy: Immutability, mtime: i64, dates: impl IntoIterator<Item = i64>) -> i64 {
    dates.into_iter().fold(policy.retain_until(mtime), i64::max)
}

/// What enforces retention: the store (S3 Object Lock) or the inode immutable flag of a
/// hardened local repository (ADR 0185). GC, prune and commit ask both the same questions.
#[derive(Clone, Debug)]
pub(crate) enum Retainer {
    /// S3 Object Lock: the store knows each object's date.
    S3(std::sync::Arc<S3Lock>),
    /// `FS_IMMUTABLE_FL`: the dates come from the ledger and the frozen modification times.
    Local(std::sync::Arc<crate::immutable_local::LocalLock>),
}

impl Retainer {
    /// Whether `key` may be deleted at `now`. The local backend needs the ledger loaded
    /// (segments still in force are enough).
    pub(crate) async fn removal(
        &self,
        key: &str,
        now: i64,
        policy: Immutability,
        ledger: &Ledger,
    ) -> Result<Removal> {
        let local = match self {
            Self::S3(lock) => return removal(lock, key, now).await,
            Self::Local(l) => l,
        };
        let (mtime, size) = match local.stat(key) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(Removal::Gone),
            Err(e) => return Err(local_err("stat", key, e)),
        };
        let mut dates = Vec::new();
        let owner = key
            .strip_prefix("snapshots/")
            .or_else(|| key.strip_prefix("indexes/"))
            .and_then(|r| r.split('/').next());
        dates.extend(owner.and_then(|id| ledger.by_tag.get(id)).copied());
        dates.extend(
            key.strip_prefix("chunks/")
                .and_then(|r| r.rsplit('/').next())
                .and_then(ChunkId::from_hex)
                .and_then(|id| ledger.until.get(&id))
                .copied(),
        );
        dates.extend(ledger_until(key));
        let until = local_until(policy, mtime, dates);
        Ok(if until > now {
            Removal::Keep(Some(until), size)
        } else {
            Removal::Delete(None)
        })
    }

    /// Deletes `key` (the given version on S3; clearing the flag first locally).
    pub(crate) async fn delete(&self, key: &str, version: Option<&str>) -> Result<Deleted> {
        match self {
            Self::S3(lock) => lock.delete_version(key, version).await,
            Self::Local(l) => {
                let (l, k) = (l.clone(), key.to_string());
                tokio::task::spawn_blocking(move || l.remove(&k))
                    .await
                    .map_err(|e| local_err("delete", key, std::io::Error::other(e)))?
                    .map_err(|e| local_err("delete", key, e))
            }
        }
    }

    /// Whether the retain-until dates come from the ledger (so callers must load it).
    pub(crate) fn needs_ledger(&self) -> bool {
        matches!(self, Self::Local(_))
    }
}

/// Decides whether an object may be deleted now, by asking the store for its lock.
pub(crate) async fn removal(lock: &S3Lock, key: &str, now: i64) -> Result<Removal> {
    Ok(match lock.head(key).await? {
        None => Removal::Gone,
        Some(info) => match info.until {
            Some(u) if u > now => Removal::Keep(Some(u), info.size),
            _ => Removal::Delete(info.version),
        },
    })
}

/// Called by a commit of an immutable repository before its indexes and manifest are
/// written: extends the retention of every referenced chunk that no ledger segment covers
/// until `now + retention` (in one concurrent batch), keeps `config` and `keys/` locked, and
/// records what it locked in a ledger segment. Returns the number of retention calls.
pub(crate) async fn secure_commit(
    repo: &crate::Repository,
    tag: &str,
    started: i64,
    referenced: Vec<ChunkId>,
    locked: Vec<ChunkId>,
) -> Result<u64> {
    use futures::StreamExt as _;
    let store = repo.store();
    let (Some(p), Some(retainer)) = (store.immutability(), store.retainer()) else {
        return Ok(0);
    };
    let keys = &repo.inner.keys;
    let t = now();
    let needed = p.needed_until(t);
    let new_until = p.retain_until(t);
    // The writer's own chunks were locked when written, at or after it started.
    let since = started + (t - crate::time::now_unix());
    let locked_until = p.retain_until(since);
    let ledger = Ledger::load(store, keys, needed).await?;
    let mut fresh: std::collections::HashSet<ChunkId> = ledger
        .until
        .iter()
        .filter(|(_, u)| **u >= needed)
        .map(|(id, _)| *id)
        .collect();
    if locked_until >= needed {
        fresh.extend(locked.iter().copied());
    }
    let mut extend: Vec<ChunkId> = referenced
        .into_iter()
        .filter(|c| !c.is_zero() && !fresh.contains(c))
        .collect();
    extend.sort_unstable();
    extend.dedup();
    let mut calls = 0u64;
    let lock = match retainer {
        Retainer::S3(lock) => lock,
        Retainer::Local(local) => {
            // The flag has no date: an extension is only the ledger segment below. Flagging the
            // reused chunks again is idempotent and seals a crash's unflagged leftovers.
            let l = local.clone();
            let objs: Vec<String> = extend.iter().map(|id| id.object_key()).collect();
            tokio::task::spawn_blocking(move || objs.iter().try_for_each(|k| l.seal(k)))
                .await
                .map_err(|e| local_err("seal", "chunks", std::io::Error::other(e)))?
                .map_err(|e| local_err("seal", "chunks", e))?;
            let mut ids = locked;
            ids.extend(extend);
            ids.sort_unstable();
            ids.dedup();
            // Everything it names, and the restore point `tag` itself, is kept until then.
            Ledger::write(store, keys, new_until, tag, &ids, true).await?;
            return Ok(0);
        }
    };
    // `config` and the key slots must outlive every restore point too.
    let config_lock = lock.head(crate::config::CONFIG_KEY).await?;
    if config_lock.and_then(|i| i.until).is_none_or(|u| u < needed) {
        let mut meta = vec![crate::config::CONFIG_KEY.to_string()];
        meta.extend(
            store
                .list("keys")
                .await?
                .into_iter()
                .map(|o| o.location.to_string()),
        );
        for k in meta {
            lock.put_retention(&k, p.mode, new_until).await?;
            calls += 1;
        }
    }
    let results: Vec<Result<()>> = futures::stream::iter(extend.clone())
        .map(|id: ChunkId| {
            let lock = lock.clone();
            let key = id.object_key();
            async move { lock.put_retention(&key, p.mode, new_until).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    calls += extend.len() as u64;
    if !extend.is_empty() {
        tracing::info!(chunks = extend.len(), until = %rfc3339(new_until), "retention extended for reused chunks");
    }
    let mut ids = locked;
    ids.extend(extend);
    ids.sort_unstable();
    ids.dedup();
    Ledger::write(store, keys, locked_until.min(new_until), tag, &ids, false).await?;
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_until_is_quantized_and_leaves_a_generation_of_lead() {
        let p = Immutability {
            mode: LockMode::Governance,
            retention_secs: 100,
            generation_secs: 10,
        };
        assert_eq!(p.retain_until(0), 110);
        assert_eq!(p.retain_until(1), 120);
        assert_eq!(p.retain_until(9), 120);
        assert_eq!(p.retain_until(10), 120);
        for t in 0..50 {
            let u = p.retain_until(t);
            assert_eq!(u % 10, 0);
            // Good for every commit up to one generation later.
            assert!(u >= p.needed_until(t + 10), "t={t} u={u}");
        }
    }

    proptest::proptest! {
        /// A hardened local repository never lets a restore point's objects go before the
        /// retention: written at `w`, committed at `t` (segment date `retain_until(t)`), its
        /// manifest written at `m` within a generation of `t`; whatever other segments say.
        #[test]
        fn local_retention_never_ends_early(
            r in 1i64..100_000, l in 1i64..50_000, w in 0i64..1_000_000,
            dt in 0i64..50_000, others in proptest::collection::vec(0i64..2_000_000, 0..5),
        ) {
            let p = Immutability {
                mode: LockMode::Compliance,
                retention_secs: r as u64,
                generation_secs: l as u64,
            };
            let t = w + dt % l;
            let m = t + (dt % l) / 2;
            let seg = p.retain_until(t);
            let with = |extra: &[i64]| {
                local_until(p, m, extra.iter().copied().chain([seg]))
            };
            proptest::prop_assert!(with(&[]) >= m + r);
            proptest::prop_assert!(local_until(p, w, [seg]) >= t + r);
            // More segments never shorten it; it is always a generation boundary or a date
            // some segment wrote.
            proptest::prop_assert!(with(&others) >= with(&[]));
            let u = with(&others);
            proptest::prop_assert!(u % l == 0 || others.contains(&u));
        }

        /// A chunk reused by commits at increasing times is extended (a ledger segment) at
        /// most once per generation, and is always covered until each commit's `t + R`.
        #[test]
        fn reuse_extends_once_per_generation(
            r in 1i64..10_000, l in 1i64..5_000,
            steps in proptest::collection::vec(0i64..3_000, 1..40),
        ) {
            let p = Immutability {
                mode: LockMode::Compliance,
                retention_secs: r as u64,
                generation_secs: l as u64,
            };
            let mut t = 0;
            let mut covered = p.retain_until(0);
            let mut extensions = 0i64;
            for s in &steps {
                t += s;
                if covered < p.needed_until(t) {
                    covered = p.retain_until(t);
                    extensions += 1;
                }
                proptest::prop_assert!(covered >= p.needed_until(t));
            }
            proptest::prop_assert!(extensions <= t / l + 1, "{} extensions in {} s", extensions, t);
        }
    }

    #[test]
    fn data_keys() {
        assert!(is_data_key("chunks/ab/abcd"));
        assert!(is_data_key("config"));
        assert!(is_data_key("snapshots/x/manifest"));
        assert!(!is_data_key("locks/gc"));
        assert!(!is_data_key("catalog/x-000001"));
        assert!(!is_data_key("retention/000000000100-x"));
        assert!(!is_data_key("benchmark-00000000000000ab-1"));
        assert!(!is_data_key("configuration"));
    }

    #[test]
    fn ledger_keys_round_trip() {
        let k = ledger_key(1_800_000_000, "20260101T000000.000Z-abcd1234");
        assert_eq!(ledger_until(&k), Some(1_800_000_000));
        assert_eq!(ledger_until("retention/junk"), None);
        assert_eq!(ledger_until("catalog/1"), None);
    }

    #[test]
    fn lock_configuration_parses() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><ObjectLockConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>GOVERNANCE</Mode><Days>1</Days></DefaultRetention></Rule></ObjectLockConfiguration>"#;
        let c = parse_lock_configuration(xml).unwrap();
        assert_eq!(c.object_lock_enabled.as_deref(), Some("Enabled"));
        assert!(parse_lock_configuration("<a><b>").is_err());
        assert_eq!(parse_date("2026-01-02T03:04:05Z"), Some(1_767_323_045));
        assert_eq!(parse_date("2026-01-02T03:04:05.000Z"), Some(1_767_323_045));
        assert_eq!(parse_date("yesterday"), None);
    }
}
