"""The switch port features of Hyper-V VMs' network adapters as pypsrp's WSMan (the vendor-side
client, not Ferry's) reads them from the host's WMI: per adapter, its VLAN settings
(`Msvm_EthernetSwitchPortVlanSettingData`: operation mode, access/native VLAN, trunk and private
VLAN ids) and bandwidth settings (`Msvm_EthernetSwitchPortBandwidthSettingData`). Prints one
JSON object, a VM name → a list of adapters (or null: no such VM).

usage: hyperv_port_probe.py HTTPS_URL USER PASSWORD VM_NAME...
"""

import json

import hyperv_wsman

wsman, names = hyperv_wsman.connect()

VLAN = ["OperationMode", "AccessVlanId", "NativeVlanId", "PvlanMode", "PrimaryVlanId", "SecondaryVlanId"]
VLAN_ARRAYS = ["TrunkVlanIdArray", "SecondaryVlanIdArray"]
BANDWIDTH = ["Limit", "Reservation", "Weight", "BurstLimit", "BurstSize"]


def everything(cls):
    return hyperv_wsman.enumerate_all(wsman, "SELECT * FROM %s" % cls)


def iid(el):
    return hyperv_wsman.prop(el, "InstanceID") or ""


def owned(items, prefix):
    return [i for i in items if iid(i).lower().startswith(prefix.lower())]


def number(v):
    return int(v) if v not in (None, "") else 0


vms = hyperv_wsman.enumerate_all(wsman, "SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
ports, conns = everything("Msvm_SyntheticEthernetPortSettingData"), everything("Msvm_EthernetPortAllocationSettingData")
vlans, bandwidths = everything("Msvm_EthernetSwitchPortVlanSettingData"), everything("Msvm_EthernetSwitchPortBandwidthSettingData")
out = {}
for name in names:
    hits = [v for v in vms if hyperv_wsman.prop(v, "ElementName") == name]
    if len(hits) != 1:
        out[name] = None
        continue
    mine = "Microsoft:%s\\" % hyperv_wsman.prop(hits[0], "Name")
    nics = []
    for p in owned(ports, mine):
        c = owned(conns, iid(p) + "\\")
        vlan, bandwidth = None, None
        if c:
            under = iid(c[0]) + "\\"
            v = owned(vlans, under)
            if v:
                vlan = {k: number(hyperv_wsman.prop(v[0], k)) for k in VLAN}
                vlan |= {k: [int(x) for x in hyperv_wsman.props(v[0], k) if x] for k in VLAN_ARRAYS}
            b = owned(bandwidths, under)
            if b:
                bandwidth = {k: number(hyperv_wsman.prop(b[0], k)) for k in BANDWIDTH}
        nics.append({"vlan": vlan, "bandwidth": bandwidth})
    out[name] = nics
print(json.dumps(out))
