//! Live migrations in the middle of a backup (ADR 0171): side door
//! `FerrySim_SideDoor.MigrateAfter(VirtualSystem, Calls[, Method][, Times])` arms a trigger; the
//! VM is live-migrated (RCT kept, as [`super::cluster`]'s `LiveMigrate`) to the next node right
//! after `Calls` more WMI requests (or calls of `Method`, `Class.Method`, when given) have been
//! answered, and again after each further `Calls`, `Times` times in all (default once). A test
//! thus lands the move between the checkpoint and the reads, or makes the VM bounce.
//!
//! Side-door and `root/MSCluster` requests do not count: they are the test's and the
//! re-resolution's own.

use super::cluster::MSCLUSTER;
use super::sidedoor::CLASS;
use super::{Fault, State, fault, set_rv};
use ferry_wsman::cim::Instance;
use ferry_wsman::xml::Node;

/// An armed trigger.
#[derive(Debug, Clone, Default)]
pub(super) struct Pending {
    vm: String,
    /// The `Class.Method` that counts; `None`: every request.
    method: Option<String>,
    every: u64,
    left: u64,
    times: u64,
}

/// The `Class.Method` (or the WS-Man verb) of a request.
fn call_of(action: &str, resource: &str) -> String {
    let class = resource.rsplit('/').next().unwrap_or("");
    match action
        .strip_prefix(resource)
        .and_then(|m| m.strip_prefix('/'))
    {
        Some(m) => format!("{class}.{m}"),
        None => format!("{class}.{}", action.rsplit('/').next().unwrap_or_default()),
    }
}

/// Called once a request has been answered: counts it and migrates when the trigger fires.
pub(super) fn after(st: &mut State, action: &str, resource: &str) {
    let Some(p) = st.pending_move.as_mut() else {
        return;
    };
    let lower = resource.to_ascii_lowercase();
    if lower.starts_with(MSCLUSTER) || resource.ends_with(CLASS) {
        return;
    }
    if p.method
        .as_deref()
        .is_some_and(|m| !m.eq_ignore_ascii_case(&call_of(action, resource)))
    {
        return;
    }
    p.left = p.left.saturating_sub(1);
    if p.left > 0 {
        return;
    }
    p.times -= 1;
    p.left = p.every;
    let vm = p.vm.clone();
    if p.times == 0 {
        st.pending_move = None;
    }
    st.migrate_to_next(&vm, "MigrateAfter");
}

/// `MigrateAfter`, or `None` for the other side-door methods.
pub(super) fn sidedoor(
    st: &mut State,
    method: &str,
    body: &Node,
) -> Option<Result<Instance, Fault>> {
    if method != "MigrateAfter" {
        return None;
    }
    let r = (|| {
        let bad = |m: String| fault("InvalidParameter", m);
        let vm = body
            .text_at("VirtualSystem")
            .ok_or_else(|| bad(format!("{CLASS}.MigrateAfter needs VirtualSystem.")))?;
        let num = |k: &str, default: Option<u64>| match body.text_at(k) {
            Some(v) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| bad(format!("{k} must be a number above 0."))),
            None => default.ok_or_else(|| bad(format!("{CLASS}.MigrateAfter needs {k}."))),
        };
        let every = num("Calls", None)?;
        let times = num("Times", Some(1))?;
        if st.cluster.is_none() {
            return Err(bad("the host is not a cluster node".into()));
        }
        st.vm_id_of(vm)
            .ok_or_else(|| bad(format!("no VM `{vm}`")))?;
        st.pending_move = Some(Pending {
            vm: vm.to_string(),
            method: body.text_at("Method").map(|m| m.trim().to_string()),
            every,
            left: every,
            times,
        });
        let mut out = Instance::default();
        set_rv(&mut out, 0);
        Ok(out)
    })();
    Some(r)
}

impl State {
    /// Live-migrates VM `vm` (RCT kept) to the node after the one that runs it, as side door
    /// `door` asked.
    pub(super) fn migrate_to_next(&mut self, vm: &str, door: &str) {
        let to = self.cluster.as_ref().and_then(|c| {
            let id = self.vm_id_of(vm)?;
            let from = c.owners.get(&id)?;
            let at = c.nodes.iter().position(|n| n == from)?;
            Some(c.nodes[(at + 1) % c.nodes.len()].clone())
        });
        match to.map(|to| (self.migrate(vm, &to, true), to)) {
            Some((Ok(()), to)) => tracing::info!(vm, node = %to, "live migration ({door})"),
            Some((Err(e), _)) => tracing::warn!(vm, error = %e, "{door}: no migration"),
            None => tracing::warn!(vm, "{door}: no cluster or no such VM"),
        }
    }

    /// The id of VM `vm` (name or id).
    fn vm_id_of(&self, vm: &str) -> Option<String> {
        self.objects
            .get("Msvm_ComputerSystem")?
            .iter()
            .filter(|i| i.text("Caption") == Some("Virtual Machine"))
            .find(|i| i.text("Name") == Some(vm) || i.text("ElementName") == Some(vm))
            .and_then(|i| i.text("Name"))
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::call_of;

    #[test]
    fn calls_are_named_class_dot_method() {
        let r = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/Msvm_VirtualSystemSnapshotService";
        assert_eq!(
            call_of(&format!("{r}/CreateSnapshot"), r),
            "Msvm_VirtualSystemSnapshotService.CreateSnapshot"
        );
        assert_eq!(
            call_of("http://schemas.xmlsoap.org/ws/2004/09/transfer/Get", r),
            "Msvm_VirtualSystemSnapshotService.Get"
        );
    }
}
