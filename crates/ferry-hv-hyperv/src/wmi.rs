//! The WMI calls of a Hyper-V backup, typed over [`WsmanClient`]: the inventory (VMs, their
//! settings, virtual hard disks, the backup integration service), recovery checkpoints,
//! reference points and RCT's `GetVirtualDiskChanges`. Sans policy: the driver decides.

use crate::cim::{self, Epr, Instance, Param};
use crate::client::WsmanClient;
use crate::error::{FaultKind, HypervError};

/// `Msvm_VirtualSystemSettingData.VirtualSystemType` of a VM's own settings.
pub const REALIZED: &str = "Microsoft:Hyper-V:System:Realized";
/// … of a recovery checkpoint (`CreateSnapshot` with `SnapshotType` 32768).
pub const RECOVERY: &str = "Microsoft:Hyper-V:Snapshot:Recovery";
/// `CreateSnapshot`'s `SnapshotType` of a recovery checkpoint.
pub const RECOVERY_SNAPSHOT: &str = "32768";
/// `Msvm_VirtualSystemSnapshotSettingData.ConsistencyLevel`: application consistent (VSS).
pub const APPLICATION_CONSISTENT: &str = "1";
/// … crash consistent.
pub const CRASH_CONSISTENT: &str = "2";
/// `RequestStateChange`: running.
pub const STATE_RUNNING: &str = "2";
/// `RequestStateChange`: saved.
pub const STATE_SAVED: &str = "32769";
/// `EnabledState` of a saved VM ("enabled but offline").
pub const ENABLED_SAVED: &str = "6";

/// One virtual hard disk of a VM (or of a checkpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualDisk {
    /// The disk's identifier: the device segment of its settings' InstanceID
    /// (`Microsoft:<system>\<disk>\…`), the same in the VM and in its checkpoints.
    pub key: String,
    /// The image on the host (`C:\…\disk0.vhdx`, a checkpoint's `.avhdx`).
    pub path: String,
    /// Position on its controller.
    pub address: Option<String>,
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

/// The WMI operations Ferry uses.
#[derive(Debug)]
pub struct Wmi<'a> {
    /// The client.
    pub c: &'a WsmanClient,
}

impl<'a> Wmi<'a> {
    /// Over `c`.
    pub fn new(c: &'a WsmanClient) -> Self {
        Self { c }
    }

    /// The guests (`Msvm_ComputerSystem` with Caption `Virtual Machine`).
    pub async fn vms(&self) -> Result<Vec<Instance>, HypervError> {
        self.c
            .enumerate(
                "Msvm_ComputerSystem",
                Some("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'"),
            )
            .await
    }

    /// A reference to the VM with id `id`.
    pub fn vm_epr(id: &str) -> Epr {
        Epr::new(
            "Msvm_ComputerSystem",
            &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", id)],
        )
    }

    /// The VM `id` now.
    pub async fn vm(&self, id: &str) -> Result<Instance, HypervError> {
        self.c.get(&Self::vm_epr(id)).await
    }

    /// The VM's own settings (`Msvm_VirtualSystemSettingData`, realized).
    pub async fn settings(&self, id: &str) -> Result<Option<Instance>, HypervError> {
        let q = format!(
            "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = '{}' AND VirtualSystemType = '{REALIZED}'",
            quote(id)
        );
        Ok(self
            .c
            .enumerate("Msvm_VirtualSystemSettingData", Some(&q))
            .await?
            .into_iter()
            .next())
    }

    /// The recovery checkpoints of every VM.
    pub async fn recovery_checkpoints(&self) -> Result<Vec<Instance>, HypervError> {
        let q = format!(
            "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemType = '{RECOVERY}'"
        );
        self.c
            .enumerate("Msvm_VirtualSystemSettingData", Some(&q))
            .await
    }

    /// The backup (VSS) integration service of VM `id`, if it has one.
    pub async fn vss_component(&self, id: &str) -> Result<Option<Instance>, HypervError> {
        let q = format!(
            "SELECT * FROM Msvm_VssComponent WHERE SystemName = '{}'",
            quote(id)
        );
        Ok(self
            .c
            .enumerate("Msvm_VssComponent", Some(&q))
            .await?
            .into_iter()
            .next())
    }

    /// Every virtual hard disk on the host, by the settings (VM or checkpoint) it belongs to:
    /// `(settings InstanceID, disk)`.
    pub async fn all_disks(&self) -> Result<Vec<(String, VirtualDisk)>, HypervError> {
        let q = "SELECT * FROM Msvm_StorageAllocationSettingData WHERE ResourceType = 31";
        let all = self
            .c
            .enumerate("Msvm_StorageAllocationSettingData", Some(q))
            .await?;
        Ok(all
            .iter()
            .filter_map(|i| {
                let id = i.text("InstanceID")?;
                let (owner, rest) = id.split_once('\\')?;
                let key = rest.split('\\').next()?.to_string();
                let path = i.texts("HostResource").first()?.to_string();
                Some((
                    owner.to_string(),
                    VirtualDisk {
                        key,
                        path,
                        address: i.text("AddressOnParent").map(str::to_string),
                    },
                ))
            })
            .collect())
    }

    /// The disks of the settings whose InstanceID is `owner` (`Microsoft:<guid>`).
    pub fn disks_of(all: &[(String, VirtualDisk)], owner: &str) -> Vec<VirtualDisk> {
        all.iter()
            .filter(|(o, _)| o.eq_ignore_ascii_case(owner))
            .map(|(_, d)| d.clone())
            .collect()
    }

    pub(crate) async fn service(&self, class: &str) -> Result<Epr, HypervError> {
        let svc = self
            .c
            .enumerate(class, None)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| {
                HypervError::protocol(self.c.source(), class, "the host has no such service")
            })?;
        let sel = |k: &str| svc.text(k).unwrap_or("").to_string();
        Ok(Epr::new(
            class,
            &[
                ("CreationClassName", &sel("CreationClassName")),
                ("Name", &sel("Name")),
                ("SystemCreationClassName", &sel("SystemCreationClassName")),
                ("SystemName", &sel("SystemName")),
            ],
        ))
    }

    /// The virtual size of the image at `path`, per `GetVirtualHardDiskSettingData`.
    pub async fn disk_size(&self, path: &str) -> Result<u64, HypervError> {
        let svc = self.service("Msvm_ImageManagementService").await?;
        let out = self
            .c
            .invoke(
                &svc,
                "GetVirtualHardDiskSettingData",
                &[Param::Text("Path".into(), path.into())],
            )
            .await?;
        out.text("SettingData")
            .and_then(cim::parse_embedded)
            .and_then(|(_, p)| p.get("MaxInternalSize")?.parse().ok())
            .ok_or_else(|| {
                HypervError::protocol(
                    self.c.source(),
                    "GetVirtualHardDiskSettingData",
                    "no MaxInternalSize in SettingData",
                )
            })
    }

    /// `CreateSnapshot` of a recovery checkpoint at `consistency`, named `name`; waits for the
    /// job and returns the checkpoint's settings reference.
    pub async fn create_recovery_checkpoint(
        &self,
        vm_id: &str,
        consistency: &str,
        name: &str,
    ) -> Result<Epr, HypervError> {
        let svc = self.service("Msvm_VirtualSystemSnapshotService").await?;
        let settings = cim::embedded_instance(
            "Msvm_VirtualSystemSnapshotSettingData",
            &[
                ("ConsistencyLevel", "uint8", consistency),
                ("IgnoreNonSnapshottableDisks", "boolean", "true"),
                ("ElementName", "string", name),
            ],
        );
        let out = self
            .c
            .invoke(
                &svc,
                "CreateSnapshot",
                &[
                    Param::Ref("AffectedSystem".into(), Self::vm_epr(vm_id)),
                    Param::Embedded("SnapshotSettings".into(), settings),
                    Param::Text("SnapshotType".into(), RECOVERY_SNAPSHOT.into()),
                ],
            )
            .await?;
        out.reference("ResultingSnapshot").cloned().ok_or_else(|| {
            HypervError::protocol(self.c.source(), "CreateSnapshot", "no ResultingSnapshot")
        })
    }

    /// A reference to the settings (checkpoint) with InstanceID `id`.
    pub fn settings_epr(id: &str) -> Epr {
        Epr::new("Msvm_VirtualSystemSettingData", &[("InstanceID", id)])
    }

    /// Whether the host has the checkpoint (settings) `id`.
    pub async fn checkpoint_exists(&self, id: &str) -> Result<bool, HypervError> {
        match self.c.get(&Self::settings_epr(id)).await {
            Ok(_) => Ok(true),
            Err(e) if is_gone(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `DestroySnapshot`; a checkpoint that is already gone is no error.
    pub async fn destroy_checkpoint(&self, id: &str) -> Result<(), HypervError> {
        let svc = self.service("Msvm_VirtualSystemSnapshotService").await?;
        let r = self
            .c
            .invoke(
                &svc,
                "DestroySnapshot",
                &[Param::Ref(
                    "AffectedSnapshot".into(),
                    Self::settings_epr(id),
                )],
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `ConvertToReferencePoint`: the reference point's reference.
    pub async fn convert_to_reference_point(&self, id: &str) -> Result<Epr, HypervError> {
        let svc = self.service("Msvm_VirtualSystemSnapshotService").await?;
        let out = self
            .c
            .invoke(
                &svc,
                "ConvertToReferencePoint",
                &[Param::Ref(
                    "AffectedSnapshot".into(),
                    Self::settings_epr(id),
                )],
            )
            .await?;
        out.reference("ResultingReferencePoint")
            .cloned()
            .ok_or_else(|| {
                HypervError::protocol(
                    self.c.source(),
                    "ConvertToReferencePoint",
                    "no ResultingReferencePoint",
                )
            })
    }

    /// A reference to the reference point `id`.
    pub fn reference_point_epr(id: &str) -> Epr {
        Epr::new("Msvm_VirtualSystemReferencePoint", &[("InstanceID", id)])
    }

    /// The reference point `id`, or `None` when the host has none of that id.
    pub async fn reference_point(&self, id: &str) -> Result<Option<Instance>, HypervError> {
        match self.c.get(&Self::reference_point_epr(id)).await {
            Ok(i) => Ok(Some(i)),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `DestroyReferencePoint`; one already gone is no error.
    pub async fn destroy_reference_point(&self, id: &str) -> Result<(), HypervError> {
        let svc = self
            .service("Msvm_VirtualSystemReferencePointService")
            .await?;
        match self
            .c
            .invoke(
                &svc,
                "DestroyReferencePoint",
                &[Param::Ref(
                    "AffectedReferencePoint".into(),
                    Self::reference_point_epr(id),
                )],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `RequestStateChange` of VM `id` to `state`.
    pub async fn request_state(&self, id: &str, state: &str) -> Result<(), HypervError> {
        self.c
            .invoke(
                &Self::vm_epr(id),
                "RequestStateChange",
                &[Param::Text("RequestedState".into(), state.into())],
            )
            .await
            .map(|_| ())
    }

    /// The ranges of the image at `path` changed since RCT id `since`, within `[0, size)`,
    /// asked page by page as Windows answers (`ByteOffset + ProcessedByteLength` continues).
    pub async fn changes(
        &self,
        path: &str,
        since: &str,
        size: u64,
    ) -> Result<Vec<(u64, u64)>, HypervError> {
        let svc = self.service("Msvm_ImageManagementService").await?;
        let call = "GetVirtualDiskChanges";
        let mut out = Vec::new();
        let mut off = 0u64;
        while off < size {
            let r = self
                .c
                .invoke(
                    &svc,
                    call,
                    &[
                        Param::Text("Path".into(), path.into()),
                        Param::Text("TargetSnapshotId".into(), since.into()),
                        Param::Text("ByteOffset".into(), off.to_string()),
                        Param::Text("ByteLength".into(), (size - off).to_string()),
                    ],
                )
                .await?;
            let num = |v: &str| v.parse::<u64>().ok();
            let offs: Option<Vec<u64>> =
                r.texts("ChangedByteOffsets").into_iter().map(num).collect();
            let lens: Option<Vec<u64>> =
                r.texts("ChangedByteLengths").into_iter().map(num).collect();
            let (Some(offs), Some(lens)) = (offs, lens) else {
                return Err(HypervError::protocol(
                    self.c.source(),
                    call,
                    "a range is not a number",
                ));
            };
            if offs.len() != lens.len() {
                return Err(HypervError::protocol(
                    self.c.source(),
                    call,
                    "ChangedByteOffsets and ChangedByteLengths differ in length",
                ));
            }
            let processed = r.u64("ProcessedByteLength").unwrap_or(0);
            if processed == 0 {
                return Err(HypervError::protocol(
                    self.c.source(),
                    call,
                    format!("no progress at offset {off} (ProcessedByteLength 0)"),
                ));
            }
            for (o, l) in offs.into_iter().zip(lens) {
                if o.checked_add(l).is_none_or(|e| e > size) || l == 0 {
                    return Err(HypervError::protocol(
                        self.c.source(),
                        call,
                        format!("range {o}+{l} lies outside the disk of {size} bytes"),
                    ));
                }
                out.push((o, l));
            }
            off = off.saturating_add(processed);
        }
        Ok(out)
    }
}

/// Whether `e` says the object does not exist (any more).
pub fn is_gone(e: &HypervError) -> bool {
    match e {
        HypervError::Fault { kind, .. } => *kind == FaultKind::NotFound,
        HypervError::Wmi { message, .. } => message.contains("does not exist"),
        _ => false,
    }
}
