//! Standard checkpoints (`CreateSnapshot` with `SnapshotType` 2) as Hyper-V makes them on the
//! files, for VMs whose disks Ferry writes in place (replica standbys, ADR 0175):
//!
//! - `CreateSnapshot`: every disk's current file is frozen and belongs to the checkpoint; a new
//!   empty differencing `<disk>_<checkpoint GUID>.avhdx` over it (made by `ferry-image`) becomes
//!   the VM's current disk (the drive's `HostResource` moves to it);
//! - `ApplySnapshot`: a new empty child of the checkpoint's files becomes the current disk, the
//!   old current files (leaves no checkpoint holds) are deleted; the VM must be off;
//! - `DestroySnapshot`: the checkpoint's settings go; where its file has exactly one child, the
//!   child is merged into it (whole blocks, `ferry-image`), the child's children are re-pointed
//!   at it and whatever named the child (the VM or a newer checkpoint) names it — Hyper-V's
//!   merge. A file with several children stays; one with none is deleted.
//!
//! After a standard checkpoint is made or applied, the guest's live disk (what the side door
//! writes and recovery checkpoints freeze) is refilled from the images, so a VM Ferry wrote into
//! in place can be backed up again (a reversed replica).
//!
//! Also `ModifySystemSettings` of a VM's `Notes` and `ElementName` (the replica marks). Recovery
//! checkpoints (backups, `SnapshotType` 32768) keep the frozen-live model of [`super::disks`].

use super::{Fault, State, fault, guid, inst, job_out, no_storage, param_ref, set_rv, text};
use ferry_wsman::cim::{self, Epr, Instance, Value};
use ferry_wsman::xml::Node;
use std::path::PathBuf;

/// `VirtualSystemType` of a standard checkpoint.
pub(super) const STANDARD: &str = "Microsoft:Hyper-V:Snapshot:Realized";
/// Hyper-V makes differencing disks with 2 MiB blocks.
const CHILD_BLOCK: u64 = 2 << 20;
const SASD: &str = "Msvm_StorageAllocationSettingData";
const VSSD: &str = "Msvm_VirtualSystemSettingData";

/// Whether a `CreateSnapshot` asks for a standard checkpoint.
pub(super) fn is_standard(body: &Node) -> bool {
    body.text_at("SnapshotType") == Some("2")
}

/// One disk of a VM or checkpoint: its settings' InstanceID, the disk's key and its image.
struct DiskRef {
    iid: String,
    key: String,
    path: String,
}

/// The virtual hard disks of the settings `owner` (`Microsoft:<guid>`).
fn disks(st: &State, owner: &str) -> Vec<DiskRef> {
    let prefix = format!("{owner}\\").to_lowercase();
    st.objects
        .get(SASD)
        .map(|v| {
            v.iter()
                .filter_map(|i| {
                    let iid = i.text("InstanceID")?;
                    if !iid.to_lowercase().starts_with(&prefix) {
                        return None;
                    }
                    let key = iid[prefix.len()..].split('\\').next()?.to_string();
                    let path = i.texts("HostResource").first()?.to_string();
                    Some(DiskRef {
                        iid: iid.to_string(),
                        key,
                        path,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Points every SASD and simulated disk naming `from` at `to`.
fn rename_image(st: &mut State, from: &str, to: &str) {
    if let Some(v) = st.objects.get_mut(SASD) {
        for i in v.iter_mut() {
            if i.texts("HostResource")
                .first()
                .is_some_and(|p| p.eq_ignore_ascii_case(from))
            {
                i.props
                    .insert("HostResource".into(), Value::Array(vec![text(to)]));
            }
        }
    }
    if let Some(s) = st.storage.as_mut() {
        for d in s.disks.iter_mut() {
            if d.host_path.eq_ignore_ascii_case(from) {
                d.host_path = to.to_string();
            }
        }
    }
}

/// What the guest of `vm_id` sees becomes what its current images hold (Ferry writes into
/// them in place, bypassing the simulated guest): each disk's live file is refilled from
/// `images` (host path per disk key) and its change log cleared.
fn refresh_live(st: &mut State, vm_id: &str, images: &[(String, String)]) -> Result<(), String> {
    let storage = st
        .storage
        .as_mut()
        .ok_or("The host's storage is not available.")?;
    for i in 0..storage.disks.len() {
        if storage.disks[i].vm_id != vm_id {
            continue;
        }
        let key = storage.disks[i].id.clone();
        let Some((_, path)) = images.iter().find(|(k, _)| k.eq_ignore_ascii_case(&key)) else {
            continue;
        };
        let local = storage.local(path)?;
        let img = futures::executor::block_on(ferry_image::open_image(&local))
            .map_err(|e| format!("{path}: {e}"))?;
        super::define::fill_live(&storage.live_path(&storage.disks[i]), img.source.as_ref())?;
        storage.disks[i].forget_changes();
    }
    Ok(())
}

/// `<folder>\<disk>_<tag>.avhdx` for a child of `path` (a `.vhdx` or an earlier `.avhdx`).
fn child_path(path: &str, tag: &str) -> String {
    let stem = path.rsplit_once('.').map_or(path, |(s, _)| s);
    // An earlier checkpoint's suffix goes: the name stays `<disk>_<newest GUID>`.
    let stem = match stem.rsplit_once('_') {
        Some((s, g)) if g.len() == 36 && g.chars().filter(|c| *c == '-').count() == 4 => s,
        _ => stem,
    };
    format!("{stem}_{tag}.avhdx")
}

fn local(st: &State, host: &str) -> Result<PathBuf, String> {
    st.storage
        .as_ref()
        .ok_or("The host's storage is not available.")?
        .local(host)
}

/// A CIM datetime of now with microseconds: checkpoints sort by it.
fn now_cim() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}.{:06}+000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// `CreateSnapshot` of a standard checkpoint.
pub(super) fn create(st: &mut State, body: &Node, out: &mut Instance) -> Result<(), Fault> {
    let vm = param_ref(body, "AffectedSystem")
        .ok_or_else(|| fault("InvalidParameter", "CreateSnapshot needs AffectedSystem."))?;
    let Some(sys) = st.find("Msvm_ComputerSystem", &vm.selectors).cloned() else {
        set_rv(out, 32773);
        return Ok(());
    };
    let vm_id = sys.text("Name").unwrap_or("").to_string();
    let vm_name = sys.text("ElementName").unwrap_or("").to_string();
    let name = body
        .text_at("SnapshotSettings")
        .and_then(cim::parse_embedded)
        .and_then(|(_, p)| p.get("ElementName").cloned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{vm_name} - standard checkpoint"));
    st.storage.as_ref().ok_or_else(no_storage)?;
    let snap_guid = guid(&st.id(&vm_id));
    let snap_id = format!("Microsoft:{snap_guid}");
    let current = disks(st, &format!("Microsoft:{vm_id}"));
    let mut made: Vec<PathBuf> = Vec::new();
    let mut children = Vec::new();
    for d in &current {
        let child = child_path(&d.path, &snap_guid);
        let r = local(st, &d.path).and_then(|parent| {
            let c = local(st, &child)?;
            ferry_image::create_vhdx_child(&c, &parent, Some(CHILD_BLOCK)).map_err(|e| {
                format!("Failed to create the checkpoint's differencing disk '{child}': {e}")
            })?;
            Ok(c)
        });
        match r {
            Ok(c) => {
                made.push(c);
                children.push(child);
            }
            Err(m) => {
                for f in &made {
                    let _ = std::fs::remove_file(f);
                }
                job_out(st, out, "CreateSnapshot", Err(m));
                return Ok(());
            }
        }
    }
    let snap = inst(
        VSSD,
        &[
            ("InstanceID", text(&snap_id)),
            ("ElementName", text(name)),
            ("VirtualSystemIdentifier", text(&vm_id)),
            ("VirtualSystemType", text(STANDARD)),
            ("CreationTime", text(now_cim())),
            ("Parent", Value::Null),
        ],
    );
    let epr = Epr::new(VSSD, &[("InstanceID", snap_id.as_str())]);
    st.objects.entry(VSSD.into()).or_default().push(snap);
    for ((k, d), child) in current.iter().enumerate().zip(&children) {
        st.objects.entry(SASD.into()).or_default().push(inst(
            SASD,
            &[
                (
                    "InstanceID",
                    text(format!("{snap_id}\\{}\\0\\{k}\\L", d.key)),
                ),
                ("ElementName", text("Hard Disk Image")),
                ("ResourceType", text("31")),
                (
                    "ResourceSubType",
                    text("Microsoft:Hyper-V:Virtual Hard Disk"),
                ),
                ("HostResource", Value::Array(vec![text(&d.path)])),
                ("AddressOnParent", text(k.to_string())),
            ],
        ));
        // The VM's drive now holds the new child (only the VM's own settings move).
        if let Some(i) = st.objects.get_mut(SASD).and_then(|v| {
            v.iter_mut()
                .find(|i| i.text("InstanceID") == Some(d.iid.as_str()))
        }) {
            i.props
                .insert("HostResource".into(), Value::Array(vec![text(child)]));
        }
        if let Some(s) = st.storage.as_mut() {
            for x in s.disks.iter_mut() {
                if x.vm_id == vm_id && x.host_path.eq_ignore_ascii_case(&d.path) {
                    x.host_path = child.clone();
                }
            }
        }
    }
    let frozen: Vec<(String, String)> = current
        .iter()
        .map(|d| (d.key.clone(), d.path.clone()))
        .collect();
    let r = refresh_live(st, &vm_id, &frozen);
    job_out(st, out, "CreateSnapshot", r);
    out.props
        .insert("ResultingSnapshot".into(), Value::Ref(epr));
    Ok(())
}

/// The standard checkpoint a parameter references.
fn checkpoint(st: &State, body: &Node, param: &str) -> Option<Instance> {
    let r = param_ref(body, param)?;
    st.find(VSSD, &r.selectors)
        .filter(|i| i.text("VirtualSystemType") == Some(STANDARD))
        .cloned()
}

/// Whether a snapshot's settings hold image `path`.
fn held_by_checkpoint(st: &State, path: &str) -> bool {
    st.objects.get(VSSD).is_some_and(|v| {
        v.iter()
            .filter(|i| i.text("VirtualSystemType") == Some(STANDARD))
            .filter_map(|i| i.text("InstanceID"))
            .any(|id| {
                disks(st, id)
                    .iter()
                    .any(|d| d.path.eq_ignore_ascii_case(path))
            })
    })
}

/// `ApplySnapshot(Snapshot)`.
pub(super) fn apply(st: &mut State, body: &Node, out: &mut Instance) -> Result<(), Fault> {
    let Some(snap) = checkpoint(st, body, "Snapshot") else {
        job_out(
            st,
            out,
            "ApplySnapshot",
            Err("The snapshot does not exist.".into()),
        );
        return Ok(());
    };
    let snap_id = snap.text("InstanceID").unwrap_or("").to_string();
    let vm_id = snap
        .text("VirtualSystemIdentifier")
        .unwrap_or("")
        .to_string();
    let off = st
        .find(
            "Msvm_ComputerSystem",
            &[("Name".to_string(), vm_id.clone())],
        )
        .is_some_and(|v| v.text("EnabledState") == Some("3"));
    if !off {
        // Invalid State, as the host answers for a running VM.
        set_rv(out, 32775);
        return Ok(());
    }
    let tag = guid(&st.id(&format!("{vm_id}-apply")));
    let frozen = disks(st, &snap_id);
    let current = disks(st, &format!("Microsoft:{vm_id}"));
    let mut r = Ok(());
    for d in &current {
        let Some(f) = frozen.iter().find(|f| f.key.eq_ignore_ascii_case(&d.key)) else {
            continue;
        };
        let child = child_path(&f.path, &tag);
        let made = local(st, &f.path).and_then(|p| {
            ferry_image::create_vhdx_child(&local(st, &child)?, &p, Some(CHILD_BLOCK))
                .map_err(|e| e.to_string())
        });
        if let Err(m) = made {
            r = Err(format!("Failed to apply the checkpoint: {m}"));
            break;
        }
        let old = d.path.clone();
        rename_image(st, &old, &child);
        // The old current file: a leaf no checkpoint holds.
        if !held_by_checkpoint(st, &old)
            && let Ok(p) = local(st, &old)
        {
            let _ = std::fs::remove_file(p);
        }
    }
    if r.is_ok() {
        let images: Vec<(String, String)> = frozen
            .iter()
            .map(|f| (f.key.clone(), f.path.clone()))
            .collect();
        r = refresh_live(st, &vm_id, &images);
    }
    job_out(st, out, "ApplySnapshot", r);
    Ok(())
}

/// The parent image (local path) of local image `p`, as its locator names it (`.\name`, next
/// to it), if it is a differencing disk. The parent is not opened: during a merge its
/// DataWriteGuid no longer matches the child's linkage.
fn parent_of(p: &std::path::Path) -> Option<PathBuf> {
    let names = ferry_image::vhdx_parent_locator(p).ok()?;
    let rel = names.first()?.strip_prefix(".\\")?;
    let mut out = p.parent()?.to_path_buf();
    out.extend(rel.split('\\'));
    Some(out)
}

fn same(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// `DestroySnapshot` of the standard checkpoint `snap`: its settings go, its files merge.
pub(super) fn destroy(st: &mut State, snap: &Instance, out: &mut Instance) {
    let snap_id = snap.text("InstanceID").unwrap_or("").to_string();
    let vm_id = snap
        .text("VirtualSystemIdentifier")
        .unwrap_or("")
        .to_string();
    let frozen = disks(st, &snap_id);
    if let Some(v) = st.objects.get_mut(VSSD) {
        v.retain(|i| i.text("InstanceID") != Some(snap_id.as_str()));
    }
    super::remove_by_prefix(st, SASD, &format!("{snap_id}\\"));
    // Every image the VM and its other checkpoints name, with their parents.
    let mut owners = vec![format!("Microsoft:{vm_id}")];
    owners.extend(
        st.objects
            .get(VSSD)
            .into_iter()
            .flatten()
            .filter(|i| {
                i.text("VirtualSystemType") == Some(STANDARD)
                    && i.text("VirtualSystemIdentifier") == Some(vm_id.as_str())
            })
            .filter_map(|i| i.text("InstanceID").map(str::to_string)),
    );
    let mut r = Ok(());
    for f in &frozen {
        if held_by_checkpoint(st, &f.path) {
            continue;
        }
        let Ok(fl) = local(st, &f.path) else { continue };
        // The images of this disk's chain that name f as their parent.
        let named: Vec<String> = owners
            .iter()
            .flat_map(|o| disks(st, o))
            .filter(|d| d.key.eq_ignore_ascii_case(&f.key))
            .map(|d| d.path)
            .collect();
        let mut chain = Vec::new();
        for n in &named {
            if let Ok(l) = local(st, n) {
                // Walk each named image up to f: the image right below f is its child.
                let mut at = l.clone();
                while let Some(p) = parent_of(&at) {
                    if same(&p, &fl) {
                        chain.push((at.clone(), n.clone(), l.clone()));
                        break;
                    }
                    at = p;
                }
            }
        }
        let mut kids: Vec<PathBuf> = chain.iter().map(|(k, _, _)| k.clone()).collect();
        kids.sort();
        kids.dedup_by(|a, b| same(a, b));
        let child = match kids.as_slice() {
            [one] => one.clone(),
            [] => {
                // Nothing builds on it any more (a reverted-away branch): it goes.
                let _ = std::fs::remove_file(&fl);
                continue;
            }
            // Several children: the file stays until one remains.
            _ => continue,
        };
        let child = &child;
        let merged = futures::executor::block_on(ferry_image::merge_vhdx_child(child, &fl));
        if let Err(e) = merged {
            r = Err(format!("Failed to merge '{}': {e}", child.display()));
            break;
        }
        // The child's own children now hang below f.
        for (_, _, leaf) in &chain {
            let mut at = leaf.clone();
            while let Some(p) = parent_of(&at) {
                if same(&p, child) {
                    if let Err(e) = ferry_image::set_vhdx_parent(&at, &fl) {
                        r = Err(format!("Failed to re-point '{}': {e}", at.display()));
                    }
                    break;
                }
                at = p;
            }
        }
        // Whatever named the child names f.
        let child_host = named
            .iter()
            .find(|n| local(st, n).is_ok_and(|l| same(&l, child)));
        if let Some(h) = child_host.cloned() {
            rename_image(st, &h, &f.path);
        }
        let _ = std::fs::remove_file(child);
    }
    job_out(st, out, "DestroySnapshot", r);
}

/// The class and properties of a CIM-XML embedded instance; an array (`Notes[]` in
/// `root/virtualization/v2`) is its values joined by newlines.
fn embedded_props(text: &str) -> Option<(String, std::collections::BTreeMap<String, String>)> {
    let n = ferry_wsman::xml::parse(text.as_bytes()).ok()?;
    if n.name != "INSTANCE" {
        return None;
    }
    let mut props = std::collections::BTreeMap::new();
    for p in n.all("PROPERTY") {
        props.insert(
            p.attr("NAME")?.to_string(),
            p.text_at("VALUE").unwrap_or("").to_string(),
        );
    }
    for p in n.all("PROPERTY.ARRAY") {
        let values: Vec<&str> = p
            .child("VALUE.ARRAY")
            .map(|a| a.all("VALUE").map(|v| v.text.as_str()).collect())
            .unwrap_or_default();
        props.insert(p.attr("NAME")?.to_string(), values.join("\n"));
    }
    Some((n.attr("CLASSNAME")?.to_string(), props))
}

/// `ModifySystemSettings`: a VM's `Notes` and `ElementName`.
pub(super) fn modify_system_settings(
    st: &mut State,
    body: &Node,
    _out: &mut Instance,
) -> Result<(), String> {
    let raw = body.text_at("SystemSettings").ok_or(
        "ModifySystemSettings needs SystemSettings (an embedded Msvm_VirtualSystemSettingData).",
    )?;
    let (class, props) = embedded_props(raw)
        .ok_or("SystemSettings is not an embedded instance (CIM-XML INSTANCE).")?;
    if class != VSSD {
        return Err(format!(
            "SystemSettings must be an embedded {VSSD}, not {class}."
        ));
    }
    let id = props
        .get("InstanceID")
        .ok_or("The embedded settings have no InstanceID.")?
        .clone();
    let vssd = st
        .objects
        .get_mut(VSSD)
        .and_then(|v| {
            v.iter_mut()
                .find(|i| i.text("InstanceID") == Some(id.as_str()))
        })
        .ok_or_else(|| format!("The object {VSSD}.InstanceID=\"{id}\" does not exist."))?;
    for k in ["Notes", "ElementName"] {
        if let Some(v) = props.get(k) {
            vssd.props.insert(k.into(), text(v.as_str()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_names_keep_the_disk_name() {
        let g = "0123ABCD-0000-4000-8000-000000000000";
        assert_eq!(
            child_path("C:\\v\\disk0.vhdx", g),
            format!("C:\\v\\disk0_{g}.avhdx")
        );
        let h = "FFFFABCD-0000-4000-8000-000000000000";
        assert_eq!(
            child_path(&format!("C:\\v\\disk0_{g}.avhdx"), h),
            format!("C:\\v\\disk0_{h}.avhdx")
        );
        assert_eq!(
            child_path("C:\\v\\my_disk.vhdx", g),
            format!("C:\\v\\my_disk_{g}.avhdx")
        );
        assert!(now_cim().len() == 25, "{}", now_cim());
    }
}
