"""A test's eyes and hands on a XenAPI pool, through the official Python SDK (PyPI `XenAPI`).

Usage: xen_probe.py URL USER PASSWORD. Reads one JSON request per line on stdin and answers one
JSON line on stdout ({"ok": …} or {"error": "…"}), so one process and one session serve a whole
test. Requests:
  {"op": "leftovers"}                        what a backup may leave behind, as lists
  {"op": "vm", "name": N}                    a VM's machine fields, disks and VIFs
  {"op": "export", "vdi": UUID, "path": P}   GET /export_raw_vdi into file P
  {"op": "sim", "call": C, "args": [...]}    the simulator's side door: session.xenapi.sim.C(*args)
  {"op": "vdis"}                             uuids of every VDI
  {"op": "vm_names"}                         names of every VM that is not a snapshot
  {"op": "networks"}                         names of every network
"""
import json, shutil, ssl, sys, urllib.request
import XenAPI

url, user, pw = sys.argv[1:4]
session = XenAPI.Session(url, ignore_ssl=True)
session.xenapi.login_with_password(user, pw, "2.21", "ferry-cli-tests")
x = session.xenapi


def leftovers():
    vms = x.VM.get_all_records()
    vdis = x.VDI.get_all_records()
    vbds = x.VBD.get_all_records()
    proxy = [r for r, v in vms.items() if v["name_label"] == "ferry-proxy"]
    snapshot_vdis = {r for r, v in vdis.items() if v["is_a_snapshot"] and v["type"] != "cbt_metadata"}
    return {
        "snapshot_vms": sorted(v["name_label"] for v in vms.values() if v["is_a_snapshot"]),
        "cbt_anchors": sorted(v["uuid"] for v in vdis.values() if v["type"] == "cbt_metadata"),
        "snapshot_vdis": sorted(vdis[r]["uuid"] for r in snapshot_vdis),
        "proxy_vbds": sorted(b for p in proxy for b in x.VM.get_VBDs(p)),
        "vbds_on_snapshots": sorted(r for r, b in vbds.items() if b["VDI"] in snapshot_vdis),
        "tasks": sorted("%s %s" % (t["name_label"], t["status"]) for t in x.task.get_all_records().values()),
    }


def vm(name):
    refs = [r for r in x.VM.get_by_name_label(name) if not x.VM.get_is_a_snapshot(r)]
    if len(refs) != 1:
        raise Exception("%d VMs named %r" % (len(refs), name))
    rec = x.VM.get_record(refs[0])
    disks = []
    for b in rec["VBDs"]:
        vb = x.VBD.get_record(b)
        if vb["type"] != "Disk":
            continue
        vd = x.VDI.get_record(vb["VDI"])
        disks.append({"userdevice": vb["userdevice"], "bootable": vb["bootable"], "mode": vb["mode"],
                      "virtual_size": vd["virtual_size"], "uuid": vd["uuid"]})
    disks.sort(key=lambda d: int(d["userdevice"]))
    vifs = []
    for v in rec["VIFs"]:
        vr = x.VIF.get_record(v)
        vifs.append({"device": vr["device"], "MAC": vr["MAC"], "MTU": vr["MTU"],
                     "network": x.network.get_name_label(vr["network"])})
    vifs.sort(key=lambda v: v["device"])
    keep = ("uuid", "power_state", "VCPUs_max", "VCPUs_at_startup", "memory_static_max",
            "memory_static_min", "memory_dynamic_max", "memory_dynamic_min", "HVM_boot_policy",
            "HVM_boot_params", "platform", "tags", "other_config")
    out = {k: rec[k] for k in keep}
    out["disks"] = disks
    out["vifs"] = vifs
    return out


def export(vdi, path):
    q = "%s/export_raw_vdi?session_id=%s&vdi=%s&format=raw" % (url, session._session, vdi)
    with urllib.request.urlopen(q, context=ssl._create_unverified_context()) as r, open(path, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    return path


for line in sys.stdin:
    req = json.loads(line)
    try:
        op = req["op"]
        if op == "leftovers":
            ans = leftovers()
        elif op == "vm":
            ans = vm(req["name"])
        elif op == "export":
            ans = export(req["vdi"], req["path"])
        elif op == "sim":
            ans = getattr(x.sim, req["call"])(*req["args"])
        elif op == "vm_names":
            ans = sorted(v["name_label"] for v in x.VM.get_all_records().values() if not v["is_a_snapshot"])
        elif op == "networks":
            ans = sorted(v["name_label"] for v in x.network.get_all_records().values())
        elif op == "vdis":
            ans = sorted(v["uuid"] for v in x.VDI.get_all_records().values())
        else:
            raise Exception("unknown op %r" % op)
        print(json.dumps({"ok": ans}), flush=True)
    except Exception as e:  # the Rust side fails the test with this text
        print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}), flush=True)
session.xenapi.session.logout()
