//! `ferry export`: a restore point's disk over NBD, checked with nbdinfo, nbdcopy and qemu-io;
//! the writable overlay takes writes without changing the restore point.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const PASSWORD: &str = "test password";

fn init_repo(location: &str) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::open(location, true).unwrap();
        let opts = InitOptions {
            chunk_size: 256 << 10,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(store, Some(&Secret::new(PASSWORD)), opts)
            .await
            .unwrap();
    });
}

/// A running `ferry export`, killed on drop; `uri` is the first line it printed.
struct Export {
    child: Child,
    uri: String,
}

impl Export {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("export")
            .args(args)
            .env("FERRY_PASSWORD", PASSWORD)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("nbd"), "ferry export printed {line:?}");
        Self {
            child,
            uri: line.trim().to_string(),
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn export_serves_a_restore_point_read_only_and_writable() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    init_repo(r);
    let raw = dir.path().join("disk.raw");
    let p = raw.to_str().unwrap();
    ferry_testkit::qemu_img(&["create", "-q", "-f", "raw", p, "20M"]);
    ferry_testkit::qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x3c 1M 2M",
        "-c",
        "write -P 0x3d 17M 64k",
        p,
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "backup",
            "--repo",
            r,
            "--vm",
            "x",
            "--disk",
            &format!("root={p}"),
        ])
        .env("FERRY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Read-only over TCP: nbdinfo sees the size and allocation, nbdcopy the exact bytes.
    {
        let e = Export::start(&["--repo", r, "latest", "--listen", "127.0.0.1:0"]);
        assert!(
            e.uri.starts_with("nbd://127.0.0.1:") && e.uri.ends_with("/root"),
            "{}",
            e.uri
        );
        let info = ferry_testkit::run_ok(
            Command::new(ferry_testkit::tool("nbdinfo")).args(["--json", &e.uri]),
        );
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["exports"][0]["export-size"], 20u64 << 20);
        assert_eq!(v["exports"][0]["is_read_only"], true);
        let copy = dir.path().join("copy.raw");
        ferry_testkit::run_ok(
            Command::new(ferry_testkit::tool("nbdcopy")).args([&e.uri, copy.to_str().unwrap()]),
        );
        ferry_testkit::qemu_img_compare(std::path::Path::new(p), "raw", &copy, "raw");
    }
    // Writable over a Unix socket: writes are visible to clients, the restore point unchanged.
    let sock = dir.path().join("x.sock");
    {
        let listen = format!("unix:{}", sock.display());
        let e = Export::start(&[
            "--repo",
            r,
            "latest",
            "--disk",
            "root",
            "--listen",
            &listen,
            "--writable",
        ]);
        assert!(e.uri.starts_with("nbd+unix:///root?socket="), "{}", e.uri);
        ferry_testkit::qemu_io(&["-f", "raw", "-c", "write -P 0x7e 1M 4096", &e.uri]);
        ferry_testkit::qemu_io(&[
            "-f",
            "raw",
            "-c",
            "read -P 0x7e 1M 4096",
            "-c",
            "read -P 0x3c 1052672 4096",
            &e.uri,
        ]);
    }
    let e = Export::start(&["--repo", r, "latest", "--listen", "127.0.0.1:0"]);
    ferry_testkit::qemu_io(&["-f", "raw", "-r", "-c", "read -P 0x3c 1M 4096", &e.uri]);
}
