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
