#!/usr/bin/env bash
# File-level restore: one FILE_MIB (256) MiB file out of a 1 GiB GPT disk's restore point (ext4 and NTFS
# partitions), vs. `ferry restore` of the whole disk and vs. debugfs / ntfscat reading the same file from
# the raw partition images, in the same run. Prints one table.
#
# Usage: tests/bench/files.sh
# Env:   FERRY (a prebuilt ferry binary; skips the release build), BENCH_DIR (scratch, default
#        /tmp/ferry-bench-files), FILE_MIB (256), ROUNDS (timed runs per command, best kept; default 2).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PATH=$PATH:/usr/sbin:/sbin

DIR=${BENCH_DIR:-/tmp/ferry-bench-files}
FILE_MIB=${FILE_MIB:-256}
ROUNDS=${ROUNDS:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/bench}
if [[ -z "${FERRY:-}" ]]; then
  echo "building (release)..." >&2
  cargo build --release -q -p ferry-cli
  FERRY=$CARGO_TARGET_DIR/release/ferry
fi
for t in mke2fs mkntfs ntfscp ntfscat debugfs sfdisk; do
  command -v "$t" >/dev/null || { echo "$t missing: run tests/peers/install.sh" >&2; exit 1; }
done

rm -rf "$DIR"; mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
cd "$DIR"
echo "making a 1 GiB GPT disk: ext4 (512 MiB) and NTFS (480 MiB), each with a ${FILE_MIB} MiB file..." >&2
mkdir root
head -c $((FILE_MIB << 20)) /dev/urandom > root/big.bin
mke2fs -q -F -t ext4 -d root ext4.img 512M >/dev/null
truncate -s 480M ntfs.img
mkntfs -q -F -Q -s 512 -p 2048 -H 16 -S 63 ntfs.img >/dev/null 2>&1
ntfscp -q ntfs.img root/big.bin big.bin
truncate -s 1G disk.img
sfdisk -q disk.img >/dev/null <<'SF'
label: gpt
unit: sectors
start=2048, size=1048576, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4
start=1050624, size=983040, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7
SF
dd if=ext4.img of=disk.img bs=1M seek=1 conv=notrunc status=none
dd if=ntfs.img of=disk.img bs=512 seek=1050624 conv=notrunc status=none

export FERRY_REPO=$DIR/repo FERRY_PASSWORD=bench
"$FERRY" -q repo init >/dev/null
SNAP=$("$FERRY" -q backup --vm bench --disk d=raw:disk.img)

best() { # label command... : best wall seconds of ROUNDS runs
  shift
  local b=""
  for _ in $(seq "$ROUNDS"); do
    rm -f out.bin restored.img
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    b=$(python3 -c "import sys; t=float(sys.argv[2])-float(sys.argv[1]); b=sys.argv[3]; print(t if b=='' else min(t,float(b)))" "$t0" "$t1" "$b")
  done
  echo "$b"
}
check() { cmp -s out.bin root/big.bin || { echo "$1: wrong bytes" >&2; exit 1; }; }

# Each timed run starts without out.bin; the last run's output is checked.
t_ext=$(best x "$FERRY" -q files get "$SNAP" --partition 1 /big.bin --out out.bin); check ferry-ext4
t_ntfs=$(best x "$FERRY" -q files get "$SNAP" --partition 2 /big.bin --out out.bin); check ferry-ntfs
t_restore=$(best x "$FERRY" -q restore "$SNAP" --disk d --to restored.img)
debugfs_run() { debugfs -R "dump /big.bin out.bin" ext4.img 2>/dev/null; }
t_debugfs=$(best x debugfs_run); check debugfs
ntfscat_run() { ntfscat ntfs.img big.bin > out.bin; }
t_ntfscat=$(best x ntfscat_run); check ntfscat

printf '\n| %s MiB file from a 1 GiB disk | seconds | MiB/s |\n|---|---:|---:|\n' "$FILE_MIB"
row() { python3 -c "import sys; t=float(sys.argv[2]); print(f'| {sys.argv[1]} | {t:.2f} | {int(sys.argv[3])/t:.0f} |')" "$1" "$2" "$FILE_MIB"; }
row "ferry files get (ext4, from the restore point)" "$t_ext"
row "ferry files get (NTFS, from the restore point)" "$t_ntfs"
row "ferry restore (whole 1 GiB disk to a raw file)" "$t_restore"
row "debugfs dump (raw ext4 partition image)" "$t_debugfs"
row "ntfscat (raw NTFS partition image)" "$t_ntfscat"
