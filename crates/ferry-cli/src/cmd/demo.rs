//! `ferry demo`: the main job end to end on one machine, with no hypervisor and no cloud.
//!
//! 1. A local encrypted repository, and the in-tree XenAPI simulator (an XCP-ng pool whose VMs
//!    have generated disks: boot sector, logs, binary data, holes) running in this process.
//! 2. A full backup of VM `debian-web` through the Xen driver, exactly as
//!    `ferry backup --source` does it: snapshot, CBT enabled, disks read over NBD with TLS,
//!    snapshot turned into CBT anchors.
//! 3. Simulated guest writes (the simulator's side door), recorded by CBT.
//! 4. A changed-block incremental from `VDI.list_changed_blocks`, with trust-but-verify.
//! 5. Restores of both restore points to raw files, compared byte for byte with the disks as
//!    they were at snapshot time, and a whole-VM restore into the pool, compared the same way.
//!
//! Needs nothing outside this binary. `--hypervisor vmware` runs the same job against the vSphere
//! simulator (which needs the `vcsim` peer) with the VMDKs read straight off its datastore.

use crate::cmd::hvbackup::{VmBackup, VmBackupOptions, backup_vm, find_vm};
use crate::cmd::restore::restore_plan;
use anyhow::{Context, bail};
use ferry_core::Secret;
use ferry_core::size::{human_bytes, human_rate};
use ferry_engine::{RestoreOptions, RestoreTo};
use ferry_hv::{FerryConfig, HypervisorDriver};
use ferry_hv_xen::XenDriver;
use ferry_image::OutputFormat;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use ferry_sim::xen::{Value, XenSim, XenSimConfig};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const SOURCE: &str = "demo-xen";
const VM: &str = "debian-web";

/// Arguments of `ferry demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Work directory (default: a fresh temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Virtual size of the VM's first disk in MiB (the second is half of it).
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Keep the work directory (repository, images) for a look afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Which simulated hypervisor: `xen` (XenAPI, NBD with TLS), `vmware` (govmomi's vcsim
    /// behind `ferry sim vmware`, VMDKs read off the datastore, QueryChangedDiskAreas) or
    /// `hyperv` (WinRM/WMI, child-VM and saved-state methods, RCT, VHDX chains).
    #[arg(long, default_value = "xen", value_parser = ["xen", "vmware", "hyperv"])]
    pub hypervisor: String,
}

/// Runs `ferry demo`.
pub async fn run(a: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let (dir, temporary) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id())),
            !a.keep,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = if a.hypervisor == "vmware" {
        demo_vmware(&dir, a.size_mib.max(8)).await
    } else if a.hypervisor == "hyperv" {
        crate::cmd::demo_hyperv::demo(&dir, a.size_mib.max(8)).await
    } else {
        demo(&dir, a.size_mib.max(8)).await
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("work directory kept: {}", dir.display());
    }
    result
}

pub(crate) fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let mut fa = std::fs::File::open(a).with_context(|| format!("open {}", a.display()))?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("open {}", b.display()))?;
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

/// Restores every disk of restore point `snapshot` to `dir/restored-<label>-<disk>.raw` and
/// compares each with its expected copy.
pub(crate) async fn restores_match(
    repo: &Repository,
    snapshot: &str,
    expected: &[(String, PathBuf)],
    dir: &Path,
    label: &str,
) -> anyhow::Result<bool> {
    let manifest = repo.load_manifest(snapshot).await?;
    let mut ok = true;
    for (disk, want) in expected {
        let out = dir.join(format!("restored-{label}-{}.raw", disk.replace(':', "-")));
        ferry_engine::restore_disk(
            repo,
            &manifest,
            disk,
            RestoreTo::File {
                path: out.clone(),
                format: OutputFormat::Raw,
            },
            &RestoreOptions::default(),
        )
        .await?;
        ok &= same_content(&out, want)?;
    }
    Ok(ok)
}

/// The live VDIs of `vm` with their disk names (`xvda`, `xvdb`, … in userdevice order).
async fn live_disks(sim: &XenSim, vm: &str) -> anyhow::Result<Vec<(String, String)>> {
    let r = sim.vm(vm).await?;
    Ok(sim
        .vm_disks(&r)
        .await?
        .into_iter()
        .enumerate()
        .map(|(i, vdi)| (format!("xvd{}", (b'a' + i as u8) as char), vdi))
        .collect())
}

/// Saves every disk of `vm` as it is now into `dir/<label>-<disk>.raw`.
async fn save_disks(
    sim: &XenSim,
    vm: &str,
    dir: &Path,
    label: &str,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for (name, vdi) in live_disks(sim, vm).await? {
        let p = dir.join(format!("{label}-{name}.raw"));
        sim.save_vdi(&vdi, &p).await?;
        out.push((name, p));
    }
    Ok(out)
}

pub(crate) fn line(what: &str, b: &VmBackup) -> String {
    let r = &b.report;
    let t = |f: fn(&ferry_engine::DiskReport) -> u64| human_bytes(r.total(f));
    format!(
        "{what}: restore point {} in {:.2} s ({} of virtual disk) — read {}, skipped {} as holes, {} zero, {} unchanged (CBT), reused {}, new {}, uploaded {} after compression+encryption",
        r.snapshot,
        r.seconds,
        human_rate(r.total(|d| d.size), r.seconds),
        t(|d| d.read_bytes),
        t(|d| d.hole_bytes),
        t(|d| d.zero_bytes),
        t(|d| d.unchanged_bytes),
        t(|d| d.reused_bytes),
        t(|d| d.new_bytes),
        t(|d| d.uploaded_bytes),
    )
}

/// What is left on the pool besides VMs and their disks: snapshot VMs, CBT anchors,
/// snapshot VDIs still holding data, VBDs on the proxy, tasks.
async fn leftovers(sim: &XenSim) -> anyhow::Result<(usize, usize, usize, usize, usize)> {
    let (mut snaps, mut anchors, mut snap_vdis) = (0, 0, 0);
    for vm in sim.all("VM").await? {
        if sim.flag("VM", &vm, "is_a_snapshot").await? {
            snaps += 1;
        }
    }
    for vdi in sim.all("VDI").await? {
        if sim.field("VDI", &vdi, "type").await? == "cbt_metadata" {
            anchors += 1;
        } else if sim.flag("VDI", &vdi, "is_a_snapshot").await? {
            snap_vdis += 1;
        }
    }
    let proxy = sim.vm("ferry-proxy").await?;
    let sess = sim.login().await?;
    let vbds = sim
        .call("VM.get_VBDs", vec![Value::s(&sess), Value::s(&proxy)])
        .await?;
    let tasks = sim.call("task.get_all", vec![Value::s(&sess)]).await?;
    sim.call("session.logout", vec![Value::s(&sess)]).await?;
    let len = |v: &Value| match v {
        Value::Array(a) => a.len(),
        _ => 0,
    };
    Ok((snaps, anchors, snap_vdis, len(&vbds), len(&tasks)))
}

async fn demo(dir: &Path, size_mib: u64) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let say = |s: String| println!("{s}");

    // 1. Repository and simulated pool.
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
    let mut cfg = XenSimConfig::new(dir.join("xen-pool"));
    cfg.disk_mib = size_mib;
    let sim = XenSim::start(cfg)
        .await
        .context("cannot start the XenAPI simulator")?;
    let pw = dir.join("xen.password");
    std::fs::write(&pw, sim.password())?;
    let toml = format!(
        "[sources.{SOURCE}]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\ntransports = [\"network\"]\nstate-dir = \"{}\"\n",
        sim.url(),
        sim.username(),
        pw.display(),
        sim.tls_fingerprint(),
        dir.join("state").display()
    );
    let config_path = dir.join("ferry.toml");
    std::fs::write(&config_path, &toml)?;
    let config = FerryConfig::parse(&toml, &config_path)?;
    let driver = XenDriver::connect(SOURCE, config.source(SOURCE)?).await?;
    let vms = driver.list_vms().await?;
    let vm = find_vm(&vms, VM)?.clone();
    say(format!(
        "   XenAPI simulator (XCP-ng pool) at {}, TLS pinned; {} VMs: {}; backing up `{VM}` ({} disks, {}) over NBD with TLS — source `{SOURCE}` in {}",
        sim.url(),
        vms.len(),
        vms.iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        vm.disks.len(),
        human_bytes(vm.disks.iter().map(|d| d.size).sum()),
        config_path.display()
    ));

    // 2. Full backup.
    let expected_full = save_disks(&sim, VM, dir, "expected-full").await?;
    let full = backup_vm(&driver, SOURCE, &repo, &vm, &VmBackupOptions::default()).await?;
    say(format!("2. {}", line("full backup", &full)));

    // 3. Guest writes, recorded by CBT.
    let live = live_disks(&sim, VM).await?;
    let mib = 1u64 << 20;
    let writes: [(usize, u64, Vec<u8>); 4] = [
        (0, 2 * mib, vec![0xa5; 3 * mib as usize]),
        (
            0,
            5 * mib + 4000,
            b"guest log line: nightly job done\n".repeat(100),
        ),
        (1, mib, vec![0x5a; mib as usize / 2]),
        (1, 3 * mib - 100, vec![0u8; 200]),
    ];
    let mut written = 0;
    for (disk, off, data) in &writes {
        sim.guest_write(&live[*disk].1, *off, data).await?;
        written += data.len() as u64;
    }
    let expected_incr = save_disks(&sim, VM, dir, "expected-incremental").await?;
    say(format!(
        "3. simulated guest writes: {} in {} places on both disks (one of them zeroes)",
        human_bytes(written),
        writes.len()
    ));

    // 4. Incremental from CBT.
    let incr = backup_vm(&driver, SOURCE, &repo, &vm, &VmBackupOptions::default()).await?;
    say(format!("4. {}", line("incremental (CBT)", &incr)));
    let cbt: u64 = incr.disks.iter().filter_map(|d| d.cbt_changed_bytes).sum();
    let fetched: u64 = incr.disks.iter().map(|d| d.source_read_bytes).sum();
    say(format!(
        "   CBT (VDI.list_changed_blocks) reported {} changed; the driver fetched {} from the pool",
        human_bytes(cbt),
        human_bytes(fetched)
    ));
    let (sampled, mismatched) =
        incr.report
            .disks
            .iter()
            .fold((0, 0), |(s, m), d| match &d.verify {
                Some(v) => (s + v.sampled, m + v.mismatched_offsets.len()),
                None => (s, m),
            });
    say(format!(
        "   trust but verify: {sampled} unchanged chunk(s) re-read, {mismatched} mismatch(es)"
    ));
    let (snaps, anchors, snap_vdis, vbds, tasks) = leftovers(&sim).await?;
    say(format!(
        "   left on the pool: {snaps} snapshot VM(s), {anchors} CBT anchor(s) without data, {snap_vdis} snapshot disk(s) with data, {vbds} VBD(s) on the proxy, {tasks} task(s)"
    ));
    let clean =
        snaps == 0 && snap_vdis == 0 && vbds == 0 && tasks == 0 && anchors == vm.disks.len();

    // 5. Restores, checked byte for byte.
    let mut all_ok = clean;
    for (b, expected, label, step) in [
        (&full, &expected_full, "full", "5."),
        (&incr, &expected_incr, "incremental", "  "),
    ] {
        let manifest = repo.load_manifest(&b.report.snapshot).await?;
        let (mut secs, mut bytes, mut ok) = (0.0, 0, true);
        for (disk, want) in expected {
            let out = dir.join(format!("restored-{label}-{disk}.raw"));
            let r = ferry_engine::restore_disk(
                &repo,
                &manifest,
                disk,
                RestoreTo::File {
                    path: out.clone(),
                    format: OutputFormat::Raw,
                },
                &RestoreOptions::default(),
            )
            .await?;
            secs += r.seconds;
            bytes += r.size;
            ok &= same_content(&out, want)?;
        }
        all_ok &= ok;
        say(format!(
            "{step} restored the {label} restore point ({} disks) in {secs:.2} s ({}): {}",
            expected.len(),
            human_rate(bytes, secs),
            if ok {
                "identical to the disks at snapshot time"
            } else {
                "DIFFERENT from the disks at snapshot time"
            }
        ));
    }
    let manifest = repo.load_manifest(&incr.report.snapshot).await?;
    let t = Instant::now();
    let plan = restore_plan(
        &repo,
        &manifest,
        driver.kind(),
        format!("{VM}-restored"),
        false,
    )
    .await?;
    let restored = driver.restore_vm(&plan).await?;
    let secs = t.elapsed().as_secs_f64();
    let got = save_disks(&sim, &restored.name, dir, "restored-vm").await?;
    let mut vm_ok = got.len() == expected_incr.len();
    for ((_, g), (_, w)) in got.iter().zip(&expected_incr) {
        vm_ok &= same_content(g, w)?;
    }
    all_ok &= vm_ok;
    say(format!(
        "   whole-VM restore into the pool: VM `{}` ({}) with {} disks in {secs:.2} s: {}",
        restored.name,
        restored.id,
        got.len(),
        if vm_ok {
            "disks identical to the VM at snapshot time"
        } else {
            "disks DIFFERENT from the VM at snapshot time"
        }
    ));
    driver.close().await;
    let uploaded =
        full.report.total(|d| d.uploaded_bytes) + incr.report.total(|d| d.uploaded_bytes);
    say(format!(
        "done in {:.1} s: 2 restore points of a {} VM hold {} in the repository; the incremental read {} and uploaded {}",
        t0.elapsed().as_secs_f64(),
        human_bytes(vm.disks.iter().map(|d| d.size).sum()),
        human_bytes(uploaded),
        human_bytes(incr.report.total(|d| d.read_bytes)),
        human_bytes(incr.report.total(|d| d.uploaded_bytes)),
    ));
    if !clean {
        bail!("the backups left objects on the pool");
    }
    if !all_ok {
        bail!("a restored disk differs from the original");
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry demo --hypervisor vmware`: the same job against `ferry sim vmware` (vcsim as a child
/// process, needs the `vcsim` peer): full backup (CBT switched on, VMDKs read off the datastore
/// directory, QueryChangedDiskAreas(`*`) as the allocation map), guest writes, an incremental from
/// QueryChangedDiskAreas, restores compared byte for byte, no snapshot left, and the VM
/// restored to vCenter (CreateVM_Task, disks over nbdkit) with the same disks.
async fn demo_vmware(dir: &Path, size_mib: u64) -> anyhow::Result<ExitCode> {
    use ferry_sim::vmware::{VmwareSim, VmwareSimConfig};
    const VC: &str = "demo-vc";
    let t0 = Instant::now();
    let say = |s: String| println!("{s}");
    let store = Store::open(&dir.join("repo").display().to_string(), true)?;
    let password = Secret::new("ferry demo password");
    let opts = InitOptions {
        kdf: KdfParams::insecure_fast(),
        ..InitOptions::default()
    };
    let repo = Repository::init(store, Some(&password), opts).await?;
    say(format!("1. repository {}", dir.join("repo").display()));
    let mut cfg = VmwareSimConfig::new(dir.join("vcenter"));
    cfg.disk_mib = size_mib;
    let sim = VmwareSim::start(cfg).await.context(
        "cannot start the vSphere simulator (is vcsim installed? tests/peers/install.sh)",
    )?;
    let pw = dir.join("vc.password");
    std::fs::write(&pw, sim.password())?;
    let mut toml = format!(
        "[sources.{VC}]\nkind = \"vmware\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\ntransports = [\"san\"]\nnbdkit-stand-in = \"file\"\nstate-dir = \"{}\"\n[sources.{VC}.san-paths]\n",
        sim.url(),
        sim.username(),
        pw.display(),
        sim.tls_fingerprint(),
        dir.join("state").display()
    );
    for (ds, p) in sim.san_paths() {
        toml.push_str(&format!("\"{ds}\" = \"{}\"\n", p.display()));
    }
    let config_path = dir.join("ferry.toml");
    std::fs::write(&config_path, &toml)?;
    let config = FerryConfig::parse(&toml, &config_path)?;
    let driver = ferry_hv_vmware::VmwareDriver::connect(VC, config.source(VC)?).await?;
    let vms = driver.list_vms().await?;
    let vm = vms
        .iter()
        .find(|v| v.disks.len() == 2)
        .context("the simulator has no 2-disk VM")?
        .clone();
    say(format!(
        "   vCenter simulator (govmomi vcsim behind Ferry's front) at {}, TLS pinned; {} VMs; backing up `{}` ({} disks, {}) straight off datastore LocalDS_0 — source `{VC}` in {}",
        sim.url(),
        vms.len(),
        vm.name,
        vm.disks.len(),
        human_bytes(vm.disks.iter().map(|d| d.size).sum()),
        config_path.display()
    ));
    let sim_disks = sim.disks().await;
    // Disk name (position) → the simulator's (vm moref, device key).
    let keys: Vec<(String, String, i64)> = vm
        .disks
        .iter()
        .filter_map(|d| {
            let key: i64 = d.key.split(':').next()?.parse().ok()?;
            let (m, ..) = sim_disks
                .iter()
                .filter(|s| s.1 == key)
                .find(|s| sim_disks.iter().filter(|o| o.0 == s.0).count() == 2)?;
            Some((d.name.clone(), m.clone(), key))
        })
        .collect();
    let save = |label: &'static str| {
        let keys = keys.clone();
        let sim = &sim;
        async move {
            let mut out = Vec::new();
            for (name, m, k) in keys {
                let p = dir.join(format!("{label}-{}.raw", name.replace(':', "-")));
                std::fs::write(&p, sim.read_disk(&m, k).await.map_err(anyhow::Error::msg)?)?;
                out.push((name, p));
            }
            anyhow::Ok(out)
        }
    };
    let expected_full = save("expected-full").await?;
    let full = backup_vm(&driver, VC, &repo, &vm, &VmBackupOptions::default()).await?;
    say(format!("2. {}", line("full backup", &full)));
    let mib = 1u64 << 20;
    let (m, big) = keys
        .iter()
        .max_by_key(|(n, ..)| n.clone())
        .map(|(_, m, k)| (m.clone(), *k))
        .context("no disks")?;
    let writes: [(u64, Vec<u8>); 2] = [
        (2 * mib, vec![0xa5; 3 * mib as usize]),
        (
            5 * mib + 4000,
            b"guest log line: nightly job done\n".repeat(100),
        ),
    ];
    for (off, data) in &writes {
        sim.guest_write(&m, big, *off, data)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let expected_incr = save("expected-incremental").await?;
    say("3. simulated guest writes into the second disk".into());
    let incr = backup_vm(&driver, VC, &repo, &vm, &VmBackupOptions::default()).await?;
    say(format!("4. {}", line("incremental (CBT)", &incr)));
    let cbt: u64 = incr.disks.iter().filter_map(|d| d.cbt_changed_bytes).sum();
    let fetched: u64 = incr.disks.iter().map(|d| d.source_read_bytes).sum();
    say(format!(
        "   CBT (QueryChangedDiskAreas, paged) reported {} changed; the driver read {} off the datastore",
        human_bytes(cbt),
        human_bytes(fetched)
    ));
    let left = sim.snapshot_count().await;
    say(format!("   snapshots left on vCenter: {left}"));
    let mut all_ok = left == 0;
    for (b, expected, label, step) in [
        (&full, &expected_full, "full", "5."),
        (&incr, &expected_incr, "incremental", "  "),
    ] {
        let ok = restores_match(&repo, &b.report.snapshot, expected, dir, label).await?;
        all_ok &= ok;
        say(format!(
            "{step} restored the {label} restore point ({} disks): {}",
            expected.len(),
            if ok {
                "identical to the disks at snapshot time"
            } else {
                "DIFFERENT from the disks at snapshot time"
            }
        ));
    }
    // Whole-VM restore to vCenter: CreateVM_Task, disks over nbdkit (the file plugin stands in
    // for VDDK here), compared with the VM's disks at the incremental.
    let manifest = repo.load_manifest(&incr.report.snapshot).await?;
    let t = Instant::now();
    let name = format!("{}-restored", vm.name);
    let plan = restore_plan(&repo, &manifest, driver.kind(), name.clone(), false).await?;
    let restored = driver.restore_vm(&plan).await?;
    let secs = t.elapsed().as_secs_f64();
    let prefix = format!("] {name}/");
    let mut created: Vec<(String, i64, String)> = sim
        .disks()
        .await
        .into_iter()
        .filter(|(_, _, _, file)| file.contains(&prefix))
        .map(|(m, k, _, file)| (m, k, file))
        .collect();
    created.sort_by_key(|(_, k, _)| *k);
    let mut vm_ok = created.len() == expected_incr.len();
    for ((m, k, _), (disk, want)) in created.iter().zip(&expected_incr) {
        let p = dir.join(format!("restored-vm-{}.raw", disk.replace(':', "-")));
        std::fs::write(&p, sim.read_disk(m, *k).await.map_err(anyhow::Error::msg)?)?;
        vm_ok &= same_content(&p, want)?;
    }
    all_ok &= vm_ok;
    say(format!(
        "6. whole-VM restore to vCenter: VM `{}` ({}) with {} disks in {secs:.2} s via {}: {}",
        restored.name,
        restored.id,
        created.len(),
        restored.transport,
        if vm_ok {
            "disks identical to the VM at snapshot time"
        } else {
            "disks DIFFERENT from the VM at snapshot time"
        }
    ));
    driver.close().await;
    say(format!("done in {:.1} s", t0.elapsed().as_secs_f64()));
    if !all_ok {
        bail!("a restored disk differs from the original, or a snapshot was left on vCenter");
    }
    Ok(ExitCode::SUCCESS)
}
