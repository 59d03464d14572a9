//! `ferry demo --hypervisor hyperv`: the main job against the in-tree Hyper-V simulator (WinRM,
//! WMI `root/virtualization/v2`, VHDX disks, RCT) in this process. Two VMs show the two methods:
//! `win-sql-01` qualifies for the child-VM (VSS) method, `linux-web-01` has no backup integration
//! service and is backed up by saved state. Each gets a full backup (recovery checkpoint, the
//! `.avhdx` chain read off the host's volume with `ferry-image`, checkpoint turned into a
//! reference point), guest writes, an RCT incremental (`GetVirtualDiskChanges`), and restores of
//! both points compared byte for byte with the disks at checkpoint time; no checkpoint is left.

use crate::cmd::demo::{line, restores_match};
use crate::cmd::hvbackup::{VmBackupOptions, backup_vm, find_vm};
use anyhow::bail;
use ferry_core::Secret;
use ferry_core::size::human_bytes;
use ferry_hv::{FerryConfig, HypervisorDriver};
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use ferry_sim::hyperv::{HypervSim, HypervSimConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const SOURCE: &str = "demo-hv";

/// Copies of what the guest of `vm` sees on each disk now.
fn save(
    sim: &HypervSim,
    vm: &str,
    disks: &[String],
    dir: &Path,
    label: &str,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for d in disks {
        let p = dir.join(format!("{label}-{vm}-{d}.raw"));
        std::fs::copy(sim.live_disk(vm, d).map_err(anyhow::Error::msg)?, &p)?;
        out.push((d.clone(), p));
    }
    Ok(out)
}

/// Runs the demo in `dir` with disks of `size_mib`.
pub async fn demo(dir: &Path, size_mib: u64) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let say = |s: String| println!("{s}");
    let store = Store::open(&dir.join("repo").display().to_string(), true)?;
    let opts = InitOptions {
        kdf: KdfParams::insecure_fast(),
        ..InitOptions::default()
    };
    let repo = Repository::init(store, Some(&Secret::new("ferry demo password")), opts).await?;
    say(format!("1. repository {}", dir.join("repo").display()));
    let mut cfg = HypervSimConfig::new(dir.join("hyperv-host"));
    cfg.disk_mib = size_mib;
    let sim = HypervSim::start(cfg).await?;
    let pw = dir.join("hv.password");
    std::fs::write(&pw, sim.password())?;
    let toml = format!(
        "[sources.{SOURCE}]\nkind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nproxy = \"none\"\ntransports = [\"san\"]\nstate-dir = \"{}\"\n[sources.{SOURCE}.san-paths]\n'C:\\' = \"{}\"\n",
        sim.url(),
        sim.username(),
        pw.display(),
        sim.tls_fingerprint(),
        dir.join("state").display(),
        sim.volume_dir('C').display(),
    );
    let config_path = dir.join("ferry.toml");
    std::fs::write(&config_path, &toml)?;
    let config = FerryConfig::parse(&toml, &config_path)?;
    let driver = ferry_hv_hyperv::HypervDriver::connect(SOURCE, config.source(SOURCE)?).await?;
    let vms = driver.list_vms().await?;
    say(format!(
        "   Hyper-V simulator (WinRM over HTTPS, TLS pinned) at {}; {} VMs: {}; checkpoints read off C:\\ through san-paths — source `{SOURCE}` in {}",
        sim.url(),
        vms.len(),
        vms.iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        config_path.display()
    ));
    let mut all_ok = true;
    for (step, name) in [(2, "win-sql-01"), (3, "linux-web-01")] {
        let vm = find_vm(&vms, name)?.clone();
        let disks: Vec<String> = vm.disks.iter().map(|d| d.name.clone()).collect();
        let expected_full = save(&sim, name, &disks, dir, "expected-full")?;
        let full = backup_vm(&driver, SOURCE, &repo, &vm, &VmBackupOptions::default()).await?;
        let m = full
            .method
            .clone()
            .unwrap_or_else(|| ferry_hv::BackupMethod {
                name: "?".into(),
                reason: "?".into(),
            });
        say(format!(
            "{step}. `{name}` ({} disks, {}): method {} — {}",
            disks.len(),
            human_bytes(vm.disks.iter().map(|d| d.size).sum()),
            m.name,
            m.reason
        ));
        say(format!("   {}", line("full backup", &full)));
        let mib = 1u64 << 20;
        for (off, data) in [
            (mib, vec![0xa5u8; mib as usize / 2]),
            (
                3 * mib + 4096,
                b"guest log line: nightly job done\n".repeat(124),
            ),
        ] {
            let mut data = data;
            data.truncate(data.len() / 512 * 512);
            sim.guest_write(name, &disks[0], off, &data)
                .map_err(anyhow::Error::msg)?;
        }
        let expected_incr = save(&sim, name, &disks, dir, "expected-incremental")?;
        let incr = backup_vm(&driver, SOURCE, &repo, &vm, &VmBackupOptions::default()).await?;
        say(format!("   {}", line("incremental (RCT)", &incr)));
        let rct: u64 = incr.disks.iter().filter_map(|d| d.cbt_changed_bytes).sum();
        say(format!(
            "   RCT (GetVirtualDiskChanges) reported {} changed since the previous reference point",
            human_bytes(rct)
        ));
        for (b, expected, label) in [
            (&full, &expected_full, "full"),
            (&incr, &expected_incr, "incremental"),
        ] {
            let tag = format!("{label}-{name}");
            let ok = restores_match(&repo, &b.report.snapshot, expected, dir, &tag).await?;
            all_ok &= ok;
            say(format!(
                "   restored the {label} restore point: {}",
                if ok {
                    "identical to the disks at checkpoint time"
                } else {
                    "DIFFERENT from the disks at checkpoint time"
                }
            ));
        }
    }
    let checkpoints = sim.count("Msvm_VirtualSystemSettingData", |i| {
        i.text("VirtualSystemType")
            .is_some_and(|t| t.contains(":Snapshot:"))
    });
    let refs = sim.count("Msvm_VirtualSystemReferencePoint", |_| true);
    say(format!(
        "   left on the host: {checkpoints} checkpoint(s), {refs} reference point(s) (one per VM: the next incremental's anchor)"
    ));
    say(format!("done in {:.1} s", t0.elapsed().as_secs_f64()));
    if checkpoints != 0 || refs != 2 {
        bail!("the backups left checkpoints on the host");
    }
    if !all_ok {
        bail!("a restored disk differs from the original");
    }
    Ok(ExitCode::SUCCESS)
}
