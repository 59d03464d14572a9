//! moto in server mode: an S3 endpoint on loopback with one bucket.

use crate::process::{PeerProcess, http_status};
use crate::{free_port, scratch_dir, tool};
use std::process::Command;

/// A running moto server with a bucket created.
#[derive(Debug)]
pub struct Moto {
    process: PeerProcess,
    port: u16,
    bucket: String,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts `moto_server` on a free port and creates bucket `ferry-test`.
    pub fn start() -> Self {
        Self::start_with_bucket("ferry-test")
    }

    /// Starts `moto_server` on a free port and creates `bucket`.
    pub fn start_with_bucket(bucket: &str) -> Self {
        let moto = tool("moto_server");
        let dir = scratch_dir();
        let port = free_port();
        let mut cmd = Command::new(moto);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            // moto checks no signatures by default; keep it from reaching out for anything.
            .env("MOTO_ALLOW_NONEXISTENT_REGION", "false")
            .env("AWS_DEFAULT_REGION", "us-east-1");
        let mut process = PeerProcess::spawn("moto_server", cmd, &dir.path().join("moto.log"));
        process.wait_until("answering HTTP", || http_status(port, "GET", "/").is_some());
        let status = http_status(port, "PUT", &format!("/{bucket}"));
        assert_eq!(
            status,
            Some(200),
            "moto: creating bucket {bucket} answered {status:?}"
        );
        Self {
            process,
            port,
            bucket: bucket.to_string(),
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The bucket that was created.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The region to use.
    pub fn region(&self) -> &str {
        "us-east-1"
    }

    /// Access key id (moto accepts any).
    pub fn access_key_id(&self) -> &str {
        "testing"
    }

    /// Secret access key (moto accepts any).
    pub fn secret_access_key(&self) -> &str {
        "testing"
    }

    /// `s3://BUCKET`.
    pub fn url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// The environment variables `object_store`'s `AmazonS3Builder::from_env` (and the AWS SDKs) read.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", self.access_key_id().into()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key().into()),
            ("AWS_DEFAULT_REGION", self.region().into()),
            ("AWS_REGION", self.region().into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// moto's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// moto's output so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
