//! A VM that live-migrates *during* a backup (ADR 0171).
//!
//! A cluster node's WMI only knows the VMs it runs: once a VM has moved, the node that took its
//! checkpoint answers the backup's next calls with "not found" (`w:InvalidSelectors` for a Get,
//! return value 32773 or a failed job for a method, the image held by another node for RCT).
//! A live migration keeps the checkpoint (its files stay on the CSV, its InstanceID stays the
//! same), so the backup goes on where the VM is now, as Veeam and NAKIVO do: after a failed
//! per-VM call on a cluster node, the owner is asked of `root/MSCluster` again; when it is
//! another node, the step is run again there (INFO `VM moved from A to B during the backup`).
//! Whether the VM moved is the cluster's answer, not the error's wording. Some answers of a
//! node that lost the VM are not errors but empty (the configuration's settings), so the
//! cluster is also asked once the session has read everything, and after an abort (a removal
//! takes a checkpoint it cannot see for gone). At most [`MAX_FOLLOWS`] moves are followed per
//! stage (start, session, end); then the error stands as before.

use super::{HypervDriver, HypervSession, Inner};
use ferry_hv::{BackupOptions, BackupSession, ChangeTokens, HvError, Outcome};
use std::sync::Arc;

/// How many moves one backup follows (each stage), before it fails with the host's error.
pub const MAX_FOLLOWS: u32 = 3;

/// Whether `e` can come from a node that no longer runs the VM (not a transport or
/// configuration error, which the cluster's answer would not change).
fn may_be_moved(e: &HvError) -> bool {
    matches!(
        e,
        HvError::Api { .. }
            | HvError::Vm { .. }
            | HvError::NoTransport { .. }
            | HvError::Disk { .. }
    )
}

/// Whether `e` ended a backup before its checkpoint was taken (then it starts again on the
/// VM's new node; later errors are followed by the session itself).
fn before_checkpoint(e: &HvError) -> bool {
    match e {
        HvError::Vm { .. } => true,
        HvError::Api { call, .. } => {
            call.ends_with(".CreateSnapshot") || call.ends_with(".RequestStateChange")
        }
        _ => false,
    }
}

impl Inner {
    /// The view of the node that runs VM `vm` now, if that is no longer this view's node
    /// (`None` on a standalone host, when it did not move, or when the cluster cannot say).
    pub(super) async fn moved(self: &Arc<Self>, vm: &str) -> Option<Arc<Inner>> {
        let from = self.node.as_ref()?;
        let to = match self.clusters.owner(&self.client, vm).await {
            Ok(Some(n)) => n,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(source = %self.name, vm, error = %e, "cannot ask the cluster where the VM runs now");
                return None;
            }
        };
        if to.name.eq_ignore_ascii_case(&from.name) {
            return None;
        }
        match self.clusters.client(&to.name).await {
            Ok(c) => {
                tracing::info!(source = %self.name, vm, from = %from.name, to = %to.name, "VM moved from {} to {} during the backup", from.name, to.name);
                Some(self.on(to, c))
            }
            Err(e) => {
                tracing::warn!(source = %self.name, vm, node = %to.name, error = %e, "the VM moved to a node that cannot be reached");
                None
            }
        }
    }
}

impl HypervDriver {
    /// [`HypervDriver::backup_on`] node `i`, following a VM that moves before its checkpoint
    /// is taken.
    pub(super) async fn backup_following(
        &self,
        mut i: Arc<Inner>,
        vm: &str,
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
    ) -> Result<Box<dyn BackupSession>, HvError> {
        let mut moves = 0;
        loop {
            match self.backup_on(&i, vm, opts, previous).await {
                Err(e) if moves < MAX_FOLLOWS && before_checkpoint(&e) => match i.moved(vm).await {
                    Some(next) => {
                        tracing::debug!(error = %e, "the call failed on the node the VM left");
                        moves += 1;
                        i = next;
                    }
                    None => return Err(e),
                },
                r => return r,
            }
        }
    }
}

impl HypervSession {
    /// Follows the VM to its new node after `e`; whether it moved (then the step runs again).
    async fn follow(&mut self, e: &HvError) -> bool {
        if self.inner.node.is_none() || !may_be_moved(e) {
            return false;
        }
        if self.moves >= MAX_FOLLOWS {
            tracing::warn!(source = %self.inner.name, vm = %self.vm.name, "the VM moved {MAX_FOLLOWS} times during the backup: not following it further");
            return false;
        }
        match self.inner.moved(&self.vm.id).await {
            Some(next) => {
                tracing::debug!(error = %e, "the call failed on the node the VM left");
                self.moves += 1;
                self.inner = next;
                self.vm.host = Some(self.inner.client.url().to_string());
                true
            }
            None => false,
        }
    }

    /// [`HypervSession::open`] on the node that runs the VM: again on its new node when it
    /// moved meanwhile. A node that lost the VM does not fail every call (the configuration's
    /// settings are then just not there, RCT refuses the image), so once everything is read the
    /// cluster is asked whether the VM is still on this node.
    pub(super) async fn open_following(
        &mut self,
        settings: &ferry_wsman::cim::Instance,
        live: &[crate::wmi::VirtualDisk],
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
    ) -> Result<(), HvError> {
        loop {
            self.disks.clear();
            self.vm.disks.clear();
            self.config = Default::default();
            self.old_reference = None;
            let e = match self.open(settings, live, opts, previous).await {
                Ok(()) if self.inner.node.is_none() => return Ok(()),
                Ok(()) => match self.inner.moved(&self.vm.id).await {
                    None => return Ok(()),
                    Some(_) if self.moves >= MAX_FOLLOWS => {
                        // Not a VM error: that would start the backup over.
                        return Err(HvError::Api {
                            source_name: self.inner.name.clone(),
                            call: "owner node".into(),
                            message: format!(
                                "VM `{}` moved {MAX_FOLLOWS} times during the backup: not following it further",
                                self.vm.name
                            ),
                            retryable: false,
                        });
                    }
                    Some(next) => {
                        self.moves += 1;
                        self.inner = next;
                        self.vm.host = Some(self.inner.client.url().to_string());
                        continue;
                    }
                },
                Err(e) => e,
            };
            if !self.follow(&e).await {
                return Err(e);
            }
        }
    }

    /// [`HypervSession::cleanup`] on the node that runs the VM now: the reference point (or
    /// the checkpoint's removal) is made where the VM went. A node that lost the VM calls its
    /// checkpoint gone, which removal takes for done: after an abort the cluster is asked too.
    pub(super) async fn cleanup_following(
        &mut self,
        outcome: Outcome,
    ) -> Result<ChangeTokens, HvError> {
        // The end of the backup has its own budget: the checkpoint must not stay behind.
        self.moves = 0;
        loop {
            match self.cleanup(outcome).await {
                Err(e) if self.follow(&e).await => {}
                Ok(t) if outcome == Outcome::Aborted && self.moves < MAX_FOLLOWS => {
                    match self.inner.moved(&self.vm.id).await {
                        Some(next) => {
                            self.moves += 1;
                            self.inner = next;
                        }
                        None => return Ok(t),
                    }
                }
                r => return r,
            }
        }
    }
}
