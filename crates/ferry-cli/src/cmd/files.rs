//! `ferry files ls|get SNAPSHOT [--disk D] [--partition N] PATH`: file-level restore. Reads the
//! partition table and the file system (ext2/3/4, NTFS) of a restore point's disk straight from
//! the repository, without restoring the disk (ADR 0070).

use crate::cmd::repo::RepoArgs;
use crate::cmd::restore::resolve_snapshot;
use anyhow::{Context, bail};
use ferry_core::size::human_bytes;
use ferry_fs::{BlockReader, Disk, Entry, EntryKind, Volume};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// `ferry files` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List the partitions of a restore point's disk (no PATH, no --partition), or a directory
    /// of a file system in it.
    Ls(LsArgs),
    /// Copy a file (or a directory, recursively) out of a restore point's disk.
    Get(GetArgs),
}

/// Which restore point, disk and partition.
#[derive(Debug, clap::Args)]
pub struct Target {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Restore point: an id (or a unique prefix of one), `latest`, or `VM@latest`.
    pub snapshot: String,
    /// Disk of the restore point; may be omitted when it has one disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Partition number as Linux names it (GPT: entry number; MBR: 1–4 primary, 5+ logical; 0:
    /// a disk without partition table). Default: the first partition with ext4 or NTFS.
    #[arg(long)]
    pub partition: Option<u32>,
}

/// Arguments of `ferry files ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Directory or file in the file system (`/` is its root).
    pub path: Option<String>,
    /// JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry files get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub target: Target,
    /// File or directory in the file system.
    pub path: String,
    /// Where to write: a file (`-`: stdout) for a file, a directory to create for a
    /// directory. Default: its name in the current directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs `ferry files`.
pub async fn run(c: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    match c {
        Command::Ls(a) => ls(a).await,
        Command::Get(a) => get(a).await,
    }
}

async fn open_disk(t: &Target) -> anyhow::Result<(Disk, String)> {
    let repo = t.repo.open().await?;
    let manifest = resolve_snapshot(&repo, &t.snapshot).await?;
    let disk = match (&t.disk, manifest.disks.as_slice()) {
        (Some(d), disks) if disks.iter().any(|x| &x.name == d) => d.clone(),
        (Some(d), _) => bail!("restore point {} has no disk `{d}`", manifest.id),
        (None, [one]) => one.name.clone(),
        (None, _) => bail!(
            "restore point {} has {} disks: pass --disk",
            manifest.id,
            manifest.disks.len()
        ),
    };
    let source = repo.open_disk(&manifest.id, &disk).await?;
    let label = format!("disk {disk} of restore point {}", manifest.id);
    let reader = BlockReader::new(source, tokio::runtime::Handle::current());
    let l = label.clone();
    let d = tokio::task::spawn_blocking(move || Disk::open(Arc::new(reader)))
        .await?
        .with_context(|| format!("cannot read the partition table of {l}"))?;
    Ok((d, label))
}

fn mtime_text(t: Option<i64>) -> String {
    t.and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map_or_else(|| "-".into(), |d| d.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn entry_json(e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "name": e.name,
        "type": e.kind,
        "size": e.size,
        "mtime": e.mtime.and_then(|s| chrono::DateTime::from_timestamp(s, 0)).map(|d| d.to_rfc3339()),
        "mtime_unix": e.mtime,
    })
}

async fn ls(a: LsArgs) -> anyhow::Result<ExitCode> {
    let (disk, label) = open_disk(&a.target).await?;
    let partition = a.target.partition;
    let path = a.path.clone();
    let json = a.json;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if path.is_none() && partition.is_none() {
            let vols = disk.volumes()?;
            if json {
                let v = serde_json::json!({
                    "scheme": disk.table().scheme,
                    "sector_size": disk.table().sector_size,
                    "partitions": vols,
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
                return Ok(());
            }
            let scheme = match disk.table().scheme {
                ferry_fs::Scheme::Gpt => "GPT partition table",
                ferry_fs::Scheme::Mbr => "MBR partition table",
                ferry_fs::Scheme::None => "no partition table",
            };
            writeln!(out, "{label}: {scheme}")?;
            writeln!(
                out,
                "{:>3} {:>14} {:>10}  {:<22} {:<6} name",
                "#", "start", "size", "type", "fs"
            )?;
            for v in vols {
                writeln!(
                    out,
                    "{:>3} {:>14} {:>10}  {:<22} {:<6} {}",
                    v.number,
                    v.start,
                    human_bytes(v.size),
                    if v.type_name.is_empty() {
                        "-"
                    } else {
                        v.type_name.as_str()
                    },
                    v.fs.map_or_else(|| "-".to_string(), |f| f.to_string()),
                    if v.fs.is_none() {
                        v.found.clone()
                    } else {
                        v.name.clone()
                    },
                )?;
            }
            return Ok(());
        }
        let vol = disk
            .volume(partition)
            .with_context(|| format!("cannot open the file system of {label}"))?;
        let path = path.unwrap_or_else(|| "/".into());
        let entries = vol.list(&path)?;
        if json {
            let v: Vec<_> = entries.iter().map(entry_json).collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        } else {
            for e in entries {
                writeln!(
                    out,
                    "{} {:>14} {}  {}{}",
                    e.kind.tag(),
                    e.size,
                    mtime_text(e.mtime),
                    e.name,
                    if e.kind == EntryKind::Dir { "/" } else { "" }
                )?;
            }
        }
        Ok(())
    })
    .await??;
    Ok(ExitCode::SUCCESS)
}

/// Writes `path` of `vol` to `out` under a temporary name, renamed when complete.
fn get_file(vol: &Volume, path: &str, out: &Path) -> anyhow::Result<u64> {
    let tmp = out.with_file_name(format!(
        ".{}.ferry-part",
        out.file_name()
            .map_or_else(|| "out".into(), |n| n.to_string_lossy())
    ));
    let f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let r = vol
        .read_file(path, &mut w)
        .map_err(anyhow::Error::from)
        .and_then(|n| {
            w.flush()?;
            w.get_ref().sync_all()?;
            Ok(n)
        });
    match r {
        Ok(n) => {
            std::fs::rename(&tmp, out)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn get_dir(vol: &Volume, path: &str, out: &Path, totals: &mut (u64, u64)) -> anyhow::Result<()> {
    std::fs::create_dir(out)
        .with_context(|| format!("cannot create directory {}", out.display()))?;
    for e in vol.list(path)? {
        if e.name.contains('/') || e.name == "." || e.name == ".." || e.name.is_empty() {
            tracing::warn!(name = %e.name, "skipping an entry whose name cannot be a file name");
            continue;
        }
        let child = format!("{}/{}", path.trim_end_matches('/'), e.name);
        let dst = out.join(&e.name);
        match e.kind {
            EntryKind::Dir => get_dir(vol, &child, &dst, totals)?,
            EntryKind::File => {
                totals.1 += get_file(vol, &child, &dst)?;
                totals.0 += 1;
            }
            EntryKind::Symlink | EntryKind::Other => {
                eprintln!("warning: skipped {child} ({:?})", e.kind);
            }
        }
    }
    Ok(())
}

async fn get(a: GetArgs) -> anyhow::Result<ExitCode> {
    let (disk, label) = open_disk(&a.target).await?;
    let partition = a.target.partition;
    let path = a.path.clone();
    let out = a.out.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let vol = disk
            .volume(partition)
            .with_context(|| format!("cannot open the file system of {label}"))?;
        let st = vol.stat(&path)?;
        let out = out.unwrap_or_else(|| {
            PathBuf::from(if st.name == "/" {
                "root".to_string()
            } else {
                st.name.clone()
            })
        });
        if out.as_os_str() == "-" {
            if st.kind == EntryKind::Dir {
                bail!("{path} is a directory: give --out DIR");
            }
            let mut so = std::io::stdout().lock();
            vol.read_file(&path, &mut so)?;
            so.flush()?;
            return Ok(());
        }
        if out.exists() {
            bail!("{} exists already; not overwriting it", out.display());
        }
        let started = std::time::Instant::now();
        let (files, bytes) = match st.kind {
            EntryKind::Dir => {
                let mut t = (0, 0);
                get_dir(&vol, &path, &out, &mut t)?;
                t
            }
            EntryKind::File => (1, get_file(&vol, &path, &out)?),
            other => bail!("{path} is not a regular file or directory ({other:?})"),
        };
        if !crate::logging::quiet() {
            eprintln!(
                "{files} file(s), {} from {label} to {} in {:.2} s",
                human_bytes(bytes),
                out.display(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    })
    .await??;
    Ok(ExitCode::SUCCESS)
}
