//! The guest shutdown integration service (`Msvm_ShutdownComponent`, one per VM):
//! `InitiateShutdown` stops a running guest whose service runs; one whose service is off (side
//! door `GuestShutdown` with `Answer` = `refuse`, as a guest without integration services)
//! answers 32775 (invalid state), as Hyper-V does when the guest cannot be reached.
//!
//! | side-door method | parameters | effect |
//! |---|---|---|
//! | `GuestShutdown` | `VirtualSystem` (name or id), `Answer` (`accept` / `refuse`) | the guest's shutdown service runs or not |
//! | `ShutdownsOf` | `VirtualSystem` | `Requests`: what the guest received, `force=<bool> reason=<text>` each |

use super::{Fault, State, fault, inst, job_out, set_rv, text};
use ferry_wsman::cim::{Instance, Value};
use ferry_wsman::xml::Node;

/// The class.
pub const CLASS: &str = "Msvm_ShutdownComponent";

/// The shutdown requests each guest (VM id) received, oldest first.
#[derive(Debug, Default)]
pub(super) struct Log(std::collections::HashMap<String, Vec<String>>);

/// VM `id`'s shutdown component, its service running (`on`) or not.
pub(super) fn component(id: &str, on: bool) -> Instance {
    inst(
        CLASS,
        &[
            ("CreationClassName", text(CLASS)),
            ("DeviceID", text(format!("Microsoft:{id}\\Shutdown"))),
            ("SystemCreationClassName", text("Msvm_ComputerSystem")),
            ("SystemName", text(id)),
            ("ElementName", text("Shutdown")),
            ("EnabledState", text(if on { "2" } else { "3" })),
            // 12: no contact with the guest.
            ("OperationalStatus", text(if on { "2" } else { "12" })),
        ],
    )
}

/// A method of the shutdown component `selectors` names.
pub(super) fn invoke(
    st: &mut State,
    selectors: &[(String, String)],
    method: &str,
    body: &Node,
    out: &mut Instance,
) -> Result<(), Fault> {
    if method != "InitiateShutdown" {
        return Err(fault(
            "ActionNotSupported",
            format!("The method {CLASS}.{method} is not supported by this simulator."),
        ));
    }
    let comp = st
        .find(CLASS, selectors)
        .cloned()
        .ok_or_else(|| fault("InvalidSelectors", "No such shutdown component."))?;
    let vm = comp.text("SystemName").unwrap_or("").to_string();
    let sel = [("Name".to_string(), vm.clone())];
    let running = st
        .find("Msvm_ComputerSystem", &sel)
        .is_some_and(|v| v.text("EnabledState") == Some("2"));
    if !running || comp.text("EnabledState") != Some("2") {
        set_rv(out, 32775);
        return Ok(());
    }
    let force = body
        .text_at("Force")
        .unwrap_or("false")
        .eq_ignore_ascii_case("true");
    let reason = body.text_at("Reason").unwrap_or("").to_string();
    st.shutdowns
        .0
        .entry(vm)
        .or_default()
        .push(format!("force={force} reason={reason}"));
    if let Some(v) = st.find_mut("Msvm_ComputerSystem", &sel) {
        v.props.insert("EnabledState".into(), text("3"));
    }
    job_out(st, out, method, Ok(()));
    Ok(())
}

/// The VM id of `vm` (name or id).
fn vm_id(st: &State, vm: &str) -> Result<String, Fault> {
    st.objects
        .get("Msvm_ComputerSystem")
        .and_then(|v| {
            v.iter().find(|i| {
                i.text("Caption") == Some("Virtual Machine")
                    && (i.text("Name") == Some(vm) || i.text("ElementName") == Some(vm))
            })
        })
        .and_then(|i| i.text("Name"))
        .map(str::to_string)
        .ok_or_else(|| fault("InvalidParameter", format!("no VM `{vm}`")))
}

/// The side door's shutdown methods; `None` for the others.
pub(super) fn sidedoor(
    st: &mut State,
    method: &str,
    body: &Node,
) -> Option<Result<Instance, Fault>> {
    let arg = |k: &str| {
        body.text_at(k)
            .map(str::to_string)
            .ok_or_else(|| fault("InvalidParameter", format!("{method} needs {k}.")))
    };
    let run = |st: &mut State| -> Result<Instance, Fault> {
        let id = vm_id(st, &arg("VirtualSystem")?)?;
        let mut out = Instance::default();
        match method {
            "GuestShutdown" => {
                let on = match arg("Answer")?.as_str() {
                    "accept" => true,
                    "refuse" => false,
                    a => {
                        return Err(fault(
                            "InvalidParameter",
                            format!("Answer is `accept` or `refuse`, not `{a}`."),
                        ));
                    }
                };
                let c = st.objects.entry(CLASS.into()).or_default();
                c.retain(|i| i.text("SystemName") != Some(id.as_str()));
                c.push(component(&id, on));
            }
            _ => {
                let got = st.shutdowns.0.get(&id).cloned().unwrap_or_default();
                out.props.insert(
                    "Requests".into(),
                    Value::Array(got.into_iter().map(text).collect()),
                );
            }
        }
        set_rv(&mut out, 0);
        Ok(out)
    };
    matches!(method, "GuestShutdown" | "ShutdownsOf").then(|| run(st))
}
