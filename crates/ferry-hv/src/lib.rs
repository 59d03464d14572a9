//! The hypervisor driver interface: what Ferry asks of Xen, VMware and Hyper-V alike.
//!
//! A driver ([`HypervisorDriver`]) lists VMs, opens a [`BackupSession`] for one VM and restores
//! whole VMs. A backup session has taken a snapshot at the best consistency the VM supports
//! ([`ConsistencyLevel`] reached is reported) and offers, per disk, a
//! [`BlockSource`](ferry_core::BlockSource) of the snapshot plus the extents changed since the
//! previous restore point ([`Changed`]) and the [`ChangeToken`] to store for next time. How the
//! bytes travel ([`TransportMode`]: SAN, hot-add, network) is chosen per disk from the source's
//! order of preference, and the mode used is recorded. Cleanup always runs: on
//! [`BackupSession::finish`], on drop (best effort, in the background), and — for a process
//! killed mid-backup — by [`HypervisorDriver::recover`] at the start of the next run, from
//! markers the driver left on the hypervisor and in its journal ([`journal`]).
//!
//! `docs/drivers.md` maps VMware (changeId, QueryChangedDiskAreas, nbdkit-vddk) and Hyper-V
//! (recovery checkpoints, reference points, RCT, host agent) onto these types.
//!
//! [`config`] holds the typed sources configuration (`ferry.toml`).

pub mod agent;
pub mod config;
pub mod counting;
pub mod journal;

pub use config::{FerryConfig, SourceConfig, SourceKind};
pub use counting::{CountingSource, ReadCounters};
pub use ferry_core::vm::{ConsistencyLevel, HypervisorKind, NativeConfig, VmConfig};

use async_trait::async_trait;
use ferry_core::{BlockSource, ExtentMap};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// How a disk's bytes travel from the hypervisor's storage to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum TransportMode {
    /// The proxy reads the disk's image straight off shared storage (a VHD on an NFS/LVM SR, a
    /// VMDK on a VMFS LUN, a VHDX on an SMB share).
    San,
    /// The snapshot disk is attached to the proxy VM and read as a local block device.
    Hotadd,
    /// The hypervisor (or an agent) serves the disk over the network, e.g. NBD over TLS.
    Network,
}

impl TransportMode {
    /// Every mode, in the default order of preference (fastest first).
    pub const ALL: [TransportMode; 3] = [Self::San, Self::Hotadd, Self::Network];
}

impl fmt::Display for TransportMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::San => "san",
            Self::Hotadd => "hotadd",
            Self::Network => "network",
        })
    }
}

/// Power state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    /// Running.
    Running,
    /// Powered off.
    Off,
    /// Paused or suspended.
    Suspended,
    /// Anything else the hypervisor reports.
    Unknown,
}

/// One disk of a VM as the inventory shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskSummary {
    /// Stable key of the disk across backups (a VDI uuid, a VMDK's disk key + uuid, a VHDX
    /// path's identifier); change tokens are keyed by it.
    pub key: String,
    /// Display name.
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Position on the VM (`xvda`, `scsi0:1`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
}

/// One VM of the inventory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmSummary {
    /// The hypervisor's stable id (uuid, MoRef, VM GUID).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Power state.
    pub power_state: PowerState,
    /// The host it runs on (or is registered with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The pool or cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Disks.
    pub disks: Vec<DiskSummary>,
    /// Tags or labels.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A hypervisor's change token for one disk: the value that, at the next backup, lets the
/// driver ask "what changed since?" (a Xen CBT snapshot VDI uuid, a VMware `changeId`, a
/// Hyper-V RCT reference point id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChangeToken(pub String);

/// Change tokens of a restore point, keyed by [`DiskSummary::key`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChangeTokens(pub BTreeMap<String, ChangeToken>);

/// What must be read of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// Everything allocated: there is no usable previous token. The reason is logged and kept
    /// for the restore point (e.g. "first backup", "CBT was reset").
    Full {
        /// Why the backup of this disk is full.
        reason: String,
    },
    /// Only these extents changed since the previous token.
    Since(ExtentMap),
}

/// One disk of a backup session.
#[derive(Debug, Clone)]
pub struct BackupDisk {
    /// Stable key (see [`DiskSummary::key`]).
    pub key: String,
    /// Name in the restore point.
    pub name: String,
    /// The snapshot's content.
    pub source: Arc<dyn BlockSource>,
    /// Read counters of `source` (what the backup actually read).
    pub counters: Arc<ReadCounters>,
    /// Full or changed extents.
    pub changed: Changed,
    /// How the bytes travel.
    pub transport: TransportMode,
    /// The token to store with the restore point.
    pub token: ChangeToken,
}

/// Options of one backup.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Force a full read even with a usable previous token.
    pub force_full: bool,
    /// Skip these disks (by key or name).
    pub exclude_disks: Vec<String>,
}

/// How a backup took its snapshot where a hypervisor has several ways (Hyper-V: `child-vm`
/// through the guest's VSS, or `saved-state`), and why this one; kept in the restore point's
/// labels ([`METHOD_LABEL`], [`METHOD_REASON_LABEL`]) and shown in the backup summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMethod {
    /// The method, e.g. `child-vm`, `saved-state`.
    pub name: String,
    /// Why it was chosen (the guest's qualification, or why it fell back).
    pub reason: String,
}

/// Restore point label holding [`BackupMethod::name`].
pub const METHOD_LABEL: &str = "ferry.backup.method";
/// Restore point label holding [`BackupMethod::reason`].
pub const METHOD_REASON_LABEL: &str = "ferry.backup.method-reason";

/// How a backup ended, for [`BackupSession::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The restore point was written: keep what the next incremental needs.
    Committed,
    /// The backup failed or was cancelled: remove everything this session created, keep the
    /// previous change anchors untouched.
    Aborted,
}

/// An open backup of one VM.
#[async_trait]
pub trait BackupSession: Send + Sync + fmt::Debug {
    /// The VM.
    fn vm(&self) -> &VmSummary;
    /// Consistency reached by the snapshot.
    fn consistency(&self) -> ConsistencyLevel;
    /// Normalized configuration at snapshot time.
    fn config(&self) -> &VmConfig;
    /// The hypervisor's own record at snapshot time.
    fn native(&self) -> &NativeConfig;
    /// The disks to read.
    fn disks(&self) -> &[BackupDisk];
    /// How the snapshot was taken, where the hypervisor has several methods.
    fn method(&self) -> Option<&BackupMethod> {
        None
    }
    /// Ends the session: on [`Outcome::Committed`] converts the snapshot into the change
    /// anchors of the next backup and returns their tokens; on [`Outcome::Aborted`] removes
    /// the snapshot. Both detach and remove every temporary object (VBDs, tasks, connections).
    async fn finish(self: Box<Self>, outcome: Outcome) -> Result<ChangeTokens, HvError>;
}

/// A disk to restore.
#[derive(Debug, Clone)]
pub struct RestoreDisk {
    /// Name from the restore point.
    pub name: String,
    /// Content.
    pub source: Arc<dyn BlockSource>,
}

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// Name of the new VM.
    pub name: String,
    /// Normalized configuration.
    pub config: VmConfig,
    /// The native record, when restoring to the same kind of hypervisor.
    pub native: Option<NativeConfig>,
    /// Disks in [`VmConfig::disks`] order.
    pub disks: Vec<RestoreDisk>,
    /// Power the VM on afterwards.
    pub power_on: bool,
}

/// What a restore created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoredVm {
    /// The new VM's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// How the disks were written.
    pub transport: String,
}

/// What to run from a backup while it is restored (instant recovery).
#[derive(Debug, Clone)]
pub struct InstantPlan {
    /// The VM: name, configuration, native record; `disks` are the restore point's disks
    /// (the background restore's source).
    pub vm: RestorePlan,
    /// Per disk of `vm.disks`, the writable NBD export the VM runs from meanwhile.
    pub exports: Vec<String>,
    /// Where the restored disks go (an SR's uuid or name; default: the pool's default).
    pub storage: Option<String>,
}

/// What an instant recovery created on the hypervisor; kept by the session and passed back
/// to the later steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InstantVm {
    /// The VM's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Per disk: the temporary storage object that points at the export (an `nbd` SR's uuid).
    pub staging: Vec<String>,
    /// Per disk: the disk being restored on real storage (a VDI uuid).
    pub targets: Vec<String>,
}

/// Instant recovery on a hypervisor: run a VM from exports, restore its disks to real storage
/// meanwhile, then switch it over or remove it.
#[async_trait]
pub trait InstantRecovery: Send + Sync {
    /// Creates the VM with disks on the exports and empty target disks on real storage, and
    /// starts it. A failure removes everything created.
    async fn instant_start(&self, plan: &InstantPlan) -> Result<InstantVm, HvError>;
    /// Writes `source` (the restore point's disk) into target disk `index`.
    async fn instant_restore_disk(
        &self,
        vm: &InstantVm,
        index: usize,
        source: &dyn BlockSource,
    ) -> Result<(), HvError>;
    /// Stops the VM, writes what the guest changed (`changed[i]`: the merged view of disk `i`
    /// and the extents written to it) into the targets, checks every target against its merged
    /// view, attaches the targets in place of the exports, removes the staging objects and
    /// starts the VM again. On a failure before the switch the VM runs from the exports again.
    async fn instant_finish(
        &self,
        vm: &InstantVm,
        changed: &[(Arc<dyn BlockSource>, ExtentMap)],
    ) -> Result<(), HvError>;
    /// Stops and removes the VM, the staging objects and the targets.
    async fn instant_cancel(&self, vm: &InstantVm) -> Result<(), HvError>;
}

/// A VM a replica job keeps (the standby, or a test copy), found again by the job's marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicaVm {
    /// The VM's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its power state.
    pub power_state: PowerState,
}

impl ReplicaVm {
    /// The standby that `ReplicaTarget::replica_create` restored (with `standby_plan`): off.
    pub fn standby(vm: RestoredVm) -> Self {
        Self {
            id: vm.id,
            name: vm.name,
            power_state: PowerState::Off,
        }
    }
}

/// What `ReplicaTarget::replica_create` restores: `plan` with the VM left powered off (a
/// standby stays off until a failover starts it).
pub fn standby_plan(plan: &RestorePlan) -> RestorePlan {
    RestorePlan {
        power_on: false,
        ..plan.clone()
    }
}

/// A recovery point: a snapshot of the standby VM on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RecoveryPoint {
    /// The snapshot's id.
    pub id: String,
    /// Its name (Ferry names it after the restore point it holds).
    pub name: String,
}

/// Which VMs a replica job marks on a target (ADR 0130).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaRole {
    /// The standby VM.
    Standby,
    /// A test-failover copy (isolated NICs).
    Test,
}

/// Replica targets: keep a standby VM up to date by writing changed extents into its disks,
/// recovery points as snapshots on the target, and the power and isolation failover needs.
/// Disks are addressed by their index in device order (the restore plan's disk order).
/// Every call is safe to repeat: a killed caller runs it again (ADR 0131).
#[async_trait]
pub trait ReplicaTarget: Send + Sync {
    /// Creates the standby VM of job `job` from `plan`, powered off, marked with the job.
    /// A failure removes what it created.
    async fn replica_create(&self, plan: &RestorePlan, job: &str) -> Result<ReplicaVm, HvError>;
    /// The VMs marked as `role` of job `job` (what a killed run may have left).
    async fn replica_marked(&self, job: &str, role: ReplicaRole)
    -> Result<Vec<ReplicaVm>, HvError>;
    /// The VM `vm` (id), `None` when it does not exist.
    async fn replica_vm(&self, vm: &str) -> Result<Option<ReplicaVm>, HvError>;
    /// Writes the `extents` of `source` into disk `index` of the halted VM `vm`; returns the
    /// bytes sent.
    async fn replica_write(
        &self,
        vm: &str,
        index: usize,
        source: &dyn BlockSource,
        extents: &ExtentMap,
    ) -> Result<u64, HvError>;
    /// Takes recovery point `name` of `vm` (disks only).
    async fn point_create(&self, vm: &str, name: &str) -> Result<RecoveryPoint, HvError>;
    /// The recovery points of `vm`, oldest first.
    async fn points(&self, vm: &str) -> Result<Vec<RecoveryPoint>, HvError>;
    /// Powers `vm` off and reverts its disks to `point`.
    async fn point_revert(&self, vm: &str, point: &str) -> Result<(), HvError>;
    /// Deletes `point` and its disks; a point that is gone already is no error.
    async fn point_delete(&self, point: &str) -> Result<(), HvError>;
    /// Starts (`on`) or stops `vm` (clean shutdown, forced when refused); no-op when it is
    /// in that state already.
    async fn power(&self, vm: &str, on: bool) -> Result<(), HvError>;
    /// Marks `vm` (id) as the standby of job `job`, or removes the mark (`None`): a VM
    /// changes role when the direction is reversed.
    async fn replica_mark(&self, vm: &str, job: Option<&str>) -> Result<(), HvError>;
    /// A new, halted VM `name` made from `point`, marked as test copy of job `job`, its NICs
    /// on an isolated network.
    async fn test_copy(&self, point: &str, name: &str, job: &str) -> Result<ReplicaVm, HvError>;
    /// Stops and removes `vm` with its disks (and the isolated network of a test copy).
    async fn replica_remove(&self, vm: &str) -> Result<(), HvError>;
}

/// What [`HypervisorDriver::recover`] cleaned up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CleanupReport {
    /// Leftover snapshots removed.
    pub snapshots: usize,
    /// Leftover disk attachments removed.
    pub attachments: usize,
    /// Leftover tasks removed.
    pub tasks: usize,
    /// Partial VMs of killed restores destroyed.
    pub partial_vms: usize,
}

/// A hypervisor driver.
#[async_trait]
pub trait HypervisorDriver: Send + Sync {
    /// Which hypervisor.
    fn kind(&self) -> HypervisorKind;
    /// The VMs (not templates, snapshots or the control domain).
    async fn list_vms(&self) -> Result<Vec<VmSummary>, HvError>;
    /// Snapshots `vm` (id or name) and opens its disks. `previous` holds the tokens of the
    /// previous restore point of this VM, if any. First cleans up what killed processes
    /// journaled (never what a running backup holds).
    async fn begin_backup(
        &self,
        vm: &str,
        opts: &BackupOptions,
        previous: Option<&ChangeTokens>,
    ) -> Result<Box<dyn BackupSession>, HvError>;
    /// Removes what an earlier, killed run left behind (snapshots in progress, attachments to
    /// the proxy, tasks).
    async fn recover(&self) -> Result<CleanupReport, HvError>;
    /// Removes what a backup of `vm` (id) by process `owner` (a
    /// [`journal::process_owner`] of another, dead appliance) left on the hypervisor: its
    /// snapshot and attachments, found by the markers the driver puts on them. Called by an
    /// appliance that took over the VM's work lease after that appliance's lease expired, so no
    /// backup of `owner` can still be running. Drivers without owner markers remove nothing.
    async fn remove_leftovers(&self, vm: &str, owner: &str) -> Result<CleanupReport, HvError> {
        let _ = (vm, owner);
        Ok(CleanupReport::default())
    }
    /// The datastore (vSphere) or SR (Xen) each disk of `vm` lives on, keyed by
    /// [`DiskSummary::key`]; a disk left out is on a store the driver cannot name. The
    /// appliance's per-datastore limits key on it (ADR 0142).
    async fn disk_stores(&self, vm: &VmSummary) -> Result<BTreeMap<String, String>, HvError> {
        let _ = vm;
        Ok(BTreeMap::new())
    }
    /// Creates a VM from a restore point.
    async fn restore_vm(&self, plan: &RestorePlan) -> Result<RestoredVm, HvError>;
    /// Instant recovery, where the driver supports it.
    fn instant(&self) -> Option<&dyn InstantRecovery> {
        None
    }
    /// Replica targets (and primaries of reversed replicas), where the driver supports them.
    fn replica(&self) -> Option<&dyn ReplicaTarget> {
        None
    }
}

/// A driver failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HvError {
    /// The hypervisor API refused a call.
    #[error("{source_name}: {call} failed: {message}")]
    Api {
        /// The configured source.
        source_name: String,
        /// The API call and its object.
        call: String,
        /// The hypervisor's error.
        message: String,
        /// Whether a retry may help.
        retryable: bool,
    },
    /// The hypervisor could not be reached or the connection broke.
    #[error("{source_name}: cannot reach {url}: {message}")]
    Connect {
        /// The configured source.
        source_name: String,
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// No VM has this id or name (or several have the name).
    #[error("{source_name}: VM `{vm}`: {message}")]
    Vm {
        /// The configured source.
        source_name: String,
        /// What was asked for.
        vm: String,
        /// Not found, ambiguous, …
        message: String,
    },
    /// None of the configured transports can reach this disk.
    #[error("{source_name}: disk {disk}: no usable transport ({tried})")]
    NoTransport {
        /// The configured source.
        source_name: String,
        /// The disk.
        disk: String,
        /// Each mode tried and why it was refused.
        tried: String,
    },
    /// Reading or writing disk data failed.
    #[error("{source_name}: disk {disk}: {message}")]
    Disk {
        /// The configured source.
        source_name: String,
        /// The disk.
        disk: String,
        /// What failed.
        message: String,
    },
    /// The configuration is wrong.
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// The control plane's HTTP transport failed (TLS, connection, status, transfer).
    #[error(transparent)]
    Http(#[from] ferry_http::HttpError),
}

impl HvError {
    /// Whether the same operation may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { retryable, .. } => *retryable,
            Self::Connect { .. } => true,
            Self::Http(e) => e.is_retryable(),
            _ => false,
        }
    }
}
