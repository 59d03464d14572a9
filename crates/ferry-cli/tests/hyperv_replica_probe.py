"""A Hyper-V replica target as pypsrp's WSMan (the vendor-side client, not Ferry's) reads it
from the host's WMI: per VM name its id, EnabledState, Notes, the images its drives hold now
and its standard checkpoints (oldest first: name, id, the images each holds). Prints one JSON
object, a VM name -> that or null.

usage: hyperv_replica_probe.py HTTPS_URL USER PASSWORD VM_NAME...
"""

import json

import hyperv_wsman

wsman, names = hyperv_wsman.connect()
prop = hyperv_wsman.prop


def query(q):
    return hyperv_wsman.enumerate_all(wsman, q)


def images(owner):
    """HostResource of every virtual hard disk of the settings `owner` (Microsoft:<guid>)."""
    out = []
    for d in query("SELECT * FROM Msvm_StorageAllocationSettingData WHERE ResourceType = 31"):
        iid = prop(d, "InstanceID") or ""
        if iid.lower().startswith(owner.lower() + "\\"):
            out.append([c.text for c in d if c.tag.endswith("}HostResource")][0])
    return out


vms = query("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
out = {}
for name in names:
    hits = [v for v in vms if prop(v, "ElementName") == name]
    if len(hits) != 1:
        out[name] = None if not hits else "%d VMs" % len(hits)
        continue
    vid = prop(hits[0], "Name")
    vssd = query(
        "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = '%s' "
        "AND VirtualSystemType = 'Microsoft:Hyper-V:System:Realized'" % vid)[0]
    snaps = query(
        "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = '%s' "
        "AND VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Realized'" % vid)
    snaps.sort(key=lambda s: prop(s, "CreationTime") or "")
    out[name] = {
        "id": vid,
        "state": prop(hits[0], "EnabledState"),
        "notes": prop(vssd, "Notes"),
        "folder": prop(vssd, "ConfigurationDataRoot"),
        "disks": images("Microsoft:" + vid),
        "checkpoints": [{"name": prop(s, "ElementName"), "id": prop(s, "InstanceID"),
                         "disks": images(prop(s, "InstanceID"))} for s in snaps],
    }
print(json.dumps(out))
