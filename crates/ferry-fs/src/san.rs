//! Off-host SAN reads: virtual-disk files read straight from an NTFS volume on a LUN or block
//! device (a snapshot LUN of a Cluster Shared Volume) without mounting it.
//!
//! [`SanVolume`] opens the NTFS volume of a device (the whole device or its one NTFS
//! partition); [`SanVolume::open_file`] maps a file's data runs to the volume once, so reads go
//! straight to the device, sparse runs read as zeros and the runs are the allocation map.
//! [`SanResolver`] lets `ferry-image` follow an AVHDX's parent locator inside the same volume:
//! Hyper-V writes absolute host paths (`C:\ClusterStorage\Volume1\vm\disk.vhdx`), translated
//! through the host path at which the volume is mounted on the host.

use crate::error::{FsError, Result};
use crate::fs::NtfsLayout;
use crate::{BlockReader, Disk, FsKind, Volume};
use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource, ExtentMap};
use ferry_image::{ImageError, Resolver};
use std::ops::Range;
use std::sync::Arc;

/// An NTFS volume on a device, opened for off-host reads of its files.
///
/// The `ntfs` structures are opened again on the blocking thread of each [`open_file`]
/// (boot sector, `$MFT` record, upcase table: a few reads) instead of being kept: a
/// [`Volume`] is not `Send`, and files are opened a handful of times per backup.
///
/// [`open_file`]: SanVolume::open_file
pub struct SanVolume {
    device: Arc<dyn BlockSource>,
    partition: u32,
    start: u64,
    label: String,
}

impl std::fmt::Debug for SanVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SanVolume({})", self.label)
    }
}

fn open_ntfs(
    dev: &Arc<dyn BlockSource>,
    partition: Option<u32>,
    rt: tokio::runtime::Handle,
) -> Result<(Volume, u32)> {
    // Only metadata is read here (boot sector, MFT records, upcase table): small windows, so
    // read-ahead does not pull megabytes of the LUN per open.
    let disk = Disk::open(Arc::new(BlockReader::with_window(
        dev.clone(),
        rt,
        crate::reader::PROBE_WINDOW,
    )))?;
    let n = match partition {
        Some(n) => n,
        None => disk
            .volumes()?
            .into_iter()
            .find(|v| v.fs == Some(FsKind::Ntfs))
            .map(|v| v.number)
            .ok_or_else(|| FsError::Unsupported {
                what: dev.name(),
                message: "no NTFS volume on this device".into(),
            })?,
    };
    let v = disk.volume(Some(n))?;
    if v.kind() != FsKind::Ntfs {
        return Err(FsError::Unsupported {
            what: dev.name(),
            message: format!("partition {n} holds {}, not NTFS", v.kind()),
        });
    }
    Ok((v, n))
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FsError::Usage(format!("{what} task: {e}")))?
}

impl SanVolume {
    /// Opens the NTFS file system on `device`: partition `partition` (0: the whole device), or
    /// when `None` the first NTFS volume found. Call from a multi-threaded tokio runtime.
    pub async fn open(device: Arc<dyn BlockSource>, partition: Option<u32>) -> Result<Arc<Self>> {
        let rt = tokio::runtime::Handle::current();
        let dev = device.clone();
        let (start, slice_label, n) = blocking("NTFS open", move || {
            let (v, n) = open_ntfs(&dev, partition, rt)?;
            Ok((v.slice().start(), v.slice().label().to_string(), n))
        })
        .await?;
        let label = format!("{} ({slice_label})", device.name());
        Ok(Arc::new(Self {
            device,
            partition: n,
            start,
            label,
        }))
    }

    /// The device and partition, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Opens file `path` (volume-relative, `/` or `\` separated, case-insensitive as NTFS is)
    /// as a [`BlockSource`] of its bytes.
    pub async fn open_file(self: &Arc<Self>, path: &str) -> Result<Arc<NtfsFileSource>> {
        let path = path.replace('\\', "/");
        let rt = tokio::runtime::Handle::current();
        let (dev, n, p) = (self.device.clone(), self.partition, path.clone());
        let layout = blocking("NTFS layout", move || {
            open_ntfs(&dev, Some(n), rt)?.0.ntfs_file_layout(&p)
        })
        .await?;
        Ok(Arc::new(NtfsFileSource::new(
            self.clone(),
            format!("{}{SEP}{path}", self.label),
            layout,
        )))
    }
}

/// Between the volume's label and a file's path in a source name.
const SEP: &str = ": ";

/// One piece of a file: file bytes `file..file+len` are at volume byte `vol` (`None`: sparse).
#[derive(Debug, Clone, Copy)]
struct Run {
    file: u64,
    len: u64,
    vol: Option<u64>,
}

/// The bytes of one NTFS file read from its volume's device.
pub struct NtfsFileSource {
    vol: Arc<SanVolume>,
    name: String,
    size: u64,
    runs: Vec<Run>,
    resident: Option<Vec<u8>>,
}

impl std::fmt::Debug for NtfsFileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NtfsFileSource({}, {} runs)", self.name, self.runs.len())
    }
}

impl NtfsFileSource {
    fn new(vol: Arc<SanVolume>, name: String, layout: NtfsLayout) -> Self {
        let mut runs = Vec::with_capacity(layout.runs.len());
        let mut at = 0u64;
        for (vol_off, len) in layout.runs {
            // Runs past the stream's end are allocation slack: never read.
            let len = len.min(layout.len.saturating_sub(at));
            if len == 0 {
                break;
            }
            match runs.last_mut() {
                // Adjacent runs on the volume (or adjacent holes) read as one.
                Some(Run {
                    len: l,
                    vol: Some(v),
                    ..
                }) if vol_off == Some(*v + *l) => *l += len,
                Some(Run {
                    len: l, vol: None, ..
                }) if vol_off.is_none() => *l += len,
                _ => runs.push(Run {
                    file: at,
                    len,
                    vol: vol_off,
                }),
            }
            at += len;
        }
        Self {
            vol,
            name,
            size: layout.len,
            runs,
            resident: layout.resident,
        }
    }

    /// Number of fragments (contiguous runs on the volume, holes included).
    pub fn fragments(&self) -> usize {
        self.runs.len()
    }

    /// The runs overlapping `range`, clipped to it.
    fn pieces(&self, range: Range<u64>) -> impl Iterator<Item = (u64, u64, Option<u64>)> + '_ {
        let first = self.runs.partition_point(|r| r.file + r.len <= range.start);
        self.runs[first..]
            .iter()
            .take_while(move |r| r.file < range.end)
            .map(move |r| {
                let s = r.file.max(range.start);
                let e = (r.file + r.len).min(range.end);
                (s, e - s, r.vol.map(|v| v + (s - r.file)))
            })
    }
}

#[async_trait]
impl BlockSource for NtfsFileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), BlockError> {
        BlockError::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        if let Some(r) = &self.resident {
            let o = offset as usize;
            buf.copy_from_slice(&r[o..o + buf.len()]);
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        for (at, len, vol) in self.pieces(offset..end) {
            let dst = &mut buf[(at - offset) as usize..(at - offset + len) as usize];
            match vol {
                Some(v) => self.vol.device.read_at(self.vol.start + v, dst).await?,
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    async fn allocated(&self, range: Range<u64>) -> std::result::Result<ExtentMap, BlockError> {
        let range = range.start..range.end.min(self.size);
        if self.resident.is_some() {
            return Ok(ExtentMap::from_range(range));
        }
        let mut m = ExtentMap::new();
        for (at, len, vol) in self.pieces(range) {
            if vol.is_some() {
                m.insert(at..at + len);
            }
        }
        Ok(m)
    }
}

/// Opens the files an image on a [`SanVolume`] refers to (an AVHDX's parents), inside the
/// same volume. `host_prefix` is where the host mounts the volume (`C:\ClusterStorage\Volume1`,
/// or `C:\` for a plain drive); absolute locators under it are translated, others are tried
/// by name next to the child.
#[derive(Debug, Clone)]
pub struct SanResolver {
    vol: Arc<SanVolume>,
    host_prefix: Vec<String>,
}

fn win_components(s: &str) -> Vec<String> {
    s.split(['\\', '/'])
        .filter(|c| !c.is_empty())
        .map(str::to_lowercase)
        .collect()
}

impl SanResolver {
    /// A resolver for files of `vol`, which the host mounts at `host_prefix`.
    pub fn new(vol: Arc<SanVolume>, host_prefix: &str) -> Self {
        Self {
            vol,
            host_prefix: win_components(host_prefix),
        }
    }

    /// The volume path of host path `host` (`None` when it lies outside the volume).
    pub fn volume_path(&self, host: &str) -> Option<String> {
        let comps = win_components(host);
        let original: Vec<&str> = host.split(['\\', '/']).filter(|c| !c.is_empty()).collect();
        (comps.len() > self.host_prefix.len()
            && comps[..self.host_prefix.len()] == self.host_prefix[..])
            .then(|| format!("/{}", original[self.host_prefix.len()..].join("/")))
    }
}

#[async_trait]
impl Resolver for SanResolver {
    async fn open(
        &self,
        from: &str,
        name: &str,
    ) -> std::result::Result<Arc<dyn BlockSource>, ImageError> {
        let from_path = from
            .strip_prefix(self.vol.label())
            .and_then(|p| p.strip_prefix(SEP))
            .unwrap_or(from);
        let dir = from_path.rsplit_once('/').map_or("", |(d, _)| d);
        let windows_abs = name.as_bytes().get(1) == Some(&b':') || name.starts_with("\\\\");
        let mut candidates = Vec::new();
        if windows_abs {
            candidates.extend(self.volume_path(name));
        } else if !name.starts_with('/') {
            candidates.push(format!(
                "{dir}/{}",
                name.replace('\\', "/").trim_start_matches("./")
            ));
        }
        if let Some(base) = name
            .rsplit(['\\', '/'])
            .next()
            .filter(|b| !b.is_empty() && *b != ".." && *b != ".")
        {
            candidates.push(format!("{dir}/{base}"));
        }
        candidates.dedup();
        let mut why = Vec::new();
        for c in &candidates {
            if c.split('/').any(|p| p == "..") {
                why.push(format!("{c}: `..` is not followed"));
                continue;
            }
            match self.vol.open_file(c).await {
                Ok(f) => return Ok(f),
                Err(e) => why.push(e.to_string()),
            }
        }
        Err(ImageError::Chain {
            file: from.to_string(),
            message: format!(
                "parent `{name}` not found in {} ({})",
                self.vol.label(),
                if why.is_empty() {
                    "it lies outside the volume".to_string()
                } else {
                    why.join("; ")
                }
            ),
        })
    }
}
