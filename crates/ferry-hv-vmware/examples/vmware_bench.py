"""Reference for vmware_bench: pyvmomi doing the same work in the same run.
Usage: vmware_bench.py inventory HOST PORT  |  cbt HOST PORT VM_MOREF SNAP DEVICE_KEY CAPACITY CHANGE_ID
Prints seconds as one JSON line."""
import json
import sys
import time

from pyVim.connect import SmartConnect
from pyVmomi import vim, vmodl

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
si = SmartConnect(host=host, port=port, user="user", pwd="pass", disableSslCertValidation=True)
content = si.RetrieveContent()
pc = content.propertyCollector
if mode == "inventory":
    paths = ["name", "config.uuid", "config.template", "config.guestId", "config.firmware",
             "config.hardware.numCPU", "config.hardware.memoryMB", "config.hardware.device",
             "config.changeTrackingEnabled", "runtime.powerState", "runtime.host", "snapshot"]
    t0 = time.monotonic()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True, selectSet=[
            vmodl.query.PropertyCollector.TraversalSpec(name="v", type=vim.view.ContainerView, path="view", skip=False)])],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.VirtualMachine, all=False, pathSet=paths)])
    res = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions(maxObjects=500))
    n = len(res.objects)
    while res.token:
        res = pc.ContinueRetrievePropertiesEx(res.token)
        n += len(res.objects)
    view.Destroy()
    print(json.dumps({"seconds": time.monotonic() - t0, "vms": n}))
else:
    vm_id, snap_id, key, cap, cid = sys.argv[4], sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), sys.argv[8]
    vm = vim.VirtualMachine(vm_id, si._stub)
    snap = vim.vm.Snapshot(snap_id, si._stub)
    t0 = time.monotonic()
    off, areas = 0, 0
    while off < cap:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=off, changeId=cid)
        areas += len(info.changedArea)
        off = info.startOffset + info.length
    print(json.dumps({"seconds": time.monotonic() - t0, "areas": areas}))
