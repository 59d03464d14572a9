//! The object-store backend: location parsing, bounded concurrency, retries, and the few
//! operations the repository needs (conditional create, CAS update, get, list, delete).

use crate::direct::DirectWriter;
use crate::error::{RepoError, Result};
use crate::immutable::{Immutability, Retainer, S3Lock, S3Target};
use crate::immutable_local::LocalLock;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Default number of object requests in flight per repository handle.
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Outcome of a create-if-absent write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The object was written.
    Written,
    /// An object already existed at the key; nothing was written.
    AlreadyExists,
}

/// An object store plus the repository's request policy.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: String,
    permits: Arc<Semaphore>,
    /// Local repositories: large objects bypass the page cache (see `direct.rs`).
    direct: Option<Arc<DirectWriter>>,
    /// S3: the requests `object_store` cannot make (Object Lock; ADR 0075).
    lock: Option<Arc<S3Lock>>,
    /// Set for immutable repositories: data objects are created with retention.
    policy: Option<Immutability>,
    /// Local repositories: the inode immutable flag of a hardened repository (ADR 0185).
    local: Option<Arc<LocalLock>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location)
            .finish()
    }
}

fn retry_config() -> object_store::RetryConfig {
    // Throttling (429, 503 SlowDown) and transient failures are retried with exponential
    // backoff by object_store's HTTP client; we only widen its budget.
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(300),
    }
}

fn split_bucket(location: &str, rest: &str) -> Result<(String, String)> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(RepoError::InvalidLocation {
            location: location.into(),
            reason: "missing bucket or container name".into(),
        });
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

fn with_prefix(store: Arc<dyn ObjectStore>, prefix: &str) -> Arc<dyn ObjectStore> {
    if prefix.is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    }
}

/// Setting (environment variable or `open_with` option) that lets S3 take credentials from the
/// EC2 instance metadata service (IMDS) when nothing else provides them: for proxies running
/// on an EC2 instance with a role. Off by default, so that a proxy without credentials fails
/// at once instead of retrying a link-local address that only a cloud VM can reach.
pub const S3_INSTANCE_METADATA: &str = "FERRY_S3_INSTANCE_METADATA";

/// Setting that lets Azure take a token from the managed identity endpoint (IMDS) when nothing
/// else provides credentials: for proxies running on an Azure VM with a managed identity.
pub const AZURE_MANAGED_IDENTITY: &str = "FERRY_AZURE_MANAGED_IDENTITY";

/// `name` from the `open_with` options (case-insensitive), else from the environment.
fn setting(options: &[(String, String)], name: &str) -> Option<String> {
    options
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var(name).ok())
        .filter(|v| !v.is_empty())
}

fn is_true(v: Option<String>) -> bool {
    v.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Makes sure an S3 builder has a credential source other than the instance metadata
/// service, or that the operator opted into that one; fills in the shared credentials file.
fn s3_credentials(
    b: object_store::aws::AmazonS3Builder,
    options: &[(String, String)],
    location: &str,
) -> Result<object_store::aws::AmazonS3Builder> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let has = |k: K| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
    let configured = has(K::AccessKeyId)
        || has(K::SecretAccessKey)
        || is_true(b.get_config_value(&K::SkipSignature))
        || has(K::ContainerCredentialsRelativeUri)
        || (has(K::ContainerCredentialsFullUri) && has(K::ContainerAuthorizationTokenFile))
        // object_store reads these two from the environment itself.
        || (std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
            && std::env::var_os("AWS_ROLE_ARN").is_some());
    if configured {
        return Ok(b);
    }
    if let Some(c) = shared_credentials_file(options, location)? {
        let mut b = b
            .with_config(K::AccessKeyId, c.key_id)
            .with_config(K::SecretAccessKey, c.secret);
        if let Some(t) = c.token {
            b = b.with_config(K::Token, t);
        }
        return Ok(b);
    }
    if is_true(setting(options, S3_INSTANCE_METADATA)) {
        return Ok(b);
    }
    Err(RepoError::NoCredentials {
        cloud: "S3",
        help: format!(
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary \
             keys), put them in the shared credentials file (~/.aws/credentials or \
             AWS_SHARED_CREDENTIALS_FILE, profile AWS_PROFILE or `default`), set \
             AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, or AWS_SKIP_SIGNATURE=true for a public \
             bucket; on an EC2 instance with a role, set {S3_INSTANCE_METADATA}=true to ask the \
             instance metadata service"
        ),
    })
}

/// AWS credentials from the same sources as S3 locations (environment, shared credentials
/// file, web identity; the instance metadata service only when opted into), for other AWS
/// services such as KMS (`service` names it in the error).
pub(crate) fn aws_credentials(
    options: &[(String, String)],
    service: &'static str,
) -> Result<object_store::aws::AwsCredentialProvider> {
    let b = object_store::aws::AmazonS3Builder::from_env();
    let b = s3_credentials(b, options, service).map_err(|e| match e {
        RepoError::NoCredentials { help, .. } => RepoError::NoCredentials {
            cloud: service,
            help,
        },
        e => e,
    })?;
    // The bucket is never contacted: the builder only assembles the credential chain.
    let s3 = b
        .with_bucket_name("credentials-only")
        .build()
        .map_err(|e| RepoError::InvalidLocation {
            location: service.into(),
            reason: format!("AWS configuration: {e}"),
        })?;
    Ok(s3.credentials().clone())
}

/// Keys of one profile of the AWS shared credentials file.
struct FileCredentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// The profile `AWS_PROFILE` (default `default`) of the shared credentials file
/// (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`), if the file exists and the
/// profile has both keys. Values are never logged.
fn shared_credentials_file(
    options: &[(String, String)],
    location: &str,
) -> Result<Option<FileCredentials>> {
    let path = match setting(options, "AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(home) => std::path::Path::new(&home).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let profile = setting(options, "AWS_PROFILE").unwrap_or_else(|| "default".into());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RepoError::InvalidLocation {
                location: location.into(),
                reason: format!(
                    "cannot read the AWS shared credentials file {}: {e}",
                    path.display()
                ),
            });
        }
    };
    let (mut key_id, mut secret, mut token) = (None, None, None);
    let mut in_profile = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = Some(v.trim().to_string()).filter(|v| !v.is_empty());
            match k.trim().to_ascii_lowercase().as_str() {
                "aws_access_key_id" => key_id = v,
                "aws_secret_access_key" => secret = v,
                "aws_session_token" => token = v,
                _ => {}
            }
        }
    }
    Ok(match (key_id, secret) {
        (Some(key_id), Some(secret)) => {
            tracing::debug!(file = %path.display(), profile, "S3 credentials from the shared credentials file");
            Some(FileCredentials {
                key_id,
                secret,
                token,
            })
        }
        _ => None,
    })
}

/// Where the S3 requests of [`S3Lock`] go: the same endpoint, region and addressing style as
/// `object_store`'s.
fn s3_target(b: &object_store::aws::AmazonS3Builder, bucket: &str, prefix: &str) -> S3Target {
    use object_store::aws::AmazonS3ConfigKey as K;
    let region = b
        .get_config_value(&K::Region)
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "us-east-1".into());
    let virtual_hosted = is_true(b.get_config_value(&K::VirtualHostedStyleRequest));
    let bucket_url = match b.get_config_value(&K::Endpoint).filter(|e| !e.is_empty()) {
        Some(e) if virtual_hosted => e.trim_end_matches('/').to_string(),
        Some(e) => format!("{}/{bucket}", e.trim_end_matches('/')),
        None if virtual_hosted => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        None => format!("https://s3.{region}.amazonaws.com/{bucket}"),
    };
    S3Target {
        bucket_url,
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        region,
    }
}

/// Makes sure an Azure builder has a credential source other than the managed identity
/// endpoint, or that the operator opted into that one.
fn azure_credentials(
    b: &object_store::azure::MicrosoftAzureBuilder,
    options: &[(String, String)],
) -> Result<()> {
    use object_store::azure::AzureConfigKey as K;
    let has = |k: K| b.get_config_value(&k).is_some_and(|v| !v.is_empty());
    let configured = is_true(b.get_config_value(&K::UseEmulator))
        || is_true(b.get_config_value(&K::SkipSignature))
        || is_true(b.get_config_value(&K::UseAzureCli))
        || has(K::AccessKey)
        || has(K::SasKey)
        || has(K::Token)
        || (has(K::ClientId)
            && has(K::AuthorityId)
            && (has(K::ClientSecret) || has(K::FederatedTokenFile)))
        || has(K::FabricTokenServiceUrl);
    if configured || is_true(setting(options, AZURE_MANAGED_IDENTITY)) {
        return Ok(());
    }
    Err(RepoError::NoCredentials {
        cloud: "Azure",
        help: format!(
            "set AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, \
             AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID for a service principal, \
             AZURE_USE_AZURE_CLI=true to use `az login`, or AZURE_STORAGE_USE_EMULATOR=true for \
             Azurite; on an Azure VM with a managed identity, set {AZURE_MANAGED_IDENTITY}=true"
        ),
    })
}

impl Store {
    /// Wraps any object store (e.g. `InMemory` for tests); `location` names it in messages.
    pub fn new(inner: Arc<dyn ObjectStore>, location: impl Into<String>) -> Self {
        Self {
            inner,
            location: location.into(),
            permits: Arc::new(Semaphore::new(DEFAULT_CONCURRENCY)),
            direct: None,
            lock: None,
            policy: None,
            local: None,
        }
    }

    /// Opens a location: `/path`, `file:///path`, `s3://bucket/prefix`, `az://container/prefix`
    /// (credentials and endpoints from the `AWS_*` / `AZURE_*` environment variables, for S3
    /// also the shared credentials file). A cloud location without credentials fails here
    /// with [`RepoError::NoCredentials`] unless [`S3_INSTANCE_METADATA`] /
    /// [`AZURE_MANAGED_IDENTITY`] opt into asking the instance metadata service.
    /// `create_dir` creates a missing local directory (for `init`).
    pub fn open(location: &str, create_dir: bool) -> Result<Self> {
        Self::open_with(location, create_dir, &[])
    }

    /// Like [`open`](Self::open), with extra settings on top of the environment, given as the
    /// environment variables `object_store` reads (`AWS_ENDPOINT`, `AZURE_STORAGE_ACCOUNT_KEY`,
    /// ...); names of the other cloud are ignored.
    pub fn open_with(
        location: &str,
        create_dir: bool,
        options: &[(String, String)],
    ) -> Result<Self> {
        let invalid = |reason: String| RepoError::InvalidLocation {
            location: location.into(),
            reason,
        };
        let mut direct = None;
        let mut lock = None;
        let mut local = None;
        let store: Arc<dyn ObjectStore> = if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = split_bucket(location, rest)?;
            let mut b = object_store::aws::AmazonS3Builder::from_env();
            for (k, v) in options {
                if let Ok(key) = k
                    .to_ascii_lowercase()
                    .parse::<object_store::aws::AmazonS3ConfigKey>()
                {
                    b = b.with_config(key, v);
                }
            }
            b = s3_credentials(b, options, location)?;
            let target = s3_target(&b, &bucket, &prefix);
            let s3 = b
                .with_bucket_name(bucket)
                .with_retry(retry_config())
                .build()
                .map_err(|e| invalid(format!("S3 configuration: {e}")))?;
            lock = Some(Arc::new(S3Lock::new(target, s3.credentials().clone())?));
            with_prefix(Arc::new(s3), &prefix)
        } else if let Some(rest) = location
            .strip_prefix("az://")
            .or_else(|| location.strip_prefix("azure://"))
        {
            let (container, prefix) = split_bucket(location, rest)?;
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env();
            for (k, v) in options {
                if let Ok(key) = k
                    .to_ascii_lowercase()
                    .parse::<object_store::azure::AzureConfigKey>()
                {
                    b = b.with_config(key, v);
                }
            }
            azure_credentials(&b, options)?;
            let az = b
                .with_container_name(container)
                .with_retry(retry_config())
                .build()
                .map_err(|e| invalid(format!("Azure configuration: {e}")))?;
            with_prefix(Arc::new(az), &prefix)
        } else {
            let path = location.strip_prefix("file://").unwrap_or(location);
            if path.is_empty() || path.contains("://") {
                return Err(invalid(
                    "expected a path, file://, s3:// or az:// URL".into(),
                ));
            }
            if create_dir {
                std::fs::create_dir_all(path)
                    .map_err(|e| invalid(format!("cannot create directory: {e}")))?;
            }
            let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                .map_err(|e| invalid(format!("cannot open directory: {e}")))?;
            let root = std::fs::canonicalize(path).ok();
            direct = root.clone().map(|root| Arc::new(DirectWriter::new(root)));
            local = root.map(|root| Arc::new(LocalLock::new(root)));
            Arc::new(fs)
        };
        Ok(Self {
            direct,
            lock,
            local,
            ..Self::new(store, location)
        })
    }

    /// The S3 Object Lock client (S3 locations only).
    pub fn object_lock(&self) -> Option<&Arc<S3Lock>> {
        self.lock.as_ref()
    }

    /// The immutability policy data objects are written with, if any.
    pub fn immutability(&self) -> Option<Immutability> {
        self.policy
    }

    /// The inode-flag backend of a local directory (local locations only).
    pub fn local_lock(&self) -> Option<&Arc<LocalLock>> {
        self.local.as_ref()
    }

    /// What enforces retention, for immutable repositories.
    pub(crate) fn retainer(&self) -> Option<Retainer> {
        self.policy?;
        match (&self.lock, &self.local) {
            (Some(l), _) => Some(Retainer::S3(l.clone())),
            (None, Some(l)) => Some(Retainer::Local(l.clone())),
            (None, None) => None,
        }
    }

    /// Writes data objects with retention from now on. Fails where the store cannot lock
    /// objects (S3 Object Lock and the inode flag of a local directory are implemented; see
    /// docs/immutability.md).
    pub fn with_immutability(mut self, policy: Immutability) -> Result<Self> {
        if self.lock.is_none() && self.local.is_none() {
            return Err(RepoError::Immutability {
                location: self.location.clone(),
                reason: "immutability needs an S3 bucket with Object Lock or a local directory on a file system with the inode immutable flag; this store cannot lock objects (Azure immutability policies are not implemented yet, see docs/immutability.md)".into(),
            });
        }
        self.policy = Some(policy);
        Ok(self)
    }

    /// Where the repository lives (for messages).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Sets the number of object requests in flight.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.permits = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.permits
            .acquire()
            .await
            .expect("semaphore never closed")
    }

    /// Reads a whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes> {
        let _p = self.permit().await;
        let path = Path::from(key);
        let res = self
            .inner
            .get(&path)
            .await
            .map_err(|e| RepoError::backend("get", key, e))?;
        res.bytes()
            .await
            .map_err(|e| RepoError::backend("get", key, e))
    }

    /// Reads an object and its metadata (for compare-and-swap).
    pub async fn get_with_meta(&self, key: &str) -> Result<(Bytes, ObjectMeta)> {
        let _p = self.permit().await;
        let path = Path::from(key);
        let res = self
            .inner
            .get(&path)
            .await
            .map_err(|e| RepoError::backend("get", key, e))?;
        let meta = res.meta.clone();
        let data = res
            .bytes()
            .await
            .map_err(|e| RepoError::backend("get", key, e))?;
        Ok((data, meta))
    }

    /// Writes an object only if none exists at `key` (objects are never overwritten).
    pub async fn create(&self, key: &str, data: impl Into<Bytes>) -> Result<Created> {
        let _p = self.permit().await;
        let data = data.into();
        if let (Some(_), Some(local)) = (self.policy, &self.local) {
            // Hardened local repository: data objects and sealed ledger segments get the flag.
            if crate::immutable::is_data_key(key) || key.starts_with("retention/") {
                let (l, k) = (local.clone(), key.to_string());
                return tokio::task::spawn_blocking(move || l.create(&k, &data))
                    .await
                    .map_err(|e| crate::immutable::local_err("put", key, std::io::Error::other(e)))?
                    .map_err(|e| crate::immutable::local_err("put", key, e));
            }
        }
        if let Some(d) = self.direct.as_ref().filter(|d| d.accepts(key, data.len())) {
            let (d, k, bytes) = (d.clone(), key.to_string(), data.clone());
            let local = |e: std::io::Error| {
                let source = object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                };
                RepoError::backend("put", key, source)
            };
            let r = tokio::task::spawn_blocking(move || d.create(&k, &bytes))
                .await
                .map_err(|e| local(std::io::Error::other(e)))?
                .map_err(local)?;
            if let Some(created) = r {
                return Ok(created);
            }
        }
        if let (Some(p), Some(lock)) = (self.policy, &self.lock) {
            if crate::immutable::is_data_key(key) {
                let until = p.retain_until(crate::immutable::now());
                return lock.put_create(key, data, p.mode, until).await;
            }
        }
        let opts = PutOptions::from(PutMode::Create);
        match self
            .inner
            .put_opts(&Path::from(key), PutPayload::from_bytes(data), opts)
            .await
        {
            Ok(_) => Ok(Created::Written),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::AlreadyExists),
            Err(e) => Err(RepoError::backend("put", key, e)),
        }
    }

    /// Writes (or replaces) a coordination object (leases only: data objects use [`create`](Self::create)).
    pub async fn overwrite(&self, key: &str, data: impl Into<Bytes>) -> Result<()> {
        let _p = self.permit().await;
        self.inner
            .put(&Path::from(key), PutPayload::from_bytes(data.into()))
            .await
            .map(|_| ())
            .map_err(|e| RepoError::backend("put", key, e))
    }

    /// Replaces `key` only if it still is the version in `meta`. `Ok(false)`: someone else
    /// changed it first. `Err(Usage)` if the store cannot compare-and-swap.
    pub async fn replace_if(
        &self,
        key: &str,
        meta: &ObjectMeta,
        data: impl Into<Bytes>,
    ) -> Result<Option<bool>> {
        let _p = self.permit().await;
        let mode = PutMode::Update(UpdateVersion {
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
        });
        match self
            .inner
            .put_opts(
                &Path::from(key),
                PutPayload::from_bytes(data.into()),
                mode.into(),
            )
            .await
        {
            Ok(_) => Ok(Some(true)),
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => Ok(Some(false)),
            Err(object_store::Error::NotImplemented) => Ok(None),
            Err(e) => Err(RepoError::backend("put", key, e)),
        }
    }

    /// Deletes an object (missing is fine). A flagged object of a hardened local repository
    /// is refused with a clear error: only prune and GC, past its retention, unflag and delete.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let _p = self.permit().await;
        if let (Some(_), Some(local)) = (self.policy, &self.local) {
            if crate::immutable_local::is_immutable(&local.path(key)).unwrap_or(None) == Some(true)
            {
                return Err(RepoError::Immutability {
                    location: self.location.clone(),
                    reason: format!(
                        "`{key}` carries the inode immutable flag of this hardened repository and \
                         cannot be deleted (prune and GC delete data past its retention; an \
                         administrator with CAP_LINUX_IMMUTABLE can clear the flag with chattr -i)"
                    ),
                });
            }
        }
        match self.inner.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(RepoError::backend("delete", key, e)),
        }
    }

    /// Metadata of an object, `None` if missing.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let _p = self.permit().await;
        match self.inner.head(&Path::from(key)).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(RepoError::backend("head", key, e)),
        }
    }

    /// Every object under `prefix` (recursively), as (key, metadata).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let _p = self.permit().await;
        let p = Path::from(prefix);
        self.inner
            .list(Some(&p))
            .try_collect()
            .await
            .map_err(|e| RepoError::backend("list", prefix, e))
    }
}
