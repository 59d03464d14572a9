#!/usr/bin/env python3
"""Checks an OVF 1.x descriptor against the DMTF OVF envelope schema (DSP8023 1.1.1 with the CIM
RASD/VSSD schemas, vendored in images/ovf-schema/, validated by xmllint) and against what vSphere's
import expects beyond the schema, and the VMDK it references.

  check-ovf.py DESCRIPTOR.ovf [DISK.vmdk ...]

The schema fixes the envelope's structure: element order, every section's Info, the known CIM
properties of each Item and System in order, attribute types. On top of it: files, disks and networks
have unique ids and resolve (Disk -> File, Item HostResource -> Disk, Item Parent -> controller, Item
Connection -> Network); a DiskSection, a NetworkSection and one VirtualSystem with a
VirtualHardwareSection (CPU, memory, a disk controller, a disk and a NIC) and an OperatingSystemSection;
disks are streamOptimized VMDKs with a byte capacity; each referenced file's size matches and a VMDK is
really streamOptimized. Exit 1 with one line per problem; xmllint missing is an error, not a skip.
"""
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ovf-schema", "dsp8023_1.1.1.xsd")
CONTROLLERS = {"5", "6", "20"}  # IDE, parallel SCSI, other storage (SATA/NVMe)

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


def props(el, ns):
    return {local(c): (c.text or "").strip() for c in el if ns_of(c) == ns}


def schema_check(path):
    """The DMTF schema, offline; xmllint's messages name the line and the element."""
    xmllint = shutil.which("xmllint")
    if xmllint is None:
        sys.exit("check-ovf: xmllint not found (Debian libxml2-utils; images/install-deps.sh)")
    r = subprocess.run([xmllint, "--noout", "--nonet", "--schema", SCHEMA, path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        for line in r.stderr.splitlines():
            # The CIM schemas import common.xsd by URL again; that warning is no finding.
            if "Schemas parser warning" in line or line.endswith(" fails to validate"):
                continue
            err(f"schema: {line}")
        if not errors:
            err(f"schema: xmllint failed ({r.returncode}): {r.stderr.strip()[-300:]}")


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
    schema_check(path)

    kids = list(env)

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
        sprops = props(system, VSSD)
        for need in ("ElementName", "InstanceID", "VirtualSystemType"):
            if not sprops.get(need):
                err(f"System: needs vssd:{need}")
    items = {}
    for i, it in enumerate(hw.iterfind(q(OVF, "Item"))):
        iprops = props(it, RASD)
        for need in ("ElementName", "InstanceID", "ResourceType"):
            if not iprops.get(need):
                err(f"Item {i + 1}: needs rasd:{need}")
        iid = iprops.get("InstanceID", "")
        if iid in items:
            err(f"Item {i + 1}: InstanceID {iid} repeated")
        items[iid] = iprops
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
