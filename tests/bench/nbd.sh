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
REQ=${REQ:-262144}

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

# Each prints "MB/s CPU-s": best wall-clock throughput (10^6 bytes/s) and the least client CPU time
# (user+sys) over RUNS runs. On a shared box, CPU seconds per GiB is the steadier efficiency figure.
measure() { # label, command...
    local best=0 cpu=1e9 out wall c
    for _ in $(seq "$RUNS"); do
        /usr/bin/time -f "%e %U %S" -o "$work/time" "$@" > /dev/null
        read -r wall u s < "$work/time"
        c=$(python3 -c "print($u+$s)")
        best=$(python3 -c "print(max($best, round($BYTES/max($wall,0.01)/1e6,1)))")
        cpu=$(python3 -c "print(min($cpu, $c))")
    done
    echo "$best $cpu"
}
ferry() { BYTES=${4:-$((SIZE_MB * 1048576))} measure "$BIN" "$1" "${2:-$CONNS}" "${3:-$INFLIGHT}" "$REQ" "${4:-}"; }
nbdcopy_run() { BYTES=$((SIZE_MB * 1048576)) measure nbdcopy "$1" null:; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
per_gib() { python3 -c "print(f'{$1/($SIZE_MB/1024):.2f}')"; }

q_uri="nbd://127.0.0.1:$P_QEMU/disk"
k_uri="nbd://127.0.0.1:$P_KIT/disk"
d_uri="nbd://127.0.0.1:$P_DELAY/disk"

row() { # label, "ferry MB/s CPU", "ref MB/s CPU"
    set -- "$1" $2 $3
    printf '| %-44s | %10s | %10s | %6s | %9s | %9s |\n' "$1" "$2" "$4" "$(ratio "$2" "$4")" "$(per_gib "$3")" "$(per_gib "$5")"
}

r_q=$(ferry "$q_uri"); r_qn=$(nbdcopy_run "$q_uri")
r_q1=$(ferry "$q_uri" 1)
r_k=$(ferry "$k_uri"); r_kn=$(nbdcopy_run "$k_uri")
r_d=$(ferry "$d_uri"); r_dn=$(nbdcopy_run "$d_uri")
# Without pipelining: one 256 KiB request per 10 ms round trip (first 64 MiB only).
r_d1=$(RUNS=1 ferry "$d_uri" 1 1 67108864)

echo
echo "NBD read, ${SIZE_MB} MiB dense, TCP loopback, best of $RUNS; ferry: $CONNS conns x $INFLIGHT in flight x $REQ B; nbdcopy: defaults"
printf '| %-44s | %10s | %10s | %6s | %9s | %9s |\n' "workload (reference)" "ferry MB/s" "ref MB/s" "ratio" "ferry CPU" "ref CPU"
printf '| %-44s | %10s | %10s | %6s | %9s | %9s |\n' "" "" "" "" "s/GiB" "s/GiB"
printf '|%s|%s|%s|%s|%s|%s|\n' "----------------------------------------------" "-----------:" "-----------:" "-------:" "----------:" "----------:"
row "qemu-nbd (nbdcopy)" "$r_q" "$r_qn"
row "qemu-nbd, ferry 1 connection (nbdcopy)" "$r_q1" "$r_qn"
row "nbdkit file (nbdcopy)" "$r_k" "$r_kn"
row "nbdkit file + delay 10ms (nbdcopy)" "$r_d" "$r_dn"
row "delay 10ms kept (ferry without delay)" "$r_d" "$r_k"
printf '| %-44s | %10s | %10s | %6s | %9s | %9s |\n' "delay 10ms, 1 conn x 1 in flight (ferry)" "$(echo $r_d1 | cut -d' ' -f1)" "$(echo $r_k | cut -d' ' -f1)" "$(ratio "$(echo $r_d1 | cut -d' ' -f1)" "$(echo $r_k | cut -d' ' -f1)")" "" ""
echo "# load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
