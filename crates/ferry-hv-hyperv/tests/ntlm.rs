//! The WS-Man client logs in with NTLM against `ferry sim hyperv` (the `sspi` acceptor): sealed
//! messages over HTTP, TLS alone over HTTPS, a refused password, a tampered reply, Basic still
//! available, Kerberos without a realm refused clearly; and the simulator refuses a tampered or unsealed request
//! over HTTP from a raw client.

use base64::Engine;
use ferry_core::Secret;
use ferry_http::ClientOptions;
use ferry_hv_hyperv::{AuthMethod, Credentials, HypervError, WsmanClient};
use ferry_sim::hyperv::{HypervSim, HypervSimConfig};
use ferry_wsman::ntlm::NtlmClient;
use ferry_wsman::sealed::{self, PROTOCOL_SPNEGO};

async fn sim() -> (tempfile::TempDir, HypervSim) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HypervSimConfig::new(dir.path());
    cfg.listen_http = Some("127.0.0.1:0".parse().unwrap());
    let sim = HypervSim::start(cfg).await.unwrap();
    (dir, sim)
}

fn client(sim: &HypervSim, url: &str, password: &str) -> WsmanClient {
    let pin = ferry_tls::parse_fingerprint(sim.tls_fingerprint()).unwrap();
    let mut o = ClientOptions::new("lab-hv", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    WsmanClient::new(
        url,
        &o,
        Credentials {
            user: sim.username().into(),
            password: Secret::new(password),
        },
    )
    .unwrap()
}

async fn exercise(c: &WsmanClient) {
    let vms = c
        .enumerate(
            "Msvm_ComputerSystem",
            Some("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'"),
        )
        .await
        .unwrap();
    assert_eq!(vms.len(), 5);
    let out = c.run_command("echo", &["sealed", "hello"]).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sealed hello");
    assert_eq!(out.exit_code, 0);
}

#[tokio::test]
async fn ntlm_seals_over_http_and_relies_on_tls_over_https() {
    let (_d, sim) = sim().await;
    let http = client(&sim, sim.http_url().unwrap(), sim.password());
    assert_eq!(http.auth_method(), AuthMethod::Ntlm);
    assert!(http.encrypts());
    exercise(&http).await;
    // The connection and its session are kept: far fewer logins than exchanges (the pool may
    // now and then open a second connection, which costs one more login, ADR 0112).
    for _ in 0..30 {
        http.enumerate("Msvm_ComputerSystem", None).await.unwrap();
    }
    let logins = sim.ntlm_logins();
    assert!(
        (1..=6).contains(&logins),
        "{logins} logins for 36 exchanges"
    );
    let https = client(&sim, sim.url(), sim.password());
    assert!(!https.encrypts());
    exercise(&https).await;
    // Basic stays for labs.
    let basic = client(&sim, sim.url(), sim.password()).with_auth(AuthMethod::Basic, None);
    exercise(&basic).await;
    // A domain given apart from the user name (the simulator's account is local).
    let dom = client(&sim, sim.http_url().unwrap(), sim.password())
        .with_auth(AuthMethod::Ntlm, Some("HV-SIM-01".into()));
    exercise(&dom).await;
}

#[tokio::test]
async fn wrong_password_tampering_and_kerberos_are_clear_errors() {
    let (_d, sim) = sim().await;
    for url in [sim.http_url().unwrap(), sim.url()] {
        let c = client(&sim, url, "not-the-password");
        let e = c.enumerate("Msvm_ComputerSystem", None).await.unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, HypervError::Login { .. }), "{m}");
        assert!(
            m.contains("Administrator") && !m.contains("not-the-password"),
            "{m}"
        );
        assert!(!format!("{c:?}").contains("not-the-password"));
    }

    let c = client(&sim, sim.http_url().unwrap(), sim.password());
    c.enumerate("Msvm_ComputerSystem", None).await.unwrap();
    sim.tamper_next_reply();
    let e = c.enumerate("Msvm_ComputerSystem", None).await.unwrap_err();
    let m = e.to_string();
    assert!(m.contains("refused") && m.contains("altered"), "{m}");
    // The next call logs in again.
    assert_eq!(
        c.enumerate("Msvm_ComputerSystem", None)
            .await
            .unwrap()
            .len(),
        6
    );

    let k = client(&sim, sim.url(), sim.password()).with_auth(AuthMethod::Kerberos, None);
    let m = k
        .enumerate("Msvm_ComputerSystem", None)
        .await
        .unwrap_err()
        .to_string();
    // Kerberos is built (tests/kerberos.rs); a user without a realm is refused before any
    // traffic.
    assert!(m.contains("no realm for `Administrator`"), "{m}");
}

/// Lets reqwest put the connection just read back in its pool (the next request then reuses it).
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// A raw client: the NTLM handshake by hand on one reqwest connection, then a tampered sealed
/// request and an unsealed one; the simulator refuses both.
#[tokio::test]
async fn the_simulator_refuses_tampered_and_unsealed_requests_over_http() {
    let (_d, sim) = sim().await;
    let url = sim.http_url().unwrap().to_string();
    let b64 = base64::engine::general_purpose::STANDARD;
    let pin = ferry_tls::parse_fingerprint(sim.tls_fingerprint()).unwrap();
    let mut o = ClientOptions::new("raw", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    let http = ferry_http::HttpClient::new(&o).unwrap().inner().clone();
    let login = async || {
        let (c, neg) =
            NtlmClient::start(sim.username(), None, sim.password(), "127.0.0.1").unwrap();
        let r = http
            .post(&url)
            .header("Authorization", format!("Negotiate {}", b64.encode(neg)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let h = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        let _ = r.bytes().await;
        settle().await;
        let ch = b64.decode(h.strip_prefix("Negotiate ").unwrap()).unwrap();
        let (auth, session) = c.authenticate(&ch).unwrap();
        let r = http
            .post(&url)
            .header("Authorization", format!("Negotiate {}", b64.encode(auth)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
        settle().await;
        session
    };
    let soap = "<s:Envelope xmlns:s=\"http://www.w3.org/2003/05/soap-envelope\"/>";

    let mut s = login().await;
    let mut body = sealed::wrap(&mut s, PROTOCOL_SPNEGO, soap.as_bytes()).unwrap();
    let n = body.len() - 30;
    body[n] ^= 0x80;
    let r = http
        .post(&url)
        .header("Content-Type", sealed::content_type(PROTOCOL_SPNEGO))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let t = r.text().await.unwrap();
    assert!(t.contains("encrypted WinRM message"), "{t}");

    let _s = login().await;
    let r = http
        .post(&url)
        .header("Content-Type", "application/soap+xml;charset=UTF-8")
        .body(soap)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
