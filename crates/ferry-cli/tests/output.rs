//! What `ferry` prints on a terminal: the command's own output plus warnings and errors by
//! default; the log with `-v` (info), `-vv` (debug), as JSON with `--log-format json`, into a
//! file with `--log-file`; nothing but data and errors with `-q`; never Rust `Debug` syntax.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use std::process::Output;

const PASSWORD: &str = "output test password";

fn ferry(args: &[&str]) -> Output {
    let env = [("FERRY_PASSWORD".to_string(), PASSWORD.to_string())];
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &env)
}

fn stderr(out: &Output) -> String {
    assert!(out.status.success(), "ferry failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// No log lines and no `Debug` dumps (`Name { field: … }`, `Some(…)`).
fn assert_no_log_or_debug(text: &str) {
    for needle in [" INFO ", "DEBUG", "TRACE", "StatsSnapshot", "Some(", " { "] {
        assert!(!text.contains(needle), "`{needle}` in: {text}");
    }
}

#[test]
fn the_log_shows_only_when_asked() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let opts = InitOptions {
            chunk_size: 64 << 10,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(
            Store::open(r, true).unwrap(),
            Some(&Secret::new(PASSWORD)),
            opts,
        )
        .await
        .unwrap();
    });
    let disk = dir.path().join("disk.raw");
    let mut data = vec![0u8; 1 << 20];
    data[..300_000]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i % 253) as u8);
    std::fs::write(&disk, &data).unwrap();
    let d = disk.to_str().unwrap();
    let backup = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend(["backup", "--repo", r, "--vm", "v", "--disk", d]);
        ferry(&args)
    };

    // Default: the restore point id on stdout, the summary on stderr, no log.
    let out = backup(&[]);
    let err = stderr(&out);
    assert_no_log_or_debug(&err);
    assert!(err.starts_with("restore point "), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);

    // -v: Ferry's info events, in human formats.
    let err = stderr(&backup(&["-v"]));
    assert!(
        err.contains(" INFO ") && err.contains("restore point committed"),
        "{err}"
    );
    assert!(err.contains("uploaded_chunks="), "stats as fields: {err}");
    assert!(
        !err.contains("DEBUG") && !err.contains("StatsSnapshot"),
        "{err}"
    );

    // -vv: debug events too (`features` logs one).
    assert!(!stderr(&ferry(&["-v", "features"])).contains("DEBUG"));
    assert!(stderr(&ferry(&["-vv", "features"])).contains("DEBUG"));

    // JSON log lines for machines; the summary stays text.
    let err = stderr(&backup(&["-v", "--log-format", "json"]));
    let events: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "INFO" && e["fields"]["message"] == "restore point committed"),
        "{err}"
    );

    // --log-file: the terminal stays quiet, the file has the log.
    let log = dir.path().join("ferry.log");
    let err = stderr(&backup(&["--log-file", log.to_str().unwrap()]));
    assert_no_log_or_debug(&err);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(" INFO ") && text.contains("restore point committed"),
        "{text}"
    );
    assert!(!text.contains("StatsSnapshot"), "{text}");

    // -q: the id and nothing else.
    let out = backup(&["-q"]);
    assert!(stderr(&out).is_empty());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}
