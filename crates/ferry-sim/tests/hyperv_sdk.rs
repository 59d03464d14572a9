//! Fidelity: the vendors' Python clients drive `ferry sim hyperv` — pywinrm's `run_cmd` through
//! the WinRS shell cycle on the HTTPS and HTTP listeners (and a refused password), pypsrp's
//! generic WSMan class for WMI: a WQL-filtered Enumerate paged by Pull, Get by selectors,
//! CreateSnapshot with an embedded CIM-XML instance and its job, DestroySnapshot, and the fault
//! for a missing object — with Basic, and with NTLM and message encryption (pywinrm
//! `message_encryption='always'` over HTTP and `'auto'` over HTTPS, pypsrp `encryption='always'`
//! over HTTP), where an unsealed body over HTTP is refused as Windows refuses it.

use ferry_sim::hyperv::{HypervSim, HypervSimConfig};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pywinrm_and_pypsrp_accept_the_simulator() {
    let v = run_script("basic").await;
    check(&v);
    assert_eq!(v["encrypted_http"], false, "{v}");
    assert_eq!(v["pypsrp_encrypted"], false, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pywinrm_and_pypsrp_log_in_with_ntlm_and_encrypt() {
    let v = run_script("ntlm").await;
    check(&v);
    // Sealed over HTTP, TLS alone over HTTPS ('auto'), and no clear text over HTTP.
    assert_eq!(v["encrypted_http"], true, "{v}");
    assert_eq!(v["encrypted_https"], false, "{v}");
    assert_eq!(v["pypsrp_encrypted"], true, "{v}");
    assert_eq!(v["unencrypted_http"], "InvalidCredentialsError", "{v}");
}

async fn run_script(auth: &'static str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HypervSimConfig::new(dir.path());
    cfg.listen_http = Some("127.0.0.1:0".parse().unwrap());
    let sim = HypervSim::start(cfg).await.unwrap();
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv) not found: run tests/peers/install.sh"
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hyperv_sdk.py");
    let (url, http_url) = (sim.url().to_string(), sim.http_url().unwrap().to_string());
    let (user, pass) = (sim.username().to_string(), sim.password().to_string());
    let o = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args([script, &url, &http_url, &user, &pass, auth])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        o.status.success(),
        "script failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn check(v: &serde_json::Value) {
    assert_eq!(
        v["hostname_https"],
        serde_json::json!(["HV-SIM-01", 0]),
        "{v}"
    );
    assert_eq!(
        v["hostname_http"],
        serde_json::json!(["HV-SIM-01", 0]),
        "{v}"
    );
    assert_eq!(v["echo"], serde_json::json!(["hello world", 0]), "{v}");
    assert_eq!(v["unknown"][1], 1, "{v}");
    assert!(
        v["unknown"][0]
            .as_str()
            .unwrap()
            .contains("is not recognized"),
        "{v}"
    );
    assert_eq!(v["bad_password"], "InvalidCredentialsError", "{v}");
    assert_eq!(
        v["vms"],
        serde_json::json!([
            "linux-web-01",
            "win-dyn-01",
            "win-file-01",
            "win-split-01",
            "win-sql-01"
        ]),
        "{v}"
    );
    // Five VMs in pages of two: two in the Enumerate answer, then two Pulls.
    assert_eq!(v["pulls"], 2, "{v}");
    // The host and its five guests.
    assert_eq!(v["systems"], 6, "{v}");
    assert_eq!(v["get"], "win-sql-01", "{v}");
    assert_eq!(v["create_rv"], "4096", "{v}");
    assert_eq!(v["job_state"], "7", "{v}");
    assert_eq!(v["recovery_snapshots"], 1, "{v}");
    assert_eq!(v["destroy_rv"], "4096", "{v}");
    assert_eq!(v["recovery_snapshots_after"], 0, "{v}");
    assert!(
        v["missing"].as_str().unwrap().contains("invalid selectors"),
        "{v}"
    );
}
