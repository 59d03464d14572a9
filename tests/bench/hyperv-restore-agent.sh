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
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/bench}
echo "building ($PROFILE)..." >&2
cargo build -q --profile "$PROFILE" -p ferry-cli -p ferry-agent
out=$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")
FERRY=$CARGO_TARGET_DIR/$out/ferry
AGENT=$CARGO_TARGET_DIR/$out/ferry-agent

rm -rf "$DIR"
mkdir -p "$DIR/tls"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT

# A CA, the agent's certificate and nbdcopy's client certificate, as libnbd reads them.
t=$DIR/tls
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$t/ca-key.pem" -out "$t/ca-cert.pem" 2>/dev/null
leaf() { # name cn usage
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$t/$1-key.pem" -out "$t/$1.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=%s\n' "$3" >"$t/$1.ext"
  openssl x509 -req -in "$t/$1.csr" -CA "$t/ca-cert.pem" -CAkey "$t/ca-key.pem" -CAcreateserial \
    -days 2 -extfile "$t/$1.ext" -out "$t/$1-cert.pem" 2>/dev/null
}
leaf server localhost serverAuth
leaf client bench-client clientAuth

# The simulated host (its own in-process agent is not used here: libnbd cannot pin).
"$FERRY" sim hyperv --listen 127.0.0.1:0 --disk-mib "$DISK_MIB" --dir "$DIR/host" >"$DIR/sim.json" &
pids+=($!)
for _ in $(seq 600); do [[ -s $DIR/sim.json ]] && break; sleep 0.1; done
j() { python3 -c "import json,sys; d=json.load(open('$DIR/sim.json')); print($1)"; }
printf '%s' "$(j 'd["password"]')" >"$DIR/hv.pw"

cat >"$DIR/ferry.toml" <<EOF
[sources.lab]
kind = "hyperv"
url = "$(j 'd["url"]')"
username = "$(j 'd["username"]')"
password-file = "$DIR/hv.pw"
tls-fingerprint = "$(j 'd["tls_fingerprint"]')"
state-dir = "$DIR/state"
proxy = "none"
transports = ["network"]
[sources.lab.agent]
port = 1
fingerprint = "$(openssl x509 -in "$t/server-cert.pem" -noout -fingerprint -sha256 | sed 's/.*=/sha256:/')"
[sources.lab.agent.nodes]
'$(j 'd["host"]')' = "agent-not-started-yet"
EOF
export FERRY_CONFIG=$DIR/ferry.toml FERRY_REPO=$DIR/repo FERRY_PASSWORD=bench
appliance_pin=$("$FERRY" source agent-pin lab 2>/dev/null)
client_pin=$(openssl x509 -in "$t/client-cert.pem" -noout -fingerprint -sha256 | sed 's/.*=/sha256:/')

# One agent for both writers, over the simulator's volumes (also its restore root).
"$AGENT" --listen 127.0.0.1:0 --root "$DIR/host/volumes" --restore-root "$DIR/host/volumes" --map "C:\\=$DIR/host/volumes/C" \
  --cert "$t/server-cert.pem" --key "$t/server-key.pem" \
  --client-pin "$appliance_pin" --client-pin "$client_pin" >"$DIR/agent.json" 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do [[ -s $DIR/agent.json ]] && break; sleep 0.1; done
port=$(python3 -c "import json; print(json.load(open('$DIR/agent.json'))['listen'].rsplit(':',1)[1])")
sed -i "s/agent-not-started-yet/127.0.0.1:$port/" "$DIR/ferry.toml"
"$FERRY" repo init -q >/dev/null

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
  local s i=0 size f; n=$RANDOM$RANDOM; s=$(now)
  f="$vmdir\\nbd-$n"
  nbdcopy --connections=1 "$(uri "ferry-restore:1:mkdir:$f")" null:
  for l in $lives; do
    i=$((i + 1)); size=$(stat -c %s "$l")
    nbdcopy "$l" "$(uri "ferry-restore:1:create:vhdx:$size:$f\\d$i.vhdx")"
    nbdcopy --connections=1 "$(uri "ferry-restore:1:commit:$f\\d$i.vhdx")" null:
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
