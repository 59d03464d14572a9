//! Whole-VM restore to Hyper-V written through the host agent (ADRs 0169–0170), through the
//! `ferry` binary against `ferry sim hyperv` (whose in-process `ferry-agent` has the host's
//! volumes as restore root): a source with only `transports = ["network"]` and no `san-paths`
//! backs up a two-disk VM and restores it whole; the new VM's disks are VHDX files (`qemu-img
//! info`) identical to the disks at backup time (`qemu-img compare`) and pypsrp reads its NICs
//! back. A folder outside the agent's restore roots and a wrong agent pin are clear errors that
//! create nothing (with `san` after `network`, the restore falls back with a warning); an agent
//! lost mid-restore leaves no VM, and after `ferry source cleanup` no file.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use tokio_util::sync::CancellationToken;

const VM: &str = "win-sql-01";

#[path = "common/cli.rs"]
mod cli;
#[path = "common/hyperv_lab.rs"]
mod hyperv_lab;

lab_wrapper!(
    /// The lab's host with source `lab` writing restores through the host agent.
);

impl Lab {
    /// Guests with 8 MiB disks; source `lab` with `transports = ["network"]` only, its
    /// appliance certificate (`ferry source agent-pin`) pinned by the host's agent.
    fn start() -> Self {
        let lab = Self(hyperv_lab::Lab::start(&["--disk-mib", "8"]));
        lab.agent_config("[\"network\"]", "", None, None);
        let (out, _) = lab.ok(&["source", "agent-pin", "lab"]);
        lab.door("AgentPin", &[("Fingerprint", out.trim())]);
        lab
    }

    /// `ferry.toml` with `transports`, more keys and tables `extra`, the agent pinned by
    /// `fingerprint` (else the simulator's) on `port` (else the simulator's).
    fn agent_config(
        &self,
        transports: &str,
        extra: &str,
        fingerprint: Option<&str>,
        port: Option<u16>,
    ) {
        let agent = &self.info["agent"];
        self.config(
            transports,
            &format!(
                "{extra}[sources.lab.agent]\nport = {}\nfingerprint = \"{}\"\n",
                port.map_or_else(|| agent["port"].to_string(), |p| p.to_string()),
                fingerprint.unwrap_or(agent["fingerprint"].as_str().unwrap()),
            ),
        );
    }

    /// A failing `ferry ARGS`: its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "ferry {args:?} succeeded: {err}");
        err
    }

    /// `ferry backup` of VM `VM`: the restore point's id.
    fn backup_vm(&self) -> String {
        let (reports, _) = self.backup(&["--vm", VM]);
        reports[0]["snapshot"].as_str().unwrap().to_string()
    }

    /// The folder a restore named `name` gets (the default restore-dir: where `VM` lives).
    fn restore_folder(&self, name: &str) -> PathBuf {
        let orig = &self.probe_vms(&[VM])[VM];
        let disk = orig["disks"][0]["path"].as_str().unwrap();
        let vm_folder = disk.rsplit_once('\\').unwrap().0;
        let parent = vm_folder.rsplit_once('\\').unwrap().0;
        self.local(&format!("{parent}\\{name}"))
    }
}

/// The parts of a VM's configuration a restore carries over.
fn machine(vm: &Value) -> Value {
    let disks: Vec<&Value> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["at"])
        .collect();
    serde_json::json!({"generation": vm["generation"], "cpus": vm["cpus"],
        "memory_mib": vm["memory_mib"], "nics": vm["nics"], "disks": disks})
}

#[test]
fn whole_vm_restore_through_the_agent_alone_writes_vhdx_disks_and_brings_back_the_nics() {
    let lab = Lab::start();
    let expected = lab.guest_disks(VM, "backup");
    assert_eq!(expected.len(), 2, "a two-disk VM");
    let id = lab.backup_vm();

    let (out, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "sql-agent"]);
    assert!(
        err.contains("via network (VHDX written through the host agent, nbd+tls)"),
        "{err}"
    );
    let p = lab.probe_vms(&[VM, "sql-agent"]);
    let (orig, copy) = (&p[VM], &p["sql-agent"]);
    assert!(copy.is_object(), "no restored VM: {p}\n{err}");
    assert_eq!(out.trim(), copy["id"], "{err}");
    assert_eq!(machine(copy), machine(orig), "{p}");
    let nics = copy["nics"].as_array().unwrap();
    assert!(!nics.is_empty(), "{copy}");
    for n in nics {
        assert!(n["mac"].as_str().is_some_and(|m| m.len() == 12), "{n}");
        assert_eq!(n["static"], "true", "{n}");
        assert!(n["switch"].as_str().is_some_and(|s| !s.is_empty()), "{n}");
    }
    let folder = lab.restore_folder("sql-agent");
    for (d, want) in copy["disks"].as_array().unwrap().iter().zip(&expected) {
        let local = lab.local(d["path"].as_str().unwrap());
        assert!(
            local.starts_with(&folder),
            "{} not in {}",
            local.display(),
            folder.display()
        );
        let info = ferry_testkit::qemu_img(&["info", "--output=json", local.to_str().unwrap()]);
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["format"], "vhdx", "{info}");
        ferry_testkit::qemu_img_compare(&local, "vhdx", want, "raw");
    }
    // The same name again: a folder of its own, made by the agent too.
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "sql-agent"]);
    assert!(err.contains("the restored VM is `sql-agent (2)`"), "{err}");
    assert!(lab.restore_folder("sql-agent (2)").is_dir());
}

#[test]
fn outside_the_restore_roots_or_a_wrong_pin_creates_nothing() {
    let lab = Lab::start();
    let id = lab.backup_vm();
    // A restore-dir the agent does not hold: refused before the VM is defined.
    lab.agent_config(
        "[\"network\"]",
        "restore-dir = 'D:\\Restores'\n",
        None,
        None,
    );
    let err = lab.fails(&["restore", &id, "--to-source", "lab", "--name", "outside"]);
    assert!(
        err.contains("no transport can write the restored disks")
            && err.contains("outside the agent's roots"),
        "{err}"
    );
    assert!(lab.probe_vms(&["outside"])["outside"].is_null());
    // A wrong agent pin: a clear TLS error, nothing made.
    let wrong = format!("sha256:{}", "AB".repeat(32));
    lab.agent_config("[\"network\"]", "", Some(&wrong), None);
    let err = lab.fails(&["restore", &id, "--to-source", "lab", "--name", "pinned"]);
    assert!(
        err.contains("network: the agent of node") && err.contains("TLS"),
        "{err}"
    );
    assert!(lab.probe_vms(&["pinned"])["pinned"].is_null());
    assert!(!lab.restore_folder("pinned").exists());
    // With san after network, the restore falls back to san-paths, saying why.
    lab.agent_config(
        "[\"network\", \"san\"]",
        &lab.san_paths_table(),
        Some(&wrong),
        None,
    );
    let (_, err) = lab.ok(&["restore", &id, "--to-source", "lab", "--name", "pinned"]);
    assert!(
        err.contains("restore: network cannot write the disks") && err.contains("trying san"),
        "{err}"
    );
    assert!(
        err.contains("via san (VHDX written through san-paths)"),
        "{err}"
    );
    assert!(lab.probe_vms(&["pinned"])["pinned"].is_object());
}

/// A TCP relay to `to` on `port` (0: any) that passes what the appliance sends at about
/// `bytes_per_sec` (0: at full speed); cancelling the token drops it and every connection, as a
/// dead host does.
fn relay(
    rt: &tokio::runtime::Runtime,
    port: u16,
    to: String,
    bytes_per_sec: u64,
) -> (u16, CancellationToken) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stop = CancellationToken::new();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = stop.clone();
    rt.spawn(async move {
        loop {
            let (inbound, _) = tokio::select! {
                _ = s.cancelled() => return,
                r = listener.accept() => match r { Ok(x) => x, Err(_) => return },
            };
            let (s, to) = (s.clone(), to.clone());
            tokio::spawn(async move {
                let Ok(out) = tokio::net::TcpStream::connect(&to).await else {
                    return;
                };
                let (mut ir, mut iw) = inbound.into_split();
                let (mut or, mut ow) = out.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = ir.read(&mut buf).await?;
                        if n == 0 {
                            return ow.shutdown().await;
                        }
                        ow.write_all(&buf[..n]).await?;
                        if let Some(ms) = (n as u64 * 1000).checked_div(bytes_per_sec) {
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                        }
                    }
                };
                let down = tokio::io::copy(&mut or, &mut iw);
                tokio::select! {
                    _ = s.cancelled() => {}
                    _ = async { let _ = tokio::join!(up, down); } => {}
                }
            });
        }
    });
    (port, stop)
}

#[test]
fn an_agent_lost_mid_restore_leaves_no_vm_and_after_cleanup_no_file() {
    let lab = Lab::start();
    let id = lab.backup_vm();
    let agent = lab.info["agent"]["address"].as_str().unwrap().to_string();
    // The agent behind a slow link, so the loss lands while the disks are written.
    let (port, stop) = relay(&lab.rt, 0, agent.clone(), 2 << 20);
    lab.agent_config("[\"network\"]", "", None, Some(port));
    let mut child = cli::ferry()
        .env("FERRY_PASSWORD", hyperv_lab::PASSWORD)
        .args(["-v", "restore", &id, "--to-source", "lab", "--name", "lost"])
        .envs(lab.env())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = cli::wait_for_stderr_keep(&mut child, "VM defined; writing its disks");
    stop.cancel();
    let seen = log.join().unwrap();
    assert!(!child.wait().unwrap().success(), "{seen}");
    assert!(seen.contains("removing the partial VM"), "{seen}");
    assert!(lab.probe_vms(&["lost"])["lost"].is_null(), "{seen}");
    // The agent could not be asked to remove the folder: no disk in it, and it stays journaled.
    let folder = lab.restore_folder("lost");
    let left: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["ferry-restore.json"], "{seen}");
    // The host is back: the cleanup removes the folder through the agent.
    let (_, stop2) = relay(&lab.rt, port, agent, 0);
    let (_, err) = lab.ok(&["source", "cleanup", "--source", "lab", "--json"]);
    assert!(
        err.contains("removed the files of an unfinished restore"),
        "{err}"
    );
    assert!(!folder.exists(), "the restore's folder is left");
    stop2.cancel();
}
