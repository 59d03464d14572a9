"""Reads VMs of `ferry sim vmware` with VMware's own Python SDK (pyvmomi), independently of Ferry's
vim25 client, so tests compare what Ferry created with what vSphere reports.

Usage: vmware_probe.py HOST PORT USER PASSWORD NAME... Prints one JSON object: each NAME → its
configuration (CPUs, memory, firmware, guestId, disks with position and capacity, NICs with
model, MAC and network, the host's cluster, Ferry's `ferry.*` extraConfig marks, snapshot names oldest
first), or null when no VM has that name. `vmware_probe.py HOST PORT USER PASSWORD --inventory` prints
the names of every VM and every network instead."""
import json
import sys

from pyVim.connect import SmartConnect
from pyVmomi import vim

host, port, user, pwd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
si = SmartConnect(host=host, port=port, user=user, pwd=pwd, disableSslCertValidation=True)
content = si.RetrieveContent()
view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
vms = {v.name: v for v in view.view}
view.Destroy()
view = content.viewManager.CreateContainerView(content.rootFolder, [vim.dvs.DistributedVirtualPortgroup], True)
names = {pg.key: pg.name for pg in view.view}
view.Destroy()


def describe(vm):
    devs = vm.config.hardware.device
    by_key = {d.key: d for d in devs}
    prefix = {vim.vm.device.VirtualIDEController: "ide", vim.vm.device.VirtualAHCIController: "sata",
              vim.vm.device.VirtualNVMEController: "nvme", vim.vm.device.VirtualSCSIController: "scsi"}
    disks, nics = [], []
    for d in devs:
        if isinstance(d, vim.vm.device.VirtualDisk):
            ctl = by_key[d.controllerKey]
            bus = next(p for t, p in prefix.items() if isinstance(ctl, t))
            disks.append({"position": "%s%d:%d" % (bus, ctl.busNumber, d.unitNumber),
                          "capacity": d.capacityInBytes or d.capacityInKB * 1024,
                          "file": d.backing.fileName, "key": d.key})
        elif isinstance(d, vim.vm.device.VirtualEthernetCard):
            nics.append({"type": type(d).__name__.split(".")[-1], "mac": d.macAddress.lower(),
                         "network": getattr(d.backing, "deviceName", None) or names.get(getattr(getattr(d.backing, "port", None), "portgroupKey", None)), "address_type": d.addressType})
    # vCenter keeps one option per key; vcsim appends every update, so the last one counts.
    extra = {}
    for o in vm.config.extraConfig:
        if o.key.startswith("ferry."):
            extra[o.key] = o.value
    snaps = []

    def walk(t):
        snaps.append((t.id, t.name))
        for c in t.childSnapshotList:
            walk(c)
    # RetrievePropertiesEx of the tree alone: vcsim fails reading `vm.snapshot` (RetrieveProperties)
    # once every snapshot of a VM was removed.
    spec = vim.PropertyFilterSpec(objectSet=[vim.ObjectSpec(obj=vm)], propSet=[
        vim.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot.rootSnapshotList"])])
    r = content.propertyCollector.RetrievePropertiesEx([spec], vim.PropertyCollector.RetrieveOptions())
    for o in (r.objects if r else []):
        for p in o.propSet:
            for t in p.val:
                walk(t)
    return {"moref": vm._moId, "extra": {k: v for k, v in extra.items() if v},
            "snapshots": [n for _, n in sorted(snaps)],
            "cpus": vm.config.hardware.numCPU, "memory_mb": vm.config.hardware.memoryMB,
            "firmware": vm.config.firmware, "guest_id": vm.config.guestId,
            "uuid": vm.config.uuid, "power": str(vm.runtime.powerState), "disks": disks, "nics": nics,
            "cluster": cluster(vm)}


def cluster(vm):
    """The name of the cluster of the VM's host; None for a standalone host."""
    parent = vm.runtime.host.parent if vm.runtime.host else None
    return parent.name if isinstance(parent, vim.ClusterComputeResource) else None


if sys.argv[5:] == ["--inventory"]:
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.Network], True)
    print(json.dumps({"vms": sorted(vms), "networks": sorted(n.name for n in view.view)}))
    view.Destroy()
else:
    print(json.dumps({n: describe(vms[n]) if n in vms else None for n in sys.argv[5:]}))
