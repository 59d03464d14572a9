#!/usr/bin/env bash
# NBD client benchmark: ferry-nbd read throughput over TCP loopback against qemu-nbd and nbdkit,
# with `nbdcopy SRC null:` on the same export in the same run as the reference; and latency
# tolerance: nbdkit's delay filter (rdelay=10ms per read) against the same export without delay.
#
#   tests/bench/nbd.sh            # 1 GiB dense random image
#   SIZE_MB=4096 RUNS=5 tests/bench/nbd.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_MB=${SIZE_MB:-1024}
RUNS=${RUNS:-3}
CONNS=${CONNS:-4}
INFLIGHT=${INFLIGHT:-16}
REQ=${REQ:-2097152}

cargo build --quiet --release -p ferry-nbd --example nbd_read_bench
BIN=${CARGO_TARGET_DIR:-target}/release/examples/nbd_read_bench

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 200); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "server on port $1 did not start" >&2; exit 1
}

echo "# creating ${SIZE_MB} MiB of random data (page-cached)" >&2
head -c "${SIZE_MB}M" /dev/urandom > "$work/disk.raw"
cat "$work/disk.raw" > /dev/null

P_QEMU=$(free_port)
qemu-nbd --persistent --shared=0 --read-only -f raw -x disk --bind 127.0.0.1 --port "$P_QEMU" "$work/disk.raw" 2>"$work/qemu.log" &
pids+=($!)
P_KIT=$(free_port)
nbdkit --foreground --readonly --exportname=disk --ipaddr 127.0.0.1 --port "$P_KIT" file "$work/disk.raw" 2>"$work/kit.log" &
pids+=($!)
P_DELAY=$(free_port)
nbdkit --foreground --readonly --exportname=disk --ipaddr 127.0.0.1 --port "$P_DELAY" --filter=delay file "$work/disk.raw" rdelay=10ms 2>"$work/delay.log" &
pids+=($!)
wait_port "$P_QEMU"; wait_port "$P_KIT"; wait_port "$P_DELAY"

# Best of RUNS, in MB/s (10^6 bytes).
ferry() {
    local best=0 v
    for _ in $(seq "$RUNS"); do
        v=$("$BIN" "$1" "${2:-$CONNS}" "$INFLIGHT" "$REQ" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mb_per_s"])')
        best=$(python3 -c "print(max($best, $v))")
    done
    echo "$best"
}
nbdcopy_mbs() {
    local best=0 t0 t1 v
    for _ in $(seq "$RUNS"); do
        t0=$(date +%s.%N); nbdcopy "$1" null:; t1=$(date +%s.%N)
        v=$(python3 -c "print(round($SIZE_MB*1048576/($t1-$t0)/1e6,1))")
        best=$(python3 -c "print(max($best, $v))")
    done
    echo "$best"
}
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }

q_uri="nbd://127.0.0.1:$P_QEMU/disk"
k_uri="nbd://127.0.0.1:$P_KIT/disk"
d_uri="nbd://127.0.0.1:$P_DELAY/disk"

f_q=$(ferry "$q_uri"); n_q=$(nbdcopy_mbs "$q_uri")
f_q1=$(ferry "$q_uri" 1)
f_k=$(ferry "$k_uri"); n_k=$(nbdcopy_mbs "$k_uri")
f_d=$(ferry "$d_uri"); n_d=$(nbdcopy_mbs "$d_uri")

echo
echo "NBD read, ${SIZE_MB} MiB dense, TCP loopback, best of $RUNS; ferry: $CONNS conns x $INFLIGHT in flight x $REQ B; nbdcopy: defaults"
printf '| %-40s | %12s | %12s | %8s |\n' "workload" "ferry MB/s" "ref MB/s" "ratio"
printf '| %-40s | %12s | %12s | %8s |\n' "----------------------------------------" "----------" "----------" "------"
printf '| %-40s | %12s | %12s | %8s |\n' "qemu-nbd (ref: nbdcopy)" "$f_q" "$n_q" "$(ratio "$f_q" "$n_q")"
printf '| %-40s | %12s | %12s | %8s |\n' "qemu-nbd, 1 connection (ref: nbdcopy)" "$f_q1" "$n_q" "$(ratio "$f_q1" "$n_q")"
printf '| %-40s | %12s | %12s | %8s |\n' "nbdkit file (ref: nbdcopy)" "$f_k" "$n_k" "$(ratio "$f_k" "$n_k")"
printf '| %-40s | %12s | %12s | %8s |\n' "nbdkit file + delay 10ms (ref: nbdcopy)" "$f_d" "$n_d" "$(ratio "$f_d" "$n_d")"
printf '| %-40s | %12s | %12s | %8s |\n' "delay 10ms kept (ref: ferry, no delay)" "$f_d" "$f_k" "$(ratio "$f_d" "$f_k")"
