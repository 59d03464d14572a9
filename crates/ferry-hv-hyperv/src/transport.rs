//! How a checkpoint's disk reaches the proxy: the seam between the driver (which knows the
//! checkpoint's image on the host) and a data path (which turns it into a
//! [`BlockSource`]). `san` reads the `.avhdx`/`.vhdx` chain with `ferry-image` off storage the
//! proxy sees (an SMB share or a CSV mounted on the proxy), mapped by the source's
//! `san-paths`; the host agent (`network`) and the NTFS volume reader plug in beside it.

use async_trait::async_trait;
use ferry_core::BlockSource;
use ferry_hv::TransportMode;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One disk of a checkpoint, as the host names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDisk {
    /// The VM's id.
    pub vm: String,
    /// The disk's stable key.
    pub key: String,
    /// The checkpoint's image on the host (`C:\…\disk0_<id>.avhdx`); its parents follow
    /// from the image.
    pub host_path: String,
}

/// A data path for checkpoint disks.
#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// The mode it implements.
    fn mode(&self) -> TransportMode;
    /// Opens `disk` read-only, or says why it cannot.
    async fn open(&self, disk: &CheckpointDisk) -> Result<Arc<dyn BlockSource>, String>;
    /// Opens `disk` knowing the node that runs the VM (the host agent reads it there); paths
    /// that do not depend on the node open it as [`Transport::open`] does.
    async fn open_on(
        &self,
        disk: &CheckpointDisk,
        node: Option<&crate::agent::OwnerNode>,
    ) -> Result<Arc<dyn BlockSource>, String> {
        let _ = node;
        self.open(disk).await
    }
}

/// `san`: the host's files through a local directory per host path prefix.
#[derive(Debug, Clone)]
pub struct SanTransport {
    /// Host path prefix (`C:\ClusterStorage\Volume1`, `\\fs\vms`) → local directory.
    pub paths: BTreeMap<String, PathBuf>,
}

/// Maps `host` (Windows syntax) through the longest prefix of `paths` that ends on a path
/// component boundary; case-insensitive, as Windows paths are.
pub fn map_host_path(paths: &BTreeMap<String, PathBuf>, host: &str) -> Option<PathBuf> {
    let norm = |s: &str| s.replace('/', "\\").trim_end_matches('\\').to_lowercase();
    let h = norm(host);
    let (prefix, dir) = paths
        .iter()
        .filter(|(p, _)| {
            let p = norm(p);
            h.starts_with(&p) && h[p.len()..].starts_with('\\')
        })
        .max_by_key(|(p, _)| norm(p).len())?;
    let rest = &host.replace('/', "\\")[norm(prefix).len()..];
    let mut out = dir.clone();
    for part in rest.split('\\').filter(|s| !s.is_empty()) {
        if part == ".." || part == "." {
            return None;
        }
        out.push(part);
    }
    Some(out)
}

impl SanTransport {
    /// The local file of host path `host`.
    pub fn local(&self, host: &str) -> Result<PathBuf, String> {
        map_host_path(&self.paths, host).ok_or_else(|| {
            format!(
                "no san-paths entry covers `{host}` (configured: {})",
                if self.paths.is_empty() {
                    "none".to_string()
                } else {
                    self.paths.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            )
        })
    }
}

#[async_trait]
impl Transport for SanTransport {
    fn mode(&self) -> TransportMode {
        TransportMode::San
    }

    async fn open(&self, disk: &CheckpointDisk) -> Result<Arc<dyn BlockSource>, String> {
        let file = self.local(&disk.host_path)?;
        open_chain(&file).await
    }
}

/// `network`: the checkpoint's chain served by `ferry-agent` on the host that owns the VM
/// (ADR 0125), read over NBD with pinned mutual TLS.
#[derive(Debug, Clone)]
pub struct AgentTransport {
    /// `host:port` of the agent.
    pub agent: String,
    /// The agent's certificate fingerprint (`sha256:…`).
    pub agent_pin: String,
    /// The appliance's client certificate and key, pinned by the agent.
    pub identity: ferry_tls::ClientIdentity,
}

#[async_trait]
impl Transport for AgentTransport {
    fn mode(&self) -> TransportMode {
        TransportMode::Network
    }

    async fn open(&self, disk: &CheckpointDisk) -> Result<Arc<dyn BlockSource>, String> {
        ferry_agent::client::open(
            &self.agent,
            &self.agent_pin,
            &self.identity,
            &disk.host_path,
        )
        .await
        .map_err(|e| e.to_string())
    }
}

/// `san` over snapshot LUNs: the VHDX/AVHDX files read through the NTFS volume on the device the
/// proxy sees, without mounting it (ADR 0126). `luns`: the source's `san-luns`, host path prefix
/// of a volume (`C:\ClusterStorage\Volume1`) → device.
#[derive(Debug, Clone)]
pub struct NtfsLunTransport {
    /// Host path prefix → device (or volume image).
    pub luns: BTreeMap<String, PathBuf>,
}

#[async_trait]
impl Transport for NtfsLunTransport {
    fn mode(&self) -> TransportMode {
        TransportMode::San
    }

    async fn open(&self, disk: &CheckpointDisk) -> Result<Arc<dyn BlockSource>, String> {
        // The longest prefix covering the disk names its volume.
        let (prefix, device) = self
            .luns
            .iter()
            .filter(|(p, d)| {
                map_host_path(
                    &BTreeMap::from([((*p).clone(), (*d).clone())]),
                    &disk.host_path,
                )
                .is_some()
            })
            .max_by_key(|(p, _)| p.len())
            .ok_or_else(|| format!("no san-luns entry covers `{}`", disk.host_path))?;
        let dev: Arc<dyn BlockSource> =
            Arc::new(ferry_image::FileSource::open(device).map_err(|e| e.to_string())?);
        let vol = ferry_fs::SanVolume::open(dev, None)
            .await
            .map_err(|e| e.to_string())?;
        let resolver = ferry_fs::SanResolver::new(vol.clone(), prefix);
        let path = resolver
            .volume_path(&disk.host_path)
            .ok_or_else(|| format!("`{}` lies outside {prefix}", disk.host_path))?;
        let file = vol.open_file(&path).await.map_err(|e| e.to_string())?;
        let img = ferry_image::open_source(file, &resolver)
            .await
            .map_err(|e| e.to_string())?;
        Ok(img.source)
    }
}

/// Opens an image file and its differencing chain (parents next to it).
async fn open_chain(file: &Path) -> Result<Arc<dyn BlockSource>, String> {
    let img = ferry_image::open_image(file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(img.source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_on_component_boundaries() {
        let mut m = BTreeMap::new();
        m.insert("C:\\".to_string(), PathBuf::from("/c"));
        m.insert(
            "C:\\ClusterStorage\\Volume1".to_string(),
            PathBuf::from("/csv1"),
        );
        assert_eq!(
            map_host_path(&m, "c:\\clusterstorage\\volume1\\vm\\d.avhdx").unwrap(),
            Path::new("/csv1/vm/d.avhdx")
        );
        assert_eq!(
            map_host_path(&m, "C:\\ClusterStorage\\Volume10\\d.vhdx").unwrap(),
            Path::new("/c/ClusterStorage/Volume10/d.vhdx")
        );
        assert!(map_host_path(&m, "D:\\x.vhdx").is_none());
        assert!(map_host_path(&m, "C:\\a\\..\\..\\etc\\passwd").is_none());
    }
}
