//! What the inventory adds to the VMs of a clustered source: the failover cluster's name
//! (`root/MSCluster` `MSCluster_Cluster.Name`), as the vSphere cluster or Xen pool is shown.

use crate::client::WsmanClient;
use crate::cluster::{MSCLUSTER, no_cluster};
use crate::error::HypervError;

/// The name of the failover cluster the host behind `c` belongs to; `None` for a standalone
/// host (no `root/MSCluster` namespace).
pub async fn cluster_name(c: &WsmanClient) -> Result<Option<String>, HypervError> {
    match c.enumerate_in(MSCLUSTER, "MSCluster_Cluster", None).await {
        Ok(v) => Ok(v
            .iter()
            .find_map(|i| i.text("Name"))
            .filter(|n| !n.is_empty())
            .map(str::to_string)),
        Err(e) if no_cluster(&e) => Ok(None),
        Err(e) => Err(e),
    }
}
