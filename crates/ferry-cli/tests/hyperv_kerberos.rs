//! `ferry backup` of a Hyper-V guest with `auth = "kerberos"` (ADR 0159): a throwaway MIT realm
//! (`ferry_testkit::MitKdc`), `ferry sim hyperv --kerberos-keytab` as the host holding the
//! `HTTP/127.0.0.1` key, WinRM over plain HTTP with every message sealed by the Kerberos
//! session, the KDC found through `KRB5_CONFIG` as on a Linux appliance. A wrong password fails
//! the backup with the KDC's reason and never shows the secret.

use ferry_testkit::{Killed, MitKdc};
use serde_json::Value;
use std::process::{Command, Output};

const PASSWORD: &str = "test password";
const KRB_PASSWORD: &str = "Kerb-backup-pw-7";

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

fn ferry() -> Command {
    let mut c = cli::ferry();
    c.env("FERRY_PASSWORD", PASSWORD);
    c
}

struct Lab {
    dir: tempfile::TempDir,
    kdc: MitKdc,
    _sim: Killed,
}

impl Lab {
    fn start() -> Self {
        let kdc = MitKdc::start();
        kdc.add_user("backup", KRB_PASSWORD);
        let keytab = kdc.add_service("HTTP/127.0.0.1");
        let dir = ferry_testkit::scratch_dir();
        let (sim, info) = Killed::spawn_json_line(
            ferry()
                .args([
                    "sim",
                    "hyperv",
                    "--listen",
                    "127.0.0.1:0",
                    "--listen-http",
                    "127.0.0.1:0",
                    "--disk-mib",
                    "4",
                    "--username",
                    "backup",
                    "--kerberos-keytab",
                ])
                .arg(&keytab)
                .arg("--dir")
                .arg(dir.path().join("host")),
        );
        let url = info["http_url"].as_str().unwrap();
        assert!(url.starts_with("http://"), "{info}");
        let toml = format!(
            "[sources.lab]\nkind = \"hyperv\"\nurl = \"{url}\"\nauth = \"kerberos\"\nusername = \"backup@FERRY.TEST\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\ntransports = [\"san\"]\n[sources.lab.san-paths]\n'C:\\' = \"{}\"\n",
            dir.path().join("krb.pw").display(),
            info["tls_fingerprint"].as_str().unwrap(),
            dir.path().join("state").display(),
            info["san_paths"]["C:\\"].as_str().unwrap(),
        );
        std::fs::write(dir.path().join("ferry.toml"), toml).unwrap();
        std::fs::write(dir.path().join("krb.pw"), KRB_PASSWORD).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        hyperv_lab::init_repo(&rt, &dir.path().join("repo"), PASSWORD, None);
        Self {
            dir,
            kdc,
            _sim: sim,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut env = self.kdc.env();
        env.push(("FERRY_PASSWORD".into(), PASSWORD.into()));
        env.push((
            "FERRY_REPO".into(),
            self.dir.path().join("repo").display().to_string(),
        ));
        env.push((
            "FERRY_CONFIG".into(),
            self.dir.path().join("ferry.toml").display().to_string(),
        ));
        ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &env)
    }
}

#[test]
fn backup_with_kerberos_over_sealed_http_and_a_clear_refusal() {
    let lab = Lab::start();
    let out = lab.run(&["backup", "--source", "lab", "--vm", "win-file-01", "--json"]);
    assert!(out.status.success(), "ferry backup failed");
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &reports.as_array().unwrap()[0];
    assert!(r.get("error").is_none(), "{r}");
    assert!(r["snapshot"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
    // The KDC (found through KRB5_CONFIG) issued the backup user a ticket for the host.
    let log = lab.kdc.log();
    assert!(
        log.contains("backup@FERRY.TEST for HTTP/127.0.0.1@FERRY.TEST"),
        "{log}"
    );
    let out = lab.run(&["snapshots", "--json"]);
    assert!(out.status.success());
    let snaps: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");

    // A wrong password: the backup fails, naming the principal and the KDC's reason.
    std::fs::write(lab.dir.path().join("krb.pw"), "wrong-Kerb-pw").unwrap();
    let out = lab.run(&["backup", "--source", "lab", "--vm", "win-file-01"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backup@FERRY.TEST"), "{err}");
    assert!(err.to_lowercase().contains("preauth"), "{err}");
    assert!(!err.contains("wrong-Kerb-pw"), "{err}");
}
