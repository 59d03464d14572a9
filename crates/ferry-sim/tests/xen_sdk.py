"""Drives the XenAPI simulator with the official Python SDK (PyPI `XenAPI`) and checks that the
answers have the documented shapes. Two phases: the Rust test writes into the guest between them
(through the simulator's side door) when this script prints `WRITE <vdi-ref>`."""
import base64, json, ssl, sys, time, urllib.request
import XenAPI

url, user, pw = sys.argv[1:4]
s = XenAPI.Session(url, ignore_ssl=True)
s.xenapi.login_with_password(user, pw, "2.21", "ferry-fidelity")
x = s.xenapi
assert s.API_version == "2.21", s.API_version  # pool.get_all, pool.get_master, host.get_API_version_*

vms = x.VM.get_all_records()
assert isinstance(vms, dict) and vms
for ref, v in vms.items():
    assert ref.startswith("OpaqueRef:"), ref
    for k in ("uuid", "name_label", "power_state", "VCPUs_max", "memory_static_max", "VBDs", "VIFs",
              "is_a_template", "is_a_snapshot", "is_control_domain", "other_config", "snapshots", "tags"):
        assert k in v, (k, v)
    assert isinstance(v["VCPUs_max"], str) and int(v["VCPUs_max"]) >= 1  # int64 travels as a string
    assert isinstance(v["memory_static_max"], str) and int(v["memory_static_max"]) > 0
    assert isinstance(v["is_a_template"], bool)
    assert isinstance(v["VBDs"], list) and isinstance(v["other_config"], dict)
    assert v["power_state"] in ("Running", "Halted", "Paused", "Suspended")
guests = sorted(v["name_label"] for v in vms.values()
                if not v["is_a_template"] and not v["is_control_domain"] and not v["is_a_snapshot"])
assert guests == ["debian-web", "ferry-proxy", "win-db"], guests
assert sum(1 for v in vms.values() if v["is_control_domain"]) == 1

try:
    x.VM.get_record("OpaqueRef:does-not-exist")
    raise AssertionError("no failure")
except XenAPI.Failure as f:
    assert f.details == ["HANDLE_INVALID", "VM", "OpaqueRef:does-not-exist"], f.details

vm = x.VM.get_by_name_label("debian-web")[0]
disks = sorted((x.VBD.get_userdevice(b), x.VBD.get_VDI(b)) for b in x.VM.get_VBDs(vm)
               if x.VBD.get_type(b) == "Disk")
assert len(disks) == 2, disks
vdi = disks[0][1]
size = int(x.VDI.get_virtual_size(vdi))
x.VDI.enable_cbt(vdi)
x.VDI.enable_cbt(vdi)  # idempotent
assert x.VDI.get_cbt_enabled(vdi) is True

snap1 = x.VM.snapshot(vm, "fidelity-1")
r1 = x.VM.get_record(snap1)
assert r1["is_a_snapshot"] is True and r1["snapshot_of"] == vm and snap1 in x.VM.get_snapshots(vm)
assert r1["snapshot_time"].value.endswith("Z")  # an xmlrpc DateTime

print("WRITE " + vdi, flush=True)
assert sys.stdin.readline().strip() == "GO"

task = x.Async.VM.snapshot(vm, "fidelity-2")
assert task.startswith("OpaqueRef:")
while x.task.get_status(task) == "pending":
    time.sleep(0.02)
assert x.task.get_status(task) == "success", x.task.get_error_info(task)
assert x.task.get_progress(task) == 1.0
result = x.task.get_result(task)
assert result.startswith("<value>") and result.endswith("</value>"), result
snap2 = result[len("<value>"):-len("</value>")]
x.task.destroy(task)
assert task not in x.task.get_all()

def snap_vdi(snap):
    for b in x.VM.get_VBDs(snap):
        d = x.VBD.get_VDI(b)
        if d != "OpaqueRef:NULL" and x.VDI.get_snapshot_of(d) == vdi:
            return d
    raise AssertionError("no snapshot of the disk")

a, b = snap_vdi(snap1), snap_vdi(snap2)
assert x.VDI.get_is_a_snapshot(a) is True
bitmap = base64.b64decode(x.VDI.list_changed_blocks(a, b))
assert len(bitmap) == (size // 65536 + 7) // 8, (len(bitmap), size)
changed = [i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (0x80 >> (i % 8))]

info = x.VDI.get_nbd_info(b)
assert isinstance(info, list) and len(info) == 1, info
i = info[0]
assert set(i) == {"exportname", "address", "port", "cert", "subject"}, i
assert i["exportname"] == "/%s?session_id=%s" % (x.VDI.get_uuid(b), s._session), i["exportname"]
assert int(i["port"]) > 0 and i["cert"].startswith("-----BEGIN CERTIFICATE-----") and i["subject"]

x.VDI.data_destroy(a)
x.VDI.data_destroy(a)  # idempotent
assert x.VDI.get_type(a) == "cbt_metadata"
assert x.VDI.get_nbd_info(a) == []
again = base64.b64decode(x.VDI.list_changed_blocks(a, b))
assert again == bitmap

x.VDI.disable_cbt(vdi)
x.VDI.enable_cbt(vdi)  # a CBT reset: earlier snapshots cannot be compared with later ones
snap3 = x.VM.snapshot(vm, "fidelity-3")
try:
    x.VDI.list_changed_blocks(b, snap_vdi(snap3))
    raise AssertionError("CBT reset not reported")
except XenAPI.Failure as f:
    assert f.details[0] == "VDI_NO_CBT_METADATA", f.details

# JSON-RPC: the same session works, ints are numbers, errors have the v2 shape.
ctx = ssl._create_unverified_context()
def jrpc(method, params):
    req = urllib.request.Request(url + "/jsonrpc", data=json.dumps(
        {"jsonrpc": "2.0", "method": method, "params": params, "id": 7}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx) as r:
        assert r.headers["Content-Type"] == "application/json"
        return json.loads(r.read())
rec = jrpc("VM.get_record", [s._session, vm])
assert rec["id"] == 7 and isinstance(rec["result"]["VCPUs_max"], int), rec
err = jrpc("VM.get_record", ["OpaqueRef:nope", vm])
assert err["error"]["message"] == "SESSION_INVALID", err

s.xenapi.session.logout()
print(json.dumps({"changed_blocks": changed, "size": size}), flush=True)
