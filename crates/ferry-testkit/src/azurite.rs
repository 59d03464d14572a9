//! Azurite's blob service on loopback with one container.

use crate::process::{PeerProcess, tcp_ready};
use crate::{free_port, run_ok, scratch_dir, tool};
use std::process::Command;

/// Azurite's fixed development account (public, documented by Microsoft; not a secret).
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite blob service with a container created.
#[derive(Debug)]
pub struct Azurite {
    process: PeerProcess,
    port: u16,
    container: String,
    _dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts `azurite-blob` on a free port and creates container `ferry-test`.
    pub fn start() -> Self {
        Self::start_with_container("ferry-test")
    }

    /// Starts `azurite-blob` on a free port and creates `container`.
    pub fn start_with_container(container: &str) -> Self {
        let azurite = tool("azurite-blob");
        let python = tool("python3");
        let dir = scratch_dir();
        let port = free_port();
        let mut cmd = Command::new(azurite);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path().join("data"))
            .args([
                "--skipApiVersionCheck",
                "--loose",
                "--disableProductStyleUrl",
            ]);
        let mut process = PeerProcess::spawn("azurite", cmd, &dir.path().join("azurite.log"));
        process.wait_until("listening", || tcp_ready(port));
        let me = Self {
            process,
            port,
            container: container.to_string(),
            _dir: dir,
        };
        // Container creation needs SharedKey auth; Microsoft's own SDK (from the peers venv) does it.
        let venv_python = crate::peers_dir().join("venv/bin/python3");
        let python = if venv_python.exists() {
            venv_python
        } else {
            python
        };
        run_ok(Command::new(python).args([
            "-c",
            "import sys\nfrom azure.storage.blob import BlobServiceClient\n\
             BlobServiceClient.from_connection_string(sys.argv[1]).create_container(sys.argv[2])",
            &me.connection_string(),
            container,
        ]));
        me
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// The storage account name.
    pub fn account(&self) -> &str {
        ACCOUNT
    }

    /// The account key (Azurite's well-known development key).
    pub fn access_key(&self) -> &str {
        KEY
    }

    /// The container that was created.
    pub fn container(&self) -> &str {
        &self.container
    }

    /// `az://CONTAINER`.
    pub fn url(&self) -> String {
        format!("az://{}", self.container)
    }

    /// An Azure Storage connection string for Microsoft's SDKs.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={};",
            self.endpoint()
        )
    }

    /// The environment variables `object_store`'s `MicrosoftAzureBuilder::from_env` reads.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT.to_string()),
            ("AZURE_STORAGE_ACCOUNT_KEY", KEY.to_string()),
            ("AZURE_STORAGE_ENDPOINT", self.endpoint()),
            ("AZURE_ALLOW_HTTP", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Azurite's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Azurite's output so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
