//! Instant recovery through the `ferry` binary against `ferry sim xen`: a restore point of a
//! small bootable Linux disk (built by make_boot_disk.sh; its guest loads its IDE driver and
//! writes `ferry-guest-write N` into sector 1024 once a second) is started on the simulated
//! pool, whose `nbd` SR boots it in qemu-system (TCG) over the proxy's writable NBD export.
//! The serial console proves the guest runs; `finish` moves the guest's writes onto the
//! restored VDI, which must equal the backed-up disk except for them; `cancel` leaves nothing.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use ferry_testkit::Killed;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PW: &str = "instant test password";
/// Where the guest writes (sector 1024).
const GUEST_WRITE: u64 = 1024 * 512;

struct Env {
    tmp: tempfile::TempDir,
    _sim: Killed,
    info: Value,
    repo: String,
    snapshot: String,
    disk: PathBuf,
}

impl Env {
    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn ferry(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env_remove("RUST_LOG")
            .env("FERRY_PASSWORD", PW)
            .env("FERRY_CONFIG", self.dir().join("ferry.toml"))
            .env("FERRY_RUN_DIR", self.dir().join("run"))
            .env("TMPDIR", self.dir());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.ferry().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// `instant-recover start`: the running session and its first line.
    fn start(&self, name: &str) -> (Killed, Value, Instant) {
        let t0 = Instant::now();
        let mut child = self
            .ferry()
            .args([
                "instant-recover",
                "start",
                "--repo",
                &self.repo,
                &self.snapshot,
                "--to-source",
                "xen",
                "--name",
                name,
                "--listen",
                "127.0.0.1:0",
                "--memory",
                "256",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let guard = Killed(child);
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("instant-recover start printed {line:?}: {e}"));
        (guard, v, t0)
    }

    fn console(&self, vm: &str) -> String {
        let p = Path::new(self.info["console_dir"].as_str().unwrap()).join(format!("{vm}.log"));
        String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
    }

    /// Waits until the guest printed `ferry-heartbeat N` for some N ≥ `n`.
    fn heartbeat(&self, vm: &str, n: u64) -> Duration {
        let t0 = Instant::now();
        loop {
            let c = self.console(vm);
            let seen = c
                .lines()
                .filter_map(|l| l.trim().strip_prefix("ferry-heartbeat "))
                .filter_map(|x| x.trim().parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            if seen >= n {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "no ferry-heartbeat {n} on the guest's console within 180 s; console:\n{c}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// qemu processes of this test's simulator.
    fn qemus(&self) -> Vec<String> {
        let needle = self.info["console_dir"].as_str().unwrap().to_string();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                out.push(cmd);
            }
        }
        out
    }

    /// The VMs of the pool named `name`.
    fn vms_named(&self, name: &str) -> Vec<Value> {
        let v = self.json(&["vms", "--source", "xen", "--json"]);
        v.as_array()
            .unwrap()
            .iter()
            .filter(|x| x["name"] == name)
            .cloned()
            .collect()
    }

    /// The simulator's data file of VDI `uuid`, if it has one.
    fn vdi_file(&self, uuid: &str) -> Option<PathBuf> {
        let root = self.dir().join("sim");
        for sr in std::fs::read_dir(&root).unwrap().flatten() {
            if !sr.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(sr.path()).unwrap().flatten() {
                if f.file_name().to_string_lossy().contains(uuid) {
                    return Some(f.path());
                }
            }
        }
        None
    }
}

fn setup() -> Env {
    let disk = ferry_testkit::boot_disk(
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/make_boot_disk.sh"
        )),
        true,
    );
    let tmp = tempfile::Builder::new()
        .prefix("ferry-ir-")
        .tempdir()
        .unwrap();
    let mut sim = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "sim",
            "xen",
            "--listen",
            "127.0.0.1:0",
            "--disk-mib",
            "8",
            "--dir",
        ])
        .arg(tmp.path().join("sim"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(sim.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let sim = Killed(sim);
    let info: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let pw = tmp.path().join("xen.pw");
    std::fs::write(&pw, info["password"].as_str().unwrap()).unwrap();
    std::fs::write(
        tmp.path().join("ferry.toml"),
        format!(
            "[sources.xen]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\n",
            info["url"].as_str().unwrap(),
            info["username"].as_str().unwrap(),
            pw.display(),
            info["tls_fingerprint"].as_str().unwrap(),
            tmp.path().join("state").display()
        ),
    )
    .unwrap();
    let repo = tmp.path().join("repo");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::open(repo.to_str().unwrap(), true).unwrap();
        let opts = InitOptions {
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(store, Some(&Secret::new(PW)), opts)
            .await
            .unwrap();
    });
    let mut env = Env {
        tmp,
        _sim: sim,
        info,
        repo: repo.to_str().unwrap().to_string(),
        snapshot: String::new(),
        disk: disk.clone(),
    };
    env.snapshot = env
        .ok(&[
            "backup",
            "--repo",
            &env.repo,
            "--vm",
            "web01",
            "--disk",
            disk.to_str().unwrap(),
        ])
        .trim()
        .to_string();
    env
}

fn wait_exit(mut g: Killed, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            t0.elapsed() < within,
            "the session did not end within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_vm_runs_from_its_backup_and_finish_keeps_what_the_guest_wrote() {
    let env = setup();
    let (session, started, t0) = env.start("ir-web");
    let vm = started["vm"]["id"].as_str().unwrap().to_string();
    let targets: Vec<String> = started["vm"]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(targets.len(), 1, "{started}");
    assert_eq!(started["session"], "ir-web");
    env.heartbeat(&vm, 1);
    let to_heartbeat = t0.elapsed();
    env.heartbeat(&vm, 3);
    assert_eq!(env.qemus().len(), 1, "one guest runs");

    // The VM runs from two disks' worth of VBD: the pool shows it with the NBD VDI.
    let listed = env.vms_named("ir-web");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["power-state"], "running", "{listed:?}");

    // The background restore ends; the guest keeps writing meanwhile.
    let t_restore = Instant::now();
    let status = loop {
        let s = env.json(&["instant-recover", "status", "ir-web", "--json"]);
        if s["restore"]["state"] == "restored" {
            break s;
        }
        assert_eq!(s["restore"]["state"], "running", "{s}");
        assert!(
            t_restore.elapsed() < Duration::from_secs(120),
            "restore did not end: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let size = std::fs::metadata(&env.disk).unwrap().len();
    assert_eq!(status["restore"]["size"], size, "{status}");
    assert!(
        status["guest_written_bytes"].as_u64().unwrap() > 0,
        "{status}"
    );
    // Same run, same disk: the background restore is the restore a VM would wait for without
    // instant recovery (then boot); the guest ran from the backup this long after `start`.
    let restore_secs = status["restore"]["seconds"].as_f64().unwrap();
    assert!(restore_secs > 0.0, "{status}");
    eprintln!(
        "instant recovery of a {size}-byte disk: guest heartbeat {:.1} s after start; its full restore to the pool took {restore_secs:.2} s",
        to_heartbeat.as_secs_f64(),
    );

    let done = env.json(&["instant-recover", "finish", "ir-web", "--json"]);
    assert_eq!(done["state"], "finished", "{done}");
    assert!(wait_exit(session, Duration::from_secs(30)).success());
    let last_before_finish = env
        .console(&vm)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ferry-heartbeat "))
        .filter_map(|x| x.trim().parse::<u64>().ok())
        .max()
        .unwrap();

    // The restored VDI: the backed-up disk, plus the guest's last write.
    let restored = std::fs::read(env.vdi_file(&targets[0]).expect("restored VDI file")).unwrap();
    let original = std::fs::read(&env.disk).unwrap();
    assert_eq!(restored.len() as u64, size);
    let sector = &restored[GUEST_WRITE as usize..GUEST_WRITE as usize + 512];
    let text = String::from_utf8_lossy(&sector[..26]).into_owned();
    let n: u64 = text
        .strip_prefix("ferry-guest-write ")
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or_else(|| panic!("sector 1024 of the restored disk holds {text:?}"));
    assert!(
        n >= 3 && n + 1 >= last_before_finish,
        "guest write {n}, last heartbeat {last_before_finish}"
    );
    assert_eq!(original[GUEST_WRITE as usize..][..512], [0u8; 512]);
    let mut expect = original.clone();
    expect[GUEST_WRITE as usize..][..512].copy_from_slice(sector);
    assert!(
        restored == expect,
        "the restored disk differs beyond sector 1024"
    );

    // The VM now runs on the restored VDI; the export and the guest are gone.
    let listed = env.vms_named("ir-web");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let keys: Vec<&str> = listed[0]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, [targets[0].as_str()], "{listed:?}");
    assert!(env.qemus().is_empty(), "{:?}", env.qemus());
    assert!(
        std::fs::read_dir(env.dir().join("run"))
            .unwrap()
            .next()
            .is_none(),
        "the control socket is gone"
    );
}

#[test]
fn cancel_leaves_nothing_behind() {
    let env = setup();
    let (session, started, _) = env.start("ir-cancel");
    let vm = started["vm"]["id"].as_str().unwrap().to_string();
    let target = started["vm"]["targets"][0].as_str().unwrap().to_string();
    env.heartbeat(&vm, 1);
    assert!(env.vdi_file(&target).is_some());
    let out = env.json(&["instant-recover", "cancel", "--json"]);
    assert_eq!(out["state"], "cancelled", "{out}");
    assert!(wait_exit(session, Duration::from_secs(30)).success());
    assert!(env.vms_named("ir-cancel").is_empty());
    assert!(
        env.vdi_file(&target).is_none(),
        "the restored VDI was removed"
    );
    assert!(env.qemus().is_empty(), "{:?}", env.qemus());
    // No session answers any more.
    let out = env
        .ferry()
        .args(["instant-recover", "finish", "ir-cancel"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
