"""The failover cluster as pypsrp's WSMan (the vendor-side client) sees it on one node:
root/MSCluster's nodes and each VM resource's owner node. Prints one JSON line.

usage: hyperv_cluster_probe.py HTTPS_URL USER PASSWORD
"""

import json
import sys
import urllib.parse
import xml.etree.ElementTree as ET

from pypsrp.wsman import NAMESPACES, WSMan

url, user, password = sys.argv[1:4]
NS = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/mscluster/"
N = NAMESPACES["wsen"]
W = NAMESPACES["wsman"]
u = urllib.parse.urlparse(url)
wsman = WSMan(u.hostname, port=u.port, username=user, password=password, ssl=True,
              auth="basic", cert_validation=False, path="wsman")


def enumerate_all(query):
    body = ET.Element("{%s}Enumerate" % N)
    ET.SubElement(body, "{%s}OptimizeEnumeration" % W)
    ET.SubElement(body, "{%s}MaxElements" % W).text = "100"
    f = ET.SubElement(body, "{%s}Filter" % W, Dialect="http://schemas.microsoft.com/wbem/wsman/1/WQL")
    f.text = query
    r = wsman.enumerate(NS + "*", body)
    items = list(r.find("wsen:EnumerateResponse/wsman:Items", NAMESPACES) or [])
    if r.find("wsen:EnumerateResponse/wsman:EndOfSequence", NAMESPACES) is None:
        raise SystemExit("more than one page: not expected for a two-node lab")
    return items


def prop(el, name):
    for c in el:
        if c.tag.endswith("}" + name):
            return c.text
    return None


nodes = enumerate_all("SELECT * FROM MSCluster_Node")
vms = enumerate_all("SELECT * FROM MSCluster_Resource WHERE Type = 'Virtual Machine'")
print(json.dumps({
    "nodes": sorted(prop(n, "Name") for n in nodes),
    "owners": {prop(r, "OwnerGroup"): prop(r, "OwnerNode") for r in vms},
}))
