//! The WS-Man client against `ferry sim hyperv`: pinned TLS, WQL enumeration paged by Pull, Get,
//! method invocation with job polling, a failed job, the WinRS command cycle, a refused password
//! and a missing object.

use ferry_core::Secret;
use ferry_http::ClientOptions;
use ferry_hv_hyperv::cim::{self, Epr, Param};
use ferry_hv_hyperv::{Credentials, FaultKind, HypervError, WsmanClient};
use ferry_sim::hyperv::{HypervSim, HypervSimConfig};

async fn sim() -> (tempfile::TempDir, HypervSim) {
    let dir = tempfile::tempdir().unwrap();
    let sim = HypervSim::start(HypervSimConfig::new(dir.path()))
        .await
        .unwrap();
    (dir, sim)
}

fn client(sim: &HypervSim, password: &str) -> WsmanClient {
    let pin = ferry_tls::parse_fingerprint(sim.tls_fingerprint()).unwrap();
    let mut o = ClientOptions::new("lab-hv", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    WsmanClient::new(
        sim.url(),
        &o,
        Credentials {
            user: sim.username().into(),
            password: Secret::new(password),
        },
    )
    .unwrap()
}

#[tokio::test]
async fn wmi_inventory_snapshots_jobs_and_shell() {
    let (_d, sim) = sim().await;
    let c = client(&sim, sim.password());
    let vms = c
        .enumerate(
            "Msvm_ComputerSystem",
            Some("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'"),
        )
        .await
        .unwrap();
    let mut names: Vec<&str> = vms.iter().filter_map(|v| v.text("ElementName")).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "linux-web-01",
            "win-dyn-01",
            "win-file-01",
            "win-split-01",
            "win-sql-01"
        ]
    );
    let all = c.enumerate("Msvm_ComputerSystem", None).await.unwrap();
    assert_eq!(all.len(), 6);

    let vm = vms
        .iter()
        .find(|v| v.text("ElementName") == Some("win-sql-01"))
        .unwrap();
    let vm_epr = Epr::new(
        "Msvm_ComputerSystem",
        &[
            ("CreationClassName", "Msvm_ComputerSystem"),
            ("Name", vm.text("Name").unwrap()),
        ],
    );
    assert_eq!(
        c.get(&vm_epr).await.unwrap().text("EnabledState"),
        Some("2")
    );

    let svc = c
        .enumerate("Msvm_VirtualSystemSnapshotService", None)
        .await
        .unwrap()
        .remove(0);
    let keys = [
        "CreationClassName",
        "Name",
        "SystemCreationClassName",
        "SystemName",
    ];
    let sel: Vec<(&str, &str)> = keys.iter().map(|k| (*k, svc.text(k).unwrap())).collect();
    let svc_epr = Epr::new("Msvm_VirtualSystemSnapshotService", &sel);
    let settings = cim::embedded_instance(
        "Msvm_VirtualSystemSnapshotSettingData",
        &[("ConsistencyLevel", "uint8", "1")],
    );
    let out = c
        .invoke(
            &svc_epr,
            "CreateSnapshot",
            &[
                Param::Ref("AffectedSystem".into(), vm_epr.clone()),
                Param::Embedded("SnapshotSettings".into(), settings),
                Param::Text("SnapshotType".into(), "32768".into()),
            ],
        )
        .await
        .unwrap();
    let snap = out.reference("ResultingSnapshot").unwrap().clone();
    let s = c.get(&snap).await.unwrap();
    assert_eq!(
        s.text("VirtualSystemType"),
        Some("Microsoft:Hyper-V:Snapshot:Recovery")
    );
    assert_eq!(s.text("ConsistencyLevel"), Some("1"));

    // Converting drops the recovery snapshot and leaves a reference point with an RCT id.
    let out = c
        .invoke(
            &svc_epr,
            "ConvertToReferencePoint",
            &[Param::Ref("AffectedSnapshot".into(), snap.clone())],
        )
        .await
        .unwrap();
    let rp = c
        .get(out.reference("ResultingReferencePoint").unwrap())
        .await
        .unwrap();
    // One RCT id per disk of the VM, beside the disks' identifiers.
    assert_eq!(rp.texts("ResilientChangeTrackingIdentifiers").len(), 2);
    assert_eq!(rp.texts("VirtualDiskIdentifiers").len(), 2);
    let e = c.get(&snap).await.unwrap_err();
    assert_eq!(e.fault_kind(), Some(&FaultKind::NotFound), "{e}");

    // Destroying it again: the job fails, and the error says so.
    let e = c
        .invoke(
            &svc_epr,
            "DestroySnapshot",
            &[Param::Ref("AffectedSnapshot".into(), snap)],
        )
        .await
        .unwrap_err();
    assert!(matches!(&e, HypervError::Wmi { code: 32775, .. }), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");

    let o = c.run_command("hostname", &[]).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "HV-SIM-01");
    assert_eq!(o.exit_code, 0);
    let o = c.run_command("exit", &["3"]).await.unwrap();
    assert_eq!(o.exit_code, 3);
}

#[tokio::test]
async fn refused_password_and_wrong_pin_are_clear_errors() {
    let (_d, sim) = sim().await;
    let c = client(&sim, "not-the-password");
    let e = c.enumerate("Msvm_ComputerSystem", None).await.unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, HypervError::Login { .. }), "{m}");
    assert!(m.contains("lab-hv") && m.contains("Administrator"), "{m}");
    assert!(!m.contains("not-the-password"), "{m}");

    let mut o = ClientOptions::new("lab-hv", ferry_tls::Trust::Fingerprint([7; 32]));
    o.proxy = ferry_http::ProxySetting::Off;
    let c = WsmanClient::new(
        sim.url(),
        &o,
        Credentials {
            user: sim.username().into(),
            password: Secret::new(sim.password()),
        },
    )
    .unwrap();
    let e = c.enumerate("Msvm_ComputerSystem", None).await.unwrap_err();
    assert!(
        matches!(e, HypervError::Http(ferry_http::HttpError::Tls { .. })),
        "{e}"
    );
    assert!(!format!("{c:?}").contains(sim.password()));
}
