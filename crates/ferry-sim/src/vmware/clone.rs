//! `CloneVM_Task` through the front. vcsim clones the configuration but not disk contents, and
//! its clone reuses the source's disk backing objects: the source's disks end up naming the
//! clone's files (its snapshots' device lists too). The front puts the source's backings back
//! (`ReconfigVM_Task` edits with the files they had) and gives the clone's disks their content —
//! the snapshot's own copy when the spec names one (ADR 0164), else the source's live disks — as
//! flat extents nbdkit can write, like a VM made by `CreateVM_Task`.

use super::{Shared, disks_of, soap};

/// After vcsim ran `req` (a CloneVM_Task whose answer is `body`); `before`: the source's
/// `config.hardware.device` read just before.
pub(super) async fn cloned(
    sh: &Shared,
    cookie: Option<&str>,
    req: &soap::El,
    body: &[u8],
    before: &soap::El,
) -> Result<(), String> {
    let src = req.text_at("_this").unwrap_or("").to_string();
    let env = soap::parse(body)?;
    let task = env
        .text_at("Body/CloneVM_TaskResponse/returnval")
        .map(|t| t.trim().to_string())
        .ok_or("no task")?;
    let Some(vm) = sh.wait_task(cookie, &task).await? else {
        return Err("the task returned no VM".into());
    };
    let vm = vm.text.trim().to_string();
    repair_source(sh, cookie, &src, before).await?;
    let snap = req.text_at("spec/snapshot").map(String::from);
    let disks = sh.disks_of_vm(cookie, &vm).await?;
    let mut st = sh.state.lock().await;
    for (n, (key, cap, file)) in disks.into_iter().enumerate() {
        // The clone keeps the source's device keys; by position otherwise.
        let from = match snap.as_ref().and_then(|s| st.snaps.get(s)) {
            Some((_, frozen)) => frozen
                .get(&key)
                .or_else(|| frozen.values().nth(n))
                .map(|d| d.content.clone()),
            None => st
                .disks
                .get(&(src.clone(), key))
                .or_else(|| {
                    st.disks
                        .iter()
                        .filter(|((v, _), _)| *v == src)
                        .map(|(_, d)| d)
                        .nth(n)
                })
                .map(|d| d.live.clone()),
        };
        let disk = sh.api_disk(file, cap, from.as_deref())?;
        st.disks.insert((vm.clone(), key), disk);
    }
    Ok(())
}

/// Gives the source's disks back the files they had before vcsim's clone renamed them.
async fn repair_source(
    sh: &Shared,
    cookie: Option<&str>,
    src: &str,
    before: &soap::El,
) -> Result<(), String> {
    let now = disks_of(&sh.devices_of_vm(cookie, src).await?);
    let mut edits = String::new();
    for d in before
        .children
        .iter()
        .filter(|d| d.type_name() == "VirtualDisk")
    {
        let (Some(key), Some(file)) = (d.text_at("key"), d.text_at("backing/fileName")) else {
            continue;
        };
        if now
            .iter()
            .any(|(k, _, f)| k.to_string() == key && f == file)
        {
            continue;
        }
        // vcsim's edit needs `deviceInfo` (it clears the summary).
        let t = |p: &str| soap::esc(d.text_at(p).unwrap_or(""));
        let uuid = d
            .text_at("backing/uuid")
            .map(|u| format!("<uuid>{}</uuid>", soap::esc(u)))
            .unwrap_or_default();
        edits.push_str(&format!(
            "<deviceChange><operation>edit</operation><device xsi:type=\"VirtualDisk\"><key>{}</key>\
<deviceInfo><label>{}</label><summary></summary></deviceInfo><backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>{}</fileName><diskMode>{}</diskMode>\
<thinProvisioned>true</thinProvisioned>{uuid}</backing><controllerKey>{}</controllerKey>\
<unitNumber>{}</unitNumber><capacityInKB>{}</capacityInKB></device></deviceChange>",
            soap::esc(key),
            t("deviceInfo/label"),
            soap::esc(file),
            t("backing/diskMode"),
            t("controllerKey"),
            t("unitNumber"),
            t("capacityInKB"),
        ));
    }
    if edits.is_empty() {
        return Ok(());
    }
    let (r, _) = sh
        .call(
            cookie,
            "ReconfigVM_Task",
            &format!(
                "{}<spec>{edits}</spec>",
                soap::moref("_this", "VirtualMachine", src)
            ),
        )
        .await?;
    let task = r.text_at("returnval").unwrap_or("").to_string();
    sh.wait_task(cookie, &task).await?;
    Ok(())
}
