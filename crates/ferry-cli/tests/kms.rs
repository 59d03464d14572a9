//! Repository keys wrapped by AWS KMS (ADR 0182), end to end through the `ferry` binary against
//! moto, which serves KMS and S3 on one port. Keys are created, disabled, re-enabled and
//! rotated with AWS's own SDK (`tests/kms_probe.py`, boto3), which also decrypts a slot's
//! ciphertext independently of ferry to show the slot file holds no plaintext master key.

#[path = "common/cli.rs"]
mod cli;

use base64::Engine as _;
use std::path::Path;
use std::process::{Command, Output};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const PW: &str = "kms test password";
/// moto accepts any credentials; a distinctive secret shows it never reaches any output.
const SECRET: &str = "kms-test-secret-Zq81xWv0";

/// moto's environment with our secret; without the endpoint variables when `endpoint_env` is
/// false (a slot's stored endpoint must then be what reaches KMS).
fn env(moto: &ferry_testkit::Moto, endpoint_env: bool) -> Vec<(String, String)> {
    moto.env()
        .into_iter()
        .filter(|(k, _)| endpoint_env || !k.starts_with("AWS_ENDPOINT"))
        .map(|(k, v)| match k.as_str() {
            "AWS_SECRET_ACCESS_KEY" => (k, SECRET.to_string()),
            _ => (k, v),
        })
        .chain([("HOME".to_string(), "/nonexistent".to_string())])
        .collect()
}

/// moto with one KMS key, its environment (see [`env`]) and a scratch directory.
struct Lab {
    moto: ferry_testkit::Moto,
    env: Vec<(String, String)>,
    key: String,
    dir: tempfile::TempDir,
}

fn lab(endpoint_env: bool) -> Lab {
    let moto = ferry_testkit::Moto::start();
    Lab {
        env: env(&moto, endpoint_env),
        key: create_key(&moto),
        dir: ferry_testkit::scratch_dir(),
        moto,
    }
}

fn ferry(args: &[&str], env: &[(String, String)], password: bool) -> Output {
    let mut c = Command::new(FERRY);
    c.args(args)
        .env_remove("RUST_LOG")
        .env_remove("FERRY_PASSWORD")
        .env_remove("FERRY_REPO")
        .env_remove("AWS_PROFILE")
        .envs(env.iter().cloned());
    if password {
        c.env("FERRY_PASSWORD", PW);
    }
    let out = c.output().expect("run ferry");
    for stream in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(stream);
        assert!(
            !text.contains(SECRET),
            "the AWS secret leaked in `ferry {args:?}`: {text}"
        );
        assert!(
            !text.contains("panicked"),
            "ferry {args:?} panicked: {text}"
        );
    }
    out
}

fn ok(args: &[&str], env: &[(String, String)], password: bool) -> String {
    let out = ferry(args, env, password);
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `ferry` expecting failure; its stderr.
fn fails(args: &[&str], env: &[(String, String)], password: bool) -> String {
    let out = ferry(args, env, password);
    assert!(
        !out.status.success(),
        "ferry {args:?} should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn probe(moto: &ferry_testkit::Moto, args: &[&str]) -> serde_json::Value {
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv with boto3 from moto) not found: run tests/peers/install.sh"
    );
    let mut c = Command::new(python);
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kms_probe.py"))
        .args(args)
        .envs(moto.env());
    let out = ferry_testkit::run_ok(&mut c);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("probe {args:?}: {e}: {out}"))
}

fn create_key(moto: &ferry_testkit::Moto) -> String {
    probe(moto, &["create-key"])["key_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn key_list(repo: &str, env: &[(String, String)]) -> Vec<serde_json::Value> {
    let out = ok(
        &["repo", "key", "list", "--repo", repo, "--json"],
        env,
        false,
    );
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

fn kms_slots(repo: &str, env: &[(String, String)]) -> Vec<serde_json::Value> {
    key_list(repo, env)
        .into_iter()
        .filter(|s| s["kind"] == "aws-kms")
        .collect()
}

/// A disk image with data in some chunks and holes in others.
fn disk(dir: &Path) -> (String, Vec<u8>) {
    let mut data = vec![0u8; 5 * (64 << 10) + 123];
    for (i, b) in data.iter_mut().enumerate().take(3 * (64 << 10)) {
        *b = (i * 7 % 251) as u8;
    }
    let p = dir.join("disk0.raw");
    std::fs::write(&p, &data).unwrap();
    (format!("disk0={}", p.display()), data)
}

fn backup_and_restore(repo: &str, env: &[(String, String)], dir: &Path, name: &str) {
    let (spec, data) = disk(dir);
    ok(
        &["backup", "--repo", repo, "--vm", name, "--disk", &spec],
        env,
        false,
    );
    let out = dir.join(format!("{name}.restored"));
    ok(
        &[
            "restore",
            &format!("{name}@latest"),
            "--repo",
            repo,
            "--to",
            out.to_str().unwrap(),
        ],
        env,
        false,
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "{name}: restored data differs"
    );
}

/// Rewrites the JSON body of the slot object at `path` (header kept, length updated).
fn rewrite_slot(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let raw = std::fs::read(path).unwrap();
    let mut body: serde_json::Value = serde_json::from_slice(&raw[12..]).unwrap();
    edit(&mut body);
    let json = serde_json::to_vec(&body).unwrap();
    let mut out = raw[..8].to_vec();
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    std::fs::write(path, out).unwrap();
}

fn repo_id(repo: &str, env: &[(String, String)]) -> String {
    let out = ok(&["repo", "info", "--repo", repo, "--json"], env, false);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// Local repository: init with `--kms` (endpoint stored in the slot, none in the environment),
/// backup and restore with no password, the slot holds no plaintext key, a disabled key fails
/// clearly while the password slot still opens, re-enabling and rotation keep it working, a
/// second KMS slot, `--kms KEYID` forcing, removal refused for the last slot, an unreachable
/// endpoint and a tampered ciphertext fail clearly.
#[test]
fn local_repository_unlocked_by_kms() {
    let Lab {
        moto,
        env,
        key,
        dir,
    } = lab(false);
    let repo = dir.path().join("repo").display().to_string();
    let endpoint = moto.endpoint();

    // A password slot too, so a disabled key can be worked around.
    let out = ok(
        &[
            "repo",
            "init",
            "--repo",
            &repo,
            "--kms",
            &key,
            "--kms-endpoint",
            &endpoint,
            "--chunk-size",
            "64K",
        ],
        &env,
        true,
    );
    assert!(out.contains(&format!("AWS KMS key {key}")), "{out}");
    let slots = key_list(&repo, &env);
    assert_eq!(slots.len(), 2, "{slots:?}");
    let kms = kms_slots(&repo, &env);
    assert_eq!(kms.len(), 1);
    assert_eq!(kms[0]["kms-key-id"], key.as_str());
    assert_eq!(kms[0]["endpoint"], endpoint.as_str());
    assert_eq!(kms[0]["region"], "us-east-1");
    assert!(kms[0]["kms-key-arn"].as_str().unwrap().ends_with(&key));
    assert!(kms[0].get("ciphertext").is_none(), "no ciphertext listed");
    let human = ok(&["repo", "key", "list", "--repo", &repo], &env, false);
    assert!(human.contains("aws-kms") && human.contains(&key), "{human}");
    let info = ok(&["repo", "info", "--repo", &repo], &env, false);
    assert!(info.contains(&format!("AWS KMS keys: {key}")), "{info}");

    // The raw slot: our format, the KMS ciphertext, and not the master key in any spelling
    // (the master key comes from AWS's SDK decrypting the ciphertext with ferry's context).
    let slot_key = kms[0]["key"].as_str().unwrap().to_string();
    let raw = std::fs::read(Path::new(&repo).join(&slot_key)).unwrap();
    assert_eq!(&raw[..6], b"FRYW\x01\x00");
    let body: serde_json::Value = serde_json::from_slice(&raw[12..]).unwrap();
    let blob = body["ciphertext"].as_str().unwrap();
    let id = repo_id(&repo, &env);
    let plain = probe(&moto, &["decrypt", blob, &id, &slot_key]);
    let b64 = base64::engine::general_purpose::STANDARD;
    let master = b64.decode(plain["plaintext"].as_str().unwrap()).unwrap();
    assert_eq!(master.len(), 32);
    let hex: String = master.iter().map(|b| format!("{b:02x}")).collect();
    let text = String::from_utf8_lossy(&raw);
    assert!(!raw.windows(32).any(|w| w == master.as_slice()));
    assert!(!text.to_ascii_lowercase().contains(&hex));
    assert!(!text.contains(&b64.encode(&master)));

    // No password: the KMS slot opens the repository for every command.
    backup_and_restore(&repo, &env, dir.path(), "vm1");
    ok(&["verify", "--repo", &repo], &env, false);
    // The secret and the master key never reach the log, even at trace level.
    let out = ferry(&["snapshots", "--repo", &repo, "-vvv"], &env, false);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("KMS"),
        "the trace log shows the KMS unlock: {log}"
    );
    assert!(!log.to_ascii_lowercase().contains(&hex) && !log.contains(&b64.encode(&master)));

    // Disabled key: a clear error without a password; the password slot still opens.
    probe(&moto, &["disable", &key]);
    let err = fails(&["snapshots", "--repo", &repo], &env, false);
    assert!(err.contains("disabled") && err.contains(&key), "{err}");
    ok(&["snapshots", "--repo", &repo], &env, true);
    // `--kms` forces the KMS slot even with a password.
    let err = fails(&["snapshots", "--repo", &repo, "--kms"], &env, true);
    assert!(err.contains("disabled"), "{err}");
    probe(&moto, &["enable", &key]);
    ok(&["snapshots", "--repo", &repo, "--kms"], &env, true);

    // Rotation: the old ciphertext still decrypts.
    let r = probe(&moto, &["rotate", &key]);
    assert_eq!(r["rotation_enabled"], true);
    backup_and_restore(&repo, &env, dir.path(), "vm2");

    // A second KMS key: `--kms KEYID` picks its slot; with the first disabled it still opens.
    let key2 = create_key(&moto);
    let out = ok(
        &[
            "repo",
            "key",
            "add",
            "--repo",
            &repo,
            "--kms",
            &key2,
            "--kms-endpoint",
            &endpoint,
        ],
        &env,
        false,
    );
    assert!(out.contains("added key slot keys/"), "{out}");
    assert_eq!(kms_slots(&repo, &env).len(), 2);
    probe(&moto, &["disable", &key]);
    // A key policy without kms:DescribeKey: the state check is skipped, Decrypt still opens.
    probe(&moto, &["deny-describe", &key2]);
    ok(&["snapshots", "--repo", &repo, "--kms", &key2], &env, false);
    let err = fails(&["snapshots", "--repo", &repo, "--kms", &key], &env, false);
    assert!(err.contains("disabled"), "{err}");
    ok(&["snapshots", "--repo", &repo], &env, false);
    let err = fails(
        &["snapshots", "--repo", &repo, "--kms", "alias/none"],
        &env,
        false,
    );
    assert!(err.contains("no KMS key slot of key alias/none"), "{err}");
    probe(&moto, &["enable", &key]);

    // Unreachable KMS (endpoint replaced): clear error, the repository location named.
    let err = fails(
        &[
            "snapshots",
            "--repo",
            &repo,
            "--kms-endpoint",
            "http://127.0.0.1:1",
        ],
        &env,
        false,
    );
    assert!(err.contains("unreachable") && err.contains(&repo), "{err}");

    // Removing slots: the password slot goes, the last KMS slots cannot all go.
    let pw_slot = key_list(&repo, &env)
        .into_iter()
        .find(|s| s["kind"] == "password")
        .unwrap();
    ok(
        &[
            "repo",
            "key",
            "remove",
            "--repo",
            &repo,
            pw_slot["key"].as_str().unwrap(),
        ],
        &env,
        false,
    );
    let err = fails(&["snapshots", "--repo", &repo], &env, true);
    assert!(err.contains("wrong password"), "{err}");
    ok(
        &["repo", "key", "remove", "--repo", &repo, &slot_key],
        &env,
        false,
    );
    let last = kms_slots(&repo, &env);
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["kms-key-id"], key2.as_str());
    let err = fails(
        &[
            "repo",
            "key",
            "remove",
            "--repo",
            &repo,
            last[0]["key"].as_str().unwrap(),
        ],
        &env,
        false,
    );
    assert!(err.contains("last usable key slot"), "{err}");
    let err = fails(
        &["repo", "key", "remove", "--repo", &repo, "keys/nosuch"],
        &env,
        false,
    );
    assert!(err.contains("no key slot"), "{err}");

    // The slot naming another key than its ciphertext's: KMS denies access; ferry says so.
    let last_key = last[0]["key"].as_str().unwrap();
    let path = Path::new(&repo).join(last_key);
    let original = std::fs::read(&path).unwrap();
    rewrite_slot(&path, |body| body["key-id"] = key.as_str().into());
    let err = fails(&["snapshots", "--repo", &repo], &env, false);
    assert!(
        err.contains("access denied") && err.contains("AccessDeniedException"),
        "{err}"
    );
    std::fs::write(&path, &original).unwrap();
    ok(&["snapshots", "--repo", &repo], &env, false);
    // A tampered ciphertext: KMS refuses it; ferry says so and does not panic.
    rewrite_slot(&path, |body| {
        let mut blob = b64.decode(body["ciphertext"].as_str().unwrap()).unwrap();
        let n = blob.len();
        blob[n - 5] ^= 0x40;
        body["ciphertext"] = b64.encode(&blob).into();
    });
    let err = fails(&["snapshots", "--repo", &repo], &env, false);
    assert!(
        err.contains("refused the ciphertext") && err.contains(last_key),
        "{err}"
    );
    // Rubbish instead of a slot: named as corrupt, not a panic.
    std::fs::write(&path, b"FRYW\x01\x00\x00\x00\x02\x00\x00\x00{}").unwrap();
    let err = fails(&["snapshots", "--repo", &repo], &env, false);
    assert!(err.contains("corrupt") && err.contains(last_key), "{err}");
}

/// S3 repository (endpoint from the environment): init with `--kms` and no password, backup
/// and restore; a KMS slot copied into another repository is refused (encryption context);
/// `repo init` without password or key is refused.
#[test]
fn s3_repository_unlocked_by_kms_and_slots_bound_to_their_repository() {
    let Lab {
        moto,
        env,
        key,
        dir,
    } = lab(true);
    let a = format!("{}/a", moto.url());
    let b = format!("{}/b", moto.url());

    let err = fails(&["repo", "init", "--repo", &a], &env, false);
    assert!(err.contains("--kms KEYID"), "{err}");
    let err = fails(
        &[
            "repo",
            "init",
            "--repo",
            &a,
            "--kms",
            &key,
            "--insecure-no-encryption",
        ],
        &env,
        false,
    );
    assert!(err.contains("--insecure-no-encryption"), "{err}");
    // Init against an unknown key writes nothing.
    let err = fails(
        &["repo", "init", "--repo", &a, "--kms", "alias/missing"],
        &env,
        false,
    );
    assert!(err.contains("alias/missing"), "{err}");
    let err = fails(&["repo", "info", "--repo", &a], &env, false);
    assert!(err.contains("no ferry repository"), "{err}");

    ok(
        &[
            "repo",
            "init",
            "--repo",
            &a,
            "--kms",
            &key,
            "--chunk-size",
            "64K",
        ],
        &env,
        false,
    );
    let slots = key_list(&a, &env);
    assert_eq!(slots.len(), 1, "only the KMS slot: {slots:?}");
    assert!(
        slots[0].get("endpoint").is_none(),
        "no endpoint stored: {slots:?}"
    );
    backup_and_restore(&a, &env, dir.path(), "s3vm");
    // Credentials from the shared credentials file (profile), as for S3 itself.
    let creds = dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!("[other]\naws_access_key_id = testing\naws_secret_access_key = {SECRET}\n"),
    )
    .unwrap();
    let mut file_env: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS_KEY") && !k.starts_with("AWS_SECRET"))
        .cloned()
        .collect();
    file_env.push((
        "AWS_SHARED_CREDENTIALS_FILE".into(),
        creds.display().to_string(),
    ));
    let err = fails(&["snapshots", "--repo", &a], &file_env, false);
    assert!(err.contains("no S3 credentials found"), "{err}");
    file_env.push(("AWS_PROFILE".into(), "other".into()));
    ok(&["snapshots", "--repo", &a], &file_env, false);
    // The key in another region: KMS there does not know it.
    let err = fails(
        &[
            "repo",
            "key",
            "add",
            "--repo",
            &a,
            "--kms",
            &key,
            "--kms-region",
            "eu-west-1",
        ],
        &env,
        false,
    );
    assert!(err.contains("does not exist in region eu-west-1"), "{err}");
    assert_eq!(key_list(&a, &env).len(), 1, "nothing added");

    // Repository b has only a password; a's KMS slot copied into it (same object key) does not
    // decrypt there: the encryption context names repository a.
    ok(
        &["repo", "init", "--repo", &b, "--chunk-size", "64K"],
        &env,
        true,
    );
    let slot = slots[0]["key"].as_str().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sa = ferry_repo::Store::open_with(&a, false, &env).unwrap();
        let sb = ferry_repo::Store::open_with(&b, false, &env).unwrap();
        let data = sa.get(slot).await.unwrap();
        sb.create(slot, data).await.unwrap();
    });
    let err = fails(&["snapshots", "--repo", &b], &env, false);
    assert!(
        err.contains("encryption context mismatch") && err.contains(slot),
        "{err}"
    );
    // b's own password still opens it.
    ok(&["snapshots", "--repo", &b], &env, true);
    // A password slot added to a KMS-only repository (unlocked by KMS) opens it afterwards.
    let mut c = env.clone();
    c.push(("FERRY_NEW_PASSWORD".into(), PW.into()));
    let out = ok(&["repo", "key", "add", "--repo", &a], &c, false);
    assert!(out.contains("(password)"), "{out}");
    probe(&moto, &["disable", &key]);
    ok(&["snapshots", "--repo", &a], &env, true);
}

/// The appliance: a repository created through the API with a KMS key and no password
/// (`kms` in `ferry.toml`), opened by the service through its KMS slot; a disabled key is a
/// clear API error, re-enabled it works again.
#[test]
fn appliance_repository_unlocked_by_kms() {
    let Lab {
        moto,
        env,
        key,
        dir,
    } = lab(false);
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, "").unwrap();
    let repo = dir.path().join("repo").display().to_string();
    let (_serve, info) =
        cli::serve_with_admin_env(&dir.path().join("state"), &config, "admin pw", &env);
    let http = cli::pinned_client(&info);
    let base = info["url"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let call = |method: reqwest::Method,
                path: &str,
                body: Option<serde_json::Value>,
                token: Option<&str>| {
        let mut r = http.request(method, format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        rt.block_on(async {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (
                status,
                serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default(),
                text,
            )
        })
    };
    let (s, login, text) = call(
        reqwest::Method::POST,
        "/api/login",
        Some(serde_json::json!({"username": "admin", "password": "admin pw"})),
        None,
    );
    assert_eq!(s, 200, "{text}");
    let token = login["token"].as_str().unwrap().to_string();
    let t = Some(token.as_str());

    let (s, _, text) = call(
        reqwest::Method::PUT,
        "/api/repositories/kms",
        Some(serde_json::json!({
            "url": repo,
            "kms": {"key_id": key, "endpoint": moto.endpoint()},
            "init": true,
        })),
        t,
    );
    assert_eq!(s, 201, "{text}");
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(
        toml.contains("[repositories.kms") && toml.contains(&key) && !toml.contains("password"),
        "{toml}"
    );
    assert_eq!(kms_slots(&repo, &env).len(), 1);
    let points = "/api/repositories/kms/restore-points";
    let (s, body, text) = call(reqwest::Method::GET, points, None, t);
    assert_eq!(s, 200, "{text}");
    assert_eq!(body.as_array().unwrap().len(), 0);
    // A backup by the CLI (no password either) shows up through the service.
    let (spec, _) = disk(dir.path());
    ok(
        &["backup", "--repo", &repo, "--vm", "apvm", "--disk", &spec],
        &env,
        false,
    );
    let (s, body, text) = call(reqwest::Method::GET, points, None, t);
    assert_eq!(s, 200, "{text}");
    assert_eq!(body.as_array().unwrap().len(), 1, "{text}");

    probe(&moto, &["disable", &key]);
    let (s, _, text) = call(reqwest::Method::GET, points, None, t);
    assert_eq!(s, 502, "{text}");
    assert!(
        text.contains("disabled") && !text.contains(SECRET),
        "{text}"
    );
    probe(&moto, &["enable", &key]);
    let (s, _, text) = call(reqwest::Method::GET, points, None, t);
    assert_eq!(s, 200, "{text}");
}
