//! `nbd` SRs: storage that is an NBD export somewhere else (a backup proxy's instant-recovery
//! export). `SR.create` with `type = "nbd"` and `device_config:uri` probes the export and
//! introduces one VDI for it; a VM whose disk is such a VDI really boots on `VM.start`: the
//! simulator runs it in qemu-system under TCG over NBD (the command line of boot verification,
//! `ferry_core::qemu`), its serial console in `<dir>/console/<vm uuid>.log`, and stops it on
//! `VM.hard_shutdown`/`clean_shutdown`. Real XenServer has no such SR driver; it stands for
//! the NFS or iSCSI datastore a backup product mounts for instant recovery.

use super::api::{Failure, NULL, State, rec};
use super::value::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

type R<T> = Result<T, Failure>;

fn s(v: impl Into<String>) -> Value {
    Value::Str(v.into())
}

/// `PATH` lookup of a program.
fn in_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(prog))
            .find(|f| f.is_file())
    })
}

impl State {
    /// Where the console of a VM booted from an NBD VDI is written.
    pub fn console_path(&self, vm_uuid: &str) -> PathBuf {
        self.dir.join("console").join(format!("{vm_uuid}.log"))
    }

    /// `SR.create(session, host, device_config, physical_size, name_label, name_description,
    /// type, content_type, shared, sm_config)`; only `nbd` SRs can be created here.
    pub(crate) async fn sr_create(&mut self, strs: &[String], params: &[Value]) -> R<String> {
        let kind = strs.get(6).cloned().unwrap_or_default();
        if kind != "nbd" {
            return Err(Failure::new("SR_UNKNOWN_DRIVER", &[&kind]));
        }
        let uri = match params.get(2) {
            Some(Value::Struct(m)) => m.get("uri").and_then(Value::as_str).map(String::from),
            _ => None,
        }
        .ok_or_else(|| {
            Failure::new(
                "SR_BACKEND_FAILURE_111",
                &["", "device_config:uri missing", ""],
            )
        })?;
        // Probe like an SR driver would: the export must answer and say its size.
        let probe = tokio::time::timeout(
            Duration::from_secs(10),
            ferry_nbd::NbdClient::connect_uri(&uri),
        )
        .await;
        let client = match probe {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Failure::new(
                    "SR_BACKEND_FAILURE_111",
                    &["", &e.to_string(), ""],
                ));
            }
            Err(_) => {
                return Err(Failure::new(
                    "SR_BACKEND_FAILURE_111",
                    &["", "NBD connect timed out", ""],
                ));
            }
        };
        let size = client.size();
        drop(client);
        let name = strs.get(4).cloned().unwrap_or_default();
        let sr = self.add(
            "SR",
            rec([
                ("name_label", s(name.clone())),
                (
                    "name_description",
                    s(strs.get(5).cloned().unwrap_or_default()),
                ),
                ("type", s("nbd")),
                ("content_type", s(strs.get(7).cloned().unwrap_or_default())),
                ("shared", Value::Bool(false)),
                ("VDIs", Value::Array(vec![])),
                ("PBDs", Value::Array(vec![])),
                ("physical_size", Value::Int(size as i64)),
                ("physical_utilisation", Value::Int(size as i64)),
                ("virtual_allocation", Value::Int(size as i64)),
                ("other_config", Value::Struct(BTreeMap::new())),
                ("sm_config", Value::Struct(BTreeMap::new())),
                ("tags", Value::Array(vec![])),
            ]),
        );
        let vdi = self.add(
            "VDI",
            rec([
                ("name_label", s(name)),
                ("name_description", s("NBD export")),
                ("SR", s(sr.clone())),
                ("VBDs", Value::Array(vec![])),
                ("virtual_size", Value::Int(size as i64)),
                ("physical_utilisation", Value::Int(size as i64)),
                ("type", s("user")),
                ("sharable", Value::Bool(false)),
                ("read_only", Value::Bool(false)),
                ("other_config", Value::Struct(BTreeMap::new())),
                ("is_a_snapshot", Value::Bool(false)),
                ("snapshot_of", s(NULL)),
                ("snapshots", Value::Array(vec![])),
                (
                    "snapshot_time",
                    Value::DateTime("19700101T00:00:00Z".into()),
                ),
                ("cbt_enabled", Value::Bool(false)),
                ("managed", Value::Bool(true)),
                ("missing", Value::Bool(false)),
                ("location", s(uri.clone())),
                ("tags", Value::Array(vec![])),
                ("sm_config", Value::Struct(BTreeMap::new())),
                ("xenstore_data", Value::Struct(BTreeMap::new())),
                ("allowed_operations", Value::Array(vec![])),
                ("current_operations", Value::Struct(BTreeMap::new())),
            ]),
        );
        self.set("SR", &sr, "VDIs", Value::strs(std::slice::from_ref(&vdi)))?;
        self.nbd_vdis.insert(vdi, uri);
        Ok(sr)
    }

    /// `SR.forget`/`SR.destroy` of an `nbd` SR: its VDIs go (refused while a VBD uses one).
    pub(crate) fn sr_forget(&mut self, sr: &str) -> R<()> {
        if self.fstr("SR", sr, "type")? != "nbd" {
            return Err(Failure::new(
                "OPERATION_NOT_ALLOWED",
                &["the simulator forgets only nbd SRs"],
            ));
        }
        let vdis = self.frefs("SR", sr, "VDIs")?;
        for v in &vdis {
            if !self.frefs("VDI", v, "VBDs")?.is_empty() {
                return Err(Failure::new("VDI_IN_USE", &[v, "forget"]));
            }
        }
        for v in vdis {
            self.nbd_vdis.remove(&v);
            self.objs.remove(&v);
        }
        self.objs.remove(sr);
        Ok(())
    }

    /// On `VM.start`: boots the VM in qemu when one of its disks is an NBD VDI (the bootable
    /// one first). Other VMs are simulated without a guest.
    pub(crate) fn boot_guest(&mut self, vm: &str) -> R<()> {
        let mut disks = Vec::new();
        for b in self.frefs("VM", vm, "VBDs")? {
            let vdi = self.fstr("VBD", &b, "VDI")?;
            if let Some(uri) = self.nbd_vdis.get(&vdi) {
                let bootable = self.fbool("VBD", &b, "bootable").unwrap_or(false);
                disks.push((!bootable, self.fstr("VBD", &b, "userdevice")?, uri.clone()));
            }
        }
        disks.sort();
        let Some((_, _, uri)) = disks.into_iter().next() else {
            return Ok(());
        };
        let uuid = self.fstr("VM", vm, "uuid")?;
        let console = self.console_path(&uuid);
        let dir = self.dir.join("console");
        let fail = |e: std::io::Error| Failure::new("INTERNAL_ERROR", &[&format!("qemu: {e}")]);
        std::fs::create_dir_all(&dir).map_err(fail)?;
        let mem = match self.field("VM", vm, "memory_static_max")? {
            Value::Int(i) => i as u64,
            Value::Str(x) => x.parse().unwrap_or(1 << 30),
            _ => 1 << 30,
        };
        let guest = ferry_core::qemu::QemuGuest {
            qemu: std::env::var_os("FERRY_SIM_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            // TCG allocates lazily, but a 2-core test box need not promise gigabytes.
            memory_mib: (mem >> 20).clamp(64, 1024) as u32,
            drive: uri,
            console,
            qmp: dir.join(format!("{uuid}.qmp")),
        };
        let log = std::fs::File::create(dir.join(format!("{uuid}.qemu.log"))).map_err(fail)?;
        let log2 = log.try_clone().map_err(fail)?;
        // setpriv's parent-death signal: a killed simulator takes its guests with it.
        let mut cmd = match in_path("setpriv") {
            Some(sp) => {
                let mut c = tokio::process::Command::new(sp);
                c.args(["--pdeathsig", "KILL", "--"]).arg(&guest.qemu);
                c
            }
            None => tokio::process::Command::new(&guest.qemu),
        };
        cmd.args(guest.args())
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(fail)?;
        tracing::info!(vm = %uuid, "booting the VM in qemu over NBD");
        self.guests.insert(vm.to_string(), child);
        Ok(())
    }

    /// On shutdown: stops the VM's qemu, if it has one.
    pub(crate) async fn stop_guest(&mut self, vm: &str) {
        if let Some(mut c) = self.guests.remove(vm) {
            let _ = c.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        }
    }
}
