//! WinRM channel binding (Extended Protection, ADR 0172) against `ferry sim hyperv --cbt`:
//! Ferry's NTLM client binds its login to the TLS channel over HTTPS and is let in by a strict
//! host; with `channel-binding = false` a strict host refuses it, and the error says channel
//! binding; a relaxed host lets an unbound login in; pywinrm (requests_ntlm, the vendor client)
//! is let in by a strict host; an AUTHENTICATE bound to another certificate is refused by
//! `sspi`'s acceptor, and the binding the sim reads back out of it is the one sent.

use ferry_core::Secret;
use ferry_http::ClientOptions;
use ferry_hv_hyperv::{Credentials, WsmanClient};
use ferry_sim::hyperv::{Cbt, HypervSim, HypervSimConfig};
use ferry_wsman::cbt;
use ferry_wsman::ntlm::{Accepted, NtlmClient, NtlmServer};

async fn sim(level: Cbt) -> (tempfile::TempDir, HypervSim) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HypervSimConfig::new(dir.path());
    cfg.cbt = level;
    let sim = HypervSim::start(cfg).await.unwrap();
    (dir, sim)
}

fn client(sim: &HypervSim) -> WsmanClient {
    let pin = ferry_tls::parse_fingerprint(sim.tls_fingerprint()).unwrap();
    let mut o = ClientOptions::new("lab-hv", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    WsmanClient::new(
        sim.url(),
        &o,
        Credentials {
            user: sim.username().into(),
            password: Secret::new(sim.password()),
        },
    )
    .unwrap()
}

async fn vms(c: &WsmanClient) -> Result<usize, ferry_hv_hyperv::HypervError> {
    let q = "SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'";
    Ok(c.enumerate("Msvm_ComputerSystem", Some(q)).await?.len())
}

#[tokio::test]
async fn a_strict_host_lets_in_a_bound_login_and_refuses_an_unbound_one() {
    let (_d, sim) = sim(Cbt::Strict).await;
    let bound = client(&sim);
    assert_eq!(vms(&bound).await.unwrap(), 5);
    let out = bound.run_command("echo", &["bound"]).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bound");
    assert!(sim.ntlm_logins() >= 1);

    let before = sim.ntlm_logins();
    let unbound = client(&sim).with_channel_binding(false);
    let e = vms(&unbound).await.unwrap_err().to_string();
    assert!(
        e.contains("channel binding") && e.contains("CbtHardeningLevel = Strict"),
        "{e}"
    );
    assert!(!e.contains(sim.password()), "{e}");
    assert_eq!(sim.ntlm_logins(), before, "no login got through");
}

#[tokio::test]
async fn a_relaxed_host_lets_in_bound_and_unbound_logins() {
    let (_d, sim) = sim(Cbt::Relaxed).await;
    assert_eq!(vms(&client(&sim)).await.unwrap(), 5);
    let unbound = client(&sim).with_channel_binding(false);
    assert_eq!(vms(&unbound).await.unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pywinrm_logs_in_to_a_strict_host() {
    let (_d, sim) = sim(Cbt::Strict).await;
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv) not found: run tests/peers/install.sh"
    );
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(&python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cbt_probe.py"))
            .args([sim.url(), sim.username(), sim.password()])
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["stdout"], "bound from pywinrm", "{v}");
    assert_eq!(sim.ntlm_logins(), 1);
}

#[test]
fn a_login_bound_to_another_certificate_is_refused() {
    let ours = ferry_tls::SelfSigned::generate(&["localhost"]).unwrap();
    let theirs = ferry_tls::SelfSigned::generate(&["localhost"]).unwrap();
    let expected = cbt::tls_server_end_point(&ours.cert_der).unwrap();
    assert!(expected.starts_with(cbt::TLS_SERVER_END_POINT));
    // rcgen signs with ECDSA P-256 / SHA-256: a SHA-256 hash.
    assert_eq!(expected.len(), cbt::TLS_SERVER_END_POINT.len() + 32);
    let other = cbt::tls_server_end_point(&theirs.cert_der).unwrap();
    for (sent, ok) in [(&expected, true), (&other, false)] {
        let (mut c, negotiate) = NtlmClient::start("alice", None, "pw", "localhost").unwrap();
        let server = NtlmServer::new("alice", "pw").unwrap();
        let Accepted::Challenge(challenge, mut server) = server.step(&negotiate).unwrap() else {
            panic!("no challenge");
        };
        c.bind_channel(sent);
        let (authenticate, _) = c.authenticate(&challenge).unwrap();
        assert_eq!(
            cbt::authenticate_bindings(&authenticate).unwrap(),
            Some(cbt::bindings_hash(sent))
        );
        server.bind_channel(&expected);
        assert_eq!(server.step(&authenticate).is_ok(), ok);
    }
}

/// The source's `channel-binding` setting reaches the driver's client: on by default, and a
/// strict host refuses the driver with `channel-binding = false`, saying so.
#[tokio::test]
async fn the_channel_binding_setting_of_a_source_is_used() {
    use ferry_hv::HypervisorDriver;
    let (d, sim) = sim(Cbt::Strict).await;
    let toml = |extra: &str| {
        format!(
            "kind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\n{extra}",
            sim.url(),
            sim.username(),
            sim.password(),
            sim.tls_fingerprint(),
            d.path().join("state").display(),
        )
    };
    for (extra, ok) in [
        ("", true),
        ("channel-binding = true\n", true),
        ("channel-binding = false\n", false),
    ] {
        let src: ferry_hv::SourceConfig = toml::from_str(&toml(extra)).unwrap();
        let driver = ferry_hv_hyperv::HypervDriver::connect("lab", &src)
            .await
            .unwrap();
        match driver.list_vms().await {
            Ok(v) => assert!(ok && v.len() == 5, "{extra}: {v:?}"),
            Err(e) => {
                let e = e.to_string();
                assert!(!ok && e.contains("channel binding"), "{extra}: {e}");
            }
        }
    }
}

/// Each node of a strict cluster has its own certificate: a login bound to it is let in there.
#[tokio::test]
async fn every_node_of_a_strict_cluster_lets_in_a_login_bound_to_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HypervSimConfig::new(dir.path());
    cfg.cbt = Cbt::Strict;
    cfg.cluster_nodes = 2;
    let sim = HypervSim::start(cfg).await.unwrap();
    for n in sim.nodes() {
        let pin = ferry_tls::parse_fingerprint(&n.tls_fingerprint).unwrap();
        let mut o = ClientOptions::new("lab-hv", ferry_tls::Trust::Fingerprint(pin));
        o.proxy = ferry_http::ProxySetting::Off;
        let creds = Credentials {
            user: sim.username().into(),
            password: Secret::new(sim.password()),
        };
        let c = WsmanClient::new(&n.url, &o, creds.clone()).unwrap();
        let q = "SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Hosting Computer System'";
        let host = c.enumerate("Msvm_ComputerSystem", Some(q)).await.unwrap();
        assert_eq!(host[0].text("Name"), Some(n.name.as_str()));
        let unbound = WsmanClient::new(&n.url, &o, creds)
            .unwrap()
            .with_channel_binding(false);
        assert!(vms(&unbound).await.is_err(), "{}", n.name);
    }
}
