#!/usr/bin/env bash
# Sequential read throughput of each ferry-image reader vs `qemu-img convert -O raw` of the same
# image to a null sink, in the same run. Prints one table of ratios (>1 = Ferry faster).
# qemu-img refuses /dev/null as a raw target ("Cannot grow device files"), so its output goes to
# qemu's null-co driver (`-n --target-image-opts driver=null-co,size=N`): same reads, no writes.
#
# Usage: tests/bench/image.sh            (SIZE=4G by default; SIZE=512M for a quick look)
# Env:   FERRY_IMAGE_READ (a prebuilt image_read example; skips the build), SIZE, BENCH_DIR (scratch, default /tmp/ferry-bench-image), JOBS (Ferry reader tasks, 2),
#        ROUNDS (timed runs per tool, best kept; default 2), ONLY (e.g. ONLY=vhdx: one reader). Page cache is warm for both tools.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

SIZE=${SIZE:-4G}
DIR=${BENCH_DIR:-/tmp/ferry-bench-image}
JOBS=${JOBS:-2}
ROUNDS=${ROUNDS:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/bench}

if [[ -z "${FERRY_IMAGE_READ:-}" ]]; then
  echo "building (release)..." >&2
  cargo build --release -q -p ferry-image --example image_read
fi
READER=${FERRY_IMAGE_READ:-$CARGO_TARGET_DIR/release/examples/image_read}

mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
SRC="$DIR/src.raw"
echo "making a $SIZE source with non-zero, mostly incompressible data..." >&2
python3 - "$SRC" "$SIZE" <<'PY'
import os, sys
path, size = sys.argv[1], sys.argv[2]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * mult[size[-1]] if size[-1] in mult else int(size)
block = os.urandom(8 << 20)
with open(path, "wb") as f:
    written = 0
    i = 0
    while written < n:
        # Vary each 8 MiB so grains differ; every 8th block is left as a hole (unallocated).
        chunk = bytes([i & 0xFF]) + block[1:]
        step = min(len(chunk), n - written)
        if i % 8 == 7:
            f.seek(step, 1)
        else:
            f.write(chunk[:step])
        written += step
        i += 1
    f.truncate(n)
PY

best() { # command... -> best wall seconds of ROUNDS runs (after one warm-up)
  "$@" >/dev/null
  local b=""
  for _ in $(seq "$ROUNDS"); do
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    b=$(python3 -c "import sys; t=float(sys.argv[2])-float(sys.argv[1]); b=sys.argv[3]; print(t if b=='' else min(t,float(b)))" "$t0" "$t1" "$b")
  done
  echo "$b"
}

printf '\n%-26s %12s %12s %12s %10s %8s\n' "reader ($SIZE, $JOBS jobs)" "data MiB" "ferry MiB/s" "qemu MiB/s" "ferry s" "ratio"
for spec in "raw::raw" "vpc:subformat=dynamic:vhd" "vhdx::vhdx" "vmdk:subformat=monolithicSparse:vmdk" "vmdk:subformat=streamOptimized:vmdk" "vmdk:subformat=monolithicFlat:vmdk"; do
  IFS=: read -r fmt opts ext <<<"$spec"
  [[ -n "${ONLY:-}" && "$spec" != *"$ONLY"* ]] && continue
  img="$DIR/img.$ext"
  if [[ $fmt == raw ]]; then cp --sparse=always "$SRC" "$img"; else qemu-img convert -f raw -O "$fmt" ${opts:+-o "$opts"} "$SRC" "$img"; fi
  data=$("$READER" "$img" "$JOBS" | python3 -c "import json,sys; print(json.load(sys.stdin)['bytes'])")
  tf=$(best "$READER" "$img" "$JOBS")
  vsize=$(qemu-img info -f "$fmt" --output=json "$img" | python3 -c "import json,sys; print(json.load(sys.stdin)['virtual-size'])")
  tq=$(best qemu-img convert -n -f "$fmt" --target-image-opts "$img" "driver=null-co,size=$vsize")
  python3 - "$fmt ${opts#subformat=}" "$data" "$tf" "$tq" <<'PY'
import sys
name, data, tf, tq = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
mib = data / (1 << 20)
print(f"{name:<26} {mib:12.0f} {mib/tf:12.0f} {mib/tq:12.0f} {tf:10.2f} {tq/tf:8.2f}")
PY
  rm -f "$DIR"/img*
done
