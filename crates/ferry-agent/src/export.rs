//! Opening an export by name: path policy, the image chain, and the change guard.

use crate::paths::{PathPolicy, PathRefused, is_windows_path};
use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource, ExtentMap};
use ferry_image::{FileSource, Format, ImageError, Resolver};
use ferry_nbd::{ExportProvider, ExportRefused, NbdExport};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// What identifies a file's content cheaply: a change to any of these means the file was
/// written, truncated or replaced since it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: (u64, u64),
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        #[cfg(unix)]
        inode: {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        },
    })
}

/// A file of an exported chain that fails every read once the file changes: a checkpoint's
/// files must not change while they are read, and a backup of a file that did would be
/// silently inconsistent.
#[derive(Debug)]
pub struct GuardedFile {
    inner: FileSource,
    path: PathBuf,
    stamp: Stamp,
}

impl GuardedFile {
    /// Opens `path` and remembers its size, modification time and identity.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let before = stamp(path).map_err(|e| ImageError::io(path.display(), "stat", e))?;
        let inner = FileSource::open(path)?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            stamp: before,
        })
    }

    fn check(&self) -> Result<(), BlockError> {
        let now = stamp(&self.path);
        if now.as_ref().ok() == Some(&self.stamp) {
            return Ok(());
        }
        let why = match now {
            Err(e) => format!("it can no longer be examined ({e})"),
            Ok(n) if n.len != self.stamp.len => {
                format!("its size went from {} to {} bytes", self.stamp.len, n.len)
            }
            Ok(_) => "it was modified or replaced".into(),
        };
        Err(BlockError::Other {
            disk: self.path.display().to_string(),
            message: format!(
                "the file changed while it was exported ({why}); take a new checkpoint and read again"
            ),
            retryable: false,
            source: None,
        })
    }
}

#[async_trait]
impl BlockSource for GuardedFile {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check()?;
        self.inner.read_at(offset, buf).await?;
        // Checked after the read too: the bytes just read may be from the changed file.
        self.check()
    }
    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        self.check()?;
        self.inner.allocated(range).await
    }
}

/// Opens the parents of an exported image, under the same roots as the image itself.
#[derive(Debug, Clone)]
pub struct RootedResolver {
    policy: Arc<PathPolicy>,
}

impl RootedResolver {
    /// A resolver for `policy`.
    pub fn new(policy: Arc<PathPolicy>) -> Self {
        Self { policy }
    }

    fn candidates(&self, from: &str, name: &str) -> Vec<(String, PathBuf)> {
        let dir = Path::new(from)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut out = Vec::new();
        if is_windows_path(name) || name.starts_with('/') {
            if let Ok(p) = self.policy.translate(name) {
                out.push((name.to_string(), p));
            }
        } else {
            let rel = name.replace('\\', "/");
            out.push((name.to_string(), dir.join(rel.trim_start_matches("./"))));
        }
        // Hyper-V keeps a chain in one directory; its locators hold absolute host paths that
        // may name another drive letter than the one mapped here.
        if let Some(base) = name
            .rsplit(['\\', '/'])
            .next()
            .filter(|b| !b.is_empty() && *b != ".." && *b != ".")
        {
            let p = dir.join(base);
            out.push((p.display().to_string(), p));
        }
        out.dedup_by(|a, b| a.1 == b.1);
        out
    }
}

#[async_trait]
impl Resolver for RootedResolver {
    async fn open(&self, from: &str, name: &str) -> Result<Arc<dyn BlockSource>, ImageError> {
        let mut why = Vec::new();
        for (shown, p) in self.candidates(from, name) {
            match self.policy.check_local(&shown, &p) {
                Ok(canon) => return Ok(Arc::new(GuardedFile::open(&canon)?)),
                Err(e) => why.push(e.to_string()),
            }
        }
        Err(ImageError::Chain {
            file: from.to_string(),
            message: format!("parent `{name}` cannot be opened: {}", why.join("; ")),
        })
    }
}

/// The agent's exports: any VHDX/VHD chain under the roots, by host path.
#[derive(Debug, Clone)]
pub struct AgentExports {
    policy: Arc<PathPolicy>,
}

impl AgentExports {
    /// Exports for `policy`.
    pub fn new(policy: Arc<PathPolicy>) -> Self {
        Self { policy }
    }

    /// Opens the chain of host path `name` (what an `NBD_OPT_GO` for it does).
    pub async fn open_chain(&self, name: &str) -> Result<NbdExport, ExportRefused> {
        let local = self.policy.resolve(name).map_err(|e| ExportRefused {
            policy: matches!(e, PathRefused::Policy(_)),
            message: e.to_string(),
        })?;
        let unknown = |message: String| ExportRefused {
            policy: false,
            message,
        };
        let file = GuardedFile::open(&local).map_err(|e| unknown(full_chain(&e)))?;
        let resolver = RootedResolver::new(self.policy.clone());
        let opened = ferry_image::open_source(Arc::new(file), &resolver)
            .await
            .map_err(|e| unknown(format!("{name}: {}", full_chain(&e))))?;
        // Only virtual disks: other files under the roots (VM configuration, saved memory)
        // are not the agent's to hand out.
        if !matches!(opened.info.format, Format::Vhdx | Format::Vhd) {
            return Err(ExportRefused {
                policy: true,
                message: format!(
                    "{name} is not a VHDX or VHD image (found {}); only virtual disks are exported",
                    opened.info.format
                ),
            });
        }
        let chain: Vec<String> = opened.info.chain().iter().map(|i| i.file.clone()).collect();
        tracing::info!(export = %name, chain = ?chain, size = opened.info.virtual_size, "export opened");
        Ok(NbdExport::read_only(name, opened.source)
            .with_description(format!("{} {}", opened.info.format, opened.info.subformat)))
    }
}

/// An error and its causes on one line (the NBD error text is all a client sees).
fn full_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[async_trait]
impl ExportProvider for AgentExports {
    async fn open(&self, name: &str) -> Result<NbdExport, ExportRefused> {
        self.open_chain(name).await
    }
}
