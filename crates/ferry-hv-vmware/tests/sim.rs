//! The driver against `ferry sim vmware` (vcsim behind the simulator's front): full and CBT
//! incremental backups in san and network mode read exactly the snapshot's bytes, CBT resets fall
//! back to full reads with a reason, no transport → an error naming every refusal, and leftover
//! snapshots are removed.

use ferry_core::BlockSource;
use ferry_hv::{
    BackupOptions, ChangeTokens, Changed, FerryConfig, HypervisorDriver, Outcome, TransportMode,
};
use ferry_hv_vmware::VmwareDriver;
use ferry_sim::vmware::{BLOCK, VmwareSim, VmwareSimConfig};
use std::path::Path;

mod common;

async fn sim(dir: &Path) -> VmwareSim {
    let mut cfg = VmwareSimConfig::new(dir.join("sim"));
    cfg.vcsim = ferry_testkit::tool("vcsim");
    cfg.disk_mib = 8;
    cfg.cbt_page = 2 << 20;
    VmwareSim::start(cfg).await.unwrap()
}

fn config(sim: &VmwareSim, dir: &Path, transports: &str, extra: &str) -> FerryConfig {
    common::config(sim, dir, transports, extra)
}

async fn read_all(src: &dyn BlockSource) -> Vec<u8> {
    let mut b = vec![0u8; src.size() as usize];
    src.read_at(0, &mut b).await.unwrap();
    b
}

/// The VM with two disks (the simulator adds a second disk to the first VM).
async fn two_disk_vm(d: &VmwareDriver) -> ferry_hv::VmSummary {
    d.list_vms()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.disks.len() == 2)
        .expect("a VM with two disks")
}

async fn backup_cycle(transports: &str, extra: &str, want: TransportMode) {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path()).await;
    let cfg = config(&sim, dir.path(), transports, extra);
    let d = VmwareDriver::connect("vc", cfg.source("vc").unwrap())
        .await
        .unwrap();
    let vm = two_disk_vm(&d).await;
    let vmid = vm.id.clone();

    // Full: CBT was off → switched on, every disk full with that reason.
    let s = d
        .begin_backup(&vmid, &BackupOptions::default(), None)
        .await
        .unwrap();
    assert_eq!(s.disks().len(), 2);
    for disk in s.disks() {
        assert_eq!(disk.transport, want);
        let Changed::Full { reason } = &disk.changed else {
            panic!("{:?}", disk.changed)
        };
        assert!(
            reason.contains("changed block tracking was off"),
            "{reason}"
        );
        assert!(!disk.token.0.is_empty(), "a changeId for next time");
        // The snapshot's bytes are the guest's bytes at snapshot time.
        let (vmref, key) = sim_disk(&sim, &disk.key).await;
        assert_eq!(
            read_all(disk.source.as_ref()).await,
            sim.read_disk(&vmref, key).await.unwrap()
        );
        // `*` bounds what is read: seeded blocks only.
        let alloc = disk.source.allocated(0..disk.source.size()).await.unwrap();
        assert!(alloc.total_len() <= 4 * BLOCK, "{alloc:?}");
    }
    let snapshot_vm = vm.name.clone();
    let tokens = s.finish(Outcome::Committed).await.unwrap();
    assert_eq!(tokens.0.len(), 2);
    assert_eq!(
        snapshots(&d, &snapshot_vm).await,
        0,
        "the snapshot is removed"
    );

    // The guest writes; the incremental sees exactly those blocks.
    let big = vm.disks.iter().max_by_key(|x| x.size).unwrap().key.clone();
    let (vmref, key) = sim_disk(&sim, &big).await;
    sim.guest_write(&vmref, key, 5 * BLOCK + 1, b"incremental")
        .await
        .unwrap();
    sim.guest_write(&vmref, key, 100 * BLOCK - 2, b"xyzw")
        .await
        .unwrap();
    let s = d
        .begin_backup(&vmid, &BackupOptions::default(), Some(&tokens))
        .await
        .unwrap();
    for disk in s.disks() {
        let Changed::Since(m) = &disk.changed else {
            panic!("{:?}", disk.changed)
        };
        if disk.key == big {
            let got: Vec<(u64, u64)> = m.iter().map(|e| (e.offset, e.length)).collect();
            assert_eq!(got, vec![(5 * BLOCK, BLOCK), (99 * BLOCK, 2 * BLOCK)]);
            let (vr, k) = sim_disk(&sim, &disk.key).await;
            assert_eq!(
                read_all(disk.source.as_ref()).await,
                sim.read_disk(&vr, k).await.unwrap()
            );
        } else {
            assert!(m.is_empty(), "{m:?}");
        }
        assert_ne!(
            Some(&disk.token),
            tokens.0.get(&disk.key),
            "the changeId advanced"
        );
    }
    let tokens2 = s.finish(Outcome::Aborted).await.unwrap();
    assert_eq!(snapshots(&d, &snapshot_vm).await, 0);

    // CBT reset (storage vMotion): the old changeId is refused → full, with the reason.
    sim.reset_cbt(&vmref, key).await.unwrap();
    let s = d
        .begin_backup(&vmid, &BackupOptions::default(), Some(&tokens2))
        .await
        .unwrap();
    let disk = s.disks().iter().find(|x| x.key == big).unwrap();
    let Changed::Full { reason } = &disk.changed else {
        panic!("{:?}", disk.changed)
    };
    assert!(
        reason.contains("refused the previous changeId") && reason.contains("FileFault"),
        "{reason}"
    );
    // A killed backup: the session is never finished; the next run removes its snapshot.
    std::mem::forget(s);
    assert_eq!(snapshots(&d, &snapshot_vm).await, 1);
    let report = d.recover().await.unwrap();
    assert_eq!(report.snapshots, 1);
    assert_eq!(snapshots(&d, &snapshot_vm).await, 0);
    let _: ChangeTokens = tokens2;
}

async fn snapshots(d: &VmwareDriver, vm: &str) -> usize {
    let objs = d
        .client()
        .retrieve_all("VirtualMachine", ferry_hv_vmware::model::VM_PATHS, 100)
        .await
        .unwrap();
    objs.iter()
        .filter_map(ferry_hv_vmware::model::Vm::from_object)
        .find(|v| v.name == vm)
        .map(|v| v.snapshots.len())
        .unwrap_or(0)
}

/// (vm moref, device key) of a disk key `KEY[:uuid]` of the two-disk VM, from the simulator.
async fn sim_disk(sim: &VmwareSim, disk_key: &str) -> (String, i64) {
    let key: i64 = disk_key.split(':').next().unwrap().parse().unwrap();
    let disks = sim.disks().await;
    let vm = disks
        .iter()
        .find(|d| disks.iter().filter(|e| e.0 == d.0).count() == 2)
        .map(|d| d.0.clone())
        .unwrap();
    assert!(disks.iter().any(|d| d.0 == vm && d.1 == key), "{disks:?}");
    (vm, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_mode_full_incremental_reset_and_recovery() {
    backup_cycle("[\"san\", \"network\"]", "", TransportMode::San).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_mode_through_nbdkit() {
    backup_cycle(
        "[\"network\"]",
        "nbdkit-stand-in = \"file\"",
        TransportMode::Network,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_vddk_and_no_san_path_name_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path()).await;
    let mut cfg = config(&sim, dir.path(), "[\"network\", \"hotadd\", \"san\"]", "");
    cfg.sources.get_mut("vc").unwrap().san_paths.clear();
    let d = VmwareDriver::connect("vc", cfg.source("vc").unwrap())
        .await
        .unwrap();
    let vm = two_disk_vm(&d).await;
    // vCenter busy with another task on the VM: a typed, retryable fault naming the call.
    sim.fail_next("CreateSnapshot_Task", "TaskInProgress", 1)
        .await;
    let e = d
        .begin_backup(&vm.id, &BackupOptions::default(), None)
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("CreateSnapshot_Task") && e.contains("TaskInProgress"),
        "{e}"
    );
    let e = d
        .begin_backup(&vm.id, &BackupOptions::default(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no usable transport"), "{e}");
    assert!(e.contains("vddk-libdir") && e.contains("VDDK"), "{e}");
    assert!(e.contains("hot-add"), "{e}");
    assert!(e.contains("no san-paths entry for datastore"), "{e}");
    // The failed begin removed its snapshot.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(snapshots(&d, &vm.name).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_disks_are_named_and_skipped_the_others_backed_up() {
    use ferry_hv_vmware::xml::Body;
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path()).await;
    let cfg = config(&sim, dir.path(), "[\"san\"]", "");
    let d = VmwareDriver::connect("vc", cfg.source("vc").unwrap())
        .await
        .unwrap();
    let summary = two_disk_vm(&d).await;
    let objs = d
        .client()
        .retrieve_all("VirtualMachine", ferry_hv_vmware::model::VM_PATHS, 100)
        .await
        .unwrap();
    let vm = objs
        .iter()
        .filter_map(ferry_hv_vmware::model::Vm::from_object)
        .find(|v| v.name == summary.name)
        .unwrap();
    let ctl = vm
        .devices
        .as_ref()
        .unwrap()
        .children
        .iter()
        .find(|c| c.type_name().contains("SCSIController"))
        .and_then(|c| c.text_at("key"))
        .unwrap()
        .to_string();
    // An administrator adds an independent disk (excluded from snapshots by definition).
    let disk = Body::new()
        .text("key", "-1")
        .nested(
            "backing",
            Some("VirtualDiskFlatVer2BackingInfo"),
            Body::new()
                .text("fileName", "")
                .text("diskMode", "independent_persistent"),
        )
        .text("controllerKey", &ctl)
        .text("unitNumber", "2")
        .text("capacityInKB", "1024");
    let change = Body::new()
        .text("operation", "add")
        .text("fileOperation", "create")
        .nested("device", Some("VirtualDisk"), disk);
    d.client()
        .run_task(
            "ReconfigVM_Task",
            Body::new().moref("_this", &vm.moref).nested(
                "spec",
                None,
                Body::new().nested("deviceChange", None, change),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        d.list_vms()
            .await
            .unwrap()
            .iter()
            .find(|v| v.name == summary.name)
            .unwrap()
            .disks
            .len(),
        3
    );
    let s = d
        .begin_backup(&summary.id, &BackupOptions::default(), None)
        .await
        .unwrap();
    let names: Vec<&str> = s.disks().iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!names.contains(&"scsi0:2"), "{names:?}");
    assert_eq!(
        s.config().disks.len(),
        2,
        "the config lists the disks backed up"
    );
    s.finish(Outcome::Aborted).await.unwrap();
}
