//! The cluster each VM runs in, for the inventory (sans I/O): read in the same
//! PropertyCollector pass as the VMs — hosts' `parent` and clusters' `name` — so listing VMs
//! costs no extra round trip. A host's parent is a `ClusterComputeResource` (a cluster) or a
//! plain `ComputeResource` (a standalone host: no cluster).

use crate::client::ObjectContent;
use crate::xml::Node;
use std::collections::BTreeMap;

/// Kinds and properties to read alongside the VMs.
pub const PATHS: &[(&str, &[&str])] = &[
    ("HostSystem", &["parent"]),
    ("ClusterComputeResource", &["name"]),
];

/// Host moref value → the name of its cluster, from the hosts and clusters among `objs`.
pub fn of_hosts(objs: &[ObjectContent]) -> BTreeMap<String, String> {
    let names: BTreeMap<&str, &str> = objs
        .iter()
        .filter_map(|o| {
            let obj = o
                .obj
                .as_ref()
                .filter(|m| m.kind == "ClusterComputeResource")?;
            Some((obj.value.as_str(), o.text("name")?))
        })
        .collect();
    objs.iter()
        .filter_map(|o| {
            let host = o.obj.as_ref().filter(|m| m.kind == "HostSystem")?;
            let parent = o
                .prop("parent")
                .and_then(Node::moref)
                .filter(|p| p.kind == "ClusterComputeResource")?;
            let name = names.get(parent.value.as_str())?;
            Some((host.value.clone(), (*name).to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xml::{MoRef, parse};

    fn obj(kind: &str, id: &str, path: &str, val: &str) -> ObjectContent {
        let mut o = ObjectContent {
            obj: Some(MoRef::new(kind, id)),
            ..Default::default()
        };
        o.props.insert(path.into(), parse(val.as_bytes()).unwrap());
        o
    }

    #[test]
    fn hosts_in_a_cluster_have_its_name_standalone_ones_none() {
        let objs = [
            obj(
                "ClusterComputeResource",
                "domain-c7",
                "name",
                "<val>DC0_C0</val>",
            ),
            obj(
                "HostSystem",
                "host-21",
                "parent",
                r#"<val type="ClusterComputeResource">domain-c7</val>"#,
            ),
            obj(
                "HostSystem",
                "host-9",
                "parent",
                r#"<val type="ComputeResource">domain-s8</val>"#,
            ),
            obj("VirtualMachine", "vm-1", "name", "<val>x</val>"),
        ];
        let m = of_hosts(&objs);
        assert_eq!(m.get("host-21").map(String::as_str), Some("DC0_C0"));
        assert_eq!(m.len(), 1, "{m:?}");
    }
}
