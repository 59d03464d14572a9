//! `Msvm_VirtualEthernetSwitchManagementService` (ADR 0187): `DefineSystem` of an embedded
//! `Msvm_VirtualEthernetSwitchSettingData` (its `ElementName`) without `ResourceSettings` makes a
//! private switch (no uplink: no external or internal port), `DestroySystem(AffectedSystem)`
//! removes a switch no adapter is connected to, as Hyper-V refuses one in use.

use super::{Fault, State, fault, guid, inst, job_out, param_ref, text};
use ferry_wsman::cim::{self, Epr, Instance, Value};
use ferry_wsman::xml::Node;

/// The service class.
pub const SERVICE: &str = "Msvm_VirtualEthernetSwitchManagementService";
const SWITCH: &str = "Msvm_VirtualEthernetSwitch";

/// A method of the switch management service.
pub(super) fn invoke(
    st: &mut State,
    method: &str,
    body: &Node,
    out: &mut Instance,
) -> Result<(), Fault> {
    let r = match method {
        "DefineSystem" => define(st, body, out),
        "DestroySystem" => destroy(st, body),
        _ => {
            return Err(fault(
                "ActionNotSupported",
                format!("The method {SERVICE}.{method} is not supported by this simulator."),
            ));
        }
    };
    job_out(st, out, method, r);
    Ok(())
}

fn define(st: &mut State, body: &Node, out: &mut Instance) -> Result<(), String> {
    let (class, props) = body
        .text_at("SystemSettings")
        .and_then(cim::parse_embedded)
        .ok_or("DefineSystem needs SystemSettings (an embedded instance).")?;
    if class != "Msvm_VirtualEthernetSwitchSettingData" {
        return Err(format!(
            "SystemSettings must be an embedded Msvm_VirtualEthernetSwitchSettingData, not {class}."
        ));
    }
    if body.all("ResourceSettings").next().is_some() {
        return Err("This simulator makes private switches only (no ResourceSettings).".into());
    }
    let name = props
        .get("ElementName")
        .filter(|n| !n.is_empty())
        .ok_or("The switch needs an ElementName.")?
        .clone();
    let id = guid(&st.id(&name));
    st.objects.entry(SWITCH.into()).or_default().push(inst(
        SWITCH,
        &[
            ("CreationClassName", text(SWITCH)),
            ("Name", text(&id)),
            ("ElementName", text(&name)),
        ],
    ));
    out.props.insert(
        "ResultingSystem".into(),
        Value::Ref(Epr::new(
            SWITCH,
            &[("CreationClassName", SWITCH), ("Name", id.as_str())],
        )),
    );
    Ok(())
}

fn destroy(st: &mut State, body: &Node) -> Result<(), String> {
    let r = param_ref(body, "AffectedSystem").ok_or("DestroySystem needs AffectedSystem.")?;
    let id = r
        .selector("Name")
        .ok_or("AffectedSystem names no switch.")?
        .to_string();
    if !st
        .objects
        .get(SWITCH)
        .is_some_and(|v| v.iter().any(|s| s.text("Name") == Some(id.as_str())))
    {
        return Err(format!("The virtual switch '{id}' does not exist."));
    }
    // Hyper-V refuses to delete a switch an adapter is connected to.
    let used = st
        .objects
        .get("Msvm_EthernetPortAllocationSettingData")
        .is_some_and(|v| {
            v.iter().any(|c| {
                c.texts("HostResource")
                    .iter()
                    .any(|h| h.contains(&format!("Name=\"{id}\"")))
            })
        });
    if used {
        return Err(format!(
            "The virtual switch '{id}' cannot be deleted: a network adapter is connected to it."
        ));
    }
    if let Some(v) = st.objects.get_mut(SWITCH) {
        v.retain(|s| s.text("Name") != Some(id.as_str()));
    }
    Ok(())
}
