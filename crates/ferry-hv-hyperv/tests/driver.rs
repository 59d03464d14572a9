//! The Hyper-V driver against `ferry sim hyperv` in-process: the method per guest with its
//! reason, a full then an RCT incremental whose data matches the guest's disk, RCT that broke,
//! a failed checkpoint conversion, and checkpoints that never leak.

use ferry_core::BlockSource;
use ferry_hv::{
    BackupOptions, ChangeTokens, Changed, ConsistencyLevel, HypervisorDriver, Outcome, SourceConfig,
};
use ferry_hv_hyperv::HypervDriver;
use ferry_hv_hyperv::driver::{CHILD_VM, SAVED_STATE};
use ferry_hv_hyperv::wmi::Wmi;
use ferry_sim::hyperv::{HypervSim, HypervSimConfig};

struct Lab {
    dir: tempfile::TempDir,
    sim: HypervSim,
    driver: HypervDriver,
}

async fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HypervSimConfig::new(dir.path().join("host"));
    cfg.disk_mib = 4;
    let sim = HypervSim::start(cfg).await.unwrap();
    let toml = format!(
        "kind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\ntransports = [\"san\"]\n[san-paths]\n'C:\\' = \"{}\"\n",
        sim.url(),
        sim.username(),
        sim.password(),
        sim.tls_fingerprint(),
        dir.path().join("state").display(),
        sim.volume_dir('C').display(),
    );
    let src: SourceConfig = toml::from_str(&toml).unwrap();
    let driver = HypervDriver::connect("lab", &src).await.unwrap();
    Lab { dir, sim, driver }
}

impl Lab {
    async fn recovery_checkpoints(&self) -> usize {
        Wmi::new(self.driver.client())
            .recovery_checkpoints()
            .await
            .unwrap()
            .len()
    }

    async fn reference_points(&self) -> usize {
        self.driver
            .client()
            .enumerate("Msvm_VirtualSystemReferencePoint", None)
            .await
            .unwrap()
            .len()
    }

    fn live(&self, vm: &str, disk: &str) -> Vec<u8> {
        std::fs::read(self.sim.live_disk(vm, disk).unwrap()).unwrap()
    }
}

async fn read_all(s: &dyn BlockSource) -> Vec<u8> {
    let mut buf = vec![0u8; s.size() as usize];
    s.read_at(0, &mut buf).await.unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_method_follows_each_guests_qualification() {
    let lab = lab().await;
    let want = [
        ("win-sql-01", CHILD_VM, "integration service"),
        ("win-file-01", SAVED_STATE, "the VM is off"),
        (
            "linux-web-01",
            SAVED_STATE,
            "integration service is disabled",
        ),
        ("win-dyn-01", SAVED_STATE, "dynamic disks"),
        ("win-split-01", SAVED_STATE, "on another volume"),
    ];
    for (vm, method, why) in want {
        let s = lab
            .driver
            .begin_backup(vm, &BackupOptions::default(), None)
            .await
            .unwrap();
        let m = s.method().unwrap().clone();
        assert_eq!(m.name, method, "{vm}: {m:?}");
        assert!(m.reason.contains(why), "{vm}: {m:?}");
        let level = if method == CHILD_VM {
            ConsistencyLevel::Application
        } else {
            ConsistencyLevel::SavedState
        };
        assert_eq!(s.consistency(), level, "{vm}");
        assert!(matches!(s.disks()[0].changed, Changed::Full { .. }));
        assert_eq!(lab.recovery_checkpoints().await, 1, "{vm}");
        check_config(vm, s.config(), &s.native().record);
        s.finish(Outcome::Aborted).await.unwrap();
        assert_eq!(lab.recovery_checkpoints().await, 0, "{vm}");
    }
    assert_eq!(lab.reference_points().await, 0);
    // Saved-state guests were resumed: every running guest runs again.
    for vm in lab.driver.list_vms().await.unwrap() {
        let off = vm.name == "win-file-01";
        assert_eq!(
            vm.power_state,
            if off {
                ferry_hv::PowerState::Off
            } else {
                ferry_hv::PowerState::Running
            },
            "{}",
            vm.name
        );
        assert_eq!(vm.disks[0].size, 4 << 20);
    }
}

/// The captured configuration of the seeded guests: hardware, switch, VLAN, MAC.
fn check_config(vm: &str, c: &ferry_hv::VmConfig, native: &str) {
    use ferry_core::vm::Firmware;
    let n: serde_json::Value = serde_json::from_str(native).unwrap();
    let nic = &c.nics[0];
    assert_eq!(c.nics.len(), 1, "{vm}");
    assert!(
        nic.mac
            .as_deref()
            .is_some_and(|m| m.starts_with("00:15:5d:01:")),
        "{vm}: {nic:?}"
    );
    assert_eq!(n["nics"][0]["mac"], nic.mac.as_deref().unwrap());
    // Generation 1 boots from IDE 0:0, generation 2 from SCSI (ADR 0166).
    let boot = if vm == "linux-web-01" {
        "ide0:0"
    } else {
        "scsi0:0"
    };
    assert_eq!(c.disks[0].controller.as_deref(), Some(boot), "{vm}");
    if vm == "linux-web-01" {
        assert_eq!(c.firmware, Firmware::Bios);
        assert_eq!(nic.network.as_deref(), Some("vSwitch-DMZ"));
        assert!(n["nics"][0]["vlan"].is_null(), "{n}");
        assert_eq!(n["generation"], 1);
    } else {
        assert_eq!(c.firmware, Firmware::UefiSecureBoot, "{vm}");
        assert_eq!(nic.network.as_deref(), Some("vSwitch-Prod"), "{vm}");
        if vm == "win-file-01" {
            // A trunk port with a bandwidth limit (ADR 0181).
            assert!(n["nics"][0]["vlan"].is_null(), "{n}");
            assert_eq!(n["nics"][0]["port"]["vlan"]["mode"], "trunk", "{n}");
            assert_eq!(
                n["nics"][0]["port"]["vlan"]["allowed"],
                serde_json::json!([10, 20, 30])
            );
            assert_eq!(n["nics"][0]["port"]["bandwidth"]["limit"], 100_000_000u64);
        } else if vm == "win-dyn-01" {
            let v = &n["nics"][0]["port"]["vlan"];
            assert_eq!(
                (&v["mode"], &v["pvlan_mode"], &v["primary"], &v["secondary"]),
                (&"private".into(), &2.into(), &100.into(), &101.into()),
                "{n}"
            );
        } else {
            assert_eq!(n["nics"][0]["vlan"], 10, "{n}");
            assert_eq!(n["nics"][0]["port"]["vlan"]["access"], 10, "{n}");
        }
        assert_eq!(n["generation"], 2);
    }
    if vm == "win-sql-01" {
        assert_eq!((c.cpus, c.memory), (2, 4096 << 20));
        assert_eq!(n["memory"]["dynamic"], false);
        assert_eq!(c.disks[1].controller.as_deref(), Some("scsi0:1"));
    } else {
        assert_eq!(c.memory, 2048 << 20, "{vm}");
        assert_eq!(n["memory"]["dynamic"], true, "{vm}");
        assert_eq!(n["memory"]["maximum_mib"], 8192, "{vm}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_rct_incremental_match_the_guest_and_rct_breaks_into_a_full() {
    let lab = lab().await;
    let vm = "win-sql-01";
    let before = lab.live(vm, "disk1");
    let s = lab
        .driver
        .begin_backup(vm, &BackupOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(s.disks().len(), 2);
    // The guest writes during the backup: the checkpoint does not see it.
    lab.sim
        .guest_write(vm, "disk1", 512 * 1024, &[0xAB; 4096])
        .unwrap();
    let d1 = &s.disks()[1];
    assert_eq!(d1.name, "disk1");
    assert_eq!(read_all(d1.source.as_ref()).await, before);
    let tokens = s.finish(Outcome::Committed).await.unwrap();
    assert_eq!(tokens.0.len(), 2);
    assert_eq!(lab.recovery_checkpoints().await, 0);
    assert_eq!(lab.reference_points().await, 1);

    lab.sim
        .guest_write(vm, "disk1", 3 << 20, &[0xCD; 1024])
        .unwrap();
    let now = lab.live(vm, "disk1");
    let s = lab
        .driver
        .begin_backup(vm, &BackupOptions::default(), Some(&tokens))
        .await
        .unwrap();
    let d1 = &s.disks()[1];
    let Changed::Since(ext) = &d1.changed else {
        panic!("incremental expected: {:?}", d1.changed)
    };
    let got: Vec<(u64, u64)> = ext.iter().map(|e| (e.offset, e.length)).collect();
    // RCT tracks 64 KiB blocks: the write during the first backup and the one after it.
    assert_eq!(got, [(512 << 10, 64 << 10), (3 << 20, 64 << 10)]);
    assert_eq!(read_all(d1.source.as_ref()).await, now);
    let Changed::Since(e0) = &s.disks()[0].changed else {
        panic!("disk0 incremental expected")
    };
    assert_eq!(e0.total_len(), 0);
    let tokens2 = s.finish(Outcome::Committed).await.unwrap();
    assert_eq!(
        lab.reference_points().await,
        1,
        "the previous reference point goes"
    );

    // RCT breaks: that disk is read in full, with the reason; the other stays incremental.
    lab.sim.break_rct(vm, "disk1").unwrap();
    let s = lab
        .driver
        .begin_backup(vm, &BackupOptions::default(), Some(&tokens2))
        .await
        .unwrap();
    match &s.disks()[1].changed {
        Changed::Full { reason } => assert!(reason.contains("reset"), "{reason}"),
        other => panic!("full expected: {other:?}"),
    }
    assert!(matches!(s.disks()[0].changed, Changed::Since(_)));
    s.finish(Outcome::Aborted).await.unwrap();
    assert_eq!(lab.recovery_checkpoints().await, 0);

    // Tokens naming a reference point that is gone: full, and says so.
    let gone = ChangeTokens(
        tokens2
            .0
            .keys()
            .map(|k| (k.clone(), ferry_hv::ChangeToken("Microsoft:nope".into())))
            .collect(),
    );
    let s = lab
        .driver
        .begin_backup(vm, &BackupOptions::default(), Some(&gone))
        .await
        .unwrap();
    match &s.disks()[0].changed {
        Changed::Full { reason } => assert!(reason.contains("is gone"), "{reason}"),
        other => panic!("full expected: {other:?}"),
    }
    s.finish(Outcome::Aborted).await.unwrap();
    drop(lab.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_leave_no_checkpoint_and_cleanup_removes_only_ferrys() {
    let lab = lab().await;
    // A checkpoint of the administrator's: never touched.
    let own = Wmi::new(lab.driver.client())
        .create_recovery_checkpoint(
            &lab.driver.list_vms().await.unwrap()[0].id,
            "2",
            "Before patching",
        )
        .await
        .unwrap();
    // The conversion fails: the commit reports it, the checkpoint stays for the cleanup.
    lab.sim.fail_next(
        "Msvm_VirtualSystemSnapshotService.ConvertToReferencePoint",
        1,
    );
    let s = lab
        .driver
        .begin_backup("linux-web-01", &BackupOptions::default(), None)
        .await
        .unwrap();
    let e = s.finish(Outcome::Committed).await.unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    assert_eq!(lab.recovery_checkpoints().await, 2);
    let r = lab.driver.recover().await.unwrap();
    assert_eq!(r.snapshots, 1);
    let left = Wmi::new(lab.driver.client())
        .recovery_checkpoints()
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].text("InstanceID"),
        own.selector("InstanceID"),
        "only Ferry's checkpoint goes"
    );
    // CreateSnapshot fails for a saved-state guest: the VM is resumed, nothing is left.
    lab.sim
        .fail_next("Msvm_VirtualSystemSnapshotService.CreateSnapshot", 1);
    let e = lab
        .driver
        .begin_backup("linux-web-01", &BackupOptions::default(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    assert_eq!(lab.recovery_checkpoints().await, 1);
    let vms = lab.driver.list_vms().await.unwrap();
    let l = vms.iter().find(|v| v.name == "linux-web-01").unwrap();
    assert_eq!(l.power_state, ferry_hv::PowerState::Running);
    // Saving the VM fails: the backup fails before any checkpoint, the VM runs on.
    lab.sim
        .fail_next("Msvm_ComputerSystem.RequestStateChange", 1);
    let e = lab
        .driver
        .begin_backup("linux-web-01", &BackupOptions::default(), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("injected"), "{e}");
    assert_eq!(
        lab.recovery_checkpoints().await,
        1,
        "the administrator's only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_resumes_a_vm_a_killed_backup_left_saved() {
    let lab = lab().await;
    let vms = lab.driver.list_vms().await.unwrap();
    let l = vms.iter().find(|v| v.name == "linux-web-01").unwrap();
    // What a backup killed between the save and the resume leaves: a saved VM, journaled.
    Wmi::new(lab.driver.client())
        .request_state(&l.id, "32769")
        .await
        .unwrap();
    ferry_hv::journal::Journal::new(&lab.dir.path().join("state"), "lab")
        .add("saved-vm", &l.id)
        .unwrap();
    let state = |vms: Vec<ferry_hv::VmSummary>| {
        vms.into_iter()
            .find(|v| v.name == "linux-web-01")
            .unwrap()
            .power_state
    };
    assert_eq!(
        state(lab.driver.list_vms().await.unwrap()),
        ferry_hv::PowerState::Suspended
    );
    let e = lab
        .sim
        .guest_write("linux-web-01", "disk0", 0, &[1; 512])
        .unwrap_err();
    assert!(e.contains("not running"), "{e}");
    lab.driver.recover().await.unwrap();
    assert_eq!(
        state(lab.driver.list_vms().await.unwrap()),
        ferry_hv::PowerState::Running
    );
    // Running again, the guest writes again.
    lab.sim
        .guest_write("linux-web-01", "disk0", 0, &[1; 512])
        .unwrap();
}
