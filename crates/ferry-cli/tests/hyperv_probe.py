"""What is left on a Hyper-V host, seen through pypsrp's WSMan (the vendor-side client, not
Ferry's): recovery checkpoints, reference points and the running VMs. Prints one JSON line.

usage: hyperv_probe.py HTTPS_URL USER PASSWORD
"""

import json
import sys
import urllib.parse
import xml.etree.ElementTree as ET

from pypsrp.wsman import NAMESPACES, WSMan

url, user, password = sys.argv[1:4]
V2 = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/"
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
    r = wsman.enumerate(V2 + "*", body)
    items = list(r.find("wsen:EnumerateResponse/wsman:Items", NAMESPACES) or [])
    done = r.find("wsen:EnumerateResponse/wsman:EndOfSequence", NAMESPACES) is not None
    ctx = r.find("wsen:EnumerateResponse/wsen:EnumerationContext", NAMESPACES).text
    while not done:
        pb = ET.Element("{%s}Pull" % N)
        ET.SubElement(pb, "{%s}EnumerationContext" % N).text = ctx
        ET.SubElement(pb, "{%s}MaxElements" % N).text = "100"
        r = wsman.pull(V2 + "*", pb)
        items += list(r.find("wsen:PullResponse/wsen:Items", NAMESPACES) or [])
        done = r.find("wsen:PullResponse/wsen:EndOfSequence", NAMESPACES) is not None
        c = r.find("wsen:PullResponse/wsen:EnumerationContext", NAMESPACES)
        ctx = c.text if c is not None else ctx
    return items


def prop(el, name):
    for c in el:
        if c.tag.endswith("}" + name):
            return c.text
    return None


checkpoints = enumerate_all(
    "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Recovery'")
refs = enumerate_all("SELECT * FROM Msvm_VirtualSystemReferencePoint")
vms = enumerate_all("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
print(json.dumps({
    "checkpoints": [prop(c, "ElementName") for c in checkpoints],
    "reference_points": len(refs),
    "running": sorted(prop(v, "ElementName") for v in vms if prop(v, "EnabledState") == "2"),
}))
