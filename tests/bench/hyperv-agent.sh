#!/usr/bin/env bash
# Hyper-V network data path: `ferry backup --full` of a simulated VM through the host agent
# (`ferry-agent`, NBD over mutual TLS) against `nbdcopy` reading the same disks from the same
# agent process, in the same run. Prints the ratio (1.0 = the backup reads as fast as nbdcopy;
# the backup also takes the checkpoint, hashes, compresses and writes the repository).
#
# Usage: tests/bench/hyperv-agent.sh         (DISK_MIB=256: win-sql-01's two disks)
# Env:   DISK_MIB, BENCH_DIR (scratch, default /tmp/ferry-bench-hvagent), ROUNDS (best of,
#        default 3), PROFILE (cargo profile, default release). Page cache is warm for both.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PATH=$PWD/.peers/bin:$PATH

DISK_MIB=${DISK_MIB:-256}
DIR=${BENCH_DIR:-/tmp/ferry-bench-hvagent}
ROUNDS=${ROUNDS:-3}
PROFILE=${PROFILE:-release}
AGENT_ARGS=()
# shellcheck source=tests/bench/hyperv-lab.sh
source tests/bench/hyperv-lab.sh

disks=$(j '" ".join(x["path"] for v in d["vms"] if v["name"]=="win-sql-01" for x in v["disks"])')
now() { date +%s.%N; }
nbdcopy_once() {
  local s; s=$(now)
  for p in $disks; do
    nbdcopy "nbds://localhost:$port/${p//\\/%5C}?tls-certificates=$t" null:
  done
  python3 -c "print($(now) - $s)"
}
backup_once() {
  local s; s=$(now)
  "$FERRY" backup --source lab --vm win-sql-01 --full >/dev/null 2>&1
  python3 -c "print($(now) - $s)"
}
best() { local b=999999 x; "$1" >/dev/null; for _ in $(seq "$ROUNDS"); do x=$("$1"); b=$(python3 -c "print(min($b, $x))"); done; echo "$b"; }
nbd_s=$(best nbdcopy_once)
ferry_s=$(best backup_once)
python3 - "$nbd_s" "$ferry_s" "$DISK_MIB" "$PROFILE" <<'PY'
import sys
n, f, mib, prof = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
total = 2 * mib
print("| reader (same agent, 2 disks) | seconds | MiB/s virtual | ratio vs nbdcopy |")
print("|---|---|---|---|")
print(f"| nbdcopy → null: | {n:.2f} | {total / n:.0f} | 1.00 |")
print(f"| ferry backup --full (checkpoint, chunk, LZ4, repository) | {f:.2f} | {total / f:.0f} | {n / f:.2f} |")
print(f"({total} MiB virtual, a quarter of each MiB allocated, profile {prof}, best of rounds, warm page cache)")
PY
