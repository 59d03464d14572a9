"""Fidelity of `ferry sim vmware`: VMware's own Python SDK (pyvmomi) logs in, lists VMs through a
ContainerView, enables CBT, snapshots, reads changeIds and pages QueryChangedDiskAreas.

Usage: vmware_sdk.py HOST PORT USER PASSWORD. Prints `WRITE <vm-moref> <deviceKey> <capacity>`,
waits for a line on stdin (the test writes into the guest), then prints one JSON line."""
import json
import sys
import time

from pyVim.connect import SmartConnect, Disconnect
from pyVmomi import vim
from pyVim.task import WaitForTask

host, port, user, pwd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
si = SmartConnect(host=host, port=port, user=user, pwd=pwd, disableSslCertValidation=True)
content = si.RetrieveContent()
view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
vms = list(view.view)
view.Destroy()
assert len(vms) >= 2, vms
# The first VM got a second disk from the simulator's seeding.
vm = [v for v in vms if len([d for d in v.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]) == 2][0]

spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)
WaitForTask(vm.ReconfigVM_Task(spec=spec))
assert vm.config.changeTrackingEnabled is True


def snapshot(name):
    t = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=True)
    WaitForTask(t)
    return t.info.result


def disks_of(snap):
    return [d for d in snap.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def cap(disk):
    # vcsim fills capacityInKB only; vCenter fills both.
    return disk.capacityInBytes or disk.capacityInKB * 1024


def changed(snap, disk, change_id):
    """QueryChangedDiskAreas paged to the capacity, as a backup tool must call it."""
    areas, calls, off = [], 0, 0
    while off < cap(disk):
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=disk.key, startOffset=off, changeId=change_id)
        calls += 1
        assert info.startOffset == off, (info.startOffset, off)
        areas += [(a.start, a.length) for a in info.changedArea]
        off = info.startOffset + info.length
    return areas, calls


s1 = snapshot("fidelity-1")
d1 = disks_of(s1)
big = max(d1, key=cap)
cid1 = big.backing.changeId
assert cid1, "the snapshot's disk backing carries a changeId"
all_areas, all_calls = changed(s1, big, "*")
print("WRITE %s %d %d" % (vm._moId, big.key, cap(big)), flush=True)
sys.stdin.readline()
s2 = snapshot("fidelity-2")
big2 = [d for d in disks_of(s2) if d.key == big.key][0]
cid2 = big2.backing.changeId
since, since_calls = changed(s2, big2, cid1)

fault = None
try:
    vm.QueryChangedDiskAreas(snapshot=s2, deviceKey=big.key, startOffset=0, changeId="52 deadbeef x/1")
except vim.fault.FileFault as e:
    fault = type(e).__name__

Disconnect(si)
print(json.dumps({
    "vm": vm._moId, "cid1": cid1, "cid2": cid2, "all": all_areas, "all_calls": all_calls,
    "since": since, "since_calls": since_calls, "fault": fault,
}), flush=True)
