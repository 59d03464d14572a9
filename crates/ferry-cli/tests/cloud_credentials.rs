//! S3 and Azure repositories without credentials: one line naming the settings that provide
//! them, no request to the instance metadata service unless the operator opted in, and the
//! AWS shared credentials file as a source. Every address these tests give ferry is a loopback
//! listener of the test (standing in for the metadata service and the cloud endpoint), so
//! nothing can reach a real metadata address even if the code under test tried.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// A loopback HTTP server that counts connections and answers every request `400 Bad
/// Request` (an answer object_store does not retry).
struct Listener {
    url: String,
    hits: Arc<AtomicUsize>,
}

impl Listener {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let url = format!("http://{}", l.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        std::thread::spawn(move || {
            for stream in l.incoming() {
                let Ok(mut s) = stream else { continue };
                h.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf);
                let _ = s.write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        Self { url, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `ferry ARGS` with nothing in its environment but `vars`, a `PATH` and an empty `HOME`.
fn ferry_bare(home: &std::path::Path, args: &[&str], vars: &[(String, String)]) -> Output {
    let mut all = env(&[
        ("HOME", home.to_str().unwrap()),
        ("FERRY_PASSWORD", "cloud test password"),
    ]);
    all.extend_from_slice(vars);
    ferry_testkit::run_logged_env_clear(FERRY, args, &all)
}

/// The failure is one line naming the missing credentials and where they come from, and says
/// nothing about metadata addresses.
fn assert_one_line_refusal(out: &Output, cloud: &str, names: &[&str]) {
    assert!(!out.status.success(), "must fail without credentials");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, not a log or retries: {stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{line}");
    assert_eq!(
        line.matches(&format!("no {cloud} credentials found"))
            .count(),
        1,
        "{line}"
    );
    for n in names {
        assert!(line.contains(n), "the message names {n}: {line}");
    }
    assert!(
        !line.contains("169.254") && !line.contains("Error fetching credentials"),
        "{line}"
    );
}

/// A failed credential request is reported on one line, once: object_store's errors repeat
/// their causes in their own text, and the CLI leaves the repetitions out.
fn assert_said_once(stderr: &str) {
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("400 Bad Request").count(), 1, "{stderr}");
}

#[test]
fn s3_without_credentials_fails_in_one_line_and_never_asks_instance_metadata() {
    let home = ferry_testkit::scratch_dir();
    let disk = home.path().join("disk.raw");
    std::fs::write(&disk, vec![7u8; 100_000]).unwrap();
    let (imds, s3) = (Listener::start(), Listener::start());
    let vars = env(&[
        ("AWS_METADATA_ENDPOINT", &imds.url),
        ("AWS_ENDPOINT", &s3.url),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
    ]);
    let repo = "s3://bucket/ferry";
    let names = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "~/.aws/credentials",
        "FERRY_S3_INSTANCE_METADATA=true",
    ];
    let out = ferry_bare(home.path(), &["repo", "init", "--repo", repo], &vars);
    assert_one_line_refusal(&out, "S3", &names);
    let out = ferry_bare(
        home.path(),
        &[
            "backup",
            "--repo",
            repo,
            "--vm",
            "v",
            "--disk",
            disk.to_str().unwrap(),
        ],
        &vars,
    );
    assert_one_line_refusal(&out, "S3", &names);
    assert_eq!(imds.hits(), 0, "the metadata service was asked");
    assert_eq!(s3.hits(), 0, "S3 was asked without credentials");

    // Opted in (an appliance on EC2): the metadata service is asked, here the test's listener.
    let mut opted = vars.clone();
    opted.extend(env(&[("FERRY_S3_INSTANCE_METADATA", "true")]));
    let out = ferry_bare(home.path(), &["repo", "init", "--repo", repo], &opted);
    assert!(
        !out.status.success(),
        "the stand-in metadata service gives nothing"
    );
    assert!(imds.hits() >= 1, "opting in must ask the metadata service");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("no S3 credentials found"),
        "opted in, the credential check must not refuse"
    );
    assert_said_once(&err);
}

#[test]
fn azure_without_credentials_fails_in_one_line_and_never_asks_managed_identity() {
    let home = ferry_testkit::scratch_dir();
    let (msi, blob) = (Listener::start(), Listener::start());
    let msi_url = format!("{}/metadata/identity/oauth2/token", msi.url);
    let blob_url = format!("{}/devstoreaccount1", blob.url);
    let vars = env(&[
        ("AZURE_STORAGE_ACCOUNT_NAME", "devstoreaccount1"),
        ("AZURE_STORAGE_ENDPOINT", &blob_url),
        ("AZURE_ALLOW_HTTP", "true"),
        ("AZURE_MSI_ENDPOINT", &msi_url),
    ]);
    let repo = "az://container/ferry";
    let out = ferry_bare(home.path(), &["repo", "init", "--repo", repo], &vars);
    assert_one_line_refusal(
        &out,
        "Azure",
        &[
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_SAS_TOKEN",
            "FERRY_AZURE_MANAGED_IDENTITY=true",
        ],
    );
    let out = ferry_bare(home.path(), &["snapshots", "--repo", repo], &vars);
    assert_one_line_refusal(&out, "Azure", &["AZURE_STORAGE_ACCOUNT_KEY"]);
    assert_eq!(msi.hits(), 0, "the managed identity endpoint was asked");
    assert_eq!(blob.hits(), 0, "Azure was asked without credentials");

    let mut opted = vars.clone();
    opted.extend(env(&[("FERRY_AZURE_MANAGED_IDENTITY", "true")]));
    let out = ferry_bare(home.path(), &["repo", "init", "--repo", repo], &opted);
    assert!(!out.status.success());
    assert!(
        msi.hits() >= 1,
        "opting in must ask the managed identity endpoint"
    );
}

#[test]
fn s3_takes_keys_from_the_shared_credentials_file() {
    let moto = ferry_testkit::Moto::start();
    let home = ferry_testkit::scratch_dir();
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::write(
        home.path().join(".aws/credentials"),
        format!(
            "[other]\naws_access_key_id = nobody\n\n[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            moto.access_key_id(),
            moto.secret_access_key()
        ),
    )
    .unwrap();
    // moto's settings without its keys: those come from the file.
    let vars: Vec<(String, String)> = moto
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS_KEY") && !k.starts_with("AWS_SECRET"))
        .collect();
    let repo = format!("{}/from-file", moto.url());
    let out = ferry_bare(
        home.path(),
        &["repo", "init", "--repo", &repo, "--chunk-size", "64K"],
        &vars,
    );
    assert!(out.status.success(), "init with the credentials file");
    let out = ferry_bare(home.path(), &["snapshots", "--repo", &repo], &vars);
    assert!(out.status.success(), "snapshots with the credentials file");
    // The secret is never echoed.
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains(moto.secret_access_key()), "{all}");
    // A profile without keys is no credentials.
    let mut other = vars.clone();
    other.extend(env(&[("AWS_PROFILE", "other")]));
    let out = ferry_bare(home.path(), &["snapshots", "--repo", &repo], &other);
    assert_one_line_refusal(&out, "S3", &["AWS_PROFILE"]);
}
