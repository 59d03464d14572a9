//! What the replica tests share (`replica.rs`, `replica_cross.rs`, `replica_vsphere.rs`,
//! `serve_replicas.rs`): a lab directory laid out as `ferry.toml`, `repo/` and `state/`, the
//! `ferry` binary run in it (`LabDir`), a repository made for it, simulator password files, and
//! disks compared byte for byte.
#![allow(dead_code)]

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// The `ferry` binary with a lab directory's environment: its repository (password
/// `password`), `ferry.toml` and state directory.
pub struct Ferry {
    pub env: Vec<(String, String)>,
}

impl Ferry {
    pub fn in_dir(dir: &Path, password: &str) -> Self {
        let env = [
            ("FERRY_PASSWORD", password.to_string()),
            ("FERRY_REPO", dir.join("repo").display().to_string()),
            ("FERRY_CONFIG", dir.join("ferry.toml").display().to_string()),
            ("FERRY_STATE_DIR", dir.join("state").display().to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec();
        Self { env }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &self.env)
    }

    /// `ferry ARGS`, which must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The repository password of a `LabDir`.
pub const PASSWORD: &str = "test password";

/// The `ferry` binary with the repository password `PASSWORD` and no `RUST_LOG`.
pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("RUST_LOG").env("FERRY_PASSWORD", PASSWORD);
    c
}

/// `dir/NAME.pw` holding the password of the simulator whose JSON line is `info`.
pub fn password_file(dir: &Path, name: &str, info: &serde_json::Value) -> PathBuf {
    let p = dir.join(format!("{name}.pw"));
    std::fs::write(&p, info["password"].as_str().unwrap()).unwrap();
    p
}

/// A test's lab directory (`ferry.toml`, `repo/` with password `PASSWORD`, `state/`) with
/// `ferry` run in it.
pub trait LabDir {
    /// The lab directory.
    fn lab_dir(&self) -> &Path;

    fn in_lab(&self) -> Ferry {
        Ferry::in_dir(self.lab_dir(), PASSWORD)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.lab_dir().join(p)
    }

    fn env(&self) -> Vec<(String, String)> {
        self.in_lab().env
    }

    fn run(&self, args: &[&str]) -> Output {
        self.in_lab().run(args)
    }

    /// `ferry ARGS`, which must succeed: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.in_lab().ok(args)
    }

    /// Replica `name` as `ferry replica status NAME --json` shows it.
    fn replica_status(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["replica", "status", name, "--json"])).unwrap();
        v[0].clone()
    }
}

impl Ferry {
    /// Disks `disks` of restore point `rp`, restored to files `dir/rp-<rp>-<disk>.raw`.
    pub fn restored(&self, dir: &Path, rp: &str, disks: &[&str]) -> Vec<PathBuf> {
        disks
            .iter()
            .map(|d| {
                let out = dir.join(format!("rp-{rp}-{}.raw", d.replace(':', "-")));
                self.ok(&["restore", rp, "--disk", d, "--to", out.to_str().unwrap()]);
                out
            })
            .collect()
    }
}

impl Ferry {
    /// The disk image `src` (any format Ferry reads, its chain followed) as the raw file
    /// `out`, by `ferry image convert`.
    pub fn image_to_raw(&self, src: &Path, out: &Path) -> PathBuf {
        self.ok(&[
            "image",
            "convert",
            src.to_str().unwrap(),
            out.to_str().unwrap(),
            "--format",
            "raw",
        ]);
        out.to_path_buf()
    }
}

/// A repository at `path` with 256 KiB chunks and a fast KDF.
pub fn init_repo(path: &Path, password: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(path.to_str().unwrap(), true).unwrap();
        let opts = InitOptions {
            chunk_size: 256 << 10,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(store, Some(&Secret::new(password)), opts)
            .await
            .unwrap();
    });
}

/// Raw disk images `a[i]` and `b[i]` are the same size and content (`qemu-img compare`).
pub fn assert_same_disks(a: &[PathBuf], b: &[PathBuf]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            std::fs::metadata(x).unwrap().len(),
            std::fs::metadata(y).unwrap().len(),
            "{} and {} differ in size",
            x.display(),
            y.display()
        );
        ferry_testkit::qemu_img_compare(x, "raw", y, "raw");
    }
}

/// Starts `ferry replica failover NAME --planned` with `env` and SIGKILLs it once the replica
/// record in `state` shows it in its final cycle (step 1: the primary is shut down), half a
/// second later.
pub fn kill_planned_failover_in_final_cycle(name: &str, env: &[(String, String)], state: &Path) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(["replica", "failover", name, "--planned"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child: Child = cmd.spawn().unwrap();
    let record = state.join(format!("replicas/{name}.json"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
        if r["op"]["step"] == 1 && r["cycle"] != serde_json::Value::Null {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the failover never got to its final cycle: {r}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
}
