//! Snapshot LUNs of the simulated host: an NTFS volume image per VM folder
//! (`C:\ClusterStorage\Volume1\<vm>`), rebuilt with ntfs-3g's `mkntfs` and `ntfscp` each
//! time a checkpoint of the VM is taken, holding its VHDX/AVHDX chain as the checkpoint left
//! it. A proxy reads it like the array snapshot of a CSV LUN (source key `san-luns`, the
//! folder → the image). ntfs-3g cannot make directories offline, so a LUN's root is the VM's
//! folder (one volume per VM). Rebuilding copies the whole chain: keep simulated disks small.

use std::path::PathBuf;
use std::process::Command;

/// The LUN images of the host.
#[derive(Debug)]
pub(super) struct Luns {
    dir: PathBuf,
}

/// `ntfs-3g`'s tools: `$FERRY_PEERS_DIR/bin`, `PATH`, then the sbin directories.
fn tool(name: &str) -> Result<PathBuf, String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("FERRY_PEERS_DIR") {
        dirs.push(PathBuf::from(p).join("bin"));
    }
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("`{name}` (Debian package ntfs-3g) is not installed: the simulator cannot make the snapshot LUN")
        })
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{:?} failed ({}): {}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

impl Luns {
    /// LUN images kept in `dir`.
    pub(super) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The image of the LUN of VM folder `folder` (a host path).
    pub(super) fn image(&self, folder: &str) -> PathBuf {
        let leaf = folder.rsplit('\\').next().unwrap_or(folder);
        self.dir.join(format!("{leaf}.ntfs"))
    }

    /// Rebuilds the LUN of `folder` with `files` (local path, file name on the volume), as
    /// the array snapshot taken now would show them; the image is replaced in one step.
    pub(super) fn refresh(&self, folder: &str, files: &[(PathBuf, String)]) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let data: u64 = files
            .iter()
            .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        // Room for the files, their MFT records and the volume's own metadata.
        let size = (data + data / 4 + (16 << 20)).div_ceil(1 << 20) << 20;
        let img = self.image(folder);
        let tmp = img.with_extension("ntfs.tmp");
        let f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.set_len(size)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        drop(f);
        let built = (|| {
            run(Command::new(tool("mkntfs")?)
                .args(["-F", "-Q", "-q", "-L", "CSV"])
                .arg(&tmp))?;
            for (local, name) in files {
                run(Command::new(tool("ntfscp")?)
                    .args(["-q", "-f"])
                    .arg(&tmp)
                    .arg(local)
                    .arg(format!("/{name}")))?;
            }
            std::fs::rename(&tmp, &img).map_err(|e| format!("{}: {e}", img.display()))
        })();
        if built.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        built.map_err(|e| format!("the snapshot LUN of {folder}: {e}"))
    }
}

/// The folder of a host path (`C:\a\b\d.vhdx` → `C:\a\b`) and the file name.
pub(super) fn split(host_path: &str) -> Option<(&str, &str)> {
    host_path.rsplit_once('\\')
}

impl Luns {
    /// After checkpoint `frozen` of VM `vm_id`: refreshes the LUN of the VM's folder with every
    /// image of its disks there (the bases and the checkpoint's children).
    pub(super) fn checkpoint_taken(
        &self,
        storage: &super::disks::Storage,
        vm_id: &str,
        frozen: &[super::disks::Frozen],
    ) -> Result<(), String> {
        let mut by_folder: std::collections::BTreeMap<&str, Vec<(PathBuf, String)>> =
            Default::default();
        let paths = storage
            .disks
            .iter()
            .filter(|d| d.vm_id == vm_id)
            .map(|d| d.host_path.as_str())
            .chain(frozen.iter().map(|f| f.host_path.as_str()));
        for hp in paths {
            let (folder, name) = split(hp).ok_or_else(|| format!("`{hp}` has no folder"))?;
            by_folder
                .entry(folder)
                .or_default()
                .push((storage.local(hp)?, name.to_string()));
        }
        for (folder, files) in by_folder {
            self.refresh(folder, &files)?;
        }
        Ok(())
    }
}
