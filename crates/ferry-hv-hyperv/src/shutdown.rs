//! A clean guest shutdown before a VM is turned off (ADR 0187): the guest's shutdown
//! integration service (`Msvm_ShutdownComponent.InitiateShutdown`, `Force` false) first, then
//! `RequestStateChange(3)` with a WARN when the guest refused or did not stop in time.

use crate::cim::{Epr, Instance, Param};
use crate::driver::HypervDriver;
use crate::wmi::Wmi;
use ferry_hv::HvError;
use std::time::{Duration, Instant};

/// The guest's shutdown integration service.
pub const SHUTDOWN_COMPONENT: &str = "Msvm_ShutdownComponent";
/// What the guest's event log records as the shutdown's reason.
pub const SHUTDOWN_REASON: &str = "Ferry: planned failover of a replicated VM";
/// How long a guest that accepted the shutdown may take to stop (as vSphere's, docs/replication.md).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(120);

/// The reference of shutdown component `s` (its four keys).
fn component_epr(s: &Instance) -> Epr {
    let k = |n: &str| s.text(n).unwrap_or("").to_string();
    let keys = [
        ("CreationClassName", k("CreationClassName")),
        ("DeviceID", k("DeviceID")),
        ("SystemCreationClassName", k("SystemCreationClassName")),
        ("SystemName", k("SystemName")),
    ];
    let refs: Vec<(&str, &str)> = keys.iter().map(|(a, b)| (*a, b.as_str())).collect();
    Epr::new(SHUTDOWN_COMPONENT, &refs)
}

impl HypervDriver {
    /// Asks the guest of the running VM `v` to shut down and waits up to `wait` for it to be
    /// off; `Err(why)` when it refused or did not stop (the VM may still run).
    async fn guest_shutdown(&self, v: &Instance, wait: Duration) -> Result<(), String> {
        let c = self.parts().0;
        let id = v.text("Name").unwrap_or("");
        let q = format!(
            "SELECT * FROM {SHUTDOWN_COMPONENT} WHERE SystemName = '{}'",
            id.replace('\'', "''")
        );
        let comps = c
            .enumerate(SHUTDOWN_COMPONENT, Some(&q))
            .await
            .map_err(|e| e.to_string())?;
        let comp = comps
            .first()
            .ok_or("the VM has no shutdown integration service")?;
        c.invoke(
            &component_epr(comp),
            "InitiateShutdown",
            &[
                Param::Text("Force".into(), "false".into()),
                Param::Text("Reason".into(), SHUTDOWN_REASON.into()),
            ],
        )
        .await
        .map_err(|e| format!("the guest refused the shutdown: {e}"))?;
        let start = Instant::now();
        loop {
            let now = Wmi::new(c).vm(id).await.map_err(|e| e.to_string())?;
            if now.text("EnabledState") == Some("3") {
                return Ok(());
            }
            if start.elapsed() >= wait {
                return Err(format!(
                    "the guest accepted the shutdown but is not off after {} s",
                    wait.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops VM `v`: a clean guest shutdown when it runs, turned off (`RequestStateChange(3)`)
    /// with a WARN when the guest refused or did not stop within [`SHUTDOWN_WAIT`].
    pub(crate) async fn shut_down(&self, v: &Instance) -> Result<(), HvError> {
        let (c, name, ..) = self.parts();
        let id = v.text("Name").unwrap_or("");
        match v.text("EnabledState") {
            Some("3") => return Ok(()),
            Some("2") => match self.guest_shutdown(v, SHUTDOWN_WAIT).await {
                Ok(()) => {
                    tracing::info!(source = %name, vm = %id, "guest shut down cleanly");
                    return Ok(());
                }
                Err(why) => {
                    tracing::warn!(source = %name, vm = %id, "clean shutdown failed ({why}): turning the VM off");
                }
            },
            // Saved, paused, starting…: no guest to ask.
            _ => {}
        }
        Wmi::new(c)
            .request_state(id, "3")
            .await
            .map_err(|e| crate::driver::hv(name, e))
    }
}
