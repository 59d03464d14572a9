//! What replication needs of a pool beyond backup and restore, as xapi does it:
//! `VDI.clone`, `VM.clone`/`VM.copy` (of a halted VM or a snapshot; a snapshot's clone is a
//! template, as `xe snapshot-clone` makes), `VM.revert` (the VM's disks are replaced by clones
//! of the snapshot's and the old ones destroyed: VDI uuids change), `VIF.move`, and
//! `network.create`/`destroy` (an internal network has no PIF).

use super::api::{Failure, NULL, Rec, State, rec};
use super::storage;
use super::value::Value;
use std::collections::BTreeMap;

type R<T> = Result<T, Failure>;

fn s(v: impl Into<String>) -> Value {
    Value::Str(v.into())
}

impl State {
    /// `VDI.clone`: a new live VDI on the same SR with the content of `vdi` (live or snapshot).
    pub(crate) async fn vdi_clone(&mut self, vdi: &str) -> R<String> {
        let d = self
            .disks
            .get(vdi)
            .cloned()
            .ok_or_else(|| Failure::new("VDI_MISSING", &["", vdi]))?;
        let file = d
            .file
            .clone()
            .ok_or_else(|| Failure::new("VDI_INCOMPATIBLE_TYPE", &[vdi, "cbt_metadata"]))?;
        let get = |f: &str| self.field("VDI", vdi, f);
        let new = self.vdi_create(rec([
            ("SR", get("SR")?),
            ("name_label", get("name_label")?),
            ("name_description", get("name_description")?),
            ("virtual_size", Value::Int(d.size as i64)),
            ("other_config", get("other_config")?),
        ]))?;
        let src = storage::open(&file, d.live).await.map_err(Self::backend)?;
        let out = self
            .disks
            .get(&new)
            .and_then(|n| n.file.clone())
            .ok_or_else(|| Failure::new("VDI_MISSING", &["", &new]))?;
        storage::materialize(src.as_ref(), &out)
            .await
            .map_err(Self::backend)?;
        // Every block counts as written: a snapshot of the clone must carry all of them.
        self.generation += 1;
        let g = self.generation;
        if let Some(n) = self.disks.get_mut(&new) {
            n.gens.iter_mut().for_each(|x| *x = g);
        }
        Ok(new)
    }

    /// `VM.clone` / `VM.copy`: a new VM with clones of the disks of `vm` (halted, or a
    /// snapshot: the copy is then a template).
    pub(crate) async fn vm_clone(&mut self, vm: &str, name: &str) -> R<String> {
        let src = self.obj("VM", vm)?.rec.clone();
        let snapshot = self.fbool("VM", vm, "is_a_snapshot")?;
        let state = self.fstr("VM", vm, "power_state")?;
        if !snapshot && state != "Halted" {
            return Err(Failure::new(
                "VM_BAD_POWER_STATE",
                &[vm, "halted", &state.to_lowercase()],
            ));
        }
        let mut r = src;
        for (k, v) in [
            ("name_label", s(name)),
            ("is_a_snapshot", Value::Bool(false)),
            ("is_a_template", Value::Bool(snapshot)),
            ("snapshot_of", s(NULL)),
            ("snapshots", Value::Array(vec![])),
            ("VBDs", Value::Array(vec![])),
            ("VIFs", Value::Array(vec![])),
            ("power_state", s("Halted")),
            ("resident_on", s(NULL)),
        ] {
            r.insert(k.into(), v);
        }
        r.remove("uuid");
        let new = self.add("VM", r);
        let made = self.copy_devices(vm, &new).await;
        if let Err(f) = made {
            for vbd in self.frefs("VM", &new, "VBDs").unwrap_or_default() {
                let vdi = self.fstr("VBD", &vbd, "VDI").unwrap_or_default();
                let _ = self.vdi_destroy(&vdi);
            }
            let _ = self.vm_destroy(&new);
            return Err(f);
        }
        Ok(new)
    }

    async fn copy_devices(&mut self, from: &str, to: &str) -> R<()> {
        for vbd in self.frefs("VM", from, "VBDs")? {
            let mut b: Rec = self.obj("VBD", &vbd)?.rec.clone();
            let vdi = self.fstr("VBD", &vbd, "VDI")?;
            let disk = self.fstr("VBD", &vbd, "type")? == "Disk" && vdi != NULL;
            let vdi = if disk {
                self.vdi_clone(&vdi).await?
            } else {
                vdi
            };
            b.insert("VM".into(), s(to));
            b.insert("VDI".into(), s(vdi));
            b.insert("empty".into(), Value::Bool(!disk));
            self.vbd_create(b)?;
        }
        for vif in self.frefs("VM", from, "VIFs")? {
            let mut f: Rec = self.obj("VIF", &vif)?.rec.clone();
            f.insert("VM".into(), s(to));
            self.vif_create(f)?;
        }
        Ok(())
    }

    /// `VM.revert(snapshot)`: the VM the snapshot was taken of gets clones of the snapshot's
    /// disks in place of its own (destroyed) and the snapshot's machine fields; a running VM
    /// is powered off first (a disk-only snapshot holds no memory to resume).
    pub(crate) async fn vm_revert(&mut self, snap: &str) -> R<()> {
        if !self.fbool("VM", snap, "is_a_snapshot")? {
            return Err(Failure::new("VM_NOT_A_SNAPSHOT", &[snap]));
        }
        let vm = self.fstr("VM", snap, "snapshot_of")?;
        if self.obj("VM", &vm).is_err() {
            return Err(Failure::new("VM_REVERT_FAILED", &[snap, "the VM is gone"]));
        }
        if self.fstr("VM", &vm, "power_state")? == "Running" {
            self.vm_power(&vm, false)?;
            self.stop_guest(&vm).await;
        }
        let vm_vbds: Vec<(String, String, String)> = self
            .frefs("VM", &vm, "VBDs")?
            .into_iter()
            .map(|b| {
                let dev = self.fstr("VBD", &b, "userdevice").unwrap_or_default();
                let vdi = self.fstr("VBD", &b, "VDI").unwrap_or_default();
                (b, dev, vdi)
            })
            .collect();
        for sb in self.frefs("VM", snap, "VBDs")? {
            let svdi = self.fstr("VBD", &sb, "VDI")?;
            if self.fstr("VBD", &sb, "type")? != "Disk" || svdi == NULL {
                continue;
            }
            let dev = self.fstr("VBD", &sb, "userdevice")?;
            let Some((vbd, _, old)) = vm_vbds.iter().find(|(_, d, _)| *d == dev) else {
                continue;
            };
            let new = self.vdi_clone(&svdi).await?;
            self.drop_ref("VDI", old, "VBDs", vbd);
            self.set("VBD", vbd, "VDI", s(new.clone()))?;
            self.push_ref("VDI", &new, "VBDs", vbd)?;
            if old != NULL {
                self.vdi_destroy(old)?;
            }
        }
        for k in [
            "VCPUs_max",
            "VCPUs_at_startup",
            "memory_static_max",
            "memory_static_min",
            "memory_dynamic_max",
            "memory_dynamic_min",
            "platform",
            "HVM_boot_params",
        ] {
            let v = self.field("VM", snap, k)?;
            self.set("VM", &vm, k, v)?;
        }
        Ok(())
    }

    /// `VIF.move(vif, network)`.
    pub(crate) fn vif_move(&mut self, vif: &str, net: &str) -> R<()> {
        self.obj("network", net)?;
        let old = self.fstr("VIF", vif, "network")?;
        self.drop_ref("network", &old, "VIFs", vif);
        self.set("VIF", vif, "network", s(net))?;
        self.push_ref("network", net, "VIFs", vif)
    }

    /// `network.create`: an internal network (no PIF).
    pub(crate) fn network_create(&mut self, r: Rec) -> R<String> {
        let get = |k: &str| r.get(k).cloned().unwrap_or(s(""));
        let n = self.all_of("network").len();
        Ok(self.add(
            "network",
            rec([
                ("name_label", get("name_label")),
                ("name_description", get("name_description")),
                ("bridge", s(format!("xapi{n}"))),
                ("MTU", r.get("MTU").cloned().unwrap_or(Value::Int(1500))),
                ("VIFs", Value::Array(vec![])),
                ("PIFs", Value::Array(vec![])),
                ("purpose", Value::Array(vec![])),
                (
                    "other_config",
                    r.get("other_config")
                        .cloned()
                        .unwrap_or(Value::Struct(BTreeMap::new())),
                ),
                ("tags", Value::Array(vec![])),
            ]),
        ))
    }

    /// `network.destroy`: refused while a VIF uses it.
    pub(crate) fn network_destroy(&mut self, net: &str) -> R<()> {
        if !self.frefs("network", net, "VIFs")?.is_empty() {
            return Err(Failure::new("NETWORK_CONTAINS_VIF", &[net]));
        }
        self.objs.remove(net);
        Ok(())
    }
}
