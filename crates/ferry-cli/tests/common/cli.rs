//! What the appliance and driver tests share: the `ferry` binary with a clean environment,
//! `ferry serve` with a first admin, an HTTPS client pinned to a service's certificate, the JSON
//! line a child prints when it is ready, and waiting for a line on a child's stderr.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command};
use std::time::{Duration, Instant};

/// The `ferry` binary, with no inherited log level, config or repository password.
#[allow(dead_code)]
pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("RUST_LOG")
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_PASSWORD");
    c
}

/// `ferry serve` on a free port with state in `state`, config `config` and a first admin
/// `admin` (password `admin_pw`); its JSON line.
#[allow(dead_code)]
pub fn serve_with_admin(
    state: &std::path::Path,
    config: &std::path::Path,
    admin_pw: &str,
) -> (ferry_testkit::Killed, Value) {
    ferry_testkit::Killed::spawn_json_line(
        ferry()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--init-admin",
                "admin",
                "--state-dir",
            ])
            .arg(state)
            .arg("--config")
            .arg(config)
            .env("FERRY_ADMIN_PASSWORD", admin_pw),
    )
}

/// Like [`serve_with_admin`], with extra environment variables for the service (cloud
/// credentials, endpoints).
#[allow(dead_code)]
pub fn serve_with_admin_env(
    state: &std::path::Path,
    config: &std::path::Path,
    admin_pw: &str,
    env: &[(String, String)],
) -> (ferry_testkit::Killed, Value) {
    let mut c = ferry();
    c.args(["serve", "--listen", "127.0.0.1:0", "--init-admin", "admin"])
        .arg("--state-dir")
        .arg(state)
        .arg("--config")
        .arg(config)
        .env("FERRY_ADMIN_PASSWORD", admin_pw)
        .envs(env.iter().cloned());
    ferry_testkit::Killed::spawn_json_line(&mut c)
}

/// An HTTPS client pinned to the certificate of the service whose JSON line is `info`.
#[allow(dead_code)]
pub fn pinned_client(info: &Value) -> reqwest::Client {
    let fp = ferry_tls::parse_fingerprint(info["tls_fingerprint"].as_str().unwrap()).unwrap();
    let tls = ferry_tls::client_config(&ferry_tls::Trust::Fingerprint(fp)).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .no_proxy()
        .build()
        .unwrap()
}

/// The first line `child` prints on stdout, parsed as JSON.
#[allow(dead_code)]
pub fn first_line(child: &mut Child) -> Value {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// Reads `child`'s stderr until a line contains `needle` (at most 60 s): the reader, and what
/// it read so far.
fn read_stderr_until(child: &mut Child, needle: &str) -> (BufReader<ChildStderr>, String) {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut l = String::new();
        assert!(
            err.read_line(&mut l).unwrap() > 0 && Instant::now() < deadline,
            "`{needle}` never came: {seen}"
        );
        seen.push_str(&l);
        if l.contains(needle) {
            return (err, seen);
        }
    }
}

/// Waits until `child` prints a stderr line containing `needle`, then keeps draining its
/// stderr in the background so it never blocks on a full pipe.
#[allow(dead_code)]
pub fn wait_for_stderr(child: &mut Child, needle: &str) {
    let (mut err, _) = read_stderr_until(child, needle);
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
}

/// Waits until `child` prints a stderr line containing `needle`; the rest of its stderr is
/// collected in the background: the handle gives everything it printed.
#[allow(dead_code)]
pub fn wait_for_stderr_keep(child: &mut Child, needle: &str) -> std::thread::JoinHandle<String> {
    let (mut err, seen) = read_stderr_until(child, needle);
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut rest);
        seen + &rest
    })
}

/// Runs the console script `tests/<script>` in headless Chromium (node with the npm
/// `playwright-core` peer and Debian's `chromium`) with `env`; the JSON line it reports.
#[allow(dead_code)]
pub fn chromium_script(script: &str, env: &[(&str, &std::ffi::OsStr)]) -> Value {
    let node_modules = ferry_testkit::peers_dir().join("node/node_modules");
    assert!(
        node_modules.join("playwright-core").is_dir()
            && std::path::Path::new("/usr/bin/chromium").exists(),
        "peers `playwright-core` (npm) and `chromium` (Debian) are needed: run tests/peers/install.sh"
    );
    let mut cmd = Command::new(ferry_testkit::tool("node"));
    cmd.arg(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join(script),
    )
    .env("NODE_PATH", &node_modules)
    .env("NO_PROXY", "127.0.0.1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}
