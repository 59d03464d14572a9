//! What the Hyper-V tests share (`hyperv.rs`, `hyperv_cluster.rs`, `hyperv_paths.rs`,
//! `hyperv_restore.rs`, `hyperv_kerberos.rs`): the lab's repository and a WS-Man client on the
//! simulator's pinned HTTPS endpoint (for the side door and WMI checks).
#![allow(dead_code)]

use ferry_core::Secret;
use ferry_hv_hyperv::{Credentials, WsmanClient};
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use serde_json::Value;
use std::path::Path;

/// A new repository at `path` with `password` (fast KDF) and `chunk_size` (else the default).
pub fn init_repo(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    password: &str,
    chunk_size: Option<u32>,
) {
    rt.block_on(async {
        let store = Store::open(path.to_str().unwrap(), true).unwrap();
        let mut opts = InitOptions {
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        if let Some(c) = chunk_size {
            opts.chunk_size = c;
        }
        Repository::init(store, Some(&Secret::new(password)), opts)
            .await
            .unwrap();
    });
}

/// A client on the simulator's `url` as its JSON line `info` gives it (pinned certificate, its
/// user and password, no proxy).
pub fn sim_client(rt: &tokio::runtime::Runtime, info: &Value) -> WsmanClient {
    let pin = ferry_tls::parse_fingerprint(info["tls_fingerprint"].as_str().unwrap()).unwrap();
    let mut o = ferry_http::ClientOptions::new("lab", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    let _g = rt.enter();
    WsmanClient::new(
        info["url"].as_str().unwrap(),
        &o,
        Credentials {
            user: info["username"].as_str().unwrap().into(),
            password: Secret::new(info["password"].as_str().unwrap()),
        },
    )
    .unwrap()
}

/// The VMs `names` of the Hyper-V simulator `info` as pypsrp reads them from the host's WMI
/// (`tests/hyperv_vm_probe.py`; null: no such VM).
pub fn probe_vms(info: &Value, names: &[&str]) -> Value {
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv with pypsrp) not found: run tests/peers/install.sh"
    );
    let out = ferry_testkit::run_ok(
        std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/hyperv_vm_probe.py"
            ))
            .args(["url", "username", "password"].map(|k| info[k].as_str().unwrap()))
            .args(names),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// What VMware's SDK (pyvmomi, `tests/vmware_probe.py`) reports of VM `name` on the vSphere
/// simulator `vc` (its JSON line).
pub fn vsphere_vm(vc: &Value, name: &str) -> Value {
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    let url = vc["url"].as_str().unwrap();
    let (host, port) = url
        .trim_start_matches("https://")
        .trim_end_matches("/sdk")
        .rsplit_once(':')
        .unwrap();
    let out = ferry_testkit::run_ok(
        std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/vmware_probe.py"
            ))
            .args([host, port])
            .args(["username", "password"].map(|k| vc[k].as_str().unwrap()))
            .arg(name)
            .env("no_proxy", "*"),
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v[name].clone()
}
