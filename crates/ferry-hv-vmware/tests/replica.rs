//! The vSphere replica target (ADR 0165) against `ferry sim vmware`: a standby made from memory
//! disks, powered off and marked; extents written exactly where asked (a zeroed piece without
//! payload); points oldest first, a revert bringing one back; a point of another VM refused
//! before anything changes; gone points and VMs no error.

use ferry_core::vm::{DiskConfig, VmConfig};
use ferry_core::{BlockSource, Extent, ExtentMap, MemSource};
use ferry_hv::{FerryConfig, HypervisorDriver, PowerState, ReplicaRole, RestoreDisk, RestorePlan};
use ferry_hv_vmware::VmwareDriver;
use ferry_sim::vmware::{VmwareSim, VmwareSimConfig};
use std::path::Path;
use std::sync::Arc;

mod common;

const SIZE: usize = 2 << 20;
const NAME: &str = "web (replica)";

fn config(sim: &VmwareSim, dir: &Path) -> FerryConfig {
    common::config(sim, dir, "[\"san\"]", "nbdkit-stand-in = \"file\"")
}

fn mem(data: Vec<u8>) -> Arc<dyn BlockSource> {
    Arc::new(MemSource::new("mem", data, 4096))
}

fn disk(name: &str) -> DiskConfig {
    DiskConfig {
        name: name.into(),
        size: SIZE as u64,
        controller: Some(name.into()),
        bootable: name.ends_with(":0"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_writes_marks_points_and_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = VmwareSimConfig::new(dir.path().join("sim"));
    cfg.vcsim = ferry_testkit::tool("vcsim");
    cfg.disk_mib = 4;
    let sim = VmwareSim::start(cfg).await.unwrap();
    let ferry = config(&sim, dir.path());
    let d = VmwareDriver::connect("vc", ferry.source("vc").unwrap())
        .await
        .unwrap();
    let t = d.replica().expect("vSphere holds replicas");

    // The standby: a restore, left off whatever the plan says, marked with its job.
    let plan = RestorePlan {
        name: NAME.into(),
        config: VmConfig {
            cpus: 1,
            memory: 256 << 20,
            disks: vec![disk("scsi0:0"), disk("scsi0:1")],
            ..Default::default()
        },
        native: None,
        disks: vec![
            RestoreDisk {
                name: "scsi0:0".into(),
                source: mem(vec![1; SIZE]),
            },
            RestoreDisk {
                name: "scsi0:1".into(),
                source: mem(vec![2; SIZE]),
            },
        ],
        power_on: true,
    };
    let vm = t.replica_create(&plan, "job").await.unwrap();
    assert_eq!(vm.power_state, PowerState::Off);
    assert_eq!(
        t.replica_marked("job", ReplicaRole::Standby).await.unwrap(),
        vec![vm.clone()]
    );
    assert!(
        t.replica_marked("job", ReplicaRole::Test)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        t.replica_marked("other", ReplicaRole::Standby)
            .await
            .unwrap()
            .is_empty()
    );
    let mut live: Vec<(String, i64)> = sim
        .disks()
        .await
        .into_iter()
        .filter(|(_, _, _, f)| f.contains(NAME))
        .map(|(v, k, _, _)| (v, k))
        .collect();
    live.sort_by_key(|(_, k)| *k);
    assert_eq!(live.len(), 2);
    let read = |i: usize| {
        let (v, k) = live[i].clone();
        let sim = &sim;
        async move { sim.read_disk(&v, k).await.unwrap() }
    };
    assert_eq!(read(1).await, vec![2; SIZE]);

    // Only the extents asked for are written; a zeroed piece carries no payload.
    let mut data = vec![2u8; SIZE];
    data[128 << 10..192 << 10].fill(9);
    data[1 << 20..(1 << 20) + (64 << 10)].fill(0);
    let changed = ExtentMap::from_extents([
        Extent::new(128 << 10, 64 << 10),
        Extent::new(1 << 20, 64 << 10),
    ]);
    let mut src = data.clone();
    src[0] = 0x77; // outside the extents: never written
    let sent = t
        .replica_write(&vm.id, 1, mem(src).as_ref(), &changed)
        .await
        .unwrap();
    assert_eq!(sent, 64 << 10);
    assert_eq!(read(1).await, data);
    assert_eq!(read(0).await, vec![1; SIZE]);
    let e = t
        .replica_write(&vm.id, 2, mem(vec![0; SIZE]).as_ref(), &changed)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("the VM has 2 disks"), "{e}");

    // Points oldest first; a revert brings one back.
    let a = t.point_create(&vm.id, "a").await.unwrap();
    let b = t.point_create(&vm.id, "b").await.unwrap();
    assert_eq!(t.points(&vm.id).await.unwrap(), vec![a.clone(), b.clone()]);
    let one = ExtentMap::from_extents([Extent::new(0, 64 << 10)]);
    t.replica_write(&vm.id, 1, mem(vec![7; SIZE]).as_ref(), &one)
        .await
        .unwrap();
    assert_ne!(read(1).await, data);
    t.point_revert(&vm.id, &a.id).await.unwrap();
    assert_eq!(read(1).await, data);

    // A point of another VM is refused before anything changes (that VM keeps running).
    let other = d
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.name != NAME && v.power_state == PowerState::Running)
        .expect("a running VM");
    let e = t
        .point_revert(&other.id, &a.id)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a snapshot of this VM"), "{e}");
    let still = t.replica_vm(&other.id).await.unwrap().unwrap();
    assert_eq!(still.power_state, PowerState::Running);

    // Power on, clean shutdown; the mark moves.
    t.power(&vm.id, true).await.unwrap();
    assert_eq!(
        t.replica_vm(&vm.id).await.unwrap().unwrap().power_state,
        PowerState::Running
    );
    t.power(&vm.id, false).await.unwrap();
    t.power(&vm.id, false).await.unwrap();
    assert_eq!(
        t.replica_vm(&vm.id).await.unwrap().unwrap().power_state,
        PowerState::Off
    );
    t.replica_mark(&vm.id, None).await.unwrap();
    assert!(
        t.replica_marked("job", ReplicaRole::Standby)
            .await
            .unwrap()
            .is_empty()
    );
    t.replica_mark(&vm.id, Some("job2")).await.unwrap();
    assert_eq!(
        t.replica_marked("job2", ReplicaRole::Standby)
            .await
            .unwrap()
            .len(),
        1
    );

    // Gone is no error: points deleted twice, the VM removed twice.
    for p in [&b, &b, &a] {
        t.point_delete(&p.id).await.unwrap();
    }
    assert!(t.points(&vm.id).await.unwrap().is_empty());
    assert_eq!(sim.snapshot_count().await, 0);
    t.replica_remove(&vm.id).await.unwrap();
    t.replica_remove(&vm.id).await.unwrap();
    assert!(t.replica_vm(&vm.id).await.unwrap().is_none());
    assert!(t.replica_vm("no-such-vm").await.unwrap().is_none());
    d.close().await;
}
