//! The simulated host's virtual disks: VHDX files under Windows-style host paths, the guests'
//! live content, checkpoints as `.avhdx` children, and RCT.
//!
//! A host path `C:\ClusterStorage\Volume1\vm\disk0.vhdx` is the file
//! `<dir>/volumes/C/ClusterStorage/Volume1/vm/disk0.vhdx`. What the guest sees now (the live
//! disk) is a sparse raw file under `<dir>/live/`, which the side door writes; the base `.vhdx`
//! (written by `ferry-image`) holds the disk as of the last merge, and the extents the guest
//! changed since are remembered. A checkpoint freezes each disk by writing those extents into
//! a differencing `<disk>_<checkpoint>.avhdx` next to the base: the chain `.avhdx` → `.vhdx`
//! is the disk at checkpoint time, what a backup reads. Removing the last checkpoint (destroy
//! or conversion into a reference point) merges: the `.avhdx` files go and the base is
//! rewritten from the live disk, as Hyper-V merges a checkpoint's differencing disk.

use super::rct::{self, Rct};
use ferry_image::{ImageWriter, OutputFormat, WriterOptions};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// VHDX block size of the simulator's images: small, so sparse guests stay small.
const BLOCK: u64 = 1 << 20;

/// One virtual disk.
#[derive(Debug)]
pub struct Disk {
    /// The VM's id (GUID).
    pub vm_id: String,
    /// The VM's name.
    pub vm_name: String,
    /// `disk0`, `disk1`, …
    pub name: String,
    /// The virtual disk identifier (GUID), the second segment of its settings' InstanceID.
    pub id: String,
    /// The base image's host path.
    pub host_path: String,
    /// Virtual size.
    pub size: u64,
    /// Change tracking.
    pub rct: Rct,
    /// Extents changed since the base image was written.
    dirty: Vec<(u64, u64)>,
    epochs: u64,
}

impl Disk {
    /// Forgets what changed since the base was written (the live disk was refilled from the
    /// images); RCT keeps its log.
    pub fn forget_changes(&mut self) {
        self.dirty.clear();
    }
}

/// One disk frozen by a checkpoint.
#[derive(Debug, Clone)]
pub struct Frozen {
    /// The disk's id.
    pub disk_id: String,
    /// The checkpoint's `.avhdx` (host path).
    pub host_path: String,
    /// Its RCT id.
    pub rct_id: String,
    /// The tracking generation it froze.
    pub generation: u64,
}

/// Every disk of the host.
#[derive(Debug)]
pub struct Storage {
    dir: PathBuf,
    /// The disks, in creation order.
    pub disks: Vec<Disk>,
    /// Checkpoint InstanceID → its frozen disks.
    pub frozen: BTreeMap<String, Vec<Frozen>>,
}

fn io(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// The local file of host path `p` under `dir`: `X:\a\b` → `dir/volumes/X/a/b`.
pub fn local_path(dir: &Path, p: &str) -> Result<PathBuf, String> {
    let b = p.as_bytes();
    if b.len() < 3 || !b[0].is_ascii_alphabetic() || b[1] != b':' || b[2] != b'\\' {
        return Err(format!("`{p}` is not a local path of the host (X:\\…)"));
    }
    let mut out = dir
        .join("volumes")
        .join(p[..1].to_ascii_uppercase().as_str());
    for part in p[3..].split('\\').filter(|s| !s.is_empty()) {
        if part == ".." || part == "." {
            return Err(format!("`{p}`: relative components are not allowed"));
        }
        out.push(part);
    }
    Ok(out)
}

/// Deterministic filler for seeded disks: a different 8-byte word at every position.
fn word(seed: u64, pos: u64) -> u64 {
    let mut z = seed ^ pos.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Storage {
    /// Storage under `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            disks: Vec::new(),
            frozen: BTreeMap::new(),
        }
    }

    /// The local file of a host path.
    pub fn local(&self, host_path: &str) -> Result<PathBuf, String> {
        local_path(&self.dir, host_path)
    }

    /// The live (guest-visible) content of `d`, a sparse raw file.
    pub fn live_path(&self, d: &Disk) -> PathBuf {
        self.dir
            .join("live")
            .join(&d.vm_name)
            .join(format!("{}.raw", d.name))
    }

    /// Creates disk `name` of VM `vm_name` (`vm_id`) in folder `folder` (a host path), with
    /// generated content in the first quarter of every MiB, and writes its base `.vhdx`; returns
    /// the disk's identifier.
    pub fn create(
        &mut self,
        vm_id: &str,
        vm_name: &str,
        folder: &str,
        name: &str,
        size: u64,
        seed: u64,
    ) -> Result<String, String> {
        let id = super::guid(&format!("{vm_name}/{name}"));
        let d = Disk {
            vm_id: vm_id.into(),
            vm_name: vm_name.into(),
            name: name.into(),
            rct: Rct::new(id.clone()),
            id,
            host_path: format!("{folder}\\{name}.vhdx"),
            size,
            dirty: Vec::new(),
            epochs: 0,
        };
        let live = self.live_path(&d);
        if let Some(p) = live.parent() {
            std::fs::create_dir_all(p).map_err(|e| io(p.display(), e))?;
        }
        let f = std::fs::File::create(&live).map_err(|e| io(live.display(), e))?;
        f.set_len(size).map_err(|e| io(live.display(), e))?;
        let mut buf = vec![0u8; (BLOCK / 4) as usize];
        for mib in 0..size / BLOCK {
            let off = mib * BLOCK;
            for (i, c) in buf.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&word(seed, off + 8 * i as u64).to_le_bytes());
            }
            f.write_all_at(&buf, off)
                .map_err(|e| io(live.display(), e))?;
        }
        self.write_base(&d)?;
        self.disks.push(d);
        Ok(self.disks[self.disks.len() - 1].id.clone())
    }

    /// Takes the image already at `host_path` as disk `name` (id `id`) of VM `vm_id`, as a
    /// restore attaches it; the caller fills its live file. Its index.
    pub fn adopt(
        &mut self,
        vm_id: &str,
        vm_name: &str,
        name: &str,
        id: &str,
        host_path: &str,
        size: u64,
    ) -> usize {
        self.disks.push(Disk {
            vm_id: vm_id.into(),
            vm_name: vm_name.into(),
            name: name.into(),
            rct: Rct::new(id.to_string()),
            id: id.into(),
            host_path: host_path.into(),
            size,
            dirty: Vec::new(),
            epochs: 0,
        });
        self.disks.len() - 1
    }

    /// Rewrites the base `.vhdx` of `d` from its live content.
    fn write_base(&self, d: &Disk) -> Result<(), String> {
        let path = self.local(&d.host_path)?;
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|e| io(p.display(), e))?;
        }
        let live = std::fs::File::open(self.live_path(d)).map_err(|e| io(d.name.as_str(), e))?;
        let opts = WriterOptions {
            block_size: Some(BLOCK),
            parent: None,
        };
        let mut w = ImageWriter::create_with(&path, OutputFormat::Vhdx, d.size, &opts)
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; BLOCK as usize];
        let mut off = 0;
        while off < d.size {
            let n = (d.size - off).min(BLOCK) as usize;
            live.read_exact_at(&mut buf[..n], off)
                .map_err(|e| io(d.name.as_str(), e))?;
            w.write(off, &buf[..n]).map_err(|e| e.to_string())?;
            off += n as u64;
        }
        w.finish().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The disk of VM `vm` (id or name) named or identified `disk`.
    pub fn find(&self, vm: &str, disk: &str) -> Result<usize, String> {
        self.disks
            .iter()
            .position(|d| {
                (d.vm_id == vm || d.vm_name == vm)
                    && (d.name == disk || d.id.eq_ignore_ascii_case(disk))
            })
            .ok_or_else(|| format!("VM `{vm}` has no disk `{disk}`"))
    }

    /// The guest writes `data` at `off` of disk `i`; RCT records it unless `tracked` is false
    /// (a write change tracking misses).
    pub fn write(&mut self, i: usize, off: u64, data: &[u8], tracked: bool) -> Result<(), String> {
        let d = &self.disks[i];
        let len = data.len() as u64;
        if off % 512 != 0 || len % 512 != 0 || len == 0 {
            return Err(format!(
                "guest writes cover whole 512-byte sectors ({len} bytes at {off})"
            ));
        }
        if off.checked_add(len).is_none_or(|e| e > d.size) {
            return Err(format!(
                "{len} bytes at {off} reach past the end of the disk ({} bytes)",
                d.size
            ));
        }
        let live = self.live_path(d);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&live)
            .map_err(|e| io(live.display(), e))?;
        f.write_all_at(data, off)
            .map_err(|e| io(live.display(), e))?;
        let d = &mut self.disks[i];
        d.dirty.push((off, len));
        rct::merge(&mut d.dirty);
        if tracked {
            d.rct.record(off, len, d.size);
        }
        Ok(())
    }

    /// Starts a new RCT epoch on disk `i`: every earlier RCT id of it becomes invalid.
    pub fn break_rct(&mut self, i: usize) {
        let d = &mut self.disks[i];
        d.epochs += 1;
        let epoch = super::guid(&format!("{}-epoch-{}", d.id, d.epochs));
        d.rct.reset(epoch);
    }

    /// Freezes every disk of VM `vm_id` for checkpoint `snap` (its InstanceID; `tag` names the
    /// files): writes the `.avhdx` children.
    pub fn freeze(&mut self, vm_id: &str, snap: &str, tag: &str) -> Result<Vec<Frozen>, String> {
        let mut out = Vec::new();
        let idx: Vec<usize> = (0..self.disks.len())
            .filter(|&i| self.disks[i].vm_id == vm_id)
            .collect();
        for i in idx {
            match self.freeze_one(i, tag) {
                Ok(f) => out.push(f),
                Err(e) => {
                    self.remove_files(&out);
                    return Err(e);
                }
            }
        }
        self.frozen.insert(snap.to_string(), out.clone());
        Ok(out)
    }

    fn freeze_one(&mut self, i: usize, tag: &str) -> Result<Frozen, String> {
        let d = &self.disks[i];
        let base = self.local(&d.host_path)?;
        let host_path = format!(
            "{}_{tag}.avhdx",
            d.host_path.strip_suffix(".vhdx").unwrap_or(&d.host_path)
        );
        let path = self.local(&host_path)?;
        let live = std::fs::File::open(self.live_path(d)).map_err(|e| io(d.name.as_str(), e))?;
        let opts = WriterOptions {
            block_size: Some(BLOCK),
            parent: Some(base),
        };
        let mut w = ImageWriter::create_with(&path, OutputFormat::Vhdx, d.size, &opts)
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; BLOCK as usize];
        for &(o, l) in &d.dirty {
            let mut at = o;
            while at < o + l {
                let n = (o + l - at).min(BLOCK) as usize;
                live.read_exact_at(&mut buf[..n], at)
                    .map_err(|e| io(d.name.as_str(), e))?;
                w.write(at, &buf[..n]).map_err(|e| e.to_string())?;
                at += n as u64;
            }
        }
        w.finish().map_err(|e| e.to_string())?;
        let d = &mut self.disks[i];
        let generation = {
            let id = d.rct.checkpoint();
            (id.clone(), d.rct.generation_of(&id).unwrap_or(0))
        };
        Ok(Frozen {
            disk_id: d.id.clone(),
            host_path,
            rct_id: generation.0,
            generation: generation.1,
        })
    }

    fn remove_files(&self, frozen: &[Frozen]) {
        for f in frozen {
            if let Ok(p) = self.local(&f.host_path) {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Checkpoint `snap` goes (destroyed or converted): its files are removed, and once VM
    /// `vm_id` has no checkpoint left the bases are rewritten from the live disks (the merge).
    pub fn release(&mut self, vm_id: &str, snap: &str) -> Result<(), String> {
        if let Some(f) = self.frozen.remove(snap) {
            self.remove_files(&f);
        }
        let others = self.frozen.values().flatten().any(|f| {
            self.disks
                .iter()
                .any(|d| d.vm_id == vm_id && d.id == f.disk_id)
        });
        if others {
            return Ok(());
        }
        for i in 0..self.disks.len() {
            if self.disks[i].vm_id != vm_id || self.disks[i].dirty.is_empty() {
                continue;
            }
            self.write_base(&self.disks[i])?;
            self.disks[i].dirty.clear();
        }
        Ok(())
    }

    /// Size and parent (host paths) of the image at host path `path`, if it exists.
    pub fn describe(&self, path: &str) -> Option<(u64, Option<String>)> {
        if let Some(d) = self
            .disks
            .iter()
            .find(|d| d.host_path.eq_ignore_ascii_case(path))
        {
            return Some((d.size, None));
        }
        let f = self
            .frozen
            .values()
            .flatten()
            .find(|f| f.host_path.eq_ignore_ascii_case(path))?;
        let d = self.disks.iter().find(|d| d.id == f.disk_id)?;
        Some((d.size, Some(d.host_path.clone())))
    }

    /// `GetVirtualDiskChanges`: the changed ranges of the disk at `path` (a checkpoint's
    /// `.avhdx`, or a base `.vhdx` for its live state) since RCT id `since`, within
    /// `[off, off + len)`, at most `page` ranges; with the length processed.
    pub fn changes(
        &self,
        path: &str,
        since: &str,
        off: u64,
        len: u64,
        page: usize,
    ) -> Result<(Vec<(u64, u64)>, u64), String> {
        let (disk, upto) = match self
            .frozen
            .values()
            .flatten()
            .find(|f| f.host_path.eq_ignore_ascii_case(path))
        {
            Some(f) => (
                self.disks
                    .iter()
                    .find(|d| d.id == f.disk_id)
                    .ok_or("the checkpoint's disk is gone")?,
                f.generation,
            ),
            None => {
                let d = self
                    .disks
                    .iter()
                    .find(|d| d.host_path.eq_ignore_ascii_case(path))
                    .ok_or_else(|| format!("the virtual disk `{path}` does not exist"))?;
                (d, u64::MAX)
            }
        };
        let from = disk.rct.generation_of(since).map_err(|e| e.to_string())?;
        if from >= upto {
            return Err(format!(
                "the RCT id `{since}` is not older than the disk `{path}`"
            ));
        }
        let end = off.saturating_add(len).min(disk.size);
        let mut out = Vec::new();
        for (o, l) in disk.rct.changes(from, upto) {
            let (s, e) = (o.max(off), (o + l).min(end));
            if s >= e {
                continue;
            }
            if out.len() == page {
                // Windows stops at a full page and says how far it got.
                return Ok((out, s - off));
            }
            out.push((s, e - s));
        }
        Ok((out, end.saturating_sub(off)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_map_under_volumes() {
        let d = Path::new("/x");
        assert_eq!(
            local_path(d, "C:\\ClusterStorage\\Volume1\\vm\\d.vhdx").unwrap(),
            Path::new("/x/volumes/C/ClusterStorage/Volume1/vm/d.vhdx")
        );
        assert!(local_path(d, "relative\\d.vhdx").is_err());
        assert!(local_path(d, "C:\\a\\..\\..\\etc").is_err());
    }
}
