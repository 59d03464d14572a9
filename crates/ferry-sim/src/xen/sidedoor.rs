//! The side door: what a test or demo does to the pool that no XenAPI client could (act as
//! the guest, break CBT, inject faults). Reachable in-process through [`XenSim`](super::XenSim)
//! methods and over the wire as `sim.*` calls on any logged-in session, so a test driving a
//! separate `ferry sim xen` process (or the Python SDK: `session.xenapi.sim.guest_write(…)`)
//! has the same powers. Real xapi answers `MESSAGE_METHOD_UNKNOWN` to the class `sim`, so no
//! driver code can come to depend on it unnoticed.
//!
//! | call | parameters after the session | effect |
//! |---|---|---|
//! | `sim.guest_write` | VDI (ref or uuid), offset, base64 data | the guest writes (CBT stamped) |
//! | `sim.untracked_write` | same | a write CBT misses (a hypervisor bug) |
//! | `sim.break_cbt` | VDI | CBT log reset, as after a storage migration |
//! | `sim.set_nbd_network` | bool | purpose `nbd` on every network, or on none |
//! | `sim.fail_next` | method, `[code, params…]`, count | the next `count` calls of `method` fail |
//! | `sim.set_task_delay` | milliseconds | every later `Async.*` task stays pending that long |
//! | `sim.set_nbd_drop_after` | bytes (negative: never) | every later NBD connection dies after that much |

use super::api::{Failure, State};
use super::value::Value;
use base64::Engine as _;
use std::time::Duration;

type R<T> = Result<T, Failure>;

impl State {
    /// A VDI by ref or uuid.
    pub(crate) fn vdi_ref(&self, v: &str) -> R<String> {
        if self.obj("VDI", v).is_ok() {
            return Ok(v.to_string());
        }
        self.by_uuid("VDI", v)
    }

    /// Resets a live VDI's CBT log.
    pub(crate) fn break_cbt(&mut self, vdi: &str) -> R<()> {
        let d = self
            .disks
            .get_mut(vdi)
            .ok_or_else(|| Failure::new("HANDLE_INVALID", &["VDI", vdi]))?;
        d.cbt_epoch += 1;
        Ok(())
    }

    /// Adds or removes purpose `nbd` on every network.
    pub(crate) fn set_nbd_network(&mut self, enabled: bool) -> R<()> {
        for n in self.all_of("network") {
            let mut p = self.frefs("network", &n, "purpose")?;
            p.retain(|x| x != "nbd" && x != "insecure_nbd");
            if enabled {
                p.push("nbd".into());
            }
            self.set("network", &n, "purpose", Value::strs(&p))?;
        }
        Ok(())
    }

    /// Queues `count` failures of `method`.
    pub(crate) fn fail_next(&mut self, method: &str, error: Vec<String>, count: usize) {
        let q = self.faults.fail_next.entry(method.to_string()).or_default();
        for _ in 0..count {
            q.push_back(error.clone());
        }
    }

    /// Runs `sim.<name>`; `strs[0]` is the (already checked) session.
    pub(crate) fn side_door(&mut self, name: &str, strs: &[String], params: &[Value]) -> R<Value> {
        let method = format!("sim.{name}");
        let arg = |i: usize| -> R<&str> {
            strs.get(i).map(|s| s.as_str()).ok_or_else(|| {
                Failure::new(
                    "MESSAGE_PARAMETER_COUNT_MISMATCH",
                    &[&method, &(i + 1).to_string(), &params.len().to_string()],
                )
            })
        };
        let int = |i: usize| -> R<i64> {
            let a = arg(i)?;
            a.parse()
                .map_err(|_| Failure::new("FIELD_TYPE_ERROR", &[&format!("{method}: `{a}`")]))
        };
        let flag = |i: usize| -> R<bool> {
            match arg(i)? {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                a => Err(Failure::new(
                    "FIELD_TYPE_ERROR",
                    &[&format!("{method}: `{a}`")],
                )),
            }
        };
        match name {
            "guest_write" | "untracked_write" => {
                let vdi = self.vdi_ref(arg(1)?)?;
                let offset = u64::try_from(int(2)?)
                    .map_err(|_| Failure::new("FIELD_TYPE_ERROR", &["offset"]))?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(arg(3)?.trim())
                    .map_err(|e| Failure::new("FIELD_TYPE_ERROR", &[&format!("data: {e}")]))?;
                self.write_live_vdi(&vdi, offset, &data, name == "guest_write")?;
            }
            "break_cbt" => {
                let vdi = self.vdi_ref(arg(1)?)?;
                self.break_cbt(&vdi)?;
            }
            "set_nbd_network" => self.set_nbd_network(flag(1)?)?,
            "fail_next" => {
                let m = arg(1)?.to_string();
                let error: Vec<String> = match params.get(2) {
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| v.as_str().unwrap_or_default().to_string())
                        .collect(),
                    _ => return Err(Failure::new("FIELD_TYPE_ERROR", &["error"])),
                };
                if error.is_empty() {
                    return Err(Failure::new("FIELD_TYPE_ERROR", &["error"]));
                }
                let count = usize::try_from(int(3)?)
                    .map_err(|_| Failure::new("FIELD_TYPE_ERROR", &["count"]))?;
                self.fail_next(&m, error, count);
            }
            "set_task_delay" => {
                let ms = u64::try_from(int(1)?)
                    .map_err(|_| Failure::new("FIELD_TYPE_ERROR", &["milliseconds"]))?;
                self.faults.task_delay = Duration::from_millis(ms);
            }
            "set_nbd_drop_after" => {
                self.faults.nbd_drop_after = u64::try_from(int(1)?).ok();
            }
            _ => return Err(Failure::new("MESSAGE_METHOD_UNKNOWN", &[&method])),
        }
        Ok(Value::s(""))
    }
}
