//! `ferry demo`: the main job end to end on one machine, with no hypervisor and no cloud.
//!
//! 1. A local encrypted repository and a generated VM disk (qcow2, deterministic content:
//!    data, allocated zeros and holes) with a persistent dirty bitmap, served by `qemu-nbd`.
//! 2. A full backup over NBD.
//! 3. Simulated guest writes (`qemu-io`), recorded by the dirty bitmap.
//! 4. A changed-block incremental over NBD using `qemu:dirty-bitmap:…`, with trust-but-verify.
//! 5. Restores of both restore points, compared byte for byte with the disk as it was.
//!
//! Needs `qemu-img`, `qemu-nbd` and `qemu-io` (Debian `qemu-utils`; `tests/peers/install.sh`
//! installs them).

use anyhow::{Context, bail};
use ferry_core::Secret;
use ferry_core::size::{human_bytes, human_rate};
use ferry_core::vm::{ConsistencyLevel, HypervisorKind, VmConfig};
use ferry_engine::source::{self, SourceOptions};
use ferry_engine::{BackupDisk, BackupOptions, BackupReport, RestoreOptions, RestoreTo};
use ferry_image::OutputFormat;
use ferry_repo::{InitOptions, KdfParams, Repository, SnapshotMeta, Store, VmIdentity};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BITMAP: &str = "ferry-demo";

/// Arguments of `ferry demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Work directory (default: a fresh temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Virtual size of the generated disk in MiB.
    #[arg(long, default_value_t = 512)]
    pub size_mib: u64,
    /// Keep the work directory (repository, images) for a look afterwards.
    #[arg(long)]
    pub keep: bool,
}

fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
    {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("`{name}` not found: run tests/peers/install.sh (it installs qemu-utils)")
}

fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `qemu-nbd` serving an image read-only on a Unix socket; killed on drop.
struct Served {
    child: Child,
    uri: String,
}

impl Served {
    fn start(image: &Path, socket: &Path, bitmap: Option<&str>) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(tool("qemu-nbd")?);
        cmd.args([
            "--read-only",
            "--persistent",
            "--shared=8",
            "-f",
            "qcow2",
            "-x",
            "disk0",
        ])
        .arg("-k")
        .arg(socket);
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        let child = cmd
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start qemu-nbd")?;
        let mut s = Self {
            child,
            uri: format!("nbd+unix:///disk0?socket={}", socket.display()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(st) = s.child.try_wait()? {
                let mut err = String::new();
                if let Some(e) = s.child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("qemu-nbd exited ({st}): {}", err.trim());
            }
            if Instant::now() > deadline {
                bail!("qemu-nbd did not create {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic, roughly 2:1 compressible content: half of every 64-byte line pseudo-random,
/// half a repeated phrase.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    let phrase = b"ferry demo: a VM disk block that compresses about two to one.. ";
    for (i, line) in buf.chunks_mut(64).enumerate() {
        for (j, b) in line.iter_mut().enumerate() {
            if j < 32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            } else {
                *b = phrase[(i + j) % phrase.len()];
            }
        }
    }
}

fn generate(raw: &Path, size: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::create(raw).with_context(|| format!("cannot create {}", raw.display()))?;
    f.set_len(size)?;
    // Data in a few regions (an OS, an application, logs), the rest holes.
    let regions = [
        (0, 48 * MIB),
        (size / 4, 24 * MIB),
        (size / 2 + 3 * MIB, 20 * MIB),
    ];
    let mut buf = vec![0u8; MIB as usize];
    for (n, (start, len)) in regions.iter().enumerate() {
        let mut off = *start;
        while off < start + len && off + MIB <= size {
            fill(off ^ (n as u64) << 40, &mut buf);
            f.write_all_at(&buf, off)?;
            off += MIB;
        }
    }
    Ok(())
}

fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let mut fa = std::fs::File::open(a)?;
    let mut fb = std::fs::File::open(b)?;
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

async fn backup_once(
    repo: &Repository,
    uri: &str,
    bitmap: Option<&str>,
) -> anyhow::Result<BackupReport> {
    let opts = SourceOptions {
        bitmap: bitmap.map(str::to_string),
        ..SourceOptions::default()
    };
    let opened = source::open(uri, &opts).await?;
    let changed = match bitmap {
        Some(b) => Some(source::changed_extents(&opened, b).await?),
        None => None,
    };
    let meta = SnapshotMeta {
        vm: VmIdentity {
            id: "demo-vm".into(),
            name: "demo-vm".into(),
        },
        source: "nbd".into(),
        hypervisor: HypervisorKind::Generic,
        consistency: ConsistencyLevel::Crash,
        config: VmConfig::default(),
        native_config: None,
        transport: Some("nbd".into()),
        labels: Default::default(),
    };
    let disk = BackupDisk {
        name: "disk0".into(),
        source: opened.source,
        changed,
        change_token: bitmap.map(|b| format!("qemu-dirty-bitmap:{b}")),
    };
    let r = ferry_engine::backup(repo, meta, vec![disk], &BackupOptions::default()).await?;
    if let Some(n) = opened.nbd {
        n.close().await;
    }
    Ok(r)
}

fn line(what: &str, r: &BackupReport) -> String {
    let d = &r.disks[0];
    format!(
        "{what}: {} in {:.2} s ({} of virtual disk) — read {}, skipped {} as holes, {} zero, {} unchanged (dirty bitmap), reused {}, new {}, uploaded {} after compression+encryption",
        r.snapshot,
        r.seconds,
        human_rate(d.size, r.seconds),
        human_bytes(d.read_bytes),
        human_bytes(d.hole_bytes),
        human_bytes(d.zero_bytes),
        human_bytes(d.unchanged_bytes),
        human_bytes(d.reused_bytes),
        human_bytes(d.new_bytes),
        human_bytes(d.uploaded_bytes),
    )
}

/// Runs `ferry demo`.
pub async fn run(a: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let (qemu_img, qemu_io) = (tool("qemu-img")?, tool("qemu-io")?);
    tool("qemu-nbd")?;
    let size = a.size_mib.max(64) * MIB;
    let (dir, temporary) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id())),
            !a.keep,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = demo(&dir, size, &qemu_img, &qemu_io).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("work directory kept: {}", dir.display());
    }
    result
}

async fn demo(dir: &Path, size: u64, qemu_img: &Path, qemu_io: &Path) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let say = |s: String| println!("{s}");
    // 1. Repository and disk.
    let store = Store::open(&dir.join("repo").display().to_string(), true)?;
    let password = Secret::new("ferry demo password");
    let opts = InitOptions {
        kdf: KdfParams::insecure_fast(),
        ..InitOptions::default()
    };
    let repo = Repository::init(store, Some(&password), opts).await?;
    say(format!(
        "1. repository {} (AES-256-GCM, {} chunks)",
        dir.join("repo").display(),
        human_bytes(u64::from(repo.config().chunk_size))
    ));
    let raw_v1 = dir.join("expected-full.raw");
    let image = dir.join("vm-disk.qcow2");
    generate(&raw_v1, size)?;
    exec(
        Command::new(qemu_img)
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw_v1)
            .arg(&image),
    )?;
    // The bitmap starts recording now: the full backup below is its base.
    exec(
        Command::new(qemu_img)
            .args(["bitmap", "--add", "-f", "qcow2"])
            .arg(&image)
            .arg(BITMAP),
    )?;
    say(format!(
        "   VM disk {} ({} virtual, 92 MiB of data) with dirty bitmap `{BITMAP}`, served by qemu-nbd",
        image.display(),
        human_bytes(size)
    ));
    let socket = dir.join("nbd.sock");

    // 2. Full backup.
    let full = {
        let served = Served::start(&image, &socket, Some(BITMAP))?;
        backup_once(&repo, &served.uri, None).await?
    };
    say(format!("2. {}", line("full backup", &full)));

    // 3. Guest writes.
    let writes = [
        format!("write -P 0xa5 {} {}", 2 * MIB, 3 * MIB),
        format!("write -P 0x5a {} {}", size / 4 + 5 * MIB, MIB),
        format!("write -z {} {}", 40 * MIB, 2 * MIB),
        format!("write -P 0x77 {} {}", size - 7 * MIB, 512 * 1024),
    ];
    let mut cmd = Command::new(qemu_io);
    cmd.args(["-f", "qcow2"]);
    for w in &writes {
        cmd.arg("-c").arg(w);
    }
    exec(cmd.arg(&image))?;
    let raw_v2 = dir.join("expected-incremental.raw");
    exec(
        Command::new(qemu_img)
            .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(&image)
            .arg(&raw_v2),
    )?;
    say("3. simulated guest writes: 6.5 MiB in 4 places (one of them zeroes)".to_string());

    // 4. Incremental from the dirty bitmap.
    let incr = {
        let served = Served::start(&image, &socket, Some(BITMAP))?;
        backup_once(&repo, &served.uri, Some(BITMAP)).await?
    };
    say(format!("4. {}", line("incremental (dirty bitmap)", &incr)));
    if let Some(v) = &incr.disks[0].verify {
        say(format!(
            "   trust but verify: {} unchanged chunk(s) re-read, {} mismatch(es)",
            v.sampled,
            v.mismatched_offsets.len()
        ));
    }

    // 5. Restores, checked byte for byte.
    let mut all_ok = true;
    for (m, expected, label) in [(&full, &raw_v1, "full"), (&incr, &raw_v2, "incremental")] {
        let manifest = repo.load_manifest(&m.snapshot).await?;
        let out = dir.join(format!("restored-{label}.raw"));
        let r = ferry_engine::restore_disk(
            &repo,
            &manifest,
            "disk0",
            RestoreTo::File {
                path: out.clone(),
                format: OutputFormat::Raw,
            },
            &RestoreOptions::default(),
        )
        .await?;
        let ok = same_content(&out, expected)?;
        all_ok &= ok;
        say(format!(
            "5. restored the {label} restore point in {:.2} s ({}): {}",
            r.seconds,
            human_rate(r.size, r.seconds),
            if ok {
                "identical to the disk at backup time"
            } else {
                "DIFFERENT from the disk at backup time"
            }
        ));
    }
    let uploaded = full.disks[0].uploaded_bytes + incr.disks[0].uploaded_bytes;
    say(format!(
        "done in {:.1} s: 2 restore points of a {} disk hold {} in the repository; the incremental read {} and uploaded {}",
        t0.elapsed().as_secs_f64(),
        human_bytes(size),
        human_bytes(uploaded),
        human_bytes(incr.disks[0].read_bytes),
        human_bytes(incr.disks[0].uploaded_bytes),
    ));
    if !all_ok {
        bail!("a restored disk differs from the original");
    }
    Ok(ExitCode::SUCCESS)
}
