#!/usr/bin/env bash
# Hyper-V whole-VM restore through the host agent (ADRs 0169-0170): `ferry restore --to-source` of
# a simulated VM whose disks are written through `ferry-agent` (restore exports, NBD over mutual
# TLS, committed as VHDX on the host) against `nbdcopy` writing the same disks (raw) into `create`
# exports of the same agent process and committing them, in the same run. Prints the ratio
# (1.0 = the restore writes as fast as nbdcopy; the restore also reads the repository, decompresses,
# and defines the VM over WinRM).
#
# Usage: tests/bench/hyperv-restore-agent.sh   (DISK_MIB=256: win-sql-01's two disks)
# Env:   DISK_MIB, BENCH_DIR (scratch, default /tmp/ferry-bench-hvrestore), ROUNDS (best of,
#        default 3), PROFILE (cargo profile, default release). Page cache is warm for both.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PATH=$PWD/.peers/bin:$PATH

DISK_MIB=${DISK_MIB:-256}
DIR=${BENCH_DIR:-/tmp/ferry-bench-hvrestore}
ROUNDS=${ROUNDS:-3}
PROFILE=${PROFILE:-release}
AGENT_ARGS=(--restore-root "$DIR/host/volumes")
# shellcheck source=tests/bench/hyperv-lab.sh
source tests/bench/hyperv-lab.sh

snap=$("$FERRY" backup --source lab --vm win-sql-01 --full --json 2>/dev/null |
  python3 -c "import json,sys; print(json.load(sys.stdin)[0]['snapshot'])")
# The guest's disks now (what the restore point holds), as raw files for nbdcopy.
lives=$(j '" ".join(x["live"] for v in d["vms"] if v["name"]=="win-sql-01" for x in v["disks"])')
vmdir=$(j '[x["path"] for v in d["vms"] if v["name"]=="win-sql-01" for x in v["disks"]][0].rsplit(chr(92), 2)[0]')
now() { date +%s.%N; }
enc() { python3 -c "import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=''))" "$1"; }
uri() { echo "nbds://localhost:$port/$(enc "$1")?tls-certificates=$t"; }
restore_once() {
  local s; n=$RANDOM$RANDOM; s=$(now)
  "$FERRY" restore "$snap" --to-source lab --name "bench-$n" >/dev/null 2>&1
  python3 -c "print($(now) - $s)"
}
# nbdcopy: the folder is made by a restore request (nbdinfo asks it), each disk copied into a
# create export (4 connections) and committed (one connection; the answer is the new VHDX).
nbdcopy_once() {
  local s i=0 size f mk cmds=()
  n=$RANDOM$RANDOM
  f="$vmdir\\nbd-$n"
  mk=$(uri "ferry-restore:1:mkdir:$f")
  for l in $lives; do
    i=$((i + 1)); size=$(stat -c %s "$l")
    cmds+=("$l" "$(uri "ferry-restore:1:create:vhdx:$size:$f\\d$i.vhdx")" \
      "$(uri "ferry-restore:1:commit:$f\\d$i.vhdx")")
  done
  s=$(now)  # URIs are made before the clock starts
  nbdcopy --connections=1 "$mk" null:
  for ((i = 0; i < ${#cmds[@]}; i += 3)); do
    nbdcopy "${cmds[i]}" "${cmds[i + 1]}"
    nbdcopy --connections=1 "${cmds[i + 2]}" null:
  done
  python3 -c "print($(now) - $s)"
}
best() { local b=999999 x; "$1" >/dev/null; for _ in $(seq "$ROUNDS"); do x=$("$1"); b=$(python3 -c "print(min($b, $x))"); done; echo "$b"; }
nbd_s=$(best nbdcopy_once)
ferry_s=$(best restore_once)
python3 - "$nbd_s" "$ferry_s" "$DISK_MIB" "$PROFILE" <<'PY'
import sys
n, f, mib, prof = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
total = 2 * mib
print("| writer (same agent, 2 disks → VHDX on the host) | seconds | MiB/s virtual | ratio vs nbdcopy |")
print("|---|---|---|---|")
print(f"| nbdcopy raw → create exports + commit | {n:.2f} | {total / n:.0f} | 1.00 |")
print(f"| ferry restore --to-source (repository, WinRM, agent) | {f:.2f} | {total / f:.0f} | {n / f:.2f} |")
print(f"({total} MiB virtual, a quarter of each MiB allocated, profile {prof}, best of rounds, warm page cache)")
PY
