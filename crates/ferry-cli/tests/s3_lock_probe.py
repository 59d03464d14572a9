"""Acts on an S3 endpoint (moto) with AWS's own SDK, independently of ferry.

Usage: s3_lock_probe.py BUCKET COMMAND [KEY]; endpoint and keys from AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Prints one JSON object.

Commands:
  create-lock-bucket      create BUCKET with Object Lock enabled
  lock KEY                the current version's lock: {"version", "mode", "until"} (until: Unix s)
  delete-version KEY      try to delete the current version for good: {"result": "denied"|"deleted"}
  bypass-delete KEY       delete the current version bypassing governance retention
  versions KEY            {"versions": N} versions and delete markers of exactly KEY
"""
import json
import os
import sys

import boto3
import botocore.exceptions


def client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def current_version(s3, bucket, key):
    return s3.head_object(Bucket=bucket, Key=key)["VersionId"]


def main():
    bucket, cmd = sys.argv[1], sys.argv[2]
    key = sys.argv[3] if len(sys.argv) > 3 else None
    s3 = client()
    if cmd == "create-lock-bucket":
        s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        out = {"created": bucket}
    elif cmd == "lock":
        h = s3.head_object(Bucket=bucket, Key=key)
        until = h.get("ObjectLockRetainUntilDate")
        out = {
            "version": h.get("VersionId"),
            "mode": h.get("ObjectLockMode"),
            "until": int(until.timestamp()) if until else None,
        }
    elif cmd in ("delete-version", "bypass-delete"):
        v = current_version(s3, bucket, key)
        try:
            if cmd == "bypass-delete":
                s3.delete_object(Bucket=bucket, Key=key, VersionId=v, BypassGovernanceRetention=True)
            else:
                s3.delete_object(Bucket=bucket, Key=key, VersionId=v)
            out = {"result": "deleted"}
        except botocore.exceptions.ClientError as e:
            out = {"result": "denied", "code": e.response["Error"]["Code"]}
    elif cmd == "versions":
        r = s3.list_object_versions(Bucket=bucket, Prefix=key)
        n = sum(1 for v in r.get("Versions", []) if v["Key"] == key)
        n += sum(1 for v in r.get("DeleteMarkers", []) if v["Key"] == key)
        out = {"versions": n}
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
