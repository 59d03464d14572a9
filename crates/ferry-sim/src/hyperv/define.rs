//! `Msvm_VirtualSystemManagementService`: the calls of a whole-VM restore. `DefineSystem`
//! (a new VM from an embedded VSSD, with the default processor and memory settings and, for
//! generation 1, the two IDE controllers), `AddResourceSettings` (SCSI controllers, disk
//! drives, virtual hard disks, synthetic network adapters and their switch connections),
//! `ModifyResourceSettings` (processors, memory), `AddFeatureSettings` (a connection's VLAN)
//! and `DestroySystem`. Every call answers with a job, as the host does.
//!
//! Embedded instances are checked as Hyper-V checks them: a class the method does not take, a
//! property the class does not have, a parent that is not this VM's, a switch or file that
//! does not exist, a bad MAC or VLAN end the job in an error worded like the host's. A virtual
//! hard disk attached to a VM joins the simulated storage ([`super::disks`]): its guest sees
//! the image's content, checkpoints and RCT work on it as on the seeded guests. `DestroySystem`
//! removes the VM and its settings but, like Hyper-V, leaves its VHDX files on the volume.

use super::controllers::{self, DRIVE, IDE, SCSI};
use super::{Fault, State, fault, guid, inst, job_out, param_ref, text};
use ferry_core::BlockSource;
use ferry_wsman::cim::{Epr, Instance, Value};
use ferry_wsman::xml::{self, Node};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

/// The service's class.
pub(super) const SERVICE: &str = "Msvm_VirtualSystemManagementService";

const VHD: &str = "Microsoft:Hyper-V:Virtual Hard Disk";
const PORT: &str = "Microsoft:Hyper-V:Synthetic Ethernet Port";
const CONNECTION: &str = "Microsoft:Hyper-V:Ethernet Connection";
const GEN1: &str = "Microsoft:Hyper-V:SubType:1";
const GEN2: &str = "Microsoft:Hyper-V:SubType:2";

/// The properties an embedded instance of `class` may carry.
fn known(class: &str) -> Option<&'static [&'static str]> {
    Some(match class {
        "Msvm_VirtualSystemSettingData" => &[
            "InstanceID",
            "ElementName",
            "VirtualSystemType",
            "VirtualSystemSubType",
            "SecureBootEnabled",
            "ConfigurationDataRoot",
            "SnapshotDataRoot",
            "Notes",
            "Version",
        ],
        "Msvm_ProcessorSettingData" => &[
            "InstanceID",
            "ResourceType",
            "ResourceSubType",
            "VirtualQuantity",
            "Reservation",
            "Limit",
            "Weight",
        ],
        "Msvm_MemorySettingData" => &[
            "InstanceID",
            "ResourceType",
            "ResourceSubType",
            "AllocationUnits",
            "VirtualQuantity",
            "DynamicMemoryEnabled",
            "Reservation",
            "Limit",
        ],
        "Msvm_ResourceAllocationSettingData" => &[
            "InstanceID",
            "ResourceType",
            "ResourceSubType",
            "ElementName",
            "Parent",
            "AddressOnParent",
            "Address",
        ],
        "Msvm_StorageAllocationSettingData" => &[
            "InstanceID",
            "ResourceType",
            "ResourceSubType",
            "ElementName",
            "Parent",
            "HostResource",
            "AddressOnParent",
        ],
        "Msvm_SyntheticEthernetPortSettingData" => &[
            "InstanceID",
            "ResourceType",
            "ResourceSubType",
            "ElementName",
            "Address",
            "StaticMacAddress",
        ],
        "Msvm_EthernetPortAllocationSettingData" => &[
            "InstanceID",
            "ResourceType",
            "ResourceSubType",
            "ElementName",
            "Parent",
            "HostResource",
            "EnabledState",
        ],
        // VLANs in every mode and bandwidth (ADR 0181).
        other => return super::port_features::known(other),
    })
}

/// An embedded instance: its class and property → values.
#[derive(Debug)]
struct Embedded {
    class: String,
    props: BTreeMap<String, Vec<String>>,
}

impl Embedded {
    fn get(&self, k: &str) -> Option<&str> {
        self.props
            .get(k)?
            .first()
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn all(&self, k: &str) -> &[String] {
        self.props.get(k).map(Vec::as_slice).unwrap_or_default()
    }

    fn num(&self, k: &str) -> Result<Option<u64>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                format!(
                    "The value '{v}' of property '{k}' of class '{}' is not valid.",
                    self.class
                )
            }),
        }
    }

    fn flag(&self, k: &str) -> Result<Option<bool>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(format!(
                "The value '{v}' of property '{k}' of class '{}' is not a boolean.",
                self.class
            )),
        }
    }
}

/// Reads the CIM-XML (DSP0201) `INSTANCE` of parameter `param`: `PROPERTY` and
/// `PROPERTY.ARRAY` elements, each named by a property the class has.
fn parse(param: &str, text: &str) -> Result<Embedded, String> {
    let n = xml::parse(text.as_bytes())
        .map_err(|e| format!("The parameter {param} is not an embedded instance: {e}"))?;
    if n.name != "INSTANCE" {
        return Err(format!(
            "The parameter {param} is not an embedded instance (found <{}>).",
            n.name
        ));
    }
    let class = n
        .attr("CLASSNAME")
        .ok_or_else(|| format!("The embedded instance in {param} has no CLASSNAME."))?
        .to_string();
    let allowed = known(&class).ok_or_else(|| {
        format!("The class '{class}' of the embedded instance in {param} is not valid here.")
    })?;
    let mut props = BTreeMap::new();
    for p in &n.children {
        let name = p.attr("NAME").unwrap_or("");
        let values: Vec<String> = match p.name.as_str() {
            "PROPERTY" => p
                .child("VALUE")
                .map(|v| vec![v.text.trim().to_string()])
                .unwrap_or_default(),
            "PROPERTY.ARRAY" => p
                .child("VALUE.ARRAY")
                .map(|a| a.all("VALUE").map(|v| v.text.trim().to_string()).collect())
                .unwrap_or_default(),
            other => {
                return Err(format!(
                    "The embedded instance in {param} holds an unexpected <{other}>."
                ));
            }
        };
        if !allowed.contains(&name) {
            return Err(format!(
                "The property '{name}' is not a property of class '{class}'."
            ));
        }
        props.insert(name.to_string(), values);
    }
    Ok(Embedded { class, props })
}

/// The InstanceID a WMI object path names (`…:Class.InstanceID="Microsoft:A\\B"`), or the
/// text itself when it is a bare InstanceID.
fn path_id(path: &str) -> String {
    match path.find("InstanceID=\"") {
        Some(at) => {
            let rest = &path[at + 12..];
            let end = rest.rfind('"').unwrap_or(rest.len());
            rest[..end].replace("\\\\", "\\").replace("\\\"", "\"")
        }
        None => path.to_string(),
    }
}

/// The `Name` key of a switch's object path.
fn switch_name(path: &str) -> Option<&str> {
    let at = path.rfind("Name=\"")? + 6;
    let rest = &path[at..];
    Some(&rest[..rest.find('"')?])
}

/// The VM of a setting's InstanceID `Microsoft:<vm>\…`.
fn owner(id: &str) -> &str {
    let id = id.strip_prefix("Microsoft:").unwrap_or(id);
    id.split('\\').next().unwrap_or(id)
}

fn epr(class: &str, id: &str) -> Epr {
    Epr::new(class, &[("InstanceID", id)])
}

impl State {
    fn push(&mut self, i: Instance) {
        self.objects.entry(i.class.clone()).or_default().push(i);
    }

    fn by_id(&self, class: &str, id: &str) -> Option<&Instance> {
        self.objects.get(class)?.iter().find(|i| {
            i.text("InstanceID")
                .is_some_and(|x| x.eq_ignore_ascii_case(id))
        })
    }

    fn vm_name(&self, vm: &str) -> String {
        self.objects
            .get("Msvm_ComputerSystem")
            .and_then(|v| v.iter().find(|i| i.text("Name") == Some(vm)))
            .and_then(|i| i.text("ElementName"))
            .unwrap_or(vm)
            .to_string()
    }

    /// The devices of `vm` of `class` and `subtype`.
    fn devices(&self, vm: &str, class: &str, subtype: &str) -> usize {
        self.objects.get(class).map_or(0, |v| {
            v.iter()
                .filter(|i| {
                    i.text("ResourceSubType") == Some(subtype)
                        && i.text("InstanceID").is_some_and(|x| owner(x) == vm)
                })
                .count()
        })
    }
}

/// A `Msvm_VirtualSystemManagementService` method.
pub(super) fn invoke(
    st: &mut State,
    method: &str,
    body: &Node,
    out: &mut Instance,
) -> Result<(), Fault> {
    let r = match method {
        "DefineSystem" => define(st, body, out),
        "AddResourceSettings" => add_resources(st, body, out),
        "ModifyResourceSettings" => modify_resources(st, body, out),
        "AddFeatureSettings" => add_features(st, body, out),
        "DestroySystem" => destroy(st, body),
        "ModifySystemSettings" => super::checkpoints::modify_system_settings(st, body, out),
        other => {
            return Err(fault(
                "ActionNotSupported",
                format!("The method {SERVICE}.{other} is not supported by this simulator."),
            ));
        }
    };
    job_out(st, out, method, r);
    Ok(())
}

fn define(st: &mut State, body: &Node, out: &mut Instance) -> Result<(), String> {
    let e = parse(
        "SystemSettings",
        body.text_at("SystemSettings")
            .ok_or("DefineSystem needs SystemSettings.")?,
    )?;
    if e.class != "Msvm_VirtualSystemSettingData" {
        return Err(format!(
            "SystemSettings must be an embedded Msvm_VirtualSystemSettingData, not {}.",
            e.class
        ));
    }
    let subtype = e.get("VirtualSystemSubType").unwrap_or(GEN1).to_string();
    if subtype != GEN1 && subtype != GEN2 {
        return Err(format!(
            "'{subtype}' is not a valid virtual machine generation (VirtualSystemSubType)."
        ));
    }
    let secure = e.flag("SecureBootEnabled")?.unwrap_or(subtype == GEN2);
    if secure && subtype == GEN1 {
        return Err("Secure Boot is only available for generation 2 virtual machines.".into());
    }
    let name = e
        .get("ElementName")
        .unwrap_or("New Virtual Machine")
        .to_string();
    let id = guid(&st.id("defined-vm-"));
    let root = e
        .get("ConfigurationDataRoot")
        .unwrap_or("C:\\ProgramData\\Microsoft\\Windows\\Hyper-V")
        .to_string();
    let snaps = e.get("SnapshotDataRoot").unwrap_or(&root).to_string();
    st.push(inst(
        "Msvm_ComputerSystem",
        &[
            ("CreationClassName", text("Msvm_ComputerSystem")),
            ("Name", text(&id)),
            ("ElementName", text(&name)),
            ("Caption", text("Virtual Machine")),
            ("EnabledState", text("3")),
            ("HealthState", text("5")),
            ("OperationalStatus", text("2")),
        ],
    ));
    st.push(inst(
        "Msvm_VirtualSystemSettingData",
        &[
            ("InstanceID", text(format!("Microsoft:{id}"))),
            ("ElementName", text(&name)),
            ("VirtualSystemIdentifier", text(&id)),
            (
                "VirtualSystemType",
                text("Microsoft:Hyper-V:System:Realized"),
            ),
            ("VirtualSystemSubType", text(&subtype)),
            ("SecureBootEnabled", text(secure.to_string())),
            ("Version", text("10.0")),
            ("ConfigurationDataRoot", text(&root)),
            ("SnapshotDataRoot", text(snaps)),
            ("Notes", text(e.get("Notes").unwrap_or(""))),
            ("Parent", Value::Null),
        ],
    ));
    // What a new VM has before anything is added: one processor, 1 GiB of static memory,
    // the integration services, and for generation 1 its two IDE controllers.
    st.push(inst(
        "Msvm_ProcessorSettingData",
        &[
            (
                "InstanceID",
                text(format!("Microsoft:{id}\\{}\\0", guid("cpu"))),
            ),
            ("ResourceType", text("3")),
            ("VirtualQuantity", text("1")),
        ],
    ));
    st.push(inst(
        "Msvm_MemorySettingData",
        &[
            (
                "InstanceID",
                text(format!("Microsoft:{id}\\{}", guid("memory"))),
            ),
            ("ResourceType", text("4")),
            ("AllocationUnits", text("byte * 2^20")),
            ("VirtualQuantity", text("1024")),
            ("DynamicMemoryEnabled", text("false")),
            ("Reservation", text("1024")),
            ("Limit", text("1024")),
        ],
    ));
    st.push(inst(
        "Msvm_VssComponent",
        &[
            ("CreationClassName", text("Msvm_VssComponent")),
            ("DeviceID", text(format!("Microsoft:{id}\\VSS"))),
            ("SystemCreationClassName", text("Msvm_ComputerSystem")),
            ("SystemName", text(&id)),
            ("ElementName", text("Backup (volume shadow copy)")),
            ("EnabledState", text("2")),
            ("OperationalStatus", text("2")),
        ],
    ));
    st.push(super::shutdown::component(&id, true));
    if subtype == GEN1 {
        for c in controllers::ide_controllers(&id) {
            st.push(c);
        }
    }
    for r in body.all("ResourceSettings") {
        if let Err(m) = parse("ResourceSettings", r.text.trim()).and_then(|e| add_one(st, &id, &e))
        {
            // DefineSystem is all or nothing.
            remove_vm(st, &id);
            return Err(m);
        }
    }
    out.props.insert(
        "ResultingSystem".into(),
        Value::Ref(Epr::new(
            "Msvm_ComputerSystem",
            &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", &id)],
        )),
    );
    Ok(())
}

/// The VM whose realized settings `AffectedConfiguration` references.
fn affected_vm(st: &State, body: &Node) -> Result<String, String> {
    let r = param_ref(body, "AffectedConfiguration")
        .ok_or("The method needs AffectedConfiguration.")?;
    let s = st
        .find("Msvm_VirtualSystemSettingData", &r.selectors)
        .ok_or("The virtual machine configuration does not exist.")?;
    if s.text("VirtualSystemType") != Some("Microsoft:Hyper-V:System:Realized") {
        return Err(
            "Resources can only be added to a virtual machine, not to a checkpoint.".into(),
        );
    }
    Ok(s.text("VirtualSystemIdentifier").unwrap_or("").to_string())
}

fn add_resources(st: &mut State, body: &Node, out: &mut Instance) -> Result<(), String> {
    let vm = affected_vm(st, body)?;
    let mut added = Vec::new();
    for r in body.all("ResourceSettings") {
        let e = parse("ResourceSettings", r.text.trim())?;
        added.push(Value::Ref(add_one(st, &vm, &e)?));
    }
    out.props
        .insert("ResultingResourceSettings".into(), Value::Array(added));
    Ok(())
}

fn need_subtype(e: &Embedded, want: &[&str]) -> Result<String, String> {
    let s = e.get("ResourceSubType").unwrap_or("");
    if want.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "The ResourceSubType '{s}' is not valid for class '{}'.",
            e.class
        ))
    }
}

fn failed(what: &str, why: impl std::fmt::Display) -> String {
    format!("Failed to add device '{what}'. {why}")
}

/// Adds one device to VM `vm`; its reference.
fn add_one(st: &mut State, vm: &str, e: &Embedded) -> Result<Epr, String> {
    match e.class.as_str() {
        "Msvm_ResourceAllocationSettingData" => {
            match need_subtype(e, &[SCSI, DRIVE, IDE])?.as_str() {
                SCSI => {
                    let n = st.devices(vm, &e.class, SCSI);
                    if n >= 4 {
                        return Err(failed(
                            "Synthetic SCSI Controller",
                            "A virtual machine has at most 4 SCSI controllers.",
                        ));
                    }
                    let c = controllers::scsi_controller(vm, n);
                    let id = c.text("InstanceID").unwrap_or("").to_string();
                    st.push(c);
                    Ok(epr(&e.class, &id))
                }
                DRIVE => add_drive(st, vm, e),
                _ => Err(failed(
                    "IDE Controller",
                    "A generation 1 virtual machine has its two IDE controllers; none can be added.",
                )),
            }
        }
        "Msvm_StorageAllocationSettingData" => add_vhd(st, vm, e),
        "Msvm_SyntheticEthernetPortSettingData" => add_port(st, vm, e),
        "Msvm_EthernetPortAllocationSettingData" => add_connection(st, vm, e),
        "Msvm_ProcessorSettingData" | "Msvm_MemorySettingData" => Err(format!(
            "A virtual machine has exactly one {}; change it with ModifyResourceSettings.",
            e.class
        )),
        other => Err(format!(
            "AddResourceSettings does not take an embedded {other}."
        )),
    }
}

fn add_port(st: &mut State, vm: &str, e: &Embedded) -> Result<Epr, String> {
    let what = "Synthetic Ethernet Port";
    need_subtype(e, &[PORT])?;
    let fixed = e.flag("StaticMacAddress")?.unwrap_or(false);
    let address = match (fixed, e.get("Address")) {
        (true, Some(a)) => {
            let ok = a.len() == 12
                && a.chars().all(|c| c.is_ascii_hexdigit())
                && u8::from_str_radix(&a[..2], 16).is_ok_and(|b| b & 1 == 0)
                && a != "000000000000";
            if !ok {
                return Err(failed(
                    what,
                    format!("'{a}' is not a valid static MAC address."),
                ));
            }
            a.to_ascii_uppercase()
        }
        (true, None) => return Err(failed(what, "A static MAC address needs Address.")),
        // Hyper-V's dynamic range.
        (false, _) => format!("00155D{:06X}", st.next_id & 0xff_ffff),
    };
    let id = format!("Microsoft:{vm}\\{}", guid(&st.id("nic-")));
    st.push(inst(
        &e.class,
        &[
            ("InstanceID", text(&id)),
            (
                "ElementName",
                text(e.get("ElementName").unwrap_or("Network Adapter")),
            ),
            ("ResourceType", text("10")),
            ("ResourceSubType", text(PORT)),
            ("Address", text(address)),
            ("StaticMacAddress", text(fixed.to_string())),
        ],
    ));
    Ok(epr(&e.class, &id))
}

fn add_connection(st: &mut State, vm: &str, e: &Embedded) -> Result<Epr, String> {
    let what = "Ethernet Connection";
    need_subtype(e, &[CONNECTION])?;
    let port = path_id(
        e.get("Parent")
            .ok_or_else(|| failed(what, "The connection needs Parent (its network adapter)."))?,
    );
    let port = st
        .by_id("Msvm_SyntheticEthernetPortSettingData", &port)
        .and_then(|p| p.text("InstanceID"))
        .filter(|x| owner(x) == vm)
        .ok_or_else(|| {
            failed(
                what,
                format!("The network adapter '{port}' does not belong to this virtual machine."),
            )
        })?
        .to_string();
    let id = format!("{port}\\C");
    if st.by_id(&e.class, &id).is_some() {
        return Err(failed(what, "The network adapter is connected already."));
    }
    let host = e.all("HostResource");
    let [switch] = host else {
        return Err(failed(
            what,
            format!(
                "HostResource must name one virtual switch, not {}.",
                host.len()
            ),
        ));
    };
    let exists = switch_name(switch).is_some_and(|n| {
        st.objects
            .get("Msvm_VirtualEthernetSwitch")
            .is_some_and(|v| v.iter().any(|s| s.text("Name") == Some(n)))
    });
    if !exists {
        return Err(failed(
            what,
            format!("The virtual switch '{switch}' was not found."),
        ));
    }
    st.push(inst(
        &e.class,
        &[
            ("InstanceID", text(&id)),
            ("ElementName", text("Dynamic Ethernet Switch Port")),
            ("ResourceType", text("33")),
            ("ResourceSubType", text(CONNECTION)),
            ("Parent", text(&port)),
            ("HostResource", Value::Array(vec![text(switch.as_str())])),
            ("EnabledState", text("2")),
        ],
    ));
    Ok(epr(&e.class, &id))
}

fn add_drive(st: &mut State, vm: &str, e: &Embedded) -> Result<Epr, String> {
    let what = "Synthetic Disk Drive";
    let parent = path_id(
        e.get("Parent")
            .ok_or_else(|| failed(what, "The drive needs Parent (its controller)."))?,
    );
    let ctl = st
        .by_id("Msvm_ResourceAllocationSettingData", &parent)
        .filter(|c| {
            c.text("InstanceID").is_some_and(|x| owner(x) == vm)
                && matches!(c.text("ResourceSubType"), Some(SCSI | IDE))
        })
        .ok_or_else(|| {
            failed(
                what,
                format!("The controller '{parent}' does not belong to this virtual machine."),
            )
        })?;
    let ctl_id = ctl.text("InstanceID").unwrap_or("").to_string();
    let slots = if ctl.text("ResourceSubType") == Some(IDE) {
        2
    } else {
        64
    };
    let addr = e
        .num("AddressOnParent")
        .map_err(|m| failed(what, m))?
        .ok_or_else(|| failed(what, "The drive needs AddressOnParent."))?;
    if addr >= slots {
        return Err(failed(
            what,
            format!(
                "Location {addr} does not exist on the controller (0 to {}).",
                slots - 1
            ),
        ));
    }
    let id = format!("{ctl_id}\\{addr}\\D");
    if st
        .by_id("Msvm_ResourceAllocationSettingData", &id)
        .is_some()
    {
        return Err(failed(
            what,
            format!("Location {addr} of the controller is in use."),
        ));
    }
    // Recorded as the host records it: `Parent` is the controller's (IDE or SCSI) path.
    st.push(controllers::drive(
        &controllers::host_name(st),
        &ctl_id,
        addr,
    ));
    Ok(epr("Msvm_ResourceAllocationSettingData", &id))
}

/// Attaches the image a `Msvm_StorageAllocationSettingData` names to its drive; the image
/// joins the simulated storage, its content becoming what the guest sees.
fn add_vhd(st: &mut State, vm: &str, e: &Embedded) -> Result<Epr, String> {
    let what = "Virtual Hard Disk";
    need_subtype(e, &[VHD])?;
    let parent = path_id(
        e.get("Parent")
            .ok_or_else(|| failed(what, "The disk needs Parent (its drive)."))?,
    );
    let drive = st
        .by_id("Msvm_ResourceAllocationSettingData", &parent)
        .filter(|d| {
            d.text("InstanceID").is_some_and(|x| owner(x) == vm)
                && d.text("ResourceSubType") == Some(DRIVE)
        })
        .ok_or_else(|| {
            failed(
                what,
                format!("The drive '{parent}' does not belong to this virtual machine."),
            )
        })?;
    let drive_id = drive.text("InstanceID").unwrap_or("").to_string();
    let addr = drive.text("AddressOnParent").unwrap_or("0").to_string();
    let taken = st.objects.get(&e.class).is_some_and(|v| {
        v.iter()
            .any(|d| d.text("Parent").map(path_id).as_deref() == Some(drive_id.as_str()))
    });
    let drive_path = controllers::path(&controllers::host_name(st), controllers::RASD, &drive_id);
    if taken {
        return Err(failed(what, "The drive holds a disk already."));
    }
    let host = e.all("HostResource");
    let [path] = host else {
        return Err(failed(
            what,
            format!("HostResource must name one image file, not {}.", host.len()),
        ));
    };
    let vm_name = st.vm_name(vm);
    let storage = st
        .storage
        .as_mut()
        .ok_or("The host's storage is not available.")?;
    if storage
        .disks
        .iter()
        .any(|d| d.host_path.eq_ignore_ascii_case(path))
    {
        return Err(failed(
            what,
            format!("The file '{path}' is in use by another virtual machine."),
        ));
    }
    let local = storage.local(path).map_err(|m| failed(what, m))?;
    let img = futures::executor::block_on(ferry_image::open_image(&local)).map_err(|x| {
        failed(
            what,
            format!(
                "The system cannot find the file specified, or it is not a virtual hard disk: '{path}' ({x})."
            ),
        )
    })?;
    let file = path.rsplit('\\').next().unwrap_or(path);
    let stem = file.rsplit_once('.').map_or(file, |(s, _)| s);
    let mut name = stem.to_string();
    let mut n = 1;
    while storage.find(vm, &name).is_ok() {
        n += 1;
        name = format!("{stem}-{n}");
    }
    let disk_id = guid(&format!("{vm}/{path}"));
    let size = img.source.size();
    let i = storage.adopt(vm, &vm_name, &name, &disk_id, path, size);
    if let Err(m) = fill_live(&storage.live_path(&storage.disks[i]), img.source.as_ref()) {
        let d = storage.disks.remove(i);
        let _ = std::fs::remove_file(storage.live_path(&d));
        return Err(failed(what, m));
    }
    let id = format!("Microsoft:{vm}\\{disk_id}\\0\\{addr}\\L");
    st.push(inst(
        &e.class,
        &[
            ("InstanceID", text(&id)),
            ("ElementName", text("Hard Disk Image")),
            ("ResourceType", text("31")),
            ("ResourceSubType", text(VHD)),
            ("Parent", text(drive_path)),
            ("HostResource", Value::Array(vec![text(path.as_str())])),
            ("AddressOnParent", text(addr)),
            ("VirtualQuantity", text(size.to_string())),
        ],
    ));
    Ok(epr(&e.class, &id))
}

/// Writes what `src` holds into the sparse raw file `live` (the guest's view of the disk).
pub(super) fn fill_live(live: &std::path::Path, src: &dyn BlockSource) -> Result<(), String> {
    let io = |e: std::io::Error| format!("{}: {e}", live.display());
    if let Some(p) = live.parent() {
        std::fs::create_dir_all(p).map_err(io)?;
    }
    let f = std::fs::File::create(live).map_err(io)?;
    let size = src.size();
    f.set_len(size).map_err(io)?;
    let map = futures::executor::block_on(src.allocated(0..size)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    for x in map.iter() {
        let mut at = x.offset;
        while at < x.offset + x.length {
            let n = (x.offset + x.length - at).min(buf.len() as u64) as usize;
            futures::executor::block_on(src.read_at(at, &mut buf[..n]))
                .map_err(|e| e.to_string())?;
            if buf[..n].iter().any(|b| *b != 0) {
                f.write_all_at(&buf[..n], at).map_err(io)?;
            }
            at += n as u64;
        }
    }
    Ok(())
}

fn modify_resources(st: &mut State, body: &Node, out: &mut Instance) -> Result<(), String> {
    let mut done = Vec::new();
    for r in body.all("ResourceSettings") {
        let e = parse("ResourceSettings", r.text.trim())?;
        let id = e
            .get("InstanceID")
            .ok_or_else(|| format!("The embedded {} has no InstanceID.", e.class))?
            .to_string();
        let Some(now) = st.by_id(&e.class, &id).cloned() else {
            return Err(format!(
                "The object {}.InstanceID=\"{id}\" does not exist.",
                e.class
            ));
        };
        let num = |k: &str| -> Result<Option<u64>, String> { Ok(e.num(k)?.or_else(|| now.u64(k))) };
        match e.class.as_str() {
            "Msvm_ProcessorSettingData" => {
                let n = num("VirtualQuantity")?.unwrap_or(1);
                if !(1..=240).contains(&n) {
                    return Err(format!(
                        "Failed to modify device 'Processor'. The virtual machine cannot have {n} virtual processors (1 to 240)."
                    ));
                }
            }
            "Msvm_MemorySettingData" => {
                let q = num("VirtualQuantity")?.unwrap_or(0);
                let dynamic = e
                    .flag("DynamicMemoryEnabled")?
                    .or_else(|| now.bool("DynamicMemoryEnabled"))
                    .unwrap_or(false);
                let bad = |why: String| format!("Failed to modify device 'Memory'. {why}");
                if q < 32 || q % 2 != 0 {
                    return Err(bad(format!(
                        "Startup memory must be an even number of MB, at least 32 (was {q})."
                    )));
                }
                if dynamic {
                    let lo = num("Reservation")?.unwrap_or(q);
                    let hi = num("Limit")?.unwrap_or(q);
                    if lo > q || q > hi {
                        return Err(bad(format!(
                            "Minimum ({lo} MB) <= startup ({q} MB) <= maximum ({hi} MB) does not hold."
                        )));
                    }
                }
            }
            "Msvm_SyntheticEthernetPortSettingData" | "Msvm_ResourceAllocationSettingData" => {}
            other => {
                return Err(format!(
                    "ModifyResourceSettings does not take an embedded {other}."
                ));
            }
        }
        let class = e.class.clone();
        if let Some(i) = st.objects.get_mut(&class).and_then(|v| {
            v.iter_mut()
                .find(|i| i.text("InstanceID") == Some(id.as_str()))
        }) {
            for (k, vs) in e.props {
                if matches!(
                    k.as_str(),
                    "InstanceID" | "ResourceType" | "ResourceSubType"
                ) {
                    continue;
                }
                let v = match vs.as_slice() {
                    [one] => text(one.as_str()),
                    many => Value::Array(many.iter().map(|s| text(s.as_str())).collect()),
                };
                i.props.insert(k, v);
            }
        }
        done.push(Value::Ref(epr(&class, &id)));
    }
    out.props
        .insert("ResultingResourceSettings".into(), Value::Array(done));
    Ok(())
}

fn add_features(st: &mut State, body: &Node, out: &mut Instance) -> Result<(), String> {
    let r = param_ref(body, "AffectedConfiguration")
        .ok_or("AddFeatureSettings needs AffectedConfiguration.")?;
    let conn = st
        .find("Msvm_EthernetPortAllocationSettingData", &r.selectors)
        .and_then(|c| c.text("InstanceID"))
        .ok_or("The Ethernet connection does not exist.")?
        .to_string();
    let mut added = Vec::new();
    for f in body.all("FeatureSettings") {
        let e = parse("FeatureSettings", f.text.trim())?;
        let id = format!("{conn}\\{}", guid(&st.id("feature-")));
        let existing = st.objects.get(&e.class).cloned().unwrap_or_default();
        let i = super::port_features::feature(&conn, &id, &e.class, &e.props, &existing)?;
        st.push(i);
        added.push(Value::Ref(epr(&e.class, &id)));
    }
    out.props
        .insert("ResultingFeatureSettings".into(), Value::Array(added));
    Ok(())
}

fn destroy(st: &mut State, body: &Node) -> Result<(), String> {
    let r = param_ref(body, "AffectedSystem").ok_or("DestroySystem needs AffectedSystem.")?;
    let vm = st
        .find("Msvm_ComputerSystem", &r.selectors)
        .filter(|v| v.text("Caption") == Some("Virtual Machine"))
        .ok_or("The virtual machine does not exist.")?;
    if vm.text("EnabledState") != Some("3") {
        return Err(
            "The operation cannot be performed while the virtual machine is in its current state (turn it off first)."
                .into(),
        );
    }
    let id = vm.text("Name").unwrap_or("").to_string();
    remove_vm(st, &id);
    Ok(())
}

/// Removes VM `id`, its settings, checkpoints and disks from the model (not its files).
fn remove_vm(st: &mut State, id: &str) {
    let mine = format!("Microsoft:{id}");
    for (class, v) in st.objects.iter_mut() {
        v.retain(|i| {
            let own = i.text("InstanceID").is_some_and(|x| {
                x.eq_ignore_ascii_case(&mine) || owner(x).eq_ignore_ascii_case(id)
            });
            let of_vm = i.text("VirtualSystemIdentifier") == Some(id)
                || (class == "Msvm_ComputerSystem" && i.text("Name") == Some(id))
                || ((class == "Msvm_VssComponent" || class == super::shutdown::CLASS)
                    && i.text("SystemName") == Some(id));
            !(own || of_vm)
        });
    }
    if let Some(s) = st.storage.as_mut() {
        let gone: Vec<usize> = (0..s.disks.len())
            .filter(|&i| s.disks[i].vm_id == id)
            .collect();
        for i in gone.into_iter().rev() {
            let d = s.disks.remove(i);
            let _ = std::fs::remove_file(s.live_path(&d));
            s.frozen
                .values_mut()
                .for_each(|f| f.retain(|x| x.disk_id != d.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_instances_are_checked() {
        let ok = "<INSTANCE CLASSNAME=\"Msvm_StorageAllocationSettingData\"><PROPERTY NAME=\"ResourceType\" TYPE=\"uint16\"><VALUE>31</VALUE></PROPERTY><PROPERTY.ARRAY NAME=\"HostResource\" TYPE=\"string\"><VALUE.ARRAY><VALUE>C:\\a.vhdx</VALUE></VALUE.ARRAY></PROPERTY.ARRAY></INSTANCE>";
        let e = parse("ResourceSettings", ok).unwrap();
        assert_eq!(e.all("HostResource"), ["C:\\a.vhdx"]);
        let bad = ok.replace("ResourceType", "Colour");
        assert!(
            parse("ResourceSettings", &bad)
                .unwrap_err()
                .contains("'Colour' is not a property")
        );
        let wrong = ok.replace("Msvm_StorageAllocationSettingData", "Msvm_Nothing");
        assert!(parse("X", &wrong).unwrap_err().contains("Msvm_Nothing"));
        assert_eq!(
            path_id(
                r#"\\H\root\virtualization\v2:Msvm_ResourceAllocationSettingData.InstanceID="Microsoft:A\\B\\0""#
            ),
            "Microsoft:A\\B\\0"
        );
        assert_eq!(owner("Microsoft:AB-1\\x\\y"), "AB-1");
        assert_eq!(
            switch_name(
                r#"\\H\root\virtualization\v2:Msvm_VirtualEthernetSwitch.CreationClassName="Msvm_VirtualEthernetSwitch",Name="S-1""#
            ),
            Some("S-1")
        );
    }
}
