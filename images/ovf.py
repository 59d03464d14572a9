#!/usr/bin/env python3
"""Writes the OVF 1.0 descriptor of the Ferry appliance's OVA on stdout.

The shape is what vSphere (and ovftool) expect of an import: References -> DiskSection (a
streamOptimized VMDK, capacity in bytes) -> NetworkSection -> one VirtualSystem with product,
operating system and a VirtualHardwareSection whose RASD items keep the CIM schema's element
order (alphabetical). Deterministic: the same arguments give the same bytes.
"""
import argparse
import os
from xml.sax.saxutils import escape, quoteattr

NS = {
    "": "http://schemas.dmtf.org/ovf/envelope/1",
    "cim": "http://schemas.dmtf.org/wbem/wscim/1/common",
    "ovf": "http://schemas.dmtf.org/ovf/envelope/1",
    "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
    "vmw": "http://www.vmware.com/schema/ovf",
    "vssd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
}
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
NETWORK = "VM Network"


def item(fields):
    """One RASD item; `fields` in any order, written in the schema's (alphabetical) order."""
    lines = ["      <Item>"]
    for key in sorted(fields):
        lines.append(f"        <rasd:{key}>{escape(str(fields[key]))}</rasd:{key}>")
    lines.append("      </Item>")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--vmdk", required=True, help="the streamOptimized VMDK (its size goes in References)")
    p.add_argument("--capacity", type=int, required=True, help="virtual disk size in bytes")
    p.add_argument("--populated", type=int, required=True, help="allocated bytes of the disk")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory-mib", type=int, default=4096)
    a = p.parse_args()

    vmdk = os.path.basename(a.vmdk)
    size = os.path.getsize(a.vmdk)
    xmlns = " ".join(
        f'xmlns{":" + k if k else ""}="{v}"' for k, v in sorted(NS.items())
    )
    hw = [
        item({"AllocationUnits": "hertz * 10^6", "Description": "Number of Virtual CPUs",
              "ElementName": f"{a.cpus} virtual CPU(s)", "InstanceID": 1, "ResourceType": 3,
              "VirtualQuantity": a.cpus}),
        item({"AllocationUnits": "byte * 2^20", "Description": "Memory Size",
              "ElementName": f"{a.memory_mib}MB of memory", "InstanceID": 2, "ResourceType": 4,
              "VirtualQuantity": a.memory_mib}),
        item({"Address": 0, "Description": "SCSI Controller", "ElementName": "SCSI Controller 0",
              "InstanceID": 3, "ResourceSubType": "VirtualSCSI", "ResourceType": 6}),
        item({"AddressOnParent": 0, "ElementName": "Hard Disk 1", "HostResource": "ovf:/disk/vmdisk1",
              "InstanceID": 4, "Parent": 3, "ResourceType": 17}),
        item({"AddressOnParent": 7, "AutomaticAllocation": "true", "Connection": NETWORK,
              "Description": f'VmxNet3 ethernet adapter on "{NETWORK}"', "ElementName": "Network adapter 1",
              "InstanceID": 5, "ResourceSubType": "VmxNet3", "ResourceType": 10}),
    ]
    out = f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope {xmlns}>
  <References>
    <File ovf:href={quoteattr(vmdk)} ovf:id="file1" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{a.capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="{STREAM_OPTIMIZED}" ovf:populatedSize="{a.populated}"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name={quoteattr(NETWORK)}>
      <Description>The network of the console, the API and the hypervisors to protect</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id={quoteattr(a.name)}>
    <Info>The Ferry backup appliance</Info>
    <Name>Ferry appliance</Name>
    <AnnotationSection>
      <Info>A human-readable annotation</Info>
      <Annotation>Ferry {escape(a.version)}: cross-hypervisor backup appliance. Console and API: https://ADDRESS/ (the first admin's password is shown on the VM console at first boot).</Annotation>
    </AnnotationSection>
    <ProductSection>
      <Info>Information about the installed software</Info>
      <Product>Ferry backup appliance</Product>
      <Vendor>Ferry</Vendor>
      <Version>{escape(a.version)}</Version>
      <FullVersion>{escape(a.version)}</FullVersion>
    </ProductSection>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian10_64Guest">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian GNU/Linux 12 (64-bit)</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{escape(a.name)}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
{chr(10).join(hw)}
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>
      <vmw:Config ovf:required="false" vmw:key="tools.syncTimeWithHost" vmw:value="false"/>
      <vmw:ExtraConfig ovf:required="false" vmw:key="disk.EnableUUID" vmw:value="TRUE"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""
    print(out, end="")


if __name__ == "__main__":
    main()
