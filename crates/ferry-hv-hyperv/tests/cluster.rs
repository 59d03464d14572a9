//! The driver against a two-node `ferry sim hyperv` cluster in-process: the owner node from
//! `root/MSCluster` (by name, and by id through the nodes' Hyper-V), the inventory over both
//! nodes, `disk_stores`, a node that answers for its own VMs only, and a standalone host that
//! is no cluster.

use ferry_hv::{DiskSummary, HypervisorDriver, SourceConfig, VmSummary};
use ferry_hv_hyperv::HypervDriver;
use ferry_hv_hyperv::wmi::Wmi;
use ferry_sim::hyperv::{HypervSim, HypervSimConfig};

async fn sim(dir: &std::path::Path, nodes: usize) -> HypervSim {
    let mut cfg = HypervSimConfig::new(dir.join("host"));
    cfg.disk_mib = 2;
    cfg.cluster_nodes = nodes;
    HypervSim::start(cfg).await.unwrap()
}

async fn driver(sim: &HypervSim, dir: &std::path::Path, nodes: &str) -> HypervDriver {
    let toml = format!(
        "kind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\ntransports = [\"san\"]\n[san-paths]\n'C:\\' = \"{}\"\n{nodes}",
        sim.url(),
        sim.username(),
        sim.password(),
        sim.tls_fingerprint(),
        dir.join("state").display(),
        sim.volume_dir('C').display(),
    );
    let src: SourceConfig = toml::from_str(&toml).unwrap();
    HypervDriver::connect("lab", &src).await.unwrap()
}

/// `[nodes]` naming every node of `sim` with its own pin.
fn node_map(sim: &HypervSim) -> String {
    let mut s = String::from("[nodes]\n");
    for n in sim.nodes() {
        s.push_str(&format!(
            "{} = {{ url = \"{}\", tls-fingerprint = \"{}\" }}\n",
            n.name, n.url, n.tls_fingerprint
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_node_follows_a_live_migration() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), 2).await;
    assert_eq!(sim.nodes().len(), 2);
    let (a, b) = (sim.nodes()[0].clone(), sim.nodes()[1].clone());
    let d = driver(&sim, dir.path(), &node_map(&sim)).await;
    let owner = d.owner_node("win-sql-01").await.unwrap().unwrap();
    assert_eq!(owner.name, a.name);
    assert_eq!(owner.url, a.url);
    assert_eq!(owner.host(), "127.0.0.1");
    // By id: the cluster's resources carry names, so the nodes' Hyper-V is asked.
    let vms = d.list_vms().await.unwrap();
    assert_eq!(vms.len(), 5, "both nodes' VMs: {vms:?}");
    let sql = vms.iter().find(|v| v.name == "win-sql-01").unwrap();
    assert_eq!(sql.host.as_deref(), Some(a.name.as_str()));
    let file = vms.iter().find(|v| v.name == "win-file-01").unwrap();
    assert_eq!(file.host.as_deref(), Some(b.name.as_str()), "VMs alternate");
    assert_eq!(d.owner_node(&file.id).await.unwrap().unwrap().name, b.name);

    sim.live_migrate("win-sql-01", &b.name).unwrap();
    assert_eq!(sim.owner_of("win-sql-01").as_deref(), Some(b.name.as_str()));
    assert_eq!(
        d.owner_node("win-sql-01").await.unwrap().unwrap().name,
        b.name
    );
    assert_eq!(
        d.owner_node(&sql.id).await.unwrap().unwrap().name,
        b.name,
        "by id too"
    );
    // Node A no longer answers for the VM, as Hyper-V: its id is unknown there.
    let on_a = Wmi::new(d.client());
    let e = on_a.vm(&sql.id).await.unwrap_err();
    assert!(ferry_hv_hyperv::wmi::is_gone(&e), "{e}");
    // Its images are held by node B.
    let image = "C:\\ClusterStorage\\Volume1\\win-sql-01\\disk0.vhdx";
    let e = on_a.disk_size(image).await.unwrap_err().to_string();
    assert!(e.contains("being used by another process"), "{e}");
    assert_eq!(
        on_a.disk_size("C:\\ClusterStorage\\Volume1\\linux-web-01\\disk0.vhdx")
            .await
            .unwrap(),
        2 << 20
    );
    let e = d.owner_node("no-such-vm").await.unwrap_err().to_string();
    assert!(
        e.contains("no node of the cluster") && e.contains("no-such-vm"),
        "{e}"
    );
    // Moving to the node it is on, or to no node, is refused by the side door.
    assert!(sim.live_migrate("win-sql-01", &b.name).is_err());
    assert!(sim.live_migrate("win-sql-01", "HV-NOPE").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_stores_name_the_volume_of_each_disk() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), 2).await;
    let d = driver(&sim, dir.path(), &node_map(&sim)).await;
    let vms = d.list_vms().await.unwrap();
    // On the cluster: the CSV, whichever node runs the VM.
    for name in ["win-sql-01", "win-file-01"] {
        let vm = vms.iter().find(|v| v.name == name).unwrap();
        let stores = d.disk_stores(vm).await.unwrap();
        assert_eq!(stores.len(), vm.disks.len(), "{name}: {stores:?}");
        for disk in &vm.disks {
            assert_eq!(stores[&disk.key], "C:\\ClusterStorage\\Volume1", "{name}");
        }
    }
    // Only the disks asked for, by key.
    let sql = vms.iter().find(|v| v.name == "win-sql-01").unwrap();
    let one = VmSummary {
        disks: vec![DiskSummary {
            ..sql.disks[1].clone()
        }],
        ..sql.clone()
    };
    let stores = d.disk_stores(&one).await.unwrap();
    assert_eq!(stores.keys().collect::<Vec<_>>(), [&sql.disks[1].key]);
    assert_eq!(
        ferry_hv_hyperv::driver::volume_label("\\\\FS01\\VMs\\a\\disk.vhdx"),
        "\\\\FS01\\VMs"
    );
    assert_eq!(
        ferry_hv_hyperv::driver::volume_label("D:\\Hyper-V\\x.vhdx"),
        "D:"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_host_has_no_owner_node() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), 0).await;
    assert_eq!(sim.nodes().len(), 1);
    let d = driver(&sim, dir.path(), "").await;
    assert_eq!(d.owner_node("win-sql-01").await.unwrap(), None);
    let vms = d.list_vms().await.unwrap();
    assert_eq!(vms.len(), 5);
    let sql = vms.iter().find(|v| v.name == "win-sql-01").unwrap();
    let stores = d.disk_stores(sql).await.unwrap();
    assert_eq!(stores.len(), 2);
    // A standalone host with `nodes` configured is an error, not a silent fallback.
    let d = driver(&sim, dir.path(), &node_map(&sim)).await;
    let e = d.owner_node("win-sql-01").await.unwrap_err().to_string();
    assert!(e.contains("MSCluster"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_is_down_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), 2).await;
    let (a, b) = (sim.nodes()[0].clone(), sim.nodes()[1].clone());
    // Node B's endpoint refuses connections, as a node that is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let map = format!(
        "[nodes]\n{} = {{ url = \"{}\", tls-fingerprint = \"{}\" }}\n{} = \"https://127.0.0.1:{port}/wsman\"\n",
        a.name, a.url, a.tls_fingerprint, b.name
    );
    let d = driver(&sim, dir.path(), &map).await;
    let vms = d.list_vms().await.unwrap();
    assert!(
        !vms.is_empty()
            && vms
                .iter()
                .all(|v| v.host.as_deref() == Some(a.name.as_str())),
        "node A's VMs only: {vms:?}"
    );
    assert_eq!(d.recover().await.unwrap(), Default::default());
    // A VM on node B cannot be backed up; the error names the node's endpoint.
    let e = d
        .begin_backup("win-file-01", &Default::default(), None)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&port.to_string()), "{e}");
}
