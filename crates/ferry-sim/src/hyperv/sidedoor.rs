//! The side door: what a test or demo does to the host that no WMI client could (act as the
//! guest, break RCT, inject faults). Reachable in-process through [`HypervSim`] methods and over
//! the wire as methods of the WMI class `FerrySim_SideDoor` (any selector), so a test driving a
//! separate `ferry sim hyperv` process has the same powers. A real host answers
//! `w:DestinationUnreachable` for the class, so no driver code can come to depend on it
//! unnoticed.
//!
//! | method | parameters | effect |
//! |---|---|---|
//! | `GuestWrite` | `VirtualSystem` (name or id), `Disk` (`disk0` or id), `Offset`, `Data` (base64) | the running guest writes; RCT records it |
//! | `UntrackedWrite` | same | a write RCT misses (a host bug) |
//! | `BreakRct` | `VirtualSystem`, `Disk` | RCT restarts: every earlier RCT id of the disk is invalid |
//! | `AgentPin` | `Fingerprint` (`sha256:…`) | the host agent admits this appliance client certificate |
//! | `FailNext` | `Method` (`Class.Method`), `Count`, optional `Skip` | after `Skip` more calls, the next `Count` calls of the method end in a failed job |

use super::{Fault, HypervSim, State, fault, set_rv};
use base64::Engine as _;
use ferry_wsman::cim::Instance;
use ferry_wsman::xml::Node;
use std::path::PathBuf;

/// The side door's WMI class.
pub const CLASS: &str = "FerrySim_SideDoor";

impl State {
    /// A guest write to disk `disk` of VM `vm` (id or name); refused unless the VM runs.
    pub(super) fn guest_write(
        &mut self,
        vm: &str,
        disk: &str,
        off: u64,
        data: &[u8],
        tracked: bool,
    ) -> Result<(), String> {
        let running = self
            .objects
            .get("Msvm_ComputerSystem")
            .and_then(|v| {
                v.iter().find(|i| {
                    i.text("Caption") == Some("Virtual Machine")
                        && (i.text("Name") == Some(vm) || i.text("ElementName") == Some(vm))
                })
            })
            .ok_or_else(|| format!("no VM `{vm}`"))?
            .text("EnabledState")
            == Some("2");
        if !running {
            return Err(format!("VM `{vm}` is not running: its guest cannot write"));
        }
        let s = self.storage.as_mut().ok_or("no storage")?;
        let i = s.find(vm, disk)?;
        s.write(i, off, data, tracked)
    }

    pub(super) fn break_rct(&mut self, vm: &str, disk: &str) -> Result<(), String> {
        let s = self.storage.as_mut().ok_or("no storage")?;
        let i = s.find(vm, disk)?;
        s.break_rct(i);
        Ok(())
    }
}

/// A `FerrySim_SideDoor` method call.
pub(super) fn invoke(st: &mut State, method: &str, body: &Node) -> Result<Instance, Fault> {
    let arg = |k: &str| {
        body.text_at(k)
            .map(str::to_string)
            .ok_or_else(|| fault("InvalidParameter", format!("{CLASS}.{method} needs {k}.")))
    };
    let num = |k: &str| {
        arg(k)?
            .parse::<u64>()
            .map_err(|_| fault("InvalidParameter", format!("{k} is not a number.")))
    };
    let failed = |m: String| fault("InvalidParameter", m);
    match method {
        "GuestWrite" | "UntrackedWrite" => {
            let data = base64::engine::general_purpose::STANDARD
                .decode(arg("Data")?.trim())
                .map_err(|e| failed(format!("Data is not base64: {e}")))?;
            st.guest_write(
                &arg("VirtualSystem")?,
                &arg("Disk")?,
                num("Offset")?,
                &data,
                method == "GuestWrite",
            )
            .map_err(failed)?;
        }
        "AgentPin" => st
            .data_paths
            .add_pin(&arg("Fingerprint")?)
            .map_err(failed)?,
        "BreakRct" => st
            .break_rct(&arg("VirtualSystem")?, &arg("Disk")?)
            .map_err(failed)?,
        "FailNext" => {
            let m = arg("Method")?;
            let skip = match body.text_at("Skip") {
                Some(_) => num("Skip")? as usize,
                None => 0,
            };
            st.fail_next.insert(m, (skip, num("Count")? as usize));
        }
        other => {
            return Err(fault(
                "ActionNotSupported",
                format!("The side door has no method {other}."),
            ));
        }
    }
    let mut out = Instance::default();
    set_rv(&mut out, 0);
    Ok(out)
}

impl HypervSim {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running guest of `vm` (name or id) writes `data` at `offset` of disk `disk`
    /// (`disk0` or its id); RCT records it.
    pub fn guest_write(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        self.state().guest_write(vm, disk, offset, data, true)
    }

    /// A write RCT misses.
    pub fn untracked_write(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        self.state().guest_write(vm, disk, offset, data, false)
    }

    /// Restarts RCT of a disk: its earlier RCT ids become invalid.
    pub fn break_rct(&self, vm: &str, disk: &str) -> Result<(), String> {
        self.state().break_rct(vm, disk)
    }

    /// The host agent admits the appliance client certificate `fingerprint` (`sha256:…`).
    pub fn agent_pin(&self, fingerprint: &str) -> Result<(), String> {
        self.state().data_paths.add_pin(fingerprint)
    }

    /// The next `count` calls of `method` (`Class.Method`) end in a failed job.
    pub fn fail_next(&self, method: &str, count: usize) {
        self.fail_after(method, 0, count);
    }

    /// After `skip` more successful calls of `method`, the next `count` end in a failed job.
    pub fn fail_after(&self, method: &str, skip: usize, count: usize) {
        self.state().fail_next.insert(method.into(), (skip, count));
    }

    /// The file holding what the guest of `vm` sees on disk `disk` now (raw).
    pub fn live_disk(&self, vm: &str, disk: &str) -> Result<PathBuf, String> {
        let st = self.state();
        let s = st.storage.as_ref().ok_or("no storage")?;
        Ok(s.live_path(&s.disks[s.find(vm, disk)?]))
    }

    /// Where the host's volume `letter` (`C`) is stored: the `san-paths` target of `C:\`.
    pub fn volume_dir(&self, letter: char) -> PathBuf {
        self.dir.join("volumes").join(letter.to_string())
    }
}
