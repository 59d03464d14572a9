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

/// A side-door call on the simulator (`FerrySim_SideDoor`: fault injection, agent pins).
pub fn side_door(
    rt: &tokio::runtime::Runtime,
    client: &WsmanClient,
    method: &str,
    params: &[(&str, &str)],
) {
    let epr = ferry_hv_hyperv::cim::Epr::new("FerrySim_SideDoor", &[("Name", "sidedoor")]);
    let p: Vec<ferry_hv_hyperv::cim::Param> = params
        .iter()
        .map(|(k, v)| ferry_hv_hyperv::cim::Param::Text(k.to_string(), v.to_string()))
        .collect();
    rt.block_on(client.invoke(&epr, method, &p))
        .unwrap_or_else(|e| panic!("side door {method}: {e}"));
}

/// The VMs `names` as pypsrp reads them from the simulator's WMI (`tests/hyperv_vm_probe.py`;
/// null: no such VM).
pub fn vm_probe(info: &Value, names: &[&str]) -> Value {
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

/// The simulator's local file for host path `p` (under `C:\`).
pub fn sim_local(info: &Value, p: &str) -> std::path::PathBuf {
    let rest = p.strip_prefix("C:\\").unwrap_or_else(|| panic!("{p}"));
    let mut out = std::path::PathBuf::from(info["san_paths"]["C:\\"].as_str().unwrap());
    for c in rest.split('\\') {
        out.push(c);
    }
    out
}
