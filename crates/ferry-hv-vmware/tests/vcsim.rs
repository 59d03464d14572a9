//! The vim25 client against govmomi's vcsim, unmodified: login and faults, paged inventory,
//! snapshots and tasks, CBT reconfiguration.

use ferry_core::Secret;
use ferry_hv_vmware::model::{VM_PATHS, Vm};
use ferry_hv_vmware::{FaultKind, MoRef, VimClient, VimError};
use ferry_testkit::Vcsim;

fn opts(sim: &Vcsim) -> ferry_http::ClientOptions {
    let fp = ferry_tls::parse_fingerprint(sim.tls_fingerprint()).expect("vcsim fingerprint");
    let mut o = ferry_http::ClientOptions::new("lab-vc", ferry_tls::Trust::Fingerprint(fp));
    o.proxy = ferry_http::ProxySetting::Off;
    o
}

async fn login(sim: &Vcsim) -> VimClient {
    VimClient::connect(
        sim.url(),
        &opts(sim),
        sim.username(),
        &Secret::new(sim.password()),
    )
    .await
    .expect("login")
}

#[tokio::test]
async fn login_pinning_and_login_faults() {
    let sim = Vcsim::start();
    let c = login(&sim).await;
    assert_eq!(c.content().api_type, "VirtualCenter");
    assert!(!c.content().root_folder.value.is_empty());
    c.logout().await;
    // After logout the session is gone: calls fail as NotAuthenticated.
    let e = c
        .retrieve_all("VirtualMachine", &["name"], 10)
        .await
        .unwrap_err();
    assert_eq!(e.fault(), Some(&FaultKind::NotAuthenticated), "{e}");

    let e = VimClient::connect(sim.url(), &opts(&sim), "user", &Secret::new("wrong"))
        .await
        .unwrap_err();
    assert_eq!(e.fault(), Some(&FaultKind::InvalidLogin), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("lab-vc") && msg.contains("Login") && !msg.contains("wrong"),
        "{msg}"
    );

    let mut o = opts(&sim);
    o.trust = ferry_tls::Trust::Fingerprint([7u8; 32]);
    let e = VimClient::connect(sim.url(), &o, "user", &Secret::new("pass"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, VimError::Http(ferry_http::HttpError::Tls { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("does not match"), "{e}");
}

#[tokio::test]
async fn inventory_is_paged_through_a_container_view() {
    // 3 VMs in each of the cluster's and the standalone host's resource pools.
    let sim = Vcsim::start_with(&["-vm", "3"]);
    let c = login(&sim).await;
    let one_by_one = c.retrieve_all("VirtualMachine", VM_PATHS, 1).await.unwrap();
    let at_once = c
        .retrieve_all("VirtualMachine", VM_PATHS, 1000)
        .await
        .unwrap();
    assert_eq!(one_by_one.len(), 6, "{one_by_one:?}");
    assert_eq!(at_once.len(), 6);
    let vms: Vec<Vm> = at_once.iter().filter_map(Vm::from_object).collect();
    let mut names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 6, "{names:?}");
    for vm in &vms {
        assert!(vm.cpus >= 1 && vm.memory_mb >= 32, "{vm:?}");
        assert_eq!(vm.disks.len(), 1, "{vm:?}");
        let d = &vm.disks[0];
        assert!(d.capacity > 0 && d.file.starts_with('['), "{d:?}");
        assert!(d.position.contains(':'), "{d:?}");
        assert_eq!(vm.nics.len(), 1, "{vm:?}");
        assert!(
            vm.nics[0].mac.is_some() && vm.nics[0].network.is_some(),
            "{vm:?}"
        );
        assert_eq!(vm.power_state, "poweredOn");
        assert!(vm.host.is_some());
        let cfg = vm.config();
        assert_eq!(cfg.disks.len(), 1);
        assert_eq!(cfg.memory, vm.memory_mb << 20);
    }
    // Networks resolve by name (distributed port groups are `Network`s too).
    let nets = c.retrieve_all("Network", &["name"], 100).await.unwrap();
    assert!(
        nets.iter().any(|n| n.text("name") == Some("DC0_DVPG0")),
        "{nets:?}"
    );
}

#[tokio::test]
async fn snapshots_tasks_and_cbt() {
    let sim = Vcsim::start();
    let c = login(&sim).await;
    let vms = c
        .retrieve_all("VirtualMachine", VM_PATHS, 100)
        .await
        .unwrap();
    let vm = vms.iter().filter_map(Vm::from_object).next().unwrap();
    assert!(!vm.cbt_enabled);
    assert!(vm.snapshots.is_empty());

    c.set_change_tracking(&vm.moref, true).await.unwrap();
    let o = c.retrieve_one(&vm.moref, VM_PATHS).await.unwrap();
    assert!(Vm::from_object(&o).unwrap().cbt_enabled);

    let snap = c
        .create_snapshot(&vm.moref, "ferry-test", "made by a test", false)
        .await
        .unwrap();
    assert_eq!(snap.kind, "VirtualMachineSnapshot");
    let o = c.retrieve_one(&vm.moref, VM_PATHS).await.unwrap();
    let after = Vm::from_object(&o).unwrap();
    assert_eq!(
        after.snapshots,
        vec![(snap.clone(), "ferry-test".to_string())]
    );
    // The snapshot's own disk list is readable (what a backup reads).
    let s = c
        .retrieve_one(&snap, &["config.hardware.device"])
        .await
        .unwrap();
    let (disks, _) =
        ferry_hv_vmware::model::parse_devices(s.prop("config.hardware.device").unwrap());
    assert_eq!(disks.len(), 1);

    // vcsim has no CBT: the fault arrives typed.
    let e = c
        .query_changed_disk_areas(
            &vm.moref,
            &snap,
            disks[0].device_key,
            disks[0].capacity,
            "*",
        )
        .await
        .unwrap_err();
    assert_eq!(e.fault(), Some(&FaultKind::MethodNotFound), "{e}");
    assert!(e.to_string().contains("QueryChangedDiskAreas"), "{e}");

    c.remove_snapshot(&snap).await.unwrap();
    let o = c.retrieve_one(&vm.moref, VM_PATHS).await.unwrap();
    assert!(Vm::from_object(&o).unwrap().snapshots.is_empty());
    // Removing it again: the object is gone.
    let e = c.remove_snapshot(&snap).await.unwrap_err();
    assert_eq!(e.fault(), Some(&FaultKind::NotFound), "{e}");
    // A task that fails reports the fault of its info.error.
    let e = c
        .create_snapshot(
            &MoRef::new("VirtualMachine", "vm-does-not-exist"),
            "x",
            "",
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.fault(), Some(&FaultKind::NotFound), "{e}");
}
