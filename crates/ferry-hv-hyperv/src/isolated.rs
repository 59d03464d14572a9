//! The private virtual switch `<copy> (isolated)` a replica's test copy is connected to
//! (ADR 0187), as the vSphere target's isolated port group: made by
//! `Msvm_VirtualEthernetSwitchManagementService.DefineSystem` with no port settings (a private
//! switch: no uplink, no host adapter), removed with the copy (`DestroySystem`).

use crate::cim::{self, Epr, Param};
use crate::driver::{HypervDriver, hv};
use crate::wmi::Wmi;
use ferry_hv::HvError;

const SERVICE: &str = "Msvm_VirtualEthernetSwitchManagementService";
const SWITCH: &str = "Msvm_VirtualEthernetSwitch";

/// The isolated switch's name for test copy `vm`.
pub fn isolated_name(vm: &str) -> String {
    format!("{vm} (isolated)")
}

impl HypervDriver {
    /// The id of the switch named `name`, if the host has one.
    async fn switch_id(&self, name: &str) -> Result<Option<String>, HvError> {
        let (c, src, ..) = self.parts();
        Ok(c.enumerate(SWITCH, None)
            .await
            .map_err(|e| hv(src, e))?
            .iter()
            .find(|s| s.text("ElementName") == Some(name))
            .and_then(|s| s.text("Name").map(str::to_string)))
    }

    /// Makes the private switch for test copy `vm` unless it exists (a re-run); its name.
    pub(crate) async fn isolated_switch(&self, vm: &str) -> Result<String, HvError> {
        let (c, src, ..) = self.parts();
        let name = isolated_name(vm);
        if self.switch_id(&name).await?.is_none() {
            let svc = Wmi::new(c).service(SERVICE).await.map_err(|e| hv(src, e))?;
            c.invoke(
                &svc,
                "DefineSystem",
                &[Param::Embedded(
                    "SystemSettings".into(),
                    cim::embedded_instance(
                        "Msvm_VirtualEthernetSwitchSettingData",
                        &[("ElementName", "string", &name)],
                    ),
                )],
            )
            .await
            .map_err(|e| hv(src, e))?;
            tracing::info!(source = %src, switch = %name, "private switch made for the test copy");
        }
        Ok(name)
    }

    /// Removes the private switch of test copy `vm` when there is one; a failure is a WARN
    /// (the copy is gone already).
    pub(crate) async fn remove_isolated_switch(&self, vm: &str) {
        let (c, src, ..) = self.parts();
        let name = isolated_name(vm);
        let r = match self.switch_id(&name).await {
            Ok(Some(id)) => match Wmi::new(c).service(SERVICE).await {
                Ok(svc) => c
                    .invoke(
                        &svc,
                        "DestroySystem",
                        &[Param::Ref(
                            "AffectedSystem".into(),
                            Epr::new(SWITCH, &[("CreationClassName", SWITCH), ("Name", &id)]),
                        )],
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            Ok(None) => return,
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => tracing::info!(source = %src, switch = %name, "private switch removed"),
            Err(e) => {
                tracing::warn!(source = %src, switch = %name, error = %e, "cannot remove the test copy's private switch")
            }
        }
    }
}
