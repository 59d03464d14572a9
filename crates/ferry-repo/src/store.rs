//! The object-store backend: location parsing, bounded concurrency, retries, and the few
//! operations the repository needs (conditional create, CAS update, get, list, delete).

use crate::direct::DirectWriter;
use crate::error::{RepoError, Result};
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

impl Store {
    /// Wraps any object store (e.g. `InMemory` for tests); `location` names it in messages.
    pub fn new(inner: Arc<dyn ObjectStore>, location: impl Into<String>) -> Self {
        Self {
            inner,
            location: location.into(),
            permits: Arc::new(Semaphore::new(DEFAULT_CONCURRENCY)),
            direct: None,
        }
    }

    /// Opens a location: `/path`, `file:///path`, `s3://bucket/prefix`, `az://container/prefix`
    /// (credentials and endpoints from the `AWS_*` / `AZURE_*` environment variables).
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
            let s3 = b
                .with_bucket_name(bucket)
                .with_retry(retry_config())
                .build()
                .map_err(|e| invalid(format!("S3 configuration: {e}")))?;
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
            direct = std::fs::canonicalize(path)
                .ok()
                .map(|root| Arc::new(DirectWriter::new(root)));
            Arc::new(fs)
        };
        Ok(Self {
            direct,
            ..Self::new(store, location)
        })
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

    /// Deletes an object (missing is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        let _p = self.permit().await;
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
