#!/usr/bin/env python3
"""Checks an OVF 1.x descriptor against the shape of the DMTF schema (DSP8023) that vSphere's
import enforces, and the VMDK it references.

  check-ovf.py DESCRIPTOR.ovf [DISK.vmdk ...]

Checks: the envelope's namespace and child order (References, sections, VirtualSystem); every
section starts with Info; files, disks and networks have unique ids and resolve (Disk -> File,
Item HostResource -> Disk, Item Parent -> controller, Item Connection -> Network); disks are
streamOptimized VMDKs with a byte capacity; RASD/VSSD elements are known CIM properties in the
schema's (alphabetical) order; the hardware has CPU, memory, a disk controller, a disk and a NIC;
each referenced file's size matches and a VMDK is really streamOptimized. Exit 1 with one line per
problem.
"""
import os
import re
import sys
import xml.etree.ElementTree as ET

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
# The properties of CIM_ResourceAllocationSettingData (schema 2.22, as OVF 1.x imports it), in order.
RASD_ORDER = [
    "Address", "AddressOnParent", "AllocationUnits", "AutomaticAllocation", "AutomaticDeallocation",
    "Caption", "Connection", "ConsumerVisibility", "Description", "ElementName", "HostResource",
    "InstanceID", "Limit", "MappingBehavior", "OtherResourceType", "Parent", "PoolID", "Reservation",
    "ResourceSubType", "ResourceType", "VirtualQuantity", "VirtualQuantityUnits", "Weight",
]
VSSD_ORDER = [
    "AutomaticRecoveryAction", "AutomaticShutdownAction", "AutomaticStartupAction",
    "AutomaticStartupActionDelay", "AutomaticStartupActionSequenceNumber", "Caption",
    "ConfigurationDataRoot", "ConfigurationFile", "ConfigurationID", "CreationTime", "Description",
    "ElementName", "InstanceID", "LogDataRoot", "Notes", "RecoveryFile", "SnapshotDataRoot",
    "SuspendDataRoot", "SwapFileDataRoot", "VirtualSystemIdentifier", "VirtualSystemType",
]
CONTROLLERS = {"5", "6", "20"}  # IDE, parallel SCSI, other storage (SATA/NVMe)
SECTIONS = {"DiskSection", "NetworkSection", "AnnotationSection", "ProductSection", "EulaSection",
            "OperatingSystemSection", "VirtualHardwareSection", "StartupSection",
            "DeploymentOptionSection", "ResourceAllocationSection", "InstallSection"}

errors = []


def err(msg):
    errors.append(msg)


def q(ns, tag):
    return f"{{{ns}}}{tag}"


def local(el):
    return el.tag.split("}", 1)[-1]


def ns_of(el):
    return el.tag[1:].split("}", 1)[0] if el.tag.startswith("{") else ""


def attr(el, name):
    return el.get(q(OVF, name))


def check_section(el, where):
    kids = list(el)
    if not kids or kids[0].tag != q(OVF, "Info"):
        err(f"{where}: the first child must be ovf:Info")


def check_order(children, order, ns, where):
    names = []
    for c in children:
        if ns_of(c) != ns:
            err(f"{where}: element {c.tag} is not in the namespace {ns}")
            continue
        n = local(c)
        if n not in order:
            err(f"{where}: {n} is not a property of the CIM class")
            continue
        names.append(n)
    idx = [order.index(n) for n in names]
    if idx != sorted(idx) or len(set(idx)) != len(idx):
        err(f"{where}: elements out of the schema's order or repeated: {', '.join(names)}")
    return {local(c): (c.text or "").strip() for c in children if ns_of(c) == ns}


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: check-ovf.py DESCRIPTOR.ovf [DISK ...]")
    path = sys.argv[1]
    given = {os.path.basename(p): p for p in sys.argv[2:]}
    try:
        env = ET.parse(path).getroot()
    except ET.ParseError as e:
        sys.exit(f"{path}: not well-formed XML: {e}")
    if env.tag != q(OVF, "Envelope"):
        sys.exit(f"{path}: root element is {env.tag}, not the OVF 1.x Envelope ({OVF})")

    kids = list(env)
    kinds = [local(k) if ns_of(k) == OVF else k.tag for k in kids]
    if not kinds or kinds[0] != "References":
        err("Envelope: References must come first")
    if not kinds or kinds[-1] not in ("VirtualSystem", "VirtualSystemCollection"):
        err("Envelope: the content (VirtualSystem) must come last")
    for k in kinds[1:-1]:
        if k not in SECTIONS:
            err(f"Envelope: unexpected element {k} between References and the content")

    files = {}
    for f in env.iterfind(f"{{{OVF}}}References/{{{OVF}}}File"):
        fid, href, size = attr(f, "id"), attr(f, "href"), attr(f, "size")
        if not fid or not href:
            err("References/File needs ovf:id and ovf:href")
            continue
        if fid in files:
            err(f"References: file id {fid} repeated")
        if "/" in href or href.startswith("."):
            err(f"References: {href} must be a plain file name inside the OVA")
        files[fid] = (href, size)
        if href in given:
            actual = os.path.getsize(given[href])
            if size is None or not size.isdigit() or int(size) != actual:
                err(f"References/File {fid}: ovf:size={size}, but {href} has {actual} bytes")
            with open(given[href], "rb") as fh:
                head = fh.read(1024)
            if not (head[:4] == b"KDMV" and b'createType="streamOptimized"' in head[512:]):
                err(f"{href}: not a streamOptimized VMDK (sparse header and descriptor)")

    disks = {}
    dsec = env.find(q(OVF, "DiskSection"))
    if dsec is None:
        err("no DiskSection")
    else:
        check_section(dsec, "DiskSection")
        for d in dsec.iterfind(q(OVF, "Disk")):
            did, ref, cap, fmt = attr(d, "diskId"), attr(d, "fileRef"), attr(d, "capacity"), attr(d, "format")
            if not did:
                err("DiskSection/Disk needs ovf:diskId")
                continue
            if did in disks:
                err(f"DiskSection: disk id {did} repeated")
            disks[did] = 0
            if ref not in files:
                err(f"Disk {did}: ovf:fileRef={ref} names no References/File")
            if fmt != STREAM:
                err(f"Disk {did}: ovf:format must be {STREAM}, not {fmt}")
            units = attr(d, "capacityAllocationUnits") or "byte"
            if not (cap and cap.isdigit() and int(cap) > 0):
                err(f"Disk {did}: ovf:capacity={cap} is not a positive integer")
            if not re.fullmatch(r"byte( \* 2\^\d+)?", units):
                err(f"Disk {did}: ovf:capacityAllocationUnits={units} is not 'byte' or 'byte * 2^N'")
            pop = attr(d, "populatedSize")
            if pop is not None and not pop.isdigit():
                err(f"Disk {did}: ovf:populatedSize={pop} is not an integer")

    networks = set()
    nsec = env.find(q(OVF, "NetworkSection"))
    if nsec is None:
        err("no NetworkSection")
    else:
        check_section(nsec, "NetworkSection")
        for n in nsec.iterfind(q(OVF, "Network")):
            name = attr(n, "name")
            if not name or name in networks:
                err(f"NetworkSection: network name {name!r} missing or repeated")
            networks.add(name)
            if n.find(q(OVF, "Description")) is None:
                err(f"Network {name}: needs a Description")

    vs = kids[-1] if kids else None
    if vs is None or vs.tag != q(OVF, "VirtualSystem"):
        err("no VirtualSystem")
        return report(path)
    if not attr(vs, "id"):
        err("VirtualSystem needs ovf:id")
    check_section(vs, "VirtualSystem")
    for s in vs:
        if local(s).endswith("Section"):
            check_section(s, f"VirtualSystem/{local(s)}")
    os_sec = vs.find(q(OVF, "OperatingSystemSection"))
    if os_sec is None or not (attr(os_sec, "id") or "").isdigit():
        err("VirtualSystem: needs an OperatingSystemSection with a numeric ovf:id (CIM OS type)")
    hw = vs.find(q(OVF, "VirtualHardwareSection"))
    if hw is None:
        err("VirtualSystem: no VirtualHardwareSection")
        return report(path)
    system = hw.find(q(OVF, "System"))
    if system is None:
        err("VirtualHardwareSection: no System")
    else:
        props = check_order(list(system), VSSD_ORDER, VSSD, "System")
        for need in ("ElementName", "InstanceID", "VirtualSystemType"):
            if not props.get(need):
                err(f"System: needs vssd:{need}")
    items = {}
    for i, it in enumerate(hw.iterfind(q(OVF, "Item"))):
        props = check_order(list(it), RASD_ORDER, RASD, f"Item {i + 1}")
        for need in ("ElementName", "InstanceID", "ResourceType"):
            if not props.get(need):
                err(f"Item {i + 1}: needs rasd:{need}")
        iid = props.get("InstanceID", "")
        if iid in items:
            err(f"Item {i + 1}: InstanceID {iid} repeated")
        items[iid] = props
    types = [p.get("ResourceType") for p in items.values()]
    for t, what in (("3", "CPU"), ("4", "memory"), ("17", "disk"), ("10", "network adapter")):
        if t not in types:
            err(f"VirtualHardwareSection: no {what} item (ResourceType {t})")
    if not CONTROLLERS & set(types):
        err("VirtualHardwareSection: no disk controller item (ResourceType 5, 6 or 20)")
    for iid, p in items.items():
        rt = p.get("ResourceType")
        if rt == "17":
            host = p.get("HostResource", "")
            m = re.fullmatch(r"ovf:/disk/(.+)", host)
            if not m or m.group(1) not in disks:
                err(f"disk item {iid}: HostResource {host!r} names no DiskSection disk")
            else:
                disks[m.group(1)] += 1
            parent = items.get(p.get("Parent", ""))
            if parent is None or parent.get("ResourceType") not in CONTROLLERS:
                err(f"disk item {iid}: Parent {p.get('Parent')!r} is not a controller item")
        if rt == "10" and p.get("Connection") not in networks:
            err(f"network item {iid}: Connection {p.get('Connection')!r} names no NetworkSection network")
        if rt in ("3", "4") and not (p.get("VirtualQuantity") or "").isdigit():
            err(f"item {iid}: VirtualQuantity must be an integer")
    for did, n in disks.items():
        if n != 1:
            err(f"disk {did} is attached by {n} items (exactly one expected)")
    return report(path)


def report(path):
    for e in errors:
        print(f"check-ovf: {path}: {e}", file=sys.stderr)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
