"""The failover cluster as pypsrp's WSMan (the vendor-side client) sees it on one node:
root/MSCluster's nodes and each VM resource's owner node. Prints one JSON line.

usage: hyperv_cluster_probe.py HTTPS_URL USER PASSWORD
"""

import json

from hyperv_wsman import MSCLUSTER, connect, enumerate_all, prop

wsman, _ = connect()


nodes = enumerate_all(wsman, "SELECT * FROM MSCluster_Node", MSCLUSTER)
vms = enumerate_all(wsman, "SELECT * FROM MSCluster_Resource WHERE Type = 'Virtual Machine'", MSCLUSTER)
print(json.dumps({
    "nodes": sorted(prop(n, "Name") for n in nodes),
    "owners": {prop(r, "OwnerGroup"): prop(r, "OwnerNode") for r in vms},
}))
