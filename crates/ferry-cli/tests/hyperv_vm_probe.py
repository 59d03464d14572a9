"""The configuration of Hyper-V VMs as pypsrp's WSMan (the vendor-side client, not Ferry's)
reads it from the host's WMI: generation, secure boot, processors, memory, disks (controller,
location, image) and network adapters (MAC, switch, VLAN). Prints one JSON object, a VM name
→ its configuration or null.

usage: hyperv_vm_probe.py HTTPS_URL USER PASSWORD VM_NAME...
"""

import json

import hyperv_wsman

wsman, names = hyperv_wsman.connect()


def enumerate_all(query):
    """The instances of `query` as dicts of their properties, `_all` the element itself."""
    items = hyperv_wsman.enumerate_all(wsman, query)
    return [{c.tag.split("}")[1]: c.text for c in i} | {"_all": i} for i in items]


def values(item, name):
    return [c.text for c in item["_all"] if c.tag.endswith("}" + name)]


def everything(cls):
    return enumerate_all("SELECT * FROM %s" % cls)


def owned(items, prefix):
    return [i for i in items if (i.get("InstanceID") or "").lower().startswith(prefix.lower())]


vms = enumerate_all("SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
cpus, mems = everything("Msvm_ProcessorSettingData"), everything("Msvm_MemorySettingData")
ports, conns = everything("Msvm_SyntheticEthernetPortSettingData"), everything("Msvm_EthernetPortAllocationSettingData")
vlans, switches = everything("Msvm_EthernetSwitchPortVlanSettingData"), everything("Msvm_VirtualEthernetSwitch")
rasds, vhds = everything("Msvm_ResourceAllocationSettingData"), everything("Msvm_StorageAllocationSettingData")
out = {}
for name in names:
    hits = [v for v in vms if v["ElementName"] == name]
    if len(hits) != 1:
        out[name] = None if not hits else "%d VMs" % len(hits)
        continue
    vid = hits[0]["Name"]
    mine = "Microsoft:%s\\" % vid
    vssd = enumerate_all(
        "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = '%s' "
        "AND VirtualSystemType = 'Microsoft:Hyper-V:System:Realized'" % vid)[0]
    mem = owned(mems, mine)[0]
    nics = []
    for p in owned(ports, mine):
        c = owned(conns, p["InstanceID"] + "\\")
        switch, vlan = None, None
        if c:
            sid = values(c[0], "HostResource")[0].rsplit('Name="', 1)[1].rstrip('"')
            switch = [s["ElementName"] for s in switches if s["Name"] == sid][0]
            v = owned(vlans, c[0]["InstanceID"] + "\\")
            vlan = int(v[0]["AccessVlanId"]) if v else None
        nics.append({"mac": p["Address"], "static": p["StaticMacAddress"], "switch": switch, "vlan": vlan})
    disks = []
    for d in owned(vhds, mine):
        ctl = None
        drive = [r for r in rasds if r["InstanceID"] == d.get("Parent")]
        if drive:
            c = [r for r in rasds if r["InstanceID"] == drive[0].get("Parent")][0]
            bus = "ide" if "IDE" in c["ResourceSubType"] else "scsi"
            ctl = "%s%s:%s" % (bus, c["Address"], drive[0]["AddressOnParent"])
        disks.append({"path": values(d, "HostResource")[0], "at": ctl or "scsi0:" + d["AddressOnParent"]})
    disks.sort(key=lambda d: d["at"])
    out[name] = {
        "id": vid,
        "state": hits[0]["EnabledState"],
        "generation": vssd["VirtualSystemSubType"].rsplit(":", 1)[1],
        "secure_boot": vssd["SecureBootEnabled"],
        "cpus": int(owned(cpus, mine)[0]["VirtualQuantity"]),
        "memory_mib": int(mem["VirtualQuantity"]),
        "dynamic_memory": [mem["Reservation"], mem["Limit"]] if mem["DynamicMemoryEnabled"] == "true" else None,
        "nics": nics,
        "disks": disks,
    }
print(json.dumps(out))
