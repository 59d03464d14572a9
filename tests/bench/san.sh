#!/usr/bin/env bash
# Off-host SAN read throughput: the same qemu-img VHDX read through ferry-image from the file
# itself and straight from an NTFS volume image holding it (ferry-fs `SanVolume`, data runs),
# in the same run. Prints the ratio (1.0 = the NTFS path costs nothing).
#
# Usage: tests/bench/san.sh            (SIZE=1G by default)
# Env:   SIZE, BENCH_DIR (scratch, default /tmp/ferry-bench-san), ROUNDS (best of, default 3),
#        PROFILE (cargo profile, default release). Page cache is warm for both paths.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PATH=$PATH:/usr/sbin:/sbin

SIZE=${SIZE:-1G}
DIR=${BENCH_DIR:-/tmp/ferry-bench-san}
ROUNDS=${ROUNDS:-3}
PROFILE=${PROFILE:-release}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/bench}

echo "building ($PROFILE)..." >&2
cargo build -q --profile "$PROFILE" -p ferry-fs --example san_read
out=$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")
READER=$CARGO_TARGET_DIR/$out/examples/san_read

mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
qemu-img create -q -f vhdx -o block_size=32M "$DIR/disk.vhdx" "$SIZE"
# Fill 7 of every 8 blocks with data (one left unallocated).
bytes=$(qemu-img info --output=json "$DIR/disk.vhdx" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
cmds=()
for ((off = 0; off < bytes; off += 256 << 20)); do cmds+=(-c "write -P 0x5a $off 224M"); done
qemu-io -f vhdx "${cmds[@]}" "$DIR/disk.vhdx" >/dev/null
vhdx_len=$(stat -c %s "$DIR/disk.vhdx")
truncate -s $((vhdx_len + vhdx_len / 4 + (64 << 20))) "$DIR/vol.img"
mkntfs -F -Q -q "$DIR/vol.img" >/dev/null 2>&1
ntfscp -q "$DIR/vol.img" "$DIR/disk.vhdx" /disk.vhdx

best() { # args... -> best seconds of ROUNDS runs, after one warm-up
  "$READER" "$@" >/dev/null
  local b=999999
  for _ in $(seq "$ROUNDS"); do
    b=$("$READER" "$@" | python3 -c "import json,sys; print(min(json.load(sys.stdin)['seconds'], $b))")
  done
  echo "$b"
}
file_s=$(best file "$DIR/disk.vhdx")
ntfs_s=$(best ntfs "$DIR/vol.img" /disk.vhdx)
data=$("$READER" file "$DIR/disk.vhdx" | python3 -c "import json,sys; print(json.load(sys.stdin)['bytes'])")
python3 - "$data" "$file_s" "$ntfs_s" "$SIZE" "$PROFILE" <<'PY'
import sys
data, f, n, size, prof = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
mib = data / (1 << 20)
print(f"| path | MiB/s | ratio vs file |")
print(f"|---|---|---|")
print(f"| VHDX file (ferry-image) | {mib / f:.0f} | 1.00 |")
print(f"| VHDX on NTFS volume (ferry-fs san) | {mib / n:.0f} | {f / n:.2f} |")
print(f"({size} virtual, {mib:.0f} MiB allocated, profile {prof}, best of rounds, warm page cache)")
PY
