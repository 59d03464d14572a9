"""Drives `ferry sim hyperv` with the vendors' clients: pywinrm (run_cmd over the WinRS shell
cycle, HTTP and HTTPS) and pypsrp's generic WSMan class (WMI Enumerate with a WQL filter, Pull,
Get, method invocation with a job). AUTH `basic` logs in with Basic; `ntlm` with NTLM and message
encryption over HTTP (pywinrm 'always', pypsrp 'always'), TLS alone over HTTPS (pywinrm 'auto').
Prints one JSON line with what it saw.

usage: hyperv_sdk.py HTTPS_URL HTTP_URL USER PASSWORD [AUTH]
"""

import json
import sys
import urllib.parse
import xml.etree.ElementTree as ET

import winrm
from pypsrp.exceptions import WSManFaultError
from pypsrp.wsman import NAMESPACES, WSMan, SelectorSet

https_url, http_url, user, password = sys.argv[1:5]
AUTH = sys.argv[5] if len(sys.argv) > 5 else "basic"
V2 = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/"
N = NAMESPACES["wsen"]
W = NAMESPACES["wsman"]
A = NAMESPACES["wsa"]
out = {}

# --- pywinrm: the cmd shell cycle, on both listeners -------------------------------------------
def session(url, pw, encryption="auto"):
    return winrm.Session(url, auth=(user, pw), transport=AUTH, server_cert_validation="ignore",
                         message_encryption=encryption if AUTH == "ntlm" else "auto")


for name, url in (("https", https_url), ("http", http_url)):
    s = session(url, password, "always" if name == "http" else "auto")
    r = s.run_cmd("hostname")
    out[f"hostname_{name}"] = [r.std_out.decode().strip(), r.status_code]
    out[f"encrypted_{name}"] = s.protocol.transport.encryption is not None
r = s.run_cmd("echo", ["hello", "world"])
out["echo"] = [r.std_out.decode().strip(), r.status_code]
r = s.run_cmd("frobnicate")
out["unknown"] = [r.std_err.decode().strip().splitlines()[0], r.status_code]
try:
    session(http_url, "wrong").run_cmd("hostname")
    out["bad_password"] = "accepted"
except winrm.exceptions.InvalidCredentialsError as e:
    out["bad_password"] = "InvalidCredentialsError"
if AUTH == "ntlm":
    # Windows refuses an unsealed body over HTTP after NTLM (AllowUnencrypted = false).
    try:
        session(http_url, password, "never").run_cmd("hostname")
        out["unencrypted_http"] = "accepted"
    except winrm.exceptions.InvalidCredentialsError as e:
        out["unencrypted_http"] = "InvalidCredentialsError"

# --- pypsrp: WMI over WS-Man -------------------------------------------------------------------
u = urllib.parse.urlparse(https_url if AUTH == "basic" else http_url)
wsman = WSMan(u.hostname, port=u.port, username=user, password=password, ssl=AUTH == "basic",
              auth=AUTH, cert_validation=False, path="wsman",
              encryption="always" if AUTH == "ntlm" else "auto")


def enumerate_all(class_uri, query=None, page=2):
    ET.register_namespace("wsen", N)
    body = ET.Element("{%s}Enumerate" % N)
    ET.SubElement(body, "{%s}OptimizeEnumeration" % W)
    ET.SubElement(body, "{%s}MaxElements" % W).text = str(page)
    if query:
        f = ET.SubElement(body, "{%s}Filter" % W, Dialect="http://schemas.microsoft.com/wbem/wsman/1/WQL")
        f.text = query
    r = wsman.enumerate(class_uri, body)
    items = list(r.find("wsen:EnumerateResponse/wsman:Items", NAMESPACES) or [])
    pulls = 0
    done = r.find("wsen:EnumerateResponse/wsman:EndOfSequence", NAMESPACES) is not None
    ctx = r.find("wsen:EnumerateResponse/wsen:EnumerationContext", NAMESPACES).text
    while not done:
        pb = ET.Element("{%s}Pull" % N)
        ET.SubElement(pb, "{%s}EnumerationContext" % N).text = ctx
        ET.SubElement(pb, "{%s}MaxElements" % N).text = str(page)
        r = wsman.pull(class_uri, pb)
        pulls += 1
        items += list(r.find("wsen:PullResponse/wsen:Items", NAMESPACES) or [])
        done = r.find("wsen:PullResponse/wsen:EndOfSequence", NAMESPACES) is not None
        c = r.find("wsen:PullResponse/wsen:EnumerationContext", NAMESPACES)
        ctx = c.text if c is not None else ctx
    return items, pulls


def prop(el, name):
    for c in el:
        if c.tag.endswith("}" + name):
            return c.text
    return None


vms, pulls = enumerate_all(V2 + "*", "SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
out["vms"] = sorted(prop(v, "ElementName") for v in vms)
out["pulls"] = pulls
everything, _ = enumerate_all(V2 + "Msvm_ComputerSystem", page=100)
out["systems"] = len(everything)

vm = next(v for v in vms if prop(v, "ElementName") == "win-sql-01")
vm_id = prop(vm, "Name")
sel = SelectorSet()
sel.add_option("CreationClassName", "Msvm_ComputerSystem")
sel.add_option("Name", vm_id)
got = wsman.get(V2 + "Msvm_ComputerSystem", selector_set=sel)
out["get"] = prop(got[0], "ElementName")

svc, _ = enumerate_all(V2 + "Msvm_VirtualSystemSnapshotService")
svc = svc[0]
ssel = SelectorSet()
for k in ("CreationClassName", "Name", "SystemCreationClassName", "SystemName"):
    ssel.add_option(k, prop(svc, k))


def epr(parent, tag, class_name, selectors):
    e = ET.SubElement(parent, tag)
    ET.SubElement(e, "{%s}Address" % A).text = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous"
    rp = ET.SubElement(e, "{%s}ReferenceParameters" % A)
    ET.SubElement(rp, "{%s}ResourceURI" % W).text = V2 + class_name
    ss = ET.SubElement(rp, "{%s}SelectorSet" % W)
    for k, v in selectors:
        ET.SubElement(ss, "{%s}Selector" % W, Name=k).text = v
    return e


SVC = V2 + "Msvm_VirtualSystemSnapshotService"
inp = ET.Element("{%s}CreateSnapshot_INPUT" % SVC)
epr(inp, "{%s}AffectedSystem" % SVC, "Msvm_ComputerSystem",
    [("CreationClassName", "Msvm_ComputerSystem"), ("Name", vm_id)])
ET.SubElement(inp, "{%s}SnapshotSettings" % SVC).text = (
    '<INSTANCE CLASSNAME="Msvm_VirtualSystemSnapshotSettingData">'
    '<PROPERTY NAME="ConsistencyLevel" TYPE="uint8"><VALUE>1</VALUE></PROPERTY></INSTANCE>')
ET.SubElement(inp, "{%s}SnapshotType" % SVC).text = "32768"
r = wsman.invoke(SVC + "/CreateSnapshot", SVC, inp, selector_set=ssel)
o = r.find("s:Body", NAMESPACES)[0]
out["create_rv"] = prop(o, "ReturnValue")
job_sel = {}
snap_sel = {}
for c in o:
    for s in c.iter("{%s}Selector" % W):
        (job_sel if c.tag.endswith("}Job") else snap_sel)[s.get("Name")] = s.text
js = SelectorSet()
for k, v in job_sel.items():
    js.add_option(k, v)
job = wsman.get(V2 + "Msvm_ConcreteJob", selector_set=js)[0]
out["job_state"] = prop(job, "JobState")
snaps, _ = enumerate_all(V2 + "*", "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Recovery'")
out["recovery_snapshots"] = len(snaps)

inp = ET.Element("{%s}DestroySnapshot_INPUT" % SVC)
epr(inp, "{%s}AffectedSnapshot" % SVC, "Msvm_VirtualSystemSettingData", list(snap_sel.items()))
r = wsman.invoke(SVC + "/DestroySnapshot", SVC, inp, selector_set=ssel)
out["destroy_rv"] = prop(r.find("s:Body", NAMESPACES)[0], "ReturnValue")
snaps, _ = enumerate_all(V2 + "*", "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Recovery'")
out["recovery_snapshots_after"] = len(snaps)

missing = SelectorSet()
missing.add_option("CreationClassName", "Msvm_ComputerSystem")
missing.add_option("Name", "00000000-0000-0000-0000-000000000000")
try:
    wsman.get(V2 + "Msvm_ComputerSystem", selector_set=missing)
    out["missing"] = "found"
except WSManFaultError as e:
    out["missing"] = e.reason
out["pypsrp_encrypted"] = wsman.transport.encryption is not None
print(json.dumps(out))
