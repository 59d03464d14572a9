//! What the Hyper-V tests share (`hyperv.rs`, `hyperv_cluster.rs`, `hyperv_paths.rs`,
//! `hyperv_restore.rs`, `hyperv_kerberos.rs`): the [`Lab`] (a simulated host, its repository
//! and config, the guest's side door, restores compared with `qemu-img`, `ferry sim vmware` / `xen`
//! as more sources of its config), and the pieces for
//! labs of another shape (a repository; a WS-Man client on the simulator's pinned endpoint).
#![allow(dead_code)]

use base64::Engine as _;
use ferry_core::Secret;
use ferry_hv_hyperv::cim::{Epr, Param};
use ferry_hv_hyperv::{Credentials, WsmanClient};
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A new repository at `path` with `password` (fast KDF) and `chunk_size` (else the default).
pub fn init_repo(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    password: &str,
    chunk_size: Option<u32>,
) {
    rt.block_on(async {
        let store = Store::open(path.to_str().unwrap(), true).unwrap();
        let mut opts = InitOptions {
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        if let Some(c) = chunk_size {
            opts.chunk_size = c;
        }
        Repository::init(store, Some(&Secret::new(password)), opts)
            .await
            .unwrap();
    });
}

/// A client on the simulator's `url` as its JSON line `info` gives it (pinned certificate, its
/// user and password, no proxy).
pub fn sim_client(rt: &tokio::runtime::Runtime, info: &Value) -> WsmanClient {
    let pin = ferry_tls::parse_fingerprint(info["tls_fingerprint"].as_str().unwrap()).unwrap();
    let mut o = ferry_http::ClientOptions::new("lab", ferry_tls::Trust::Fingerprint(pin));
    o.proxy = ferry_http::ProxySetting::Off;
    let _g = rt.enter();
    WsmanClient::new(
        info["url"].as_str().unwrap(),
        &o,
        Credentials {
            user: info["username"].as_str().unwrap().into(),
            password: Secret::new(info["password"].as_str().unwrap()),
        },
    )
    .unwrap()
}

/// The repository password of every Hyper-V lab.
pub const PASSWORD: &str = "test password";
/// The labs' chunk size: small, so that 8 MiB disks make many chunks.
pub const CHUNK: u64 = 256 << 10;

/// One `ferry sim hyperv` host in a scratch directory, with its password file (`hv.pw`), a
/// repository (`repo`), the config file (`ferry.toml`, written by [`Lab::config`]) and a
/// pinned WS-Man client for the side door.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub info: Value,
    pub rt: tokio::runtime::Runtime,
    pub client: WsmanClient,
    _sim: ferry_testkit::Killed,
}

impl Lab {
    /// `ferry sim hyperv --listen 127.0.0.1:0 --dir <scratch>/host ARGS`.
    pub fn start(args: &[&str]) -> Self {
        let dir = ferry_testkit::scratch_dir();
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env_remove("RUST_LOG")
            .env_remove("FERRY_CONFIG")
            .env_remove("FERRY_PASSWORD")
            .args(["sim", "hyperv", "--listen", "127.0.0.1:0"])
            .args(args)
            .arg("--dir")
            .arg(dir.path().join("host"));
        let (sim, info) = ferry_testkit::Killed::spawn_json_line(&mut c);
        std::fs::write(dir.path().join("hv.pw"), info["password"].as_str().unwrap()).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        init_repo(&rt, &dir.path().join("repo"), PASSWORD, Some(CHUNK as u32));
        let client = sim_client(&rt, &info);
        Self {
            dir,
            info,
            rt,
            client,
            _sim: sim,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes `ferry.toml`: source `lab` on the simulator with `transports` (TOML array), then
    /// `tail` (more keys of the source, then tables).
    pub fn config(&self, transports: &str, tail: &str) {
        let toml = format!(
            "[sources.lab]\nkind = \"hyperv\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\nproxy = \"none\"\ntransports = {transports}\n{tail}",
            self.info["url"].as_str().unwrap(),
            self.info["username"].as_str().unwrap(),
            self.path("hv.pw").display(),
            self.info["tls_fingerprint"].as_str().unwrap(),
            self.path("state").display(),
        );
        std::fs::write(self.path("ferry.toml"), toml).unwrap();
    }

    /// Source `lab` reads through `san-paths` and restores whole VMs to `restore-dir`
    /// (`C:\ClusterStorage\Volume1\Restores`).
    pub fn san_restore_config(&self) {
        self.config(
            "[\"san\"]",
            &format!(
                "restore-dir = 'C:\\ClusterStorage\\Volume1\\Restores'\n{}",
                self.san_paths_table()
            ),
        );
    }

    /// `[sources.lab.san-paths]`: the host's `C:\` as the proxy sees it.
    pub fn san_paths_table(&self) -> String {
        format!(
            "[sources.lab.san-paths]\n'C:\\' = \"{}\"\n",
            self.info["san_paths"]["C:\\"].as_str().unwrap()
        )
    }

    pub fn env(&self) -> [(String, String); 3] {
        [
            ("FERRY_PASSWORD", PASSWORD.to_string()),
            ("FERRY_REPO", self.path("repo").display().to_string()),
            (
                "FERRY_CONFIG",
                self.path("ferry.toml").display().to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v))
    }

    pub fn run(&self, args: &[&str]) -> Output {
        ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &self.env())
    }

    /// [`Self::run`] that must succeed: (stdout, stderr).
    pub fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        assert!(out.status.success(), "ferry {args:?} failed");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    /// Appends source `name` of `kind` on the simulator whose JSON line is `sim` to `ferry.toml`
    /// (its password in `<name>.pw`, the lab's state directory), then `extra` (more keys, tables).
    pub fn add_source(&self, name: &str, kind: &str, sim: &Value, extra: &str) {
        let pw = self.path(&format!("{name}.pw"));
        std::fs::write(&pw, sim["password"].as_str().unwrap()).unwrap();
        let mut t = std::fs::read_to_string(self.path("ferry.toml")).unwrap();
        t.push_str(&format!(
            "[sources.{name}]\nkind = \"{kind}\"\nurl = \"{}\"\nusername = \"{}\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\nstate-dir = \"{}\"\n{extra}",
            sim["url"].as_str().unwrap(),
            sim["username"].as_str().unwrap(),
            pw.display(),
            sim["tls_fingerprint"].as_str().unwrap(),
            self.path("state").display(),
        ));
        std::fs::write(self.path("ferry.toml"), t).unwrap();
    }

    /// `ferry sim ARGS` in this lab: the simulator (killed on drop) and its JSON line.
    fn sim(&self, args: &[&str]) -> (ferry_testkit::Killed, Value) {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env_remove("RUST_LOG").arg("sim").args(args);
        ferry_testkit::Killed::spawn_json_line(&mut c)
    }

    /// `ferry sim vmware` (vcsim, 8 MiB disks) in `vc-sim` as source `vc`: SAN through its
    /// datastores, the nbdkit file stand-in for writes.
    pub fn with_vsphere(&self) -> (ferry_testkit::Killed, Value) {
        let dir = self.path("vc-sim");
        let vcsim = ferry_testkit::tool("vcsim");
        let (sim, vc) = self.sim(&[
            "vmware",
            "--listen",
            "127.0.0.1:0",
            "--disk-mib",
            "8",
            "--vcsim",
            vcsim.to_str().unwrap(),
            "--dir",
            dir.to_str().unwrap(),
        ]);
        let mut extra =
            "transports = [\"san\"]\nnbdkit-stand-in = \"file\"\n[sources.vc.san-paths]\n"
                .to_string();
        for (ds, p) in vc["san_paths"].as_object().unwrap() {
            extra.push_str(&format!("\"{ds}\" = \"{}\"\n", p.as_str().unwrap()));
        }
        self.add_source("vc", "vmware", &vc, &extra);
        (sim, vc)
    }

    /// `ferry sim xen` (4 MiB disks) in `xen-sim` as source `xen`, over the network.
    pub fn with_xen(&self) -> (ferry_testkit::Killed, Value) {
        let dir = self.path("xen-sim");
        let (sim, xen) = self.sim(&[
            "xen",
            "--listen",
            "127.0.0.1:0",
            "--disk-mib",
            "4",
            "--dir",
            dir.to_str().unwrap(),
        ]);
        self.add_source("xen", "xen", &xen, "transports = [\"network\"]\n");
        (sim, xen)
    }

    /// `ferry backup --source lab --json ARGS`: the reports, and stderr.
    pub fn backup(&self, args: &[&str]) -> (Vec<Value>, String) {
        let mut all = vec!["backup", "--source", "lab", "--json"];
        all.extend_from_slice(args);
        let (out, err) = self.ok(&all);
        let v: Value = serde_json::from_str(&out).unwrap();
        (v.as_array().unwrap().clone(), err)
    }

    /// A side-door call (the guest, faults, migrations); every node has the side door.
    pub fn door(&self, method: &str, params: &[(&str, &str)]) {
        self.door_out(method, params);
    }

    /// A side-door call that answers with properties (the per-node agents' addresses and
    /// counters).
    pub fn door_out(&self, method: &str, params: &[(&str, &str)]) -> ferry_hv_hyperv::Instance {
        let epr = Epr::new("FerrySim_SideDoor", &[("Name", "sidedoor")]);
        let p: Vec<Param> = params
            .iter()
            .map(|(k, v)| Param::Text(k.to_string(), v.to_string()))
            .collect();
        self.rt
            .block_on(self.client.invoke(&epr, method, &p))
            .unwrap_or_else(|e| panic!("side door {method}: {e}"))
    }

    /// Reads through the host agent (`network` only), node `k`'s agent at `agents[k]`; pairs
    /// the appliance with the simulated agent.
    pub fn use_network(&self, agents: [&str; 2]) {
        let mut tail = format!(
            "{}[sources.lab.agent]\nport = {}\nfingerprint = \"{}\"\n[sources.lab.agent.nodes]\n",
            self.nodes_table(|k| k),
            self.info["agent"]["port"],
            self.info["agent"]["fingerprint"].as_str().unwrap()
        );
        for (k, addr) in agents.iter().enumerate() {
            tail.push_str(&format!("'{}' = \"{addr}\"\n", self.node(k).0));
        }
        self.config("[\"network\"]", &tail);
        let (out, _) = self.ok(&["source", "agent-pin", "lab", "--json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        self.door(
            "AgentPin",
            &[("Fingerprint", v["fingerprint"].as_str().unwrap())],
        );
    }

    /// The guest of `vm` writes `data` at `offset` of its disk `disk`.
    pub fn guest_write(&self, vm: &str, disk: &str, offset: u64, data: &[u8]) {
        let data = base64::engine::general_purpose::STANDARD.encode(data);
        self.door(
            "GuestWrite",
            &[
                ("VirtualSystem", vm),
                ("Disk", disk),
                ("Offset", &offset.to_string()),
                ("Data", &data),
            ],
        );
    }

    /// Copies of what the guest of `vm` sees on its disks now.
    pub fn guest_disks(&self, vm: &str, tag: &str) -> Vec<PathBuf> {
        let v = self.info["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .unwrap_or_else(|| panic!("no VM {vm} in the simulator"));
        v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let to = self.path(&format!("{vm}-{}-{tag}.raw", d["name"].as_str().unwrap()));
                std::fs::copy(d["live"].as_str().unwrap(), &to).unwrap();
                to
            })
            .collect()
    }

    /// Restores disk `diskN` of `snapshot` to a raw file and compares it with `expected[N]`.
    pub fn assert_restores(&self, snapshot: &str, expected: &[PathBuf]) {
        for (i, want) in expected.iter().enumerate() {
            let disk = format!("disk{i}");
            let out = self.path(&format!("restored-{snapshot}-{disk}.raw"));
            self.ok(&[
                "restore",
                snapshot,
                "--disk",
                &disk,
                "--to",
                out.to_str().unwrap(),
            ]);
            assert_eq!(
                std::fs::metadata(&out).unwrap().len(),
                std::fs::metadata(want).unwrap().len()
            );
            ferry_testkit::qemu_img_compare(&out, "raw", want, "raw");
        }
    }

    /// Restore point `id`'s manifest, read from the repository.
    pub fn manifest(&self, id: &str) -> ferry_repo::Manifest {
        self.rt.block_on(async {
            let store = Store::open(self.path("repo").to_str().unwrap(), false).unwrap();
            let repo = Repository::open(store, Some(&Secret::new(PASSWORD)))
                .await
                .unwrap();
            repo.load_manifest(id).await.unwrap()
        })
    }

    /// `[sources.lab.nodes]` of a `--cluster` simulator: node `k` at the endpoint (URL and pin)
    /// of node `reach(k)`.
    pub fn nodes_table(&self, reach: impl Fn(usize) -> usize) -> String {
        let all = self.info["cluster"]["nodes"].as_array().unwrap();
        let rows: String = all
            .iter()
            .enumerate()
            .map(|(k, n)| {
                let to = &all[reach(k)];
                format!(
                    "{} = {{ url = \"{}\", tls-fingerprint = \"{}\" }}\n",
                    n["name"].as_str().unwrap(),
                    to["url"].as_str().unwrap(),
                    to["tls_fingerprint"].as_str().unwrap()
                )
            })
            .collect();
        format!("[sources.lab.nodes]\n{rows}")
    }

    /// `ferry -v backup --source lab --vm VM ARGS --limit-rate 1M` in the background, returned
    /// once the engine reads its disks (for a kill mid-backup).
    pub fn throttled_backup_reading(&self, vm: &str, args: &[&str]) -> std::process::Child {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.env_remove("RUST_LOG").envs(self.env());
        let mut child = c
            .args(["-v", "backup", "--source", "lab", "--vm", vm])
            .args(args)
            .args(["--limit-rate", "1M"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        crate::cli::wait_for_stderr(&mut child, "backing up disk");
        std::thread::sleep(std::time::Duration::from_millis(300));
        child
    }

    /// Cluster node `k`: (name, WinRM URL).
    pub fn node(&self, k: usize) -> (String, String) {
        let n = &self.info["cluster"]["nodes"][k];
        (
            n["name"].as_str().unwrap().to_string(),
            n["url"].as_str().unwrap().to_string(),
        )
    }

    /// (recovery checkpoints, reference points) on each of the `nodes` cluster nodes, as
    /// pypsrp sees them.
    pub fn left_on_nodes(&self, nodes: usize) -> Vec<(usize, u64)> {
        (0..nodes)
            .map(|k| {
                let p = self.probe_with("hyperv_probe.py", &self.node(k).1, &[]);
                (
                    p["checkpoints"].as_array().unwrap().len(),
                    p["reference_points"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// A WMI method of the management service, as an administrator's script calls it.
    pub fn manage(&self, method: &str, params: Vec<Param>) -> ferry_hv_hyperv::Instance {
        let svc = Epr::new(
            "Msvm_VirtualSystemManagementService",
            &[
                ("CreationClassName", "Msvm_VirtualSystemManagementService"),
                ("Name", "vmms"),
                ("SystemCreationClassName", "Msvm_ComputerSystem"),
                ("SystemName", self.info["host"].as_str().unwrap()),
            ],
        );
        self.rt
            .block_on(self.client.invoke(&svc, method, &params))
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// The proxy's view of host path `p` (under `C:\`).
    pub fn local(&self, p: &str) -> PathBuf {
        let rest = p.strip_prefix("C:\\").unwrap_or_else(|| panic!("{p}"));
        let mut out = PathBuf::from(self.info["san_paths"]["C:\\"].as_str().unwrap());
        out.extend(rest.split('\\'));
        out
    }

    /// The id of the simulator's VM `vm`.
    pub fn vm_id(&self, vm: &str) -> String {
        self.info["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vm)
            .unwrap_or_else(|| panic!("no VM {vm} in the simulator"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The VMs `names` as pypsrp reads them from the host's WMI (`tests/hyperv_vm_probe.py`;
    /// null: no such VM).
    pub fn probe_vms(&self, names: &[&str]) -> Value {
        self.probe_with(
            "hyperv_vm_probe.py",
            self.info["url"].as_str().unwrap(),
            names,
        )
    }

    /// What a vendor client sees: `tests/SCRIPT URL USER PASSWORD ARGS` (pypsrp) as JSON.
    pub fn probe_with(&self, script: &str, url: &str, args: &[&str]) -> Value {
        let python = ferry_testkit::peers_dir().join("venv/bin/python");
        assert!(
            python.exists(),
            "peer `python` (venv with pypsrp) not found: run tests/peers/install.sh"
        );
        let out = ferry_testkit::run_ok(
            std::process::Command::new(python)
                .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
                .arg(url)
                .args(["username", "password"].map(|k| self.info[k].as_str().unwrap()))
                .args(args),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{script}: {e}: {out}"))
    }
}

/// Report `report`'s disk `name`.
pub fn disk<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no disk {name} in {report}"))
}

/// What VMware's SDK (pyvmomi, `tests/vmware_probe.py`) reports of VM `name` on the vSphere
/// simulator `vc` (its JSON line).
pub fn vsphere_vm(vc: &Value, name: &str) -> Value {
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    let url = vc["url"].as_str().unwrap();
    let (host, port) = url
        .trim_start_matches("https://")
        .trim_end_matches("/sdk")
        .rsplit_once(':')
        .unwrap();
    let out = ferry_testkit::run_ok(
        std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/vmware_probe.py"
            ))
            .args([host, port])
            .args(["username", "password"].map(|k| vc[k].as_str().unwrap()))
            .arg(name)
            .env("no_proxy", "*"),
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v[name].clone()
}

/// `struct Lab(hyperv_lab::Lab)` that derefs to the shared lab: each test file adds its own
/// setup and checks to its `Lab`.
#[macro_export]
macro_rules! lab_wrapper {
    ($(#[$m:meta])*) => {
        $(#[$m])*
        struct Lab(hyperv_lab::Lab);

        impl std::ops::Deref for Lab {
            type Target = hyperv_lab::Lab;
            fn deref(&self) -> &hyperv_lab::Lab {
                &self.0
            }
        }
    };
}
