#!/bin/sh
# Seeds the soap fuzz corpus with answers shaped like vCenter's (and vcsim's).
set -eu
d="$(dirname "$0")/corpus/soap"
mkdir -p "$d"
env='<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
end='</soapenv:Body></soapenv:Envelope>'
printf '%s<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval><startOffset>0</startOffset><length>1048576</length><changedArea><start>65536</start><length>65536</length></changedArea></returnval></QueryChangedDiskAreasResponse>%s' "$env" "$end" > "$d/qcda"
printf '%s<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Login failure</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault>%s' "$env" "$end" > "$d/fault"
printf '%s<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>1</token><objects><obj type="VirtualMachine">vm-1</obj><propSet><name>config.hardware.device</name><val xsi:type="ArrayOfVirtualDevice"><VirtualDevice xsi:type="VirtualDisk"><key>2000</key><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds] a/a.vmdk</fileName><changeId>52 1/2</changeId></backing><capacityInKB>1024</capacityInKB></VirtualDevice></val></propSet></objects></returnval></RetrievePropertiesExResponse>%s' "$env" "$end" > "$d/props"
