"""What the pypsrp probes of the Hyper-V tests share: pypsrp's WSMan on the simulator's HTTPS
endpoint (Basic auth, the lab's self-signed certificate) and a WQL enumeration that pulls
every page.

usage (by the probes): URL USER PASSWORD [ARGS...] on their command line.
"""

import sys
import urllib.parse
import xml.etree.ElementTree as ET

from pypsrp.wsman import NAMESPACES, WSMan

N = NAMESPACES["wsen"]
W = NAMESPACES["wsman"]
V2 = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/"
MSCLUSTER = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/mscluster/"


def connect():
    """pypsrp's WSMan for `URL USER PASSWORD` of the command line, and the arguments after them."""
    url, user, password = sys.argv[1:4]
    u = urllib.parse.urlparse(url)
    wsman = WSMan(u.hostname, port=u.port, username=user, password=password, ssl=True,
                  auth="basic", cert_validation=False, path="wsman")
    return wsman, sys.argv[4:]


def enumerate_all(wsman, query, ns=V2):
    """The items of WQL `query` in namespace `ns` (its resource URI prefix), every page pulled."""
    body = ET.Element("{%s}Enumerate" % N)
    ET.SubElement(body, "{%s}OptimizeEnumeration" % W)
    ET.SubElement(body, "{%s}MaxElements" % W).text = "100"
    f = ET.SubElement(body, "{%s}Filter" % W, Dialect="http://schemas.microsoft.com/wbem/wsman/1/WQL")
    f.text = query
    r = wsman.enumerate(ns + "*", body)
    items = list(r.find("wsen:EnumerateResponse/wsman:Items", NAMESPACES) or [])
    done = r.find("wsen:EnumerateResponse/wsman:EndOfSequence", NAMESPACES) is not None
    ctx = r.find("wsen:EnumerateResponse/wsen:EnumerationContext", NAMESPACES)
    while not done:
        pb = ET.Element("{%s}Pull" % N)
        ET.SubElement(pb, "{%s}EnumerationContext" % N).text = ctx.text
        ET.SubElement(pb, "{%s}MaxElements" % N).text = "100"
        r = wsman.pull(ns + "*", pb)
        items += list(r.find("wsen:PullResponse/wsen:Items", NAMESPACES) or [])
        done = r.find("wsen:PullResponse/wsen:EndOfSequence", NAMESPACES) is not None
        c = r.find("wsen:PullResponse/wsen:EnumerationContext", NAMESPACES)
        ctx = c if c is not None else ctx
    return items


def prop(el, name):
    """The text of property `name` of instance `el` (None when absent)."""
    for c in el:
        if c.tag.endswith("}" + name):
            return c.text
    return None


def props(el, name):
    """The texts of every value of property `name` of instance `el` (an array property)."""
    return [c.text for c in el if c.tag.endswith("}" + name)]
