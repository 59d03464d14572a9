"""What is left on a Hyper-V host, seen through pypsrp's WSMan (the vendor-side client, not
Ferry's): recovery checkpoints, reference points and the running VMs. Prints one JSON line.

usage: hyperv_probe.py HTTPS_URL USER PASSWORD
"""

import json

from hyperv_wsman import connect, enumerate_all, prop

wsman, _ = connect()


checkpoints = enumerate_all(
    wsman, "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Recovery'")
refs = enumerate_all(wsman, "SELECT * FROM Msvm_VirtualSystemReferencePoint")
vms = enumerate_all(wsman, "SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'")
print(json.dumps({
    "checkpoints": [prop(c, "ElementName") for c in checkpoints],
    "reference_points": len(refs),
    "running": sorted(prop(v, "ElementName") for v in vms if prop(v, "EnabledState") == "2"),
}))
