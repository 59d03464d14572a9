//! `ferry sim xen` and `ferry vms --source` through the `ferry` binary.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Sim(Child);
impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
}

#[test]
fn sim_then_vms_lists_the_seeded_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = ferry()
        .args([
            "sim",
            "xen",
            "--listen",
            "127.0.0.1:0",
            "--disk-mib",
            "4",
            "--dir",
        ])
        .arg(dir.path().join("sim"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _guard = Sim(child);
    let info: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    for k in ["url", "username", "password", "tls_fingerprint"] {
        assert!(
            info[k].as_str().is_some_and(|v| !v.is_empty()),
            "{k} missing: {line}"
        );
    }
    let pw = dir.path().join("pw");
    std::fs::write(&pw, info["password"].as_str().unwrap()).unwrap();
    let cfg = dir.path().join("ferry.toml");
    std::fs::write(
        &cfg,
        format!(
            "[sources.lab]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\n",
            info["url"].as_str().unwrap(),
            info["username"].as_str().unwrap(),
            pw.display(),
            info["tls_fingerprint"].as_str().unwrap(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let out = ferry_testkit::run_ok(
        ferry()
            .args(["vms", "--source", "lab", "--json", "--config"])
            .arg(&cfg),
    );
    let vms: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["debian-web", "ferry-proxy", "win-db"]);
    assert_eq!(vms[0]["disks"].as_array().unwrap().len(), 2);
    assert_eq!(vms[0]["power-state"], "running");
    let table = ferry_testkit::run_ok(
        ferry()
            .args(["vms", "--source", "lab"])
            .env("FERRY_CONFIG", &cfg),
    );
    assert!(
        table.starts_with("NAME") && table.contains("win-db"),
        "{table}"
    );

    // A wrong pin is refused, and the password never shows.
    let bad = std::fs::read_to_string(&cfg).unwrap().replace(
        info["tls_fingerprint"].as_str().unwrap(),
        "sha256:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00",
    );
    std::fs::write(&cfg, bad).unwrap();
    let o = ferry()
        .args(["vms", "--source", "lab", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("lab"), "{err}");
    assert!(!err.contains(info["password"].as_str().unwrap()), "{err}");
    let o = ferry()
        .args(["vms", "--source", "nope", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no source `nope`"),
        "{err}"
    );
}
