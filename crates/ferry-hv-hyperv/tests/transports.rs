//! The data paths behind the driver's `Transport` seam: the host agent (`network`, served
//! in-process on a loopback port) and snapshot LUNs read through NTFS (`san` with `san-luns`),
//! each reading a qemu-img VHDX by its host path.

use ferry_agent::AgentConfig;
use ferry_hv_hyperv::transport::{AgentTransport, CheckpointDisk, NtfsLunTransport, Transport};
use std::collections::BTreeMap;
use std::process::Command;

const SIZE: u64 = 16 << 20;

fn disk(host_path: &str) -> CheckpointDisk {
    CheckpointDisk {
        vm: "vm1".into(),
        key: "disk0".into(),
        host_path: host_path.into(),
    }
}

async fn read_all(src: &dyn ferry_core::BlockSource) -> Vec<u8> {
    let mut v = vec![0u8; src.size() as usize];
    src.read_at(0, &mut v).await.unwrap();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_reads_through_the_host_agent() {
    let dir = ferry_testkit::scratch_dir();
    let expect =
        ferry_testkit::qemu_vhdx(&dir.path().join("d.vhdx"), SIZE, &["write -P 0x3c 1M 2M"]);
    let appliance = ferry_tls::SelfSigned::generate(&["appliance"])
        .unwrap()
        .identity();
    let mut cfg = AgentConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.roots.push(dir.path().to_path_buf());
    cfg.maps
        .push(format!("C:\\VMs={}", dir.path().display()).parse().unwrap());
    cfg.client_pins.push(appliance.fingerprint().unwrap());
    let agent = ferry_agent::start(cfg).await.unwrap();
    let t = AgentTransport {
        agent: agent.addr.to_string(),
        agent_pin: agent.fingerprint.clone(),
        identity: appliance,
    };
    let src = t.open(&disk("C:\\VMs\\d.vhdx")).await.unwrap();
    assert!(read_all(src.as_ref()).await == expect);
    let e = t.open(&disk("C:\\Other\\d.vhdx")).await.unwrap_err();
    assert!(e.contains("outside the agent's roots"), "{e}");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn san_reads_a_snapshot_lun_through_ntfs() {
    let dir = ferry_testkit::scratch_dir();
    let vhdx = dir.path().join("d.vhdx");
    let expect = ferry_testkit::qemu_vhdx(&vhdx, SIZE, &["write -P 0x3d 5M 1M"]);
    let lun = dir.path().join("lun.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let run = |c: &mut Command| ferry_testkit::run_ok(c);
    run(Command::new(ferry_testkit::tool("mkntfs"))
        .args(["-F", "-Q", "-q"])
        .arg(&lun));
    run(Command::new(ferry_testkit::tool("ntfscp"))
        .arg("-q")
        .arg(&lun)
        .arg(&vhdx)
        .arg("/d.vhdx"));
    let t = NtfsLunTransport {
        luns: BTreeMap::from([("C:\\ClusterStorage\\Volume1".to_string(), lun)]),
    };
    let src = t
        .open(&disk("C:\\ClusterStorage\\Volume1\\d.vhdx"))
        .await
        .unwrap();
    assert!(read_all(src.as_ref()).await == expect);
    let e = t.open(&disk("D:\\d.vhdx")).await.unwrap_err();
    assert!(e.contains("no san-luns entry"), "{e}");
}
