//! Whole-VM restore to Hyper-V (ADR 0156). `Msvm_VirtualSystemManagementService` defines the
//! VM: `DefineSystem` (name, generation, secure boot, its folder), `ModifyResourceSettings`
//! (processors; memory, static or dynamic). Every disk is then written as a VHDX by
//! `ferry-image` into the VM's new folder under the source's `restore-dir` (default: the folder
//! that held the backed-up VM's folder), through `san-paths` (a share or CSV the proxy mounts),
//! and attached: `AddResourceSettings` of the SCSI controller, a drive and its VHDX per disk; per
//! NIC a synthetic adapter with its MAC, static, and its connection to the switch of the same
//! name, then `AddFeatureSettings` for its port's VLAN (access, trunk, private) and bandwidth.
//!
//! Before anything is made, every NIC's switch must exist on the host (a missing one is an
//! error naming the host's switches and `--network-map`). A VM of the same name makes the new
//! one `NAME (2)`. A failure after that destroys the half-defined VM and removes the written
//! files; the VM and the folder are journaled, so a killed restore is removed by `recover`.
//!
//! From another hypervisor (no `msvm-vm-config+json` record) the normalized configuration
//! decides: BIOS → generation 1 with the boot disk on IDE 0:0, UEFI → generation 2; positions
//! Hyper-V has no place for go to the next free SCSI location, NIC models become synthetic
//! adapters — each said in a WARN line.

use crate::cim::{Epr, Instance, Param, Value};
use crate::client::WsmanClient;
use crate::config::NATIVE_FORMAT;
use crate::driver::hv;
use crate::error::HypervError;
use crate::wmi::{self, Wmi};
use crate::xml::escape;
use ferry_core::BlockSource;
use ferry_core::vm::{Firmware, VmConfig};
use ferry_hv::journal::Journal;
use ferry_hv::{HvError, NativeConfig, RestorePlan, RestoredVm, SourceConfig};
use serde_json::Value as J;
use std::path::{Path, PathBuf};

/// Journal kind of a VM a restore defined (destroyed by `recover` after a kill).
pub const VM_ENTRY: &str = "restore-vm";
/// Journal kind of the proxy-side folder a restore writes (removed by `recover` after a kill).
pub const FOLDER_ENTRY: &str = "restore-folder";

/// Turns VM `id` off and destroys it; `false` when it is gone already.
pub async fn destroy_vm(c: &WsmanClient, source: &str, id: &str) -> Result<bool, HvError> {
    let w = Wmi::new(c);
    let v = match w.vm(id).await {
        Ok(v) => v,
        Err(e) if wmi::is_gone(&e) => return Ok(false),
        Err(e) => return Err(hv(source, e)),
    };
    if v.text("EnabledState") != Some("3") {
        w.request_state(id, "3").await.map_err(|e| hv(source, e))?;
    }
    let svc = w.service(SERVICE).await.map_err(|e| hv(source, e))?;
    c.invoke(
        &svc,
        "DestroySystem",
        &[Param::Ref("AffectedSystem".into(), Wmi::vm_epr(id))],
    )
    .await
    .map_err(|e| hv(source, e))?;
    Ok(true)
}

/// Removes the restore folder `dir` (on the proxy's side of `san-paths`) if it still exists;
/// whether it is gone.
pub fn remove_folder(source: &str, dir: &str) -> bool {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            tracing::warn!(source = %source, folder = %dir, "removed the files of an unfinished restore");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(source = %source, folder = %dir, error = %e, "cannot remove the folder of an unfinished restore");
            false
        }
    }
}

/// Bytes read and written per step.
const PIECE: u64 = 1 << 20;
const SERVICE: &str = "Msvm_VirtualSystemManagementService";

/// A disk's place on the new VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// IDE (generation 1 only) or SCSI.
    pub ide: bool,
    /// Controller number (IDE 0–1, SCSI 0–3).
    pub controller: u32,
    /// Location on it (IDE 0–1, SCSI 0–63).
    pub location: u32,
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bus = if self.ide { "ide" } else { "scsi" };
        write!(f, "{bus}{}:{}", self.controller, self.location)
    }
}

fn parse_slot(s: &str) -> Option<Slot> {
    let (ctl, loc) = s.split_once(':')?;
    let (ide, n) = match ctl.strip_prefix("ide") {
        Some(n) => (true, n),
        None => (false, ctl.strip_prefix("scsi")?),
    };
    let slot = Slot {
        ide,
        controller: n.parse().ok()?,
        location: loc.parse().ok()?,
    };
    let fits = if ide {
        slot.controller < 2 && slot.location < 2
    } else {
        slot.controller < 4 && slot.location < 64
    };
    fits.then_some(slot)
}

/// Where each disk of `cfg` goes on a VM of generation `generation`: its own position when
/// Hyper-V has it (IDE only on generation 1), else — for the boot disk of a generation 1 VM —
/// IDE 0:0, else the next free SCSI 0 location; a generation 1 boot disk on SCSI goes to IDE 0:0
/// (ADR 0167). With a warning per disk that moved.
pub fn place_disks(cfg: &VmConfig, generation: u8) -> (Vec<Slot>, Vec<String>) {
    let mut own: Vec<Option<Slot>> = cfg
        .disks
        .iter()
        .map(|d| {
            d.controller
                .as_deref()
                .and_then(parse_slot)
                .filter(|s| !s.ide || generation == 1)
        })
        .collect();
    let mut warnings = Vec::new();
    if generation == 1 {
        warnings.extend(boot_from_ide(cfg, &mut own));
    }
    let mut taken: Vec<Slot> = own.iter().flatten().copied().collect();
    let mut out = Vec::new();
    for (d, slot) in cfg.disks.iter().zip(own) {
        let slot = slot.unwrap_or_else(|| {
            let boot = Slot {
                ide: true,
                controller: 0,
                location: 0,
            };
            let s = if generation == 1 && d.bootable && !taken.contains(&boot) {
                boot
            } else {
                (0..64)
                    .map(|location| Slot {
                        ide: false,
                        controller: 0,
                        location,
                    })
                    .find(|s| !taken.contains(s))
                    .unwrap_or(Slot {
                        ide: false,
                        controller: 1,
                        location: 0,
                    })
            };
            taken.push(s);
            warnings.push(format!(
                "disk `{}`: position `{}` does not exist on a generation {generation} Hyper-V VM; attached at {s}",
                d.name,
                d.controller.as_deref().unwrap_or("(none)")
            ));
            s
        });
        out.push(slot);
    }
    (out, warnings)
}

/// A generation 1 VM boots from IDE 0:0 only, and restore points taken before ADR 0166 hold its
/// boot disk as `scsi0:N`: that disk goes to IDE 0:0 (if no disk claims it), the others stay.
fn boot_from_ide(cfg: &VmConfig, own: &mut [Option<Slot>]) -> Option<String> {
    let boot = Slot {
        ide: true,
        controller: 0,
        location: 0,
    };
    if own.contains(&Some(boot)) {
        return None;
    }
    let i = cfg.disks.iter().position(|d| d.bootable)?;
    let from = own[i].filter(|s| !s.ide)?;
    own[i] = Some(boot);
    Some(format!(
        "disk `{}`: boot disk at `{from}`, but generation 1 boots from IDE only; attached at {boot}",
        cfg.disks[i].name
    ))
}

/// A NIC to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicPlan {
    /// `00155D0A0B0C`, kept static; `None`: Hyper-V assigns one.
    pub mac: Option<String>,
    /// The switch, by name.
    pub switch: Option<String>,
    /// Access VLAN.
    pub vlan: Option<u64>,
    /// The port's VLAN in any mode and its bandwidth, given back by `AddFeatureSettings`
    /// (ADR 0181).
    pub port: crate::port::PortFeatures,
}

/// The VM to define, from the plan's configuration and (from Hyper-V) its native record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPlan {
    /// 1 or 2.
    pub generation: u8,
    /// Secure boot (generation 2).
    pub secure_boot: bool,
    /// Virtual processors.
    pub cpus: u32,
    /// Startup memory in MiB.
    pub memory_mib: u64,
    /// Dynamic memory: (minimum, maximum) MiB.
    pub dynamic: Option<(u64, u64)>,
    /// Disk places, in the plan's disk order.
    pub slots: Vec<Slot>,
    /// Network adapters.
    pub nics: Vec<NicPlan>,
    /// The VM's notes.
    pub notes: String,
    /// What could not be carried over as it was.
    pub warnings: Vec<String>,
}

/// Hyper-V's memory: whole MiB, an even number, at least 32.
fn even_mib(bytes: u64) -> u64 {
    let mib = bytes.div_ceil(1 << 20).max(32);
    mib + mib % 2
}

/// `aa:bb:cc:dd:ee:ff` → `AABBCCDDEEFF`, if it is a MAC address.
fn hyperv_mac(m: &str) -> Option<String> {
    let a = m.replace([':', '-'], "").to_ascii_uppercase();
    (a.len() == 12 && a.chars().all(|c| c.is_ascii_hexdigit())).then_some(a)
}

/// The native record of `plan` when it came from Hyper-V.
fn native(n: Option<&NativeConfig>) -> Option<J> {
    n.filter(|n| n.format == NATIVE_FORMAT)
        .and_then(|n| serde_json::from_str(&n.record).ok())
}

/// Decides what to define for `plan` (pure: no host calls).
pub fn vm_plan(plan: &RestorePlan) -> VmPlan {
    let cfg = &plan.config;
    let rec = native(plan.native.as_ref());
    let mut warnings = Vec::new();
    let generation = match rec.as_ref().and_then(|r| r["generation"].as_u64()) {
        Some(1) => 1,
        Some(_) => 2,
        None if cfg.firmware == Firmware::Bios => 1,
        None => 2,
    };
    let secure_boot = match rec.as_ref().and_then(|r| r["secure_boot"].as_bool()) {
        Some(s) => s && generation == 2,
        None => cfg.firmware == Firmware::UefiSecureBoot,
    };
    let mem = rec.as_ref().map(|r| &r["memory"]);
    let memory_mib = mem
        .and_then(|m| m["startup_mib"].as_u64())
        .map(|m| even_mib(m << 20))
        .unwrap_or_else(|| even_mib(cfg.memory));
    let dynamic = mem
        .filter(|m| m["dynamic"].as_bool() == Some(true))
        .and_then(|m| Some((m["minimum_mib"].as_u64()?, m["maximum_mib"].as_u64()?)))
        .map(|(lo, hi)| (lo.min(memory_mib), hi.max(memory_mib)));
    let (slots, moved) = place_disks(cfg, generation);
    warnings.extend(moved);
    let native_nics = rec
        .as_ref()
        .and_then(|r| r["nics"].as_array().cloned())
        .unwrap_or_default();
    let mut nics = Vec::new();
    for (i, n) in cfg.nics.iter().enumerate() {
        if rec.is_none()
            && let Some(m) = n.model.as_deref().filter(|m| !m.is_empty())
        {
            warnings.push(format!(
                "NIC {i}: model `{m}` does not exist on Hyper-V; it becomes a synthetic network adapter"
            ));
        }
        let mac = n.mac.as_deref().and_then(hyperv_mac);
        if let (None, Some(m)) = (&mac, &n.mac) {
            warnings.push(format!(
                "NIC {i}: `{m}` is not a MAC address; Hyper-V assigns one"
            ));
        }
        nics.push(NicPlan {
            mac,
            switch: n.network.clone().filter(|s| !s.is_empty()),
            vlan: native_nics
                .get(i)
                .and_then(|x| x["vlan"].as_u64())
                .filter(|v| *v != 0),
            port: native_nics
                .get(i)
                .map(crate::port::PortFeatures::from_json)
                .unwrap_or_default(),
        });
    }
    let notes = rec
        .as_ref()
        .and_then(|r| r["settings"]["Notes"].as_str().map(str::to_string))
        .unwrap_or_default();
    VmPlan {
        generation,
        secure_boot,
        cpus: cfg.cpus.max(1),
        memory_mib,
        dynamic,
        slots,
        nics,
        notes,
        warnings,
    }
}

/// What a Hyper-V restore point holds that another hypervisor's restore cannot carry (its
/// native record is not applied there): one line each, for WARN lines.
pub fn not_carried(native: &NativeConfig) -> Vec<String> {
    let Some(r) = self::native(Some(native)) else {
        return vec![];
    };
    let mut out = Vec::new();
    if r["memory"]["dynamic"].as_bool() == Some(true) {
        out.push(format!(
            "dynamic memory ({}–{} MiB) is not kept: the VM gets its startup memory, static",
            r["memory"]["minimum_mib"], r["memory"]["maximum_mib"]
        ));
    }
    for (i, n) in r["nics"].as_array().into_iter().flatten().enumerate() {
        let switch = n["switch"].as_str().unwrap_or("");
        out.extend(crate::port::PortFeatures::from_json(n).lost(i, switch));
    }
    if r["generation"].as_u64() == Some(2) && r["secure_boot"].as_bool() == Some(true) {
        out.push("Hyper-V generation 2 with secure boot: the target boots UEFI with secure boot if it offers it".into());
    }
    out
}

/// A file-system safe folder or file name from `s`.
fn safe_name(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| {
            if c.is_control() || "<>:\"/\\|?*".contains(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let n = n.trim().trim_end_matches('.').to_string();
    if n.is_empty() { "vm".into() } else { n }
}

/// CIM-XML of an embedded instance with scalar and array properties (`(name, CIM type,
/// values)`; one value is a scalar unless the name is in `arrays`).
fn embedded(class: &str, props: &[(&str, &str, Vec<String>)], arrays: &[&str]) -> String {
    let mut s = format!("<INSTANCE CLASSNAME=\"{}\">", escape(class));
    for (name, ty, values) in props {
        if arrays.contains(name) {
            s.push_str(&format!(
                "<PROPERTY.ARRAY NAME=\"{}\" TYPE=\"{}\"><VALUE.ARRAY>",
                escape(name),
                escape(ty)
            ));
            for v in values {
                s.push_str(&format!("<VALUE>{}</VALUE>", escape(v)));
            }
            s.push_str("</VALUE.ARRAY></PROPERTY.ARRAY>");
        } else {
            s.push_str(&format!(
                "<PROPERTY NAME=\"{}\" TYPE=\"{}\"><VALUE>{}</VALUE></PROPERTY>",
                escape(name),
                escape(ty),
                escape(values.first().map(String::as_str).unwrap_or(""))
            ));
        }
    }
    s.push_str("</INSTANCE>");
    s
}

fn p(
    name: &'static str,
    ty: &'static str,
    v: impl ToString,
) -> (&'static str, &'static str, Vec<String>) {
    (name, ty, vec![v.to_string()])
}

/// The WMI object path of a setting (`Parent` properties take paths).
fn wmi_path(host: &str, class: &str, id: &str) -> String {
    format!(
        "\\\\{host}\\root\\virtualization\\v2:{class}.InstanceID=\"{}\"",
        id.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

fn switch_path(host: &str, id: &str) -> String {
    format!(
        "\\\\{host}\\root\\virtualization\\v2:Msvm_VirtualEthernetSwitch.CreationClassName=\"Msvm_VirtualEthernetSwitch\",Name=\"{id}\""
    )
}

/// The references in out parameter `k` (one, or an array).
fn refs(out: &Instance, k: &str) -> Vec<Epr> {
    match out.props.get(k) {
        Some(Value::Ref(e)) => vec![e.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| match v {
                Value::Ref(e) => Some(e.clone()),
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

/// One restore in progress: the host, what it created so far.
struct Run<'a> {
    c: &'a WsmanClient,
    source: &'a str,
    cfg: &'a SourceConfig,
    journal: &'a Journal,
    svc: Epr,
    host: String,
    vm: Option<String>,
    files: Vec<PathBuf>,
    folder: Option<PathBuf>,
    /// The journaled folder (removed from the journal once done or undone).
    folder_entry: Option<String>,
}

impl Run<'_> {
    fn err(&self, e: HypervError) -> HvError {
        hv(self.source, e)
    }

    fn fail(&self, call: &str, message: impl Into<String>) -> HvError {
        HvError::Api {
            source_name: self.source.into(),
            call: call.into(),
            message: message.into(),
            retryable: false,
        }
    }

    async fn call(&self, method: &str, params: &[Param]) -> Result<Instance, HvError> {
        self.c
            .invoke(&self.svc, method, params)
            .await
            .map_err(|e| self.err(e))
    }

    /// `AddResourceSettings` of one device; its InstanceID.
    async fn add(&self, vssd: &Epr, what: &str, instance: String) -> Result<String, HvError> {
        let out = self
            .call(
                "AddResourceSettings",
                &[
                    Param::Ref("AffectedConfiguration".into(), vssd.clone()),
                    Param::Texts("ResourceSettings".into(), vec![instance]),
                ],
            )
            .await?;
        refs(&out, "ResultingResourceSettings")
            .first()
            .and_then(|e| e.selector("InstanceID"))
            .map(str::to_string)
            .ok_or_else(|| {
                self.fail(
                    "AddResourceSettings",
                    format!("the host returned no reference to the added {what}"),
                )
            })
    }

    /// Removes the half-made VM and the written files; what cannot be removed stays journaled
    /// for `ferry source cleanup`.
    async fn undo(&mut self) {
        if let Some(id) = self.vm.clone() {
            match destroy_vm(self.c, self.source, &id).await {
                Ok(_) => {
                    self.vm = None;
                    self.note(false, VM_ENTRY, &id);
                }
                Err(e) => {
                    tracing::warn!(source = %self.source, vm = %id, error = %e, "cannot destroy the partial VM; `ferry source cleanup` retries")
                }
            }
        }
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(&f);
        }
        self.folder = None;
        if let Some(d) = self.folder_entry.take() {
            if crate::restore_agent::remove_folder(self.source, self.cfg, &d).await {
                self.note(false, FOLDER_ENTRY, &d);
            } else {
                self.folder_entry = Some(d);
            }
        }
    }

    /// Journals what this restore made (a killed run leaves it to `recover`).
    fn note(&self, add: bool, kind: &str, id: &str) {
        self.journal.note(self.source, add, kind, id);
    }

    /// Drops the journal entries of what is done or undone.
    fn forget(&mut self) {
        if let Some(id) = self.vm.take() {
            self.note(false, VM_ENTRY, &id);
        }
        if let Some(d) = self.folder_entry.take() {
            self.note(false, FOLDER_ENTRY, &d);
        }
    }
}

/// Restores `plan` onto the host behind `c` (source `source`, configured as `cfg`).
pub async fn restore(
    c: &WsmanClient,
    source: &str,
    cfg: &SourceConfig,
    journal: &Journal,
    plan: &RestorePlan,
) -> Result<RestoredVm, HvError> {
    let vm_err = |m: String| HvError::Vm {
        source_name: source.into(),
        vm: plan.name.clone(),
        message: m,
    };
    if plan.disks.len() != plan.config.disks.len() {
        return Err(vm_err(format!(
            "{} disk sources for {} configured disks",
            plan.disks.len(),
            plan.config.disks.len()
        )));
    }
    let vp = vm_plan(plan);
    for w in &vp.warnings {
        tracing::warn!(source = %source, vm = %plan.name, "restore: {w}");
    }
    let w = Wmi::new(c);
    let svc = w.service(SERVICE).await.map_err(|e| hv(source, e))?;
    let host = svc
        .selector("SystemName")
        .unwrap_or("localhost")
        .to_string();
    // Every switch must exist before anything is made.
    let switches = c
        .enumerate("Msvm_VirtualEthernetSwitch", None)
        .await
        .map_err(|e| hv(source, e))?;
    let names: Vec<&str> = switches
        .iter()
        .filter_map(|s| s.text("ElementName"))
        .collect();
    let mut switch_ids = Vec::new();
    for (i, n) in vp.nics.iter().enumerate() {
        let Some(want) = &n.switch else {
            tracing::warn!(source = %source, vm = %plan.name, "restore: NIC {i} had no network; it is added unconnected");
            switch_ids.push(None);
            continue;
        };
        let found = switches
            .iter()
            .find(|s| s.text("ElementName") == Some(want.as_str()))
            .or_else(|| {
                switches.iter().find(|s| {
                    s.text("ElementName")
                        .is_some_and(|e| e.eq_ignore_ascii_case(want))
                })
            })
            .and_then(|s| s.text("Name"));
        match found {
            Some(id) => switch_ids.push(Some(id.to_string())),
            None => {
                return Err(vm_err(format!(
                    "NIC {i}: the virtual switch `{want}` does not exist on this host (its switches: {}); map it with --network-map '{want}=SWITCH'",
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                )));
            }
        }
    }
    // A VM of the same name: the new one gets a suffix.
    let taken: Vec<String> = w
        .vms()
        .await
        .map_err(|e| hv(source, e))?
        .iter()
        .filter_map(|v| v.text("ElementName").map(str::to_string))
        .collect();
    let mut name = plan.name.clone();
    let mut n = 1;
    while taken.iter().any(|t| t.eq_ignore_ascii_case(&name)) {
        n += 1;
        name = format!("{} ({n})", plan.name);
    }
    if name != plan.name {
        tracing::warn!(source = %source, vm = %plan.name, "restore: a VM named `{}` exists; the restored VM is `{name}`", plan.name);
    }
    let root = match (&cfg.restore_dir, native(plan.native.as_ref())) {
        (Some(d), _) => d.trim_end_matches('\\').to_string(),
        (None, Some(r)) => r["settings"]["ConfigurationDataRoot"]
            .as_str()
            .and_then(|p| p.trim_end_matches('\\').rsplit_once('\\'))
            .map(|(parent, _)| parent.to_string())
            .ok_or_else(|| {
                vm_err(format!(
                    "the restore point does not say where the VM lived; set restore-dir in source `{source}`"
                ))
            })?,
        (None, None) => {
            return Err(vm_err(format!(
                "a restore from another hypervisor needs restore-dir in source `{source}` (a host folder under its san-paths)"
            )));
        }
    };
    let mut run = Run {
        c,
        source,
        cfg,
        journal,
        svc,
        host,
        vm: None,
        files: vec![],
        folder: None,
        folder_entry: None,
    };
    match build(&mut run, plan, &vp, &name, &root, &switch_ids).await {
        Ok((id, transport)) => {
            run.forget();
            Ok(RestoredVm {
                id,
                name,
                transport: transport.into(),
            })
        }
        Err(e) => {
            tracing::warn!(source = %source, vm = %name, error = %e, "restore failed; removing the partial VM and its files");
            run.undo().await;
            Err(e)
        }
    }
}

/// Writes the disks and defines the VM; its id and how the disks were written.
async fn build(
    run: &mut Run<'_>,
    plan: &RestorePlan,
    vp: &VmPlan,
    name: &str,
    root: &str,
    switch_ids: &[Option<String>],
) -> Result<(String, &'static str), HvError> {
    // A new folder for the VM, its disks inside: through the host agent or san-paths, in the
    // source's transports order (ADR 0170).
    let (sink, folder) =
        crate::restore_agent::make_folder(run.c, run.source, run.cfg, root, &safe_name(name))
            .await
            .map_err(|m| run.fail("restore", m))?;
    let entry = sink.journal_id(&folder);
    if let crate::restore_agent::Sink::Local { local } = &sink {
        run.folder = Some(local.clone());
    }
    run.folder_entry = Some(entry.clone());
    run.note(true, FOLDER_ENTRY, &entry);
    // The VM.
    let mut settings = vec![
        p("ElementName", "string", name),
        p(
            "VirtualSystemSubType",
            "string",
            format!("Microsoft:Hyper-V:SubType:{}", vp.generation),
        ),
        p("ConfigurationDataRoot", "string", &folder),
        p("SnapshotDataRoot", "string", &folder),
        p("Notes", "string", &vp.notes),
    ];
    if vp.generation == 2 {
        settings.push(p("SecureBootEnabled", "boolean", vp.secure_boot));
    }
    let out = run
        .call(
            "DefineSystem",
            &[Param::Embedded(
                "SystemSettings".into(),
                embedded("Msvm_VirtualSystemSettingData", &settings, &[]),
            )],
        )
        .await?;
    let id = out
        .reference("ResultingSystem")
        .and_then(|e| e.selector("Name"))
        .map(str::to_string)
        .ok_or_else(|| run.fail("DefineSystem", "the host returned no VM"))?;
    run.vm = Some(id.clone());
    run.note(true, VM_ENTRY, &id);
    tracing::info!(source = %run.source, vm = %name, id = %id, "VM defined; writing its disks");
    let w = Wmi::new(run.c);
    let vssd = w
        .settings(&id)
        .await
        .map_err(|e| run.err(e))?
        .and_then(|s| s.text("InstanceID").map(Wmi::settings_epr))
        .ok_or_else(|| run.fail("DefineSystem", "the new VM has no settings"))?;
    // Processors and memory: the new VM has one of each; they are modified.
    let mine = format!("Microsoft:{id}\\");
    let owned = |all: Vec<Instance>| {
        all.into_iter().find(|i| {
            i.text("InstanceID")
                .is_some_and(|x| x.to_lowercase().starts_with(&mine.to_lowercase()))
        })
    };
    let cpu = owned(
        run.c
            .enumerate("Msvm_ProcessorSettingData", None)
            .await
            .map_err(|e| run.err(e))?,
    )
    .and_then(|i| i.text("InstanceID").map(str::to_string))
    .ok_or_else(|| run.fail("DefineSystem", "the new VM has no processor settings"))?;
    let mem = owned(
        run.c
            .enumerate("Msvm_MemorySettingData", None)
            .await
            .map_err(|e| run.err(e))?,
    )
    .and_then(|i| i.text("InstanceID").map(str::to_string))
    .ok_or_else(|| run.fail("DefineSystem", "the new VM has no memory settings"))?;
    let mut memory = vec![
        p("InstanceID", "string", &mem),
        p("VirtualQuantity", "uint64", vp.memory_mib),
        p("DynamicMemoryEnabled", "boolean", vp.dynamic.is_some()),
    ];
    if let Some((lo, hi)) = vp.dynamic {
        memory.push(p("Reservation", "uint64", lo));
        memory.push(p("Limit", "uint64", hi));
    }
    run.call(
        "ModifyResourceSettings",
        &[Param::Texts(
            "ResourceSettings".into(),
            vec![
                embedded(
                    "Msvm_ProcessorSettingData",
                    &[
                        p("InstanceID", "string", &cpu),
                        p("VirtualQuantity", "uint64", vp.cpus),
                    ],
                    &[],
                ),
                embedded("Msvm_MemorySettingData", &memory, &[]),
            ],
        )],
    )
    .await?;
    let mut vhdx = Vec::new();
    let mut used = Vec::new();
    for d in &plan.disks {
        let mut file = safe_name(&d.name);
        while used.contains(&file.to_lowercase()) {
            file.push('_');
        }
        used.push(file.to_lowercase());
        let host_path = format!("{folder}\\{file}.vhdx");
        let (written, path) = sink
            .write(&host_path, &format!("{file}.vhdx"), d.source.as_ref())
            .await
            .map_err(|m| HvError::Disk {
                source_name: run.source.into(),
                disk: format!("{name}/{}", d.name),
                message: format!("writing {host_path}: {m}"),
            })?;
        run.files.extend(path);
        tracing::info!(source = %run.source, vm = %name, disk = %d.name, file = %host_path, bytes = written, "disk written");
        vhdx.push(host_path);
    }
    // Controllers: SCSI ones as the disks need them; generation 1 has its IDE controllers.
    let rasd = "Msvm_ResourceAllocationSettingData";
    let mut controllers: Vec<((bool, u32), String)> = Vec::new();
    if vp.slots.iter().any(|s| s.ide) {
        let all = run.c.enumerate(rasd, None).await.map_err(|e| run.err(e))?;
        for i in all {
            let (Some(iid), Some(addr)) = (i.text("InstanceID"), i.u64("Address")) else {
                continue;
            };
            if iid.to_lowercase().starts_with(&mine.to_lowercase())
                && i.text("ResourceSubType") == Some("Microsoft:Hyper-V:Emulated IDE Controller")
            {
                controllers.push(((true, addr as u32), iid.to_string()));
            }
        }
    }
    let scsi_needed = vp
        .slots
        .iter()
        .filter(|s| !s.ide)
        .map(|s| s.controller)
        .max();
    if let Some(max) = scsi_needed {
        for n in 0..=max {
            let iid = run
                .add(
                    &vssd,
                    "SCSI controller",
                    embedded(
                        rasd,
                        &[
                            p("ResourceType", "uint16", 6),
                            p(
                                "ResourceSubType",
                                "string",
                                "Microsoft:Hyper-V:Synthetic SCSI Controller",
                            ),
                        ],
                        &[],
                    ),
                )
                .await?;
            controllers.push(((false, n), iid));
        }
    }
    for ((slot, path), d) in vp.slots.iter().zip(&vhdx).zip(&plan.disks) {
        let ctl = controllers
            .iter()
            .find(|(k, _)| *k == (slot.ide, slot.controller))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                run.fail(
                    "AddResourceSettings",
                    format!("the VM has no controller for {slot}"),
                )
            })?;
        let drive = run
            .add(
                &vssd,
                "disk drive",
                embedded(
                    rasd,
                    &[
                        p("ResourceType", "uint16", 17),
                        p(
                            "ResourceSubType",
                            "string",
                            "Microsoft:Hyper-V:Synthetic Disk Drive",
                        ),
                        p("Parent", "string", wmi_path(&run.host, rasd, &ctl)),
                        p("AddressOnParent", "string", slot.location),
                    ],
                    &[],
                ),
            )
            .await?;
        run.add(
            &vssd,
            "virtual hard disk",
            embedded(
                "Msvm_StorageAllocationSettingData",
                &[
                    p("ResourceType", "uint16", 31),
                    p(
                        "ResourceSubType",
                        "string",
                        "Microsoft:Hyper-V:Virtual Hard Disk",
                    ),
                    p("Parent", "string", wmi_path(&run.host, rasd, &drive)),
                    ("HostResource", "string", vec![path.clone()]),
                ],
                &["HostResource"],
            ),
        )
        .await?;
        tracing::info!(source = %run.source, vm = %name, disk = %d.name, at = %slot, "disk attached");
    }
    for (nic, switch) in vp.nics.iter().zip(switch_ids) {
        let mut port = vec![
            p("ResourceType", "uint16", 10),
            p(
                "ResourceSubType",
                "string",
                "Microsoft:Hyper-V:Synthetic Ethernet Port",
            ),
            p("ElementName", "string", "Network Adapter"),
            p("StaticMacAddress", "boolean", nic.mac.is_some()),
        ];
        if let Some(m) = &nic.mac {
            port.push(p("Address", "string", m));
        }
        let port_id = run
            .add(
                &vssd,
                "network adapter",
                embedded("Msvm_SyntheticEthernetPortSettingData", &port, &[]),
            )
            .await?;
        let Some(switch) = switch else { continue };
        let conn = run
            .add(
                &vssd,
                "switch connection",
                embedded(
                    "Msvm_EthernetPortAllocationSettingData",
                    &[
                        p("ResourceType", "uint16", 33),
                        p(
                            "ResourceSubType",
                            "string",
                            "Microsoft:Hyper-V:Ethernet Connection",
                        ),
                        p(
                            "Parent",
                            "string",
                            wmi_path(&run.host, "Msvm_SyntheticEthernetPortSettingData", &port_id),
                        ),
                        (
                            "HostResource",
                            "string",
                            vec![switch_path(&run.host, switch)],
                        ),
                    ],
                    &["HostResource"],
                ),
            )
            .await?;
        let features: Vec<String> = nic
            .port
            .settings()
            .iter()
            .map(|f| embedded(f.class, &f.props, &f.arrays))
            .collect();
        if !features.is_empty() {
            run.call(
                "AddFeatureSettings",
                &[
                    Param::Ref(
                        "AffectedConfiguration".into(),
                        Epr::new(
                            "Msvm_EthernetPortAllocationSettingData",
                            &[("InstanceID", &conn)],
                        ),
                    ),
                    Param::Texts("FeatureSettings".into(), features),
                ],
            )
            .await?;
        }
    }
    if plan.power_on {
        w.request_state(&id, wmi::STATE_RUNNING)
            .await
            .map_err(|e| run.err(e))?;
    }
    // Done: nothing is undone any more (the journal entries go in `forget`).
    run.files.clear();
    run.folder = None;
    Ok((id, sink.label()))
}

/// Writes `src` as a dynamic VHDX at `path` (only its allocated, non-zero pieces); the bytes
/// written. The file appears complete or not at all (the writer renames it into place).
pub(crate) async fn write_vhdx(src: &dyn BlockSource, path: &Path) -> Result<u64, String> {
    let size = src.size();
    let mut w = ferry_image::ImageWriter::create_with(
        path,
        ferry_image::OutputFormat::Vhdx,
        size,
        &ferry_image::WriterOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let map = src
        .allocated(0..size)
        .await
        .map_err(|e| format!("allocation map: {e}"))?;
    let mut buf = vec![0u8; PIECE as usize];
    let mut written = 0;
    for e in map.iter() {
        let mut at = e.offset;
        while at < e.end() {
            let n = (e.end() - at).min(PIECE) as usize;
            src.read_at(at, &mut buf[..n])
                .await
                .map_err(|x| format!("read at {at}: {x}"))?;
            if buf[..n].iter().any(|b| *b != 0) {
                w.write(at, &buf[..n]).map_err(|x| x.to_string())?;
                written += n as u64;
            }
            at += n as u64;
        }
    }
    w.finish().map_err(|e| e.to_string())?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::vm::{DiskConfig, NicConfig};

    fn disk(name: &str, at: Option<&str>, bootable: bool) -> DiskConfig {
        DiskConfig {
            name: name.into(),
            size: 1 << 20,
            controller: at.map(str::to_string),
            bootable,
        }
    }

    #[test]
    fn disks_keep_their_place_or_move_with_a_warning() {
        let cfg = VmConfig {
            disks: vec![
                disk("a", Some("0"), true),
                disk("b", Some("scsi0:3"), false),
                disk("c", Some("xvdc"), false),
            ],
            ..Default::default()
        };
        let (s, w) = place_disks(&cfg, 1);
        let s: Vec<String> = s.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["ide0:0", "scsi0:3", "scsi0:0"]);
        assert_eq!(w.len(), 2, "{w:?}");
        let (s, w) = place_disks(&cfg, 2);
        let s: Vec<String> = s.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["scsi0:0", "scsi0:3", "scsi0:1"]);
        assert!(
            w[0].contains("generation 2") && w[0].contains("scsi0:0"),
            "{w:?}"
        );
        let ide = VmConfig {
            disks: vec![disk("a", Some("ide0:1"), true)],
            ..Default::default()
        };
        assert_eq!(place_disks(&ide, 2).0[0].to_string(), "scsi0:0");
        assert_eq!(place_disks(&ide, 1).0[0].to_string(), "ide0:1");
    }

    #[test]
    fn a_generation_1_boot_disk_on_scsi_goes_to_ide() {
        // A restore point from before ADR 0166: every disk on SCSI, the first one boots.
        let old = VmConfig {
            disks: vec![
                disk("boot", Some("scsi0:0"), true),
                disk("data", Some("scsi0:1"), false),
            ],
            ..Default::default()
        };
        let (s, w) = place_disks(&old, 1);
        let s: Vec<String> = s.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["ide0:0", "scsi0:1"]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("`boot`")
                && w[0].contains("scsi0:0")
                && w[0].contains("generation 1 boots from IDE only"),
            "{w:?}"
        );
        // Generation 2 boots from SCSI: nothing moves.
        let (s, w) = place_disks(&old, 2);
        assert_eq!(s[0].to_string(), "scsi0:0");
        assert!(w.is_empty(), "{w:?}");
        // IDE 0:0 already held by another disk: the boot disk keeps its place.
        let held = VmConfig {
            disks: vec![
                disk("boot", Some("scsi0:0"), true),
                disk("other", Some("ide0:0"), false),
            ],
            ..Default::default()
        };
        let (s, w) = place_disks(&held, 1);
        let s: Vec<String> = s.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["scsi0:0", "ide0:0"]);
        assert!(w.is_empty(), "{w:?}");
        // Through the plan: a generation 1 native record.
        let plan = RestorePlan {
            name: "x".into(),
            config: old,
            native: Some(NativeConfig {
                format: NATIVE_FORMAT.into(),
                record: r#"{"generation":1}"#.into(),
            }),
            disks: vec![],
            power_on: false,
        };
        let v = vm_plan(&plan);
        assert_eq!((v.generation, v.slots[0].to_string()), (1, "ide0:0".into()));
        assert!(
            v.warnings.iter().any(|w| w.contains("IDE only")),
            "{:?}",
            v.warnings
        );
    }

    #[test]
    fn the_plan_follows_the_native_record_or_the_firmware() {
        let mut plan = RestorePlan {
            name: "x".into(),
            config: VmConfig {
                cpus: 2,
                memory: (1 << 30) + 1,
                firmware: Firmware::Bios,
                guest_os: None,
                disks: vec![],
                nics: vec![NicConfig {
                    mac: Some("00:16:3e:aa:bb:cc".into()),
                    network: Some("lan".into()),
                    model: Some("e1000".into()),
                }],
            },
            native: None,
            disks: vec![],
            power_on: false,
        };
        let v = vm_plan(&plan);
        assert_eq!(
            (v.generation, v.secure_boot, v.memory_mib),
            (1, false, 1026)
        );
        assert_eq!(v.nics[0].mac.as_deref(), Some("00163EAABBCC"));
        assert!(v.warnings[0].contains("synthetic"), "{:?}", v.warnings);
        plan.native = Some(NativeConfig {
            format: NATIVE_FORMAT.into(),
            record: r#"{"generation":2,"secure_boot":true,"memory":{"startup_mib":2048,"dynamic":true,"minimum_mib":512,"maximum_mib":8192},"nics":[{"vlan":10}]}"#.into(),
        });
        let v = vm_plan(&plan);
        assert_eq!((v.generation, v.secure_boot, v.memory_mib), (2, true, 2048));
        assert_eq!(v.dynamic, Some((512, 8192)));
        assert_eq!(v.nics[0].vlan, Some(10));
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
        let lost = not_carried(plan.native.as_ref().unwrap());
        assert!(lost.iter().any(|l| l.contains("VLAN 10")), "{lost:?}");
        assert!(
            lost.iter().any(|l| l.contains("dynamic memory")),
            "{lost:?}"
        );
    }

    #[test]
    fn embedded_instances_and_paths() {
        let e = embedded(
            "Msvm_StorageAllocationSettingData",
            &[
                p("ResourceType", "uint16", 31),
                ("HostResource", "string", vec!["C:\\a&b.vhdx".into()]),
            ],
            &["HostResource"],
        );
        assert!(e.contains("<PROPERTY.ARRAY NAME=\"HostResource\" TYPE=\"string\"><VALUE.ARRAY><VALUE>C:\\a&amp;b.vhdx</VALUE>"), "{e}");
        assert_eq!(
            wmi_path("H", "C", "Microsoft:A\\B"),
            "\\\\H\\root\\virtualization\\v2:C.InstanceID=\"Microsoft:A\\\\B\""
        );
        assert_eq!(safe_name("a/b: c."), "a_b_ c");
    }
}
