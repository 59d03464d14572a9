//! The `ferry` binary's contract: version and help, data on stdout, logs on stderr (text or JSON).

use std::process::{Command, Output};

fn ferry(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("FERRY_LOG_FORMAT")
        .output()
        .expect("run ferry");
    eprintln!(
        "$ ferry {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn version_names_the_crate_version() {
    let out = ferry(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ferry {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_subcommands_and_global_options() {
    let out = ferry(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["Usage: ferry", "features", "--verbose", "--log-format"] {
        assert!(text.contains(needle), "help lacks {needle}");
    }
}

#[test]
fn unknown_subcommand_fails_with_usage_on_stderr() {
    let out = ferry(&["no-such-command"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand"));
}

#[test]
fn json_logs_go_to_stderr_and_data_to_stdout() {
    // `features` logs one debug event: -vv shows it.
    let out = ferry(&["-vv", "--log-format", "json", "features", "--json"]);
    assert!(out.status.success());
    let data: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(data["version"], env!("CARGO_PKG_VERSION"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "-vv must log something");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
}

#[test]
fn quiet_by_default() {
    let out = ferry(&["features"]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "no logs without -v");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ferry "));
}
