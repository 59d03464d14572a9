"""Acts on AWS KMS (moto) with AWS's own SDK, independently of ferry.

Usage: kms_probe.py COMMAND [KEY]; endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Prints one JSON object.

Commands:
  create-key        a new symmetric key: {"key_id", "arn"}
  disable KEY       DisableKey
  enable KEY        EnableKey
  rotate KEY        EnableKeyRotation, then RotateKeyOnDemand: {"rotation_enabled"}
  state KEY         {"state"} (KeyState)
  deny-describe KEY key policy denying kms:DescribeKey (Decrypt stays allowed)
  decrypt BLOB REPO SLOT   Decrypt base64 BLOB with ferry's encryption context: {"plaintext"} (base64)
"""
import base64
import json
import os
import sys

import boto3


def main():
    cmd = sys.argv[1]
    key = sys.argv[2] if len(sys.argv) > 2 else None
    kms = boto3.client(
        "kms",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    if cmd == "create-key":
        m = kms.create_key(Description="ferry test")["KeyMetadata"]
        out = {"key_id": m["KeyId"], "arn": m["Arn"]}
    elif cmd == "disable":
        kms.disable_key(KeyId=key)
        out = {"ok": True}
    elif cmd == "enable":
        kms.enable_key(KeyId=key)
        out = {"ok": True}
    elif cmd == "rotate":
        kms.enable_key_rotation(KeyId=key)
        kms.rotate_key_on_demand(KeyId=key)
        out = {"rotation_enabled": kms.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"]}
    elif cmd == "decrypt":
        repo, slot = sys.argv[3], sys.argv[4]
        r = kms.decrypt(
            CiphertextBlob=base64.b64decode(key),
            EncryptionContext={"ferry-repository": repo, "ferry-key-slot": slot},
        )
        out = {"plaintext": base64.b64encode(r["Plaintext"]).decode()}
    elif cmd == "deny-describe":
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": ["kms:*"], "Resource": "*"},
                {"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": ["kms:DescribeKey"], "Resource": "*"},
            ],
        }
        kms.put_key_policy(KeyId=key, PolicyName="default", Policy=json.dumps(policy))
        out = {"ok": True}
    elif cmd == "state":
        out = {"state": kms.describe_key(KeyId=key)["KeyMetadata"]["KeyState"]}
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
