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

/// A `FerrySim_SideDoor` call (the guest, faults, migrations) through `client`.
pub fn side_door(
    rt: &tokio::runtime::Runtime,
    client: &WsmanClient,
    method: &str,
    params: &[(&str, String)],
) {
    use ferry_hv_hyperv::cim::{Epr, Param};
    let epr = Epr::new("FerrySim_SideDoor", &[("Name", "sidedoor")]);
    let p: Vec<Param> = params
        .iter()
        .map(|(k, v)| Param::Text(k.to_string(), v.clone()))
        .collect();
    rt.block_on(client.invoke(&epr, method, &p))
        .unwrap_or_else(|e| panic!("side door {method}: {e}"));
}

/// What pypsrp sees on the host at `url` with the simulator's login: `script` is a probe in
/// `tests/` (`hyperv_probe.py`: Hyper-V's leftovers; `hyperv_cluster_probe.py`: the owners).
pub fn pypsrp_probe(info: &Value, script: &str, url: &str) -> Value {
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv) not found: run tests/peers/install.sh"
    );
    let out = std::process::Command::new(python)
        .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg(url)
        .args(["username", "password"].map(|k| info[k].as_str().unwrap()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Copies, into `dir`, of what the guest of `vm` sees on its disks now (the simulator's `live`
/// files from its JSON line `info`), named `<vm>-<disk>-<tag>.raw`.
pub fn guest_disks(info: &Value, vm: &str, dir: &Path, tag: &str) -> Vec<std::path::PathBuf> {
    let v = info["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == vm)
        .unwrap_or_else(|| panic!("no VM {vm} in {info}"));
    v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let to = dir.join(format!("{vm}-{}-{tag}.raw", d["name"].as_str().unwrap()));
            std::fs::copy(d["live"].as_str().unwrap(), &to).unwrap();
            to
        })
        .collect()
}

/// `ferry restore SNAPSHOT --disk diskN` (environment `env`) of each disk into `dir`, compared
/// with `expected[N]` by `qemu-img compare`.
pub fn assert_restores(
    env: &[(String, String)],
    dir: &Path,
    snapshot: &str,
    expected: &[std::path::PathBuf],
) {
    for (i, want) in expected.iter().enumerate() {
        let disk = format!("disk{i}");
        let out = dir.join(format!("restored-{snapshot}-{disk}.raw"));
        let args = [
            "restore",
            snapshot,
            "--disk",
            &disk,
            "--to",
            out.to_str().unwrap(),
        ];
        let r = ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), &args, env);
        assert!(r.status.success(), "ferry {args:?} failed");
        ferry_testkit::qemu_img_compare(&out, "raw", want, "raw");
    }
}
