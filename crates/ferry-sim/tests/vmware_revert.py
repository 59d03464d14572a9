"""Snapshots that keep their content: pyvmomi takes, reverts and removes snapshots of the 2-disk VM of
`ferry sim vmware` on the test's orders.

Usage: vmware_revert.py HOST PORT USER PASSWORD. Prints `READY <vm-moref> <deviceKey> <deviceKey>`, then
answers one line per command read on stdin:
  SNAP <name>                    -> the snapshot's moref
  REVERT <snapshot>              -> OK
  REMOVE <snapshot>              -> OK
  CID <snapshot> <deviceKey>     -> the changeId of that disk in the snapshot
  CHANGED <snapshot> <deviceKey> <changeId> -> JSON [[start, length], ...]
  CLONE <snapshot> <name>        -> `<clone moref> <deviceKey>...` (CloneVM_Task from the snapshot)
  FILES <vm moref>               -> JSON [backing fileName, ...] of the VM's disks"""
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


def disks(obj):
    return [d for d in obj.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


vm = [v for v in vms if len(disks(v)) == 2][0]
WaitForTask(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
snaps = {}


def wait_state(task):
    """Polls `info.state` alone: vcsim names the snapshot as the task's `entity`, which pyvmomi's
    WaitForTask refuses to deserialize (it expects a ManagedEntity)."""
    pc = content.propertyCollector
    spec = vim.PropertyFilterSpec(
        objectSet=[vim.ObjectSpec(obj=task)],
        propSet=[vim.PropertySpec(type=vim.Task, pathSet=["info.state"])])
    for _ in range(2000):
        state = pc.RetrieveContents([spec])[0].propSet[0].val
        if state == "success":
            return
        if state == "error":
            raise RuntimeError("task failed")
        time.sleep(0.01)
    raise RuntimeError("task did not finish")

print("READY %s %s" % (vm._moId, " ".join(str(d.key) for d in disks(vm))), flush=True)

for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        break
    if cmd[0] == "SNAP":
        t = vm.CreateSnapshot_Task(name=cmd[1], description="", memory=False, quiesce=False)
        WaitForTask(t)
        s = t.info.result
        snaps[s._moId] = s
        print(s._moId, flush=True)
    elif cmd[0] == "REVERT":
        wait_state(snaps[cmd[1]].RevertToSnapshot_Task())
        print("OK", flush=True)
    elif cmd[0] == "REMOVE":
        wait_state(snaps.pop(cmd[1]).RemoveSnapshot_Task(removeChildren=False))
        print("OK", flush=True)
    elif cmd[0] == "CID":
        d = [d for d in disks(snaps[cmd[1]]) if d.key == int(cmd[2])][0]
        print(d.backing.changeId, flush=True)
    elif cmd[0] == "CHANGED":
        s, key, cid = snaps[cmd[1]], int(cmd[2]), " ".join(cmd[3:])
        d = [d for d in disks(s) if d.key == key][0]
        cap = d.capacityInBytes or d.capacityInKB * 1024
        areas, off = [], 0
        while off < cap:
            info = vm.QueryChangedDiskAreas(snapshot=s, deviceKey=key, startOffset=off, changeId=cid)
            areas += [(a.start, a.length) for a in info.changedArea]
            off = info.startOffset + info.length
        print(json.dumps(areas), flush=True)
    elif cmd[0] == "CLONE":
        spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(), powerOn=False, template=False,
                                snapshot=snaps[cmd[1]])
        t = vm.CloneVM_Task(folder=vm.parent, name=cmd[2], spec=spec)
        WaitForTask(t)
        c = t.info.result
        print("%s %s" % (c._moId, " ".join(str(d.key) for d in disks(c))), flush=True)
    elif cmd[0] == "FILES":
        v = vim.VirtualMachine(cmd[1], si._stub)
        print(json.dumps([d.backing.fileName for d in disks(v)]), flush=True)
    else:
        print("unknown command %s" % cmd[0], flush=True)
Disconnect(si)
