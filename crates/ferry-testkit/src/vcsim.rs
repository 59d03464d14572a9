//! govmomi's vCenter simulator (`vcsim`, built from Debian's govmomi sources by
//! `tests/peers/install.sh` into `$FERRY_PEERS_DIR/bin`), on a free loopback port over TLS.

use crate::process::{PeerProcess, tcp_ready};
use crate::{free_port, scratch_dir, tool};
use std::process::Command;

/// A running vcsim.
#[derive(Debug)]
pub struct Vcsim {
    process: PeerProcess,
    url: String,
    fingerprint: String,
    _dir: tempfile::TempDir,
}

impl Vcsim {
    /// Starts vcsim's default vCenter model (1 datacenter, 1 cluster of 3 hosts, 1 standalone
    /// host, 1 datastore, 2 VMs per resource pool: 4 VMs).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts vcsim with extra flags (`-vm N`, `-host N`, `-cluster N`, `-ds N`, `-plain`, …).
    pub fn start_with(extra: &[&str]) -> Self {
        let bin = tool("vcsim");
        let dir = scratch_dir();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["-l", &format!("127.0.0.1:{port}"), "-stdin=false"])
            .args(extra)
            // vcsim keeps the datastores' files under TMPDIR: inside the guard's directory.
            .env("TMPDIR", dir.path());
        let mut process = PeerProcess::spawn("vcsim", cmd, &dir.path().join("vcsim.log"));
        let mut line = None;
        process.wait_until("printing its URL", || {
            line = process_line(&dir.path().join("vcsim.log"));
            line.is_some() && tcp_ready(port)
        });
        let v: serde_json::Value =
            serde_json::from_str(line.as_deref().unwrap_or("")).expect("vcsim's JSON line");
        Self {
            url: v["url"].as_str().unwrap_or_default().to_string(),
            fingerprint: v["tls_fingerprint"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            process,
            _dir: dir,
        }
    }

    /// The SDK URL, `https://127.0.0.1:PORT/sdk`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `sha256:AB:…` of vcsim's self-signed certificate (empty with `-plain`).
    pub fn tls_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The login user.
    pub fn username(&self) -> &str {
        "user"
    }

    /// The login password.
    pub fn password(&self) -> &str {
        "pass"
    }

    /// vcsim's output so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

fn process_line(log: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .find(|l| l.starts_with('{') && l.contains("\"url\""))
        .map(String::from)
}
