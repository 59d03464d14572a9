//! The WS-Man client logs in with Kerberos (ADR 0159): tickets from a real MIT KDC (a throwaway
//! realm, `ferry_testkit::MitKdc`), the AP-REQ to `ferry sim hyperv` as the acceptor with the
//! service key the KDC wrote into a keytab, the AP-REP back (mutual authentication), then WinRM
//! messages sealed with the Kerberos session over HTTP, TLS alone over HTTPS. Wrong passwords,
//! unknown principals, principals that are not the host's user and clock skew are refused with
//! clear errors that never contain the secret. pywinrm (`transport='kerberos'`, MIT's GSSAPI
//! through pykerberos) checks the simulator's acceptor and sealing (`kerberos_probe.py`).

use ferry_core::Secret;
use ferry_http::ClientOptions;
use ferry_hv_hyperv::{AuthMethod, Credentials, Epr, HypervError, KerberosOptions, WsmanClient};
use ferry_sim::hyperv::{HypervKerberos, HypervSim, HypervSimConfig};
use ferry_testkit::MitKdc;
use ferry_wsman::sealed;

const SPN: &str = "HTTP/127.0.0.1";
const PASSWORD: &str = "Kerb-s3cret-42";

struct Lab {
    kdc: MitKdc,
    sim: HypervSim,
    _dir: tempfile::TempDir,
}

/// A realm with `alice` (password) and the host's service key; the simulator's user is `alice`.
async fn lab(max_skew: Option<std::time::Duration>) -> Lab {
    lab_with(
        tokio::task::spawn_blocking(MitKdc::start).await.unwrap(),
        max_skew,
    )
    .await
}

/// [`lab`] on a given KDC.
async fn lab_with(kdc: MitKdc, max_skew: Option<std::time::Duration>) -> Lab {
    kdc.add_user("alice", PASSWORD);
    kdc.add_user("bob", PASSWORD);
    let keytab = kdc.add_service(SPN);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HypervSimConfig::new(dir.path());
    cfg.listen_http = Some("127.0.0.1:0".parse().unwrap());
    cfg.username = "alice".into();
    cfg.disk_mib = 4;
    let mut k = HypervKerberos::new(keytab, SPN);
    if let Some(s) = max_skew {
        k.max_skew = s;
    }
    cfg.kerberos = Some(k);
    let sim = HypervSim::start(cfg).await.unwrap();
    Lab {
        kdc,
        sim,
        _dir: dir,
    }
}

/// A client of the simulator (NTLM until told otherwise).
fn plain_client(lab: &Lab, url: &str, user: &str, password: &str) -> WsmanClient {
    let pin = ferry_tls::parse_fingerprint(lab.sim.tls_fingerprint()).unwrap();
    let mut o = ClientOptions::new("lab-hv", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    WsmanClient::new(
        url,
        &o,
        Credentials {
            user: user.into(),
            password: Secret::new(password),
        },
    )
    .unwrap()
}

fn client(lab: &Lab, url: &str, user: &str, password: &str, opts: KerberosOptions) -> WsmanClient {
    plain_client(lab, url, user, password)
        .with_auth(AuthMethod::Kerberos, None)
        .with_kerberos(opts)
}

/// `alice@FERRY.TEST` with her password, the KDC given.
fn alice(lab: &Lab, url: &str) -> WsmanClient {
    client(lab, url, "alice@FERRY.TEST", PASSWORD, at_kdc(lab))
}

fn at_kdc(lab: &Lab) -> KerberosOptions {
    KerberosOptions {
        kdc: Some(lab.kdc.kdc()),
        ..Default::default()
    }
}

/// A whole WMI cycle: enumerate with a WQL filter, Get, a method invocation with its job, and
/// a shell command.
async fn exercise(c: &WsmanClient) {
    let vms = c
        .enumerate(
            "Msvm_ComputerSystem",
            Some("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'"),
        )
        .await
        .unwrap();
    assert_eq!(vms.len(), 5);
    let vm = vms
        .iter()
        .find(|v| v.text("ElementName") == Some("win-file-01"))
        .unwrap();
    let epr = Epr::new(
        "Msvm_ComputerSystem",
        &[
            ("CreationClassName", "Msvm_ComputerSystem"),
            ("Name", vm.text("Name").unwrap()),
        ],
    );
    let before = c.get(&epr).await.unwrap();
    let target = if before.text("EnabledState") == Some("2") {
        "3"
    } else {
        "2"
    };
    c.invoke(
        &epr,
        "RequestStateChange",
        &[ferry_hv_hyperv::Param::Text(
            "RequestedState".into(),
            target.into(),
        )],
    )
    .await
    .unwrap();
    assert_eq!(
        c.get(&epr).await.unwrap().text("EnabledState"),
        Some(target)
    );
    let out = c.run_command("echo", &["kerberos", "hello"]).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kerberos hello"
    );
}

#[tokio::test]
async fn kerberos_seals_over_http_and_relies_on_tls_over_https() {
    let lab = lab(None).await;
    let http = alice(&lab, lab.sim.http_url().unwrap());
    assert_eq!(http.auth_method(), AuthMethod::Kerberos);
    assert!(http.encrypts());
    exercise(&http).await;
    for _ in 0..20 {
        http.enumerate("Msvm_ComputerSystem", None).await.unwrap();
    }
    // The KDC issued alice a TGT and a ticket for the host's service; one connection, one
    // session, few logins (a second pooled connection costs one more, ADR 0112).
    let log = lab.kdc.log();
    assert!(
        log.contains("AS_REQ") && log.contains("alice@FERRY.TEST for krbtgt/FERRY.TEST@FERRY.TEST"),
        "{log}"
    );
    assert!(
        log.contains("alice@FERRY.TEST for HTTP/127.0.0.1@FERRY.TEST"),
        "{log}"
    );
    let logins = lab.sim.kerberos_logins();
    assert!((1..=6).contains(&logins), "{logins} logins");
    assert_eq!(lab.sim.ntlm_logins(), 0);

    // Over HTTPS TLS protects the messages; the realm from `realm`, the KDC from KRB5_CONFIG
    // is exercised by the `ferry backup` test; here `REALM\user` and an explicit KDC.
    let https = client(
        &lab,
        lab.sim.url(),
        "FERRY.TEST\\alice",
        PASSWORD,
        at_kdc(&lab),
    );
    assert!(!https.encrypts());
    exercise(&https).await;

    // A reply altered in transit fails its wrap token's checksum; the next call logs in again.
    lab.sim.tamper_next_reply();
    let m = http
        .enumerate("Msvm_ComputerSystem", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(m.contains("refused") && m.contains("altered"), "{m}");
    assert_eq!(
        http.enumerate("Msvm_ComputerSystem", None)
            .await
            .unwrap()
            .len(),
        6
    );

    // The KDC over UDP as well as TCP.
    let udp = client(
        &lab,
        lab.sim.http_url().unwrap(),
        "alice@FERRY.TEST",
        PASSWORD,
        KerberosOptions {
            kdc: Some(format!("udp://{}", lab.kdc.kdc())),
            ..Default::default()
        },
    );
    exercise(&udp).await;

    // A raw request sealed under the Kerberos protocol but on a connection that never logged
    // in is refused (401), not served.
    let pin = ferry_tls::parse_fingerprint(lab.sim.tls_fingerprint()).unwrap();
    let mut o = ClientOptions::new("raw", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    let raw = ferry_http::HttpClient::new(&o).unwrap().inner().clone();
    let body = sealed::encode(
        ferry_wsman::kerberos::PROTOCOL_KERBEROS,
        5,
        &[0; 60],
        b"hello",
    );
    let r = raw
        .post(lab.sim.http_url().unwrap())
        .header(
            "Content-Type",
            sealed::content_type(ferry_wsman::kerberos::PROTOCOL_KERBEROS),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keytab_logs_in_without_a_password() {
    let lab = lab(None).await;
    // `ktadd` re-keys alice: her password no longer works, the keytab does.
    let kt = tokio::task::block_in_place(|| lab.kdc.keytab_for("alice"));
    let opts = KerberosOptions {
        keytab: Some(kt.clone()),
        realm: Some("ferry.test".into()),
        ..at_kdc(&lab)
    };
    let c = client(&lab, lab.sim.http_url().unwrap(), "alice", "", opts);
    exercise(&c).await;
    // A keytab without the user's key names what is missing.
    let opts = KerberosOptions {
        keytab: Some(kt),
        ..at_kdc(&lab)
    };
    let e = client(&lab, lab.sim.url(), "bob@FERRY.TEST", "", opts)
        .enumerate("Msvm_ComputerSystem", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no key for bob@FERRY.TEST"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_never_show_the_secret() {
    let lab = lab(None).await;
    let err = |user: &str, password: &str, opts: KerberosOptions| {
        let c = client(&lab, lab.sim.http_url().unwrap(), user, password, opts);
        async move { c.enumerate("Msvm_ComputerSystem", None).await.unwrap_err() }
    };
    // A wrong password: the KDC refuses the pre-authentication.
    let e = err("alice@FERRY.TEST", "not-the-password", at_kdc(&lab)).await;
    let m = e.to_string();
    assert!(m.contains("alice@FERRY.TEST"), "{m}");
    assert!(
        m.to_lowercase().contains("preauth") || m.to_lowercase().contains("pre-auth"),
        "{m}"
    );
    assert!(!m.contains("not-the-password"), "{m}");
    assert!(!format!("{e:?}").contains("not-the-password"));
    // A principal the realm does not know.
    let m = err("mallory@FERRY.TEST", PASSWORD, at_kdc(&lab))
        .await
        .to_string();
    assert!(m.contains("mallory@FERRY.TEST"), "{m}");
    assert!(m.contains("client not found"), "{m}");
    // A real principal that is not the host's user: the host answers 401.
    let e = err("bob@FERRY.TEST", PASSWORD, at_kdc(&lab)).await;
    assert!(matches!(e, HypervError::Login { .. }), "{e}");
    assert!(e.to_string().contains("bob@FERRY.TEST"), "{e}");
    // No realm at all.
    let m = err("alice", PASSWORD, at_kdc(&lab)).await.to_string();
    assert!(m.contains("no realm"), "{m}");
    // No KDC where one is said to be.
    let dead = ferry_testkit::free_port();
    let m = err(
        "alice@FERRY.TEST",
        PASSWORD,
        KerberosOptions {
            kdc: Some(format!("127.0.0.1:{dead}")),
            ..Default::default()
        },
    )
    .await
    .to_string();
    assert!(m.contains(&format!("127.0.0.1:{dead}")), "{m}");
    assert!(!m.contains(PASSWORD), "{m}");
}

/// The host's clock disagrees with the KDC's by more than the host allows: the KDC runs ten
/// minutes ahead (libfaketime), the client takes the KDC's time (as Windows does after a skew
/// error), and the host, on the local clock, refuses the authenticator with a 401.
#[tokio::test]
async fn clock_skew_between_host_and_kdc_is_refused() {
    let lab = lab(Some(std::time::Duration::from_secs(120))).await;
    let skewed = tokio::task::spawn_blocking(|| MitKdc::start_with_clock_offset("+600"))
        .await
        .unwrap();
    let lab2 = lab_with(skewed, Some(std::time::Duration::from_secs(120))).await;
    let e = alice(&lab2, lab2.sim.url())
        .enumerate("Msvm_ComputerSystem", None)
        .await
        .unwrap_err();
    assert!(matches!(e, HypervError::Login { .. }), "{e}");
    assert_eq!(lab2.sim.kerberos_logins(), 0);
    // The skewed KDC did issue the ticket (the client followed its clock): the host refused it.
    let log = lab2.kdc.log();
    assert!(
        log.contains("alice@FERRY.TEST for HTTP/127.0.0.1@FERRY.TEST"),
        "{log}"
    );
    // The same client against the unskewed realm logs in.
    drop(lab2);
    let c = alice(&lab, lab.sim.url());
    c.enumerate("Msvm_ComputerSystem", None).await.unwrap();
}

/// The cost per call once logged in, against Basic over HTTPS in the same run (printed for
/// docs/performance.md), and the logins it takes: a kept session, not a login per call.
#[tokio::test]
async fn per_call_cost_and_logins_over_300_calls() {
    let lab = lab(None).await;
    let pw = lab.sim.password();
    let basic = plain_client(&lab, lab.sim.url(), "alice", pw).with_auth(AuthMethod::Basic, None);
    let ntlm = |url: &str| plain_client(&lab, url, "alice", pw);
    let (ntlm_https, ntlm_http) = (ntlm(lab.sim.url()), ntlm(lab.sim.http_url().unwrap()));
    let https = alice(&lab, lab.sim.url());
    let http = alice(&lab, lab.sim.http_url().unwrap());
    for (name, c) in [
        ("basic/https", &basic),
        ("ntlm/https", &ntlm_https),
        ("ntlm/http sealed", &ntlm_http),
        ("kerberos/https", &https),
        ("kerberos/http sealed", &http),
    ] {
        let t = std::time::Instant::now();
        c.enumerate("Msvm_ComputerSystem", None).await.unwrap();
        let first = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..300 {
            c.enumerate("Msvm_ComputerSystem", None).await.unwrap();
        }
        let each = t.elapsed() / 300;
        eprintln!("{name}: first call (login) {first:?}, then {each:?} per call");
    }
    let logins = lab.sim.kerberos_logins();
    eprintln!("Kerberos logins for 602 calls: {logins}");
    assert!((2..=20).contains(&logins), "{logins} logins for 602 calls");
}

/// The vendor client: pywinrm with MIT's GSSAPI (pykerberos), a TGT from `kinit`, mutual
/// authentication and sealed messages over HTTP, TLS alone over HTTPS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pywinrm_with_mit_gssapi_logs_in_and_seals() {
    let lab = lab(None).await;
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv) not found: run tests/peers/install.sh"
    );
    let cc = lab._dir.path().join("ccache");
    let mut env = lab.kdc.env();
    env.push(("KRB5CCNAME".into(), format!("FILE:{}", cc.display())));
    tokio::task::block_in_place(|| {
        use std::io::Write;
        let mut kinit = std::process::Command::new("kinit")
            .arg("alice@FERRY.TEST")
            .envs(env.iter().cloned())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("kinit (krb5-user): run tests/peers/install.sh");
        writeln!(kinit.stdin.take().unwrap(), "{PASSWORD}").unwrap();
        assert!(kinit.wait().unwrap().success(), "kinit failed");
        for (url, enc) in [
            (lab.sim.http_url().unwrap(), "always"),
            (lab.sim.url(), "auto"),
        ] {
            let out = std::process::Command::new(&python)
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/kerberos_probe.py"
                ))
                .args([url, "alice@FERRY.TEST", enc])
                .envs(env.iter().cloned())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{url}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
            assert_eq!(v["stdout"], "kerberos from pywinrm", "{v}");
            assert_eq!(v["status"], 0, "{v}");
        }
    });
    assert!(lab.sim.kerberos_logins() >= 2);
}
