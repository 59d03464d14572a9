//! Hypervisor sources from `ferry.toml`: loading the config and connecting the right driver.

use anyhow::Context;
use ferry_hv::{FerryConfig, HypervisorDriver, SourceConfig, SourceKind};
use std::path::PathBuf;
use std::sync::Arc;

/// `--source NAME [--config FILE]`.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The hypervisor source: a `[sources.NAME]` table of the configuration file.
    #[arg(long)]
    pub source: String,
    /// Configuration file (default: $FERRY_CONFIG, ./ferry.toml, /etc/ferry/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
}

impl SourceArgs {
    /// The source's `exclude-swap` key (default true).
    pub fn exclude_swap(&self) -> anyhow::Result<bool> {
        let cfg = FerryConfig::load(self.config.as_deref())?;
        Ok(cfg.source(&self.source)?.exclude_swap)
    }

    /// Loads the configuration and logs in to the source.
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn HypervisorDriver>> {
        let cfg = FerryConfig::load(self.config.as_deref())?;
        let src = cfg.source(&self.source)?;
        connect(&self.source, src).await
    }
}

/// Logs in to the source `name` configured as `src` with the driver of its kind.
pub async fn connect(name: &str, src: &SourceConfig) -> anyhow::Result<Arc<dyn HypervisorDriver>> {
    match src.kind {
        SourceKind::Xen => {
            let d = ferry_hv_xen::XenDriver::connect(name, src)
                .await
                .with_context(|| format!("cannot connect to source `{name}`"))?;
            Ok(Arc::new(d))
        }
        SourceKind::Vmware => {
            let d = ferry_hv_vmware::VmwareDriver::connect(name, src)
                .await
                .with_context(|| format!("cannot connect to source `{name}`"))?;
            Ok(Arc::new(d))
        }
        SourceKind::Hyperv => {
            let d = ferry_hv_hyperv::HypervDriver::connect(name, src)
                .await
                .with_context(|| format!("cannot connect to source `{name}`"))?;
            Ok(Arc::new(d))
        }
    }
}
