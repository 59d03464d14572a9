"""What Azurite emulates of Azure's version-level WORM, asked with the official SDK (azure-storage-blob).

Usage: az_worm_probe.py CONNECTION_STRING. Prints one JSON object; each entry is
{"ok": result} or {"error": first line of the error}. Used by tests/immutable.rs to pin Azurite's behaviour.
"""
import datetime
import json
import sys

from azure.storage.blob import BlobServiceClient, ImmutabilityPolicy


def main():
    svc = BlobServiceClient.from_connection_string(sys.argv[1])
    out = {}

    def t(name, f):
        try:
            out[name] = {"ok": f()}
        except Exception as e:  # the probe reports every failure, it judges none
            out[name] = {"error": str(e).splitlines()[0]}

    until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    policy = ImmutabilityPolicy(expiry_time=until, policy_mode="Unlocked")
    c = svc.get_container_client("worm-probe")
    t("create_container_with_versioning_worm",
      lambda: bool(c.create_container(headers={"x-ms-immutable-storage-with-versioning-enabled": "true"})))

    def container_flag():
        return c.get_container_properties().immutable_storage_with_versioning_enabled
    t("container_worm_flag", container_flag)

    b = c.get_blob_client("locked")
    t("put_with_policy", lambda: bool(b.upload_blob(b"x", immutability_policy=policy, legal_hold=True)))

    def props():
        p = b.get_blob_properties()
        return {"until": p.immutability_policy.expiry_time and p.immutability_policy.expiry_time.isoformat(),
                "mode": p.immutability_policy.policy_mode, "legal_hold": p.has_legal_hold,
                "version_id": p.version_id}
    t("properties", props)
    t("delete_locked", lambda: b.delete_blob() is None)
    b2 = c.get_blob_client("later")
    t("put_plain", lambda: bool(b2.upload_blob(b"y")))
    t("set_immutability_policy", lambda: bool(b2.set_immutability_policy(policy)))
    t("set_legal_hold", lambda: bool(b2.set_legal_hold(True)))
    print(json.dumps(out))


main()
