//! Instant recovery on a Xen pool (ADR 0100): the VM runs from the proxy's writable NBD
//! exports, attached through one `nbd` SR per disk, while its disks are restored into new
//! VDIs on real storage; `finish` moves the guest's writes over and switches the VBDs.

use crate::XenDriver;
use crate::client::XenClient;
use crate::restore::{create_vifs, default_sr, vm_record};
use async_trait::async_trait;
use ferry_core::{BlockSource, ExtentMap};
use ferry_hv::{HvError, InstantPlan, InstantRecovery, InstantVm};
use serde_json::{Value as J, json};
use std::sync::Arc;

/// Marks VMs (in `other_config`) that run from a backup.
pub const INSTANT_MARKER: &str = "ferry-instant-recovery";

fn err(c: &XenClient, what: &str, message: String) -> HvError {
    HvError::Disk {
        source_name: c.source().to_string(),
        disk: what.to_string(),
        message,
    }
}

/// The SR `spec` names (uuid or name label), or the pool's default.
async fn target_sr(c: &XenClient, spec: Option<&str>) -> Result<String, HvError> {
    let Some(spec) = spec else {
        let sr = default_sr(c).await?;
        if sr.is_empty() || sr == "OpaqueRef:NULL" {
            return Err(err(
                c,
                "storage",
                "the pool has no default SR: pass --sr".into(),
            ));
        }
        return Ok(sr);
    };
    if let Ok(r) = c.call_str("SR.get_by_uuid", vec![json!(spec)]).await {
        return Ok(r);
    }
    let hits = c.call("SR.get_by_name_label", vec![json!(spec)]).await?;
    match hits.as_array().map(Vec::as_slice) {
        Some([one]) => Ok(one.as_str().unwrap_or_default().to_string()),
        Some([]) | None => Err(err(c, "storage", format!("no SR `{spec}` in the pool"))),
        Some(_) => Err(err(
            c,
            "storage",
            format!("several SRs are named `{spec}`: give its uuid"),
        )),
    }
}

/// Created objects, for removal when a step fails.
#[derive(Default)]
struct Created {
    vm: Option<String>,
    srs: Vec<String>,
    vdis: Vec<String>,
}

impl Created {
    async fn remove(&self, c: &XenClient) {
        if let Some(vm) = &self.vm {
            let _ = c.call("VM.hard_shutdown", vec![json!(vm)]).await;
            let _ = c.call("VM.destroy", vec![json!(vm)]).await;
        }
        for sr in &self.srs {
            if let Err(e) = c.call("SR.forget", vec![json!(sr)]).await {
                tracing::warn!(error = %e, "cannot forget the instant-recovery SR");
            }
        }
        for v in &self.vdis {
            let _ = c.call("VDI.destroy", vec![json!(v)]).await;
        }
    }
}

async fn start(c: &XenClient, plan: &InstantPlan) -> Result<InstantVm, HvError> {
    let vm_plan = &plan.vm;
    if plan.exports.len() != vm_plan.disks.len()
        || vm_plan.disks.len() != vm_plan.config.disks.len()
    {
        return Err(err(
            c,
            &vm_plan.name,
            format!(
                "{} exports, {} disks, {} configured disks",
                plan.exports.len(),
                vm_plan.disks.len(),
                vm_plan.config.disks.len()
            ),
        ));
    }
    let storage = target_sr(c, plan.storage.as_deref()).await?;
    let host = c
        .call("host.get_all", vec![])
        .await?
        .as_array()
        .and_then(|a| a.first())
        .and_then(J::as_str)
        .map(String::from)
        .ok_or_else(|| err(c, "host", "the pool has no host".into()))?;
    let mut created = Created::default();
    let r = async {
        let (mut rec, native) = vm_record(vm_plan);
        rec.insert("other_config".into(), json!({ INSTANT_MARKER: "1" }));
        let vm = c.call_str("VM.create", vec![J::Object(rec)]).await?;
        created.vm = Some(vm.clone());
        let mut staging = Vec::new();
        let mut targets = Vec::new();
        for (i, ((d, cfg), uri)) in vm_plan
            .disks
            .iter()
            .zip(&vm_plan.config.disks)
            .zip(&plan.exports)
            .enumerate()
        {
            let label = format!("{} {} (instant recovery)", vm_plan.name, d.name);
            let sr = c
                .call_str(
                    "SR.create",
                    vec![
                        json!(host),
                        json!({ "uri": uri }),
                        json!("0"),
                        json!(label),
                        json!("Ferry instant recovery: a backup served over NBD"),
                        json!("nbd"),
                        json!("user"),
                        json!(false),
                        json!({}),
                    ],
                )
                .await?;
            created.srs.push(sr.clone());
            let vdi = c
                .call("SR.get_VDIs", vec![json!(sr)])
                .await?
                .as_array()
                .and_then(|a| a.first())
                .and_then(J::as_str)
                .map(String::from)
                .ok_or_else(|| err(c, &d.name, "the NBD SR shows no VDI".into()))?;
            let userdevice = cfg.controller.clone().unwrap_or_else(|| i.to_string());
            c.call(
                "VBD.create",
                vec![json!({"VM": vm, "VDI": vdi, "userdevice": userdevice, "bootable": cfg.bootable, "mode": "RW",
                    "type": "Disk", "empty": false, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})],
            )
            .await?;
            let target = c
                .call_str(
                    "VDI.create",
                    vec![json!({"SR": storage, "name_label": format!("{} {}", vm_plan.name, d.name),
                        "name_description": "restored by Ferry (instant recovery)",
                        "virtual_size": d.source.size().to_string(), "type": "user", "sharable": false, "read_only": false,
                        "other_config": {}, "xenstore_data": {}, "sm_config": {}, "tags": []})],
                )
                .await?;
            created.vdis.push(target.clone());
            staging.push(c.call_str("SR.get_uuid", vec![json!(sr)]).await?);
            targets.push(c.call_str("VDI.get_uuid", vec![json!(target)]).await?);
        }
        create_vifs(c, c.source(), vm_plan, &vm, native.as_ref()).await?;
        c.call("VM.start", vec![json!(vm), json!(false), json!(false)])
            .await?;
        Ok::<_, HvError>(InstantVm {
            id: c.call_str("VM.get_uuid", vec![json!(vm)]).await?,
            name: vm_plan.name.clone(),
            staging,
            targets,
        })
    }
    .await;
    if r.is_err() {
        created.remove(c).await;
    }
    r
}

async fn vm_ref(c: &XenClient, vm: &InstantVm) -> Result<String, HvError> {
    c.call_str("VM.get_by_uuid", vec![json!(vm.id)]).await
}

pub(crate) async fn shutdown(c: &XenClient, vm: &str) -> Result<(), HvError> {
    let state = c.call_str("VM.get_power_state", vec![json!(vm)]).await?;
    if state == "Halted" {
        return Ok(());
    }
    if let Err(e) = c.call("VM.clean_shutdown", vec![json!(vm)]).await {
        tracing::warn!(error = %e, "clean shutdown refused; forcing it");
        c.call("VM.hard_shutdown", vec![json!(vm)]).await?;
    }
    Ok(())
}

async fn cancel(c: &XenClient, vm: &InstantVm) -> Result<(), HvError> {
    let mut created = Created::default();
    match vm_ref(c, vm).await {
        Ok(r) => {
            shutdown(c, &r).await?;
            c.call("VM.destroy", vec![json!(r)]).await?;
        }
        Err(e) => {
            tracing::warn!(error = %e, vm = %vm.id, "the instant-recovery VM is gone already")
        }
    }
    for s in &vm.staging {
        if let Ok(r) = c.call_str("SR.get_by_uuid", vec![json!(s)]).await {
            created.srs.push(r);
        }
    }
    for t in &vm.targets {
        if let Ok(r) = c.call_str("VDI.get_by_uuid", vec![json!(t)]).await {
            created.vdis.push(r);
        }
    }
    created.remove(c).await;
    Ok(())
}

/// VHD block size: a changed cell is sent as its whole block, read from the merged view.
const VHD_BLOCK: u64 = 2 << 20;

/// Writes the blocks of `src` that `written` touches into the VDI `target`, as a VHD that
/// holds only those blocks.
pub(crate) async fn apply_changes(
    c: &XenClient,
    target: &str,
    src: &dyn BlockSource,
    written: &ExtentMap,
) -> Result<u64, HvError> {
    let e = |m: String| err(c, target, m);
    let dir = tempfile::Builder::new()
        .prefix("ferry-instant-")
        .tempdir()
        .map_err(|x| e(format!("scratch directory: {x}")))?;
    let path = dir.path().join("changes.vhd");
    let size = src.size();
    let mut w = ferry_image::ImageWriter::create_with(
        &path,
        ferry_image::OutputFormat::VhdDynamic,
        size,
        &ferry_image::WriterOptions {
            block_size: Some(VHD_BLOCK),
            parent: None,
        },
    )
    .map_err(|x| e(x.to_string()))?;
    let mut blocks: Vec<u64> = written
        .iter()
        .flat_map(|x| (x.offset / VHD_BLOCK)..x.end().div_ceil(VHD_BLOCK))
        .collect();
    blocks.dedup();
    let mut buf = vec![0u8; VHD_BLOCK as usize];
    let mut sent = 0u64;
    for b in blocks {
        let off = b * VHD_BLOCK;
        let n = VHD_BLOCK.min(size - off) as usize;
        src.read_at(off, &mut buf[..n])
            .await
            .map_err(|x| e(format!("reading the changes at {off}: {x}")))?;
        w.write(off, &buf[..n]).map_err(|x| e(x.to_string()))?;
        sent += n as u64;
    }
    let path = w.finish().map_err(|x| e(x.to_string()))?;
    c.import_vhd(target, &path).await?;
    Ok(sent)
}

/// A target that compares what is written to it with `expected`.
#[derive(Debug)]
struct Compare {
    expected: Arc<dyn BlockSource>,
    mismatch: std::sync::Mutex<Option<u64>>,
}

#[async_trait]
impl ferry_core::BlockTarget for Compare {
    fn size(&self) -> u64 {
        self.expected.size()
    }
    fn name(&self) -> String {
        self.expected.name()
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ferry_core::BlockError> {
        let mut want = vec![0u8; data.len()];
        self.expected.read_at(offset, &mut want).await?;
        if want != data {
            let first = want.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
            let mut m = self.mismatch.lock().expect("compare lock");
            m.get_or_insert(offset + first as u64);
        }
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ferry_core::BlockError> {
        self.write_at(offset, &vec![0u8; len as usize]).await
    }
    async fn flush(&self) -> Result<(), ferry_core::BlockError> {
        Ok(())
    }
}

async fn finish(
    c: &XenClient,
    vm: &InstantVm,
    changed: &[(Arc<dyn BlockSource>, ExtentMap)],
) -> Result<(), HvError> {
    if changed.len() != vm.targets.len() {
        return Err(err(
            c,
            &vm.name,
            format!("{} disks, {} targets", changed.len(), vm.targets.len()),
        ));
    }
    let r = vm_ref(c, vm).await?;
    let was_running = c.call_str("VM.get_power_state", vec![json!(r)]).await? == "Running";
    shutdown(c, &r).await?;
    // The guest is stopped: its writes are final. Copy them over and check every byte.
    let copied = async {
        for ((src, written), t) in changed.iter().zip(&vm.targets) {
            if !written.is_empty() {
                let n = apply_changes(c, t, src.as_ref(), written).await?;
                tracing::info!(vdi = %t, bytes = n, "guest writes copied to the restored disk");
            }
            let cmp = Compare {
                expected: src.clone(),
                mismatch: std::sync::Mutex::new(None),
            };
            c.export_raw(t, &cmp).await?;
            if let Some(at) = *cmp.mismatch.lock().expect("compare lock") {
                return Err(err(
                    c,
                    t,
                    format!("the restored disk differs from the running one at offset {at}"),
                ));
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = copied {
        if was_running {
            let _ = c
                .call("VM.start", vec![json!(r), json!(false), json!(false)])
                .await;
        }
        return Err(e);
    }
    // Switch: the VBDs on the exports go, VBDs on the restored disks take their places.
    let mut staging_srs = Vec::new();
    for s in &vm.staging {
        staging_srs.push(c.call_str("SR.get_by_uuid", vec![json!(s)]).await?);
    }
    let vbds = c.call("VM.get_VBDs", vec![json!(r)]).await?;
    let mut slots = Vec::new();
    for b in vbds.as_array().cloned().unwrap_or_default() {
        let b = b.as_str().unwrap_or_default().to_string();
        let rec = c.call("VBD.get_record", vec![json!(b)]).await?;
        let vdi = rec.get("VDI").and_then(J::as_str).unwrap_or_default();
        let Ok(sr) = c.call_str("VDI.get_SR", vec![json!(vdi)]).await else {
            continue;
        };
        if let Some(i) = staging_srs.iter().position(|s| *s == sr) {
            slots.push((
                i,
                rec.get("userdevice").cloned(),
                rec.get("bootable").cloned(),
            ));
            c.call("VBD.destroy", vec![json!(b)]).await?;
        }
    }
    for (i, userdevice, bootable) in slots {
        let vdi = c
            .call_str("VDI.get_by_uuid", vec![json!(vm.targets[i])])
            .await?;
        c.call(
            "VBD.create",
            vec![json!({"VM": r, "VDI": vdi, "userdevice": userdevice, "bootable": bootable, "mode": "RW",
                "type": "Disk", "empty": false, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})],
        )
        .await?;
    }
    for sr in staging_srs {
        c.call("SR.forget", vec![json!(sr)]).await?;
    }
    let _ = c
        .call(
            "VM.remove_from_other_config",
            vec![json!(r), json!(INSTANT_MARKER)],
        )
        .await;
    if was_running {
        c.call("VM.start", vec![json!(r), json!(false), json!(false)])
            .await?;
    }
    Ok(())
}

#[async_trait]
impl InstantRecovery for XenDriver {
    async fn instant_start(&self, plan: &InstantPlan) -> Result<InstantVm, HvError> {
        start(self.client(), plan).await
    }

    async fn instant_restore_disk(
        &self,
        vm: &InstantVm,
        index: usize,
        source: &dyn BlockSource,
    ) -> Result<(), HvError> {
        let c = self.client();
        let t = vm
            .targets
            .get(index)
            .ok_or_else(|| err(c, &vm.name, format!("no disk {index}")))?;
        c.import_raw(t, source).await
    }

    async fn instant_finish(
        &self,
        vm: &InstantVm,
        changed: &[(Arc<dyn BlockSource>, ExtentMap)],
    ) -> Result<(), HvError> {
        finish(self.client(), vm, changed).await
    }

    async fn instant_cancel(&self, vm: &InstantVm) -> Result<(), HvError> {
        cancel(self.client(), vm).await
    }
}
