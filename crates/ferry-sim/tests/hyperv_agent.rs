//! The simulated Hyper-V host's in-process agent: it serves the host's `C:\…` disks to the
//! appliance certificates pinned at start (`--agent-client-pin`) and to those added later
//! (`HypervSim::agent_pin`, the side door's `AgentPin`), and refuses the others; a malformed
//! pin stops the start with the flag named.

use ferry_core::BlockSource;
use ferry_sim::hyperv::{HypervSim, HypervSimConfig};
use std::sync::Arc;

async fn read_all(src: &Arc<dyn BlockSource>) -> Vec<u8> {
    let mut v = vec![0u8; src.size() as usize];
    src.read_at(0, &mut v).await.unwrap();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_pinned_appliances_only() {
    let dir = tempfile::tempdir().unwrap();
    let first = ferry_tls::SelfSigned::generate(&["appliance-1"])
        .unwrap()
        .identity();
    let later = ferry_tls::SelfSigned::generate(&["appliance-2"])
        .unwrap()
        .identity();
    let mut cfg = HypervSimConfig::new(dir.path());
    cfg.disk_mib = 4;
    cfg.data_paths
        .agent_client_pins
        .push(first.fingerprint().unwrap());
    let sim = HypervSim::start(cfg).await.unwrap();
    let info: serde_json::Value = serde_json::from_str(&sim.info_json()).unwrap();
    let addr = info["agent"]["address"].as_str().unwrap();
    let pin = info["agent"]["fingerprint"].as_str().unwrap();
    let vm = info["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "win-sql-01")
        .unwrap();
    let d = &vm["disks"][0];
    let path = d["path"].as_str().unwrap();
    let live = std::fs::read(d["live"].as_str().unwrap()).unwrap();

    // Pinned at start: the base VHDX reads as the guest's disk (nothing written since).
    let src = ferry_agent::client::open(addr, pin, &first, path)
        .await
        .unwrap();
    assert!(read_all(&src).await == live);
    // The drive letter is matched as Windows does, case-insensitively (the rest of the path is
    // the Linux directory's own on a lab agent).
    ferry_agent::client::open(addr, pin, &first, &path.replacen("C:", "c:", 1))
        .await
        .unwrap();

    // Not pinned yet: refused in the handshake, with the certificate named.
    let e = ferry_agent::client::open(addr, pin, &later, path)
        .await
        .err()
        .unwrap();
    let fp = later.fingerprint().unwrap();
    assert!(e.to_string().contains(&fp), "{e}");
    assert!(sim.agent_pin("sha256:nope").is_err());
    sim.agent_pin(&fp).unwrap();
    let src = ferry_agent::client::open(addr, pin, &later, path)
        .await
        .unwrap();
    assert!(read_all(&src).await == live);

    // Outside the host's volumes: refused.
    let e = ferry_agent::client::open(addr, pin, &later, "D:\\elsewhere\\x.vhdx")
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("outside the agent's roots"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_pin_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HypervSimConfig::new(dir.path());
    cfg.disk_mib = 1;
    cfg.data_paths.agent_client_pins.push("sha256:12".into());
    let e = HypervSim::start(cfg).await.unwrap_err();
    assert!(e.to_string().contains("--agent-client-pin"), "{e}");
}
