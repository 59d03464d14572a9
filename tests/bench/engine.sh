#!/usr/bin/env bash
# Backup engine benchmark (issue 6): W16 workloads through `ferry backup/restore`, each line
# beside a reference in the same run (restic and borg from Debian backing up the same file;
# nbdcopy / qemu-img convert as plain-copy references). Prints one table.
#
#   tests/bench/engine.sh            # everything (needs ~15 GiB free under $BENCH_DIR)
#   ONLY="w16-file holes" tests/bench/engine.sh
#
# Workloads come from tests/bench/gen-workload.py (seeded, deterministic) and are cached in
# $BENCH_DIR (default target/bench-engine). restic/borg are installed with apt if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BENCH_DIR=${BENCH_DIR:-$ROOT/target/bench-engine}
ONLY=${ONLY:-"w16-file w16-nbd holes incr-cbt incr-nocbt restore latency random huge s3 azure"}
mkdir -p "$BENCH_DIR"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/h-engine}
cargo build --release -q -p ferry-cli
FERRY=$CARGO_TARGET_DIR/release/ferry

if ! command -v restic >/dev/null || ! command -v borg >/dev/null || ! command -v lz4 >/dev/null || ! command -v zstd >/dev/null; then
    SUDO=$(command -v sudo >/dev/null && [ "$(id -u)" != 0 ] && echo sudo || true)
    $SUDO apt-get install -y -qq restic borgbackup lz4 zstd >/dev/null
fi

gen() { # kind file
    [ -f "$BENCH_DIR/$2" ] || { echo "generating $2 ..." >&2; python3 tests/bench/gen-workload.py "$1" "$BENCH_DIR/$2.tmp"; mv "$BENCH_DIR/$2.tmp" "$BENCH_DIR/$2"; }
}
want() { [[ " $ONLY " == *" $1 "* ]]; }

export FERRY_PASSWORD=bench-password RESTIC_PASSWORD=bench-password BORG_PASSPHRASE=bench-password
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
TIMEF="%e %U %S %M"
ROWS=()
# measure NAME CMD... : runs CMD under GNU time; sets WALL CPU RSS_MIB
measure() {
    local name=$1; shift
    sync
    /usr/bin/time -f "$TIMEF" -o "$BENCH_DIR/time.out" "$@" >"$BENCH_DIR/$name.stdout" 2>"$BENCH_DIR/$name.stderr" || {
        echo "FAILED: $name: $*" >&2; cat "$BENCH_DIR/$name.stderr" >&2; exit 1; }
    read -r WALL U S RSS < "$BENCH_DIR/time.out"
    CPU=$(echo "$U + $S" | bc)
    RSS_MIB=$((RSS / 1024))
}
row() { ROWS+=("$(printf '%-34s %8s %8s %8s %9s  %s' "$@")"); }
# Repositories (thousands of files) are removed only when the script ends: on this machine's
# journal-less ext4, creating files within ~30 s of deleting thousands of others costs a scan per
# create (`recently_deleted`), which would bill one benchmark line for the previous one's cleanup.
TRASH=$BENCH_DIR/trash
mkdir -p "$TRASH"
trap 'rm -rf "$TRASH"' EXIT
discard() { for p in "$@"; do [ -e "$p" ] && mv "$p" "$TRASH/$(basename "$p").$RANDOM$RANDOM"; done; true; }
newrepo() { discard "$1"; "$FERRY" repo init --repo "$1" >/dev/null; }
# warm PATH... : start every timed run from the same memory state: flush and drop the page
# cache (as root; earlier lines' repositories would otherwise have to be reclaimed during the
# next run, billing it for up to 8 s of extra kernel time here), then read PATH's allocated
# data back in (tests/bench/warm.py says why).
warm() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    python3 tests/bench/warm.py "$@"
}
jget() { python3 -c "import json,sys; d=json.load(open('$1')); print($2)"; }

PORT=$((20000 + RANDOM % 20000))
QNBD_PID=
start_qemu_nbd() { # file fmt [bitmap]
    local extra=()
    [ -n "${3:-}" ] && extra=(-B "$3")
    qemu-nbd -r -t --shared=16 -f "$2" -x disk -p "$PORT" -b 127.0.0.1 "${extra[@]}" "$1" &
    QNBD_PID=$!
    for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$PORT/disk" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "qemu-nbd did not start" >&2; exit 1
}
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

if want w16-file || want w16-nbd || want incr-cbt || want incr-nocbt || want restore || want latency; then gen w16 w16-v2.raw; fi
W16=$BENCH_DIR/w16-v2.raw
DATA_GIB=4

if [ -f "$W16" ]; then
    # Calibration: what one core of this machine compresses of W16's content (CLI tools, 1 MiB
    # blocks): lz4 (the repository default, ADR 0055) and zstd -1 (the --compression zstd default).
    dd if="$W16" of="$BENCH_DIR/calib.bin" bs=1M count=64 status=none
    Z=$(lz4 -b1 -B1M "$BENCH_DIR/calib.bin" 2>&1 | tr '\r' '\n' | grep -o '([0-9.]*), *[0-9.]* MB/s' | tail -1)
    row "calibration: lz4 -1, 1 core" "" "" "" "" "W16 data in 1 MiB blocks: ratio $Z"
    Z=$(zstd -b --fast=1 -B1M "$BENCH_DIR/calib.bin" 2>&1 | tr '\r' '\n' | grep -o 'x[0-9.]*), *[0-9.]* MB/s' | tail -1)
    row "calibration: zstd --fast=1, 1 core" "" "" "" "" "W16 data in 1 MiB blocks: ratio $Z"
    rm -f "$BENCH_DIR/calib.bin"
    # Ferry's own CPU work on a 512 MiB sample spread over W16 (`ferry benchmark`): the floor
    # under each W16 line, since on 2 cores a backup cannot beat data / all-core pipeline rate.
    measure ferry-calib "$FERRY" benchmark --sample "$W16" --sample-size 512M --json
    C=$BENCH_DIR/ferry-calib.stdout
    BK1=$(jget "$C" "round([r for r in d['one_core'] if r['name'] == 'backup pipeline'][0]['bytes_per_sec']/1e6)")
    BKN=$(jget "$C" "round(d['backup_all_cores']/1e6)")
    RSN=$(jget "$C" "round(d['restore_all_cores']/1e6)")
    NCPU=$(jget "$C" "d['threads']")
    DATA_MB=$(echo "$DATA_GIB * 1073.741824" | bc)
    FLOOR=$(echo "scale=2; $DATA_MB / $BKN" | bc)
    RFLOOR=$(echo "scale=2; $DATA_MB / $RSN" | bc)
    row "calibration: ferry benchmark" "" "" "" "" "W16 sample: backup $BKN MB/s on $NCPU cores ($BK1 on 1), restore $RSN MB/s, ratio $(jget "$C" "round(d['compression_ratio'], 2)")"
    row "  CPU floor: W16 backup / restore" "${FLOOR}s" "" "" "" "4 GiB of data / all-core rate; restore ${RFLOOR}s"
fi

if want w16-file; then
    newrepo "$BENCH_DIR/repo-file"
    warm "$W16"
    measure ferry-w16-file "$FERRY" backup --repo "$BENCH_DIR/repo-file" --vm w16 --disk "$W16" --json
    F_WALL=$WALL; F_CPU=$CPU; F_RSS=$RSS_MIB
    discard "$BENCH_DIR/restic"; restic init -q -r "$BENCH_DIR/restic"
    warm "$W16"
    measure restic-w16 restic -q -r "$BENCH_DIR/restic" backup "$W16"
    R_WALL=$WALL
    discard "$BENCH_DIR/borg"; borg init -e repokey "$BENCH_DIR/borg"
    warm "$W16"
    measure borg-w16 borg create --sparse --compression lz4 "$BENCH_DIR/borg::w16" "$W16"
    B_WALL=$WALL
    row "W16 full, local file" "${F_WALL}s" "${F_CPU}s" "${F_RSS}M" "$(echo "scale=1; $R_WALL / $F_WALL" | bc)x" "restic ${R_WALL}s, borg ${B_WALL}s (ratio = restic/ferry time); CPU floor ${FLOOR}s"
    row "  CPU per GiB of non-zero data" "" "$(echo "scale=2; $F_CPU / $DATA_GIB" | bc)s" "" "" "user+sys / 4 GiB"
    discard "$BENCH_DIR/restic" "$BENCH_DIR/borg"
fi

if want w16-nbd || want incr-cbt; then
    newrepo "$BENCH_DIR/repo-nbd"
    start_qemu_nbd "$W16" raw
    warm "$W16"
    measure nbdcopy-w16 nbdcopy "nbd://127.0.0.1:$PORT/disk" null:
    C_WALL=$WALL
    warm "$W16"
    Q0=$(awk '{print $14 + $15}' "/proc/$QNBD_PID/stat")
    measure ferry-w16-nbd "$FERRY" backup --repo "$BENCH_DIR/repo-nbd" --vm w16 --disk "nbd://127.0.0.1:$PORT/disk" --json
    # qemu-nbd shares the 2 cores: its CPU time (clock ticks) joins Ferry's in the floor.
    Q_CPU=$(echo "scale=2; ($(awk '{print $14 + $15}' "/proc/$QNBD_PID/stat") - $Q0) / $(getconf CLK_TCK)" | bc)
    READ=$(jget "$BENCH_DIR/ferry-w16-nbd.stdout" "d['disks'][0]['read_bytes']>>20")
    stop_pid "$QNBD_PID"
    NFLOOR=$(echo "scale=2; ($DATA_MB / $BK1 + $Q_CPU) / $NCPU" | bc)
    row "W16 full, qemu-nbd loopback" "${WALL}s" "${CPU}s" "${RSS_MIB}M" "$(echo "scale=2; $C_WALL / $WALL" | bc)x" "nbdcopy to null: ${C_WALL}s; read ${READ} MiB (allocated 5120 MiB); qemu-nbd CPU ${Q_CPU}s; CPU floor ${NFLOOR}s"
fi

if want holes; then
    gen holes holes.raw
    newrepo "$BENCH_DIR/repo-holes"
    measure ferry-holes "$FERRY" backup --repo "$BENCH_DIR/repo-holes" --vm holes --disk "$BENCH_DIR/holes.raw"
    row "all-hole 16 GiB, local file" "${WALL}s" "${CPU}s" "${RSS_MIB}M" "" "target <= 0.5 s"
fi

if want incr-cbt; then
    # A qcow2 overlay over W16 (same content as the full above) with a dirty bitmap, then 1 %
    # of the disk rewritten in clustered runs.
    OV=$BENCH_DIR/w16-overlay.qcow2
    rm -f "$OV"
    qemu-img create -q -f qcow2 -b "$W16" -F raw "$OV"
    qemu-img bitmap --add -f qcow2 "$OV" b0
    mapfile -t CMDS < <(python3 tests/bench/gen-workload.py dirty)
    ARGS=(); for c in "${CMDS[@]}"; do ARGS+=(-c "$c"); done
    qemu-io -f qcow2 "${ARGS[@]}" "$OV" >/dev/null
    start_qemu_nbd "$OV" qcow2 b0
    warm "$W16" "$OV"
    measure ferry-incr-cbt "$FERRY" backup --repo "$BENCH_DIR/repo-nbd" --vm w16 --disk "nbd://127.0.0.1:$PORT/disk" --bitmap b0 --json
    stop_pid "$QNBD_PID"
    READ=$(jget "$BENCH_DIR/ferry-incr-cbt.stdout" "d['disks'][0]['read_bytes']>>20")
    MODE=$(jget "$BENCH_DIR/ferry-incr-cbt.stdout" "d['disks'][0]['mode']")
    row "incremental, dirty bitmap, 1 %" "${WALL}s" "${CPU}s" "${RSS_MIB}M" "" "$MODE; read ${READ} MiB (164 MiB changed in 41 x 4 MiB + 1 % sample)"
fi

if want incr-nocbt; then
    [ -d "$BENCH_DIR/repo-file" ] || { newrepo "$BENCH_DIR/repo-file"; "$FERRY" backup --repo "$BENCH_DIR/repo-file" --vm w16 --disk "$W16" >/dev/null; }
    warm "$W16"
    measure ferry-incr-nocbt "$FERRY" backup --repo "$BENCH_DIR/repo-file" --vm w16 --disk "$W16" --json
    UP=$(jget "$BENCH_DIR/ferry-incr-nocbt.stdout" "d['disks'][0]['uploaded_bytes']")
    row "incremental, no CBT, unchanged" "${WALL}s" "${CPU}s" "${RSS_MIB}M" "" "chunk bytes uploaded: $UP"
fi

if want restore; then
    [ -d "$BENCH_DIR/repo-file" ] || { newrepo "$BENCH_DIR/repo-file"; "$FERRY" backup --repo "$BENCH_DIR/repo-file" --vm w16 --disk "$W16" >/dev/null; }
    rm -f "$BENCH_DIR/restored.raw" "$BENCH_DIR/copied.raw"
    warm "$W16"
    measure qemu-img-convert qemu-img convert -f raw -O raw "$W16" "$BENCH_DIR/copied.raw"
    Q_WALL=$WALL
    warm "$BENCH_DIR/repo-file"
    measure ferry-restore "$FERRY" restore --repo "$BENCH_DIR/repo-file" w16@latest --to "$BENCH_DIR/restored.raw"
    ALLOC=$(( $(stat -c %b "$BENCH_DIR/restored.raw") * 512 >> 20 ))
    cmp -s "$W16" "$BENCH_DIR/restored.raw" && SAME=identical || SAME=DIFFERENT
    row "restore W16 to sparse raw" "${WALL}s" "${CPU}s" "${RSS_MIB}M" "$(echo "scale=2; $Q_WALL / $WALL" | bc)x" "qemu-img convert ${Q_WALL}s; output allocated ${ALLOC} MiB (non-zero 4096 MiB); $SAME; CPU floor ${RFLOOR}s"
    rm -f "$BENCH_DIR/restored.raw" "$BENCH_DIR/copied.raw"
fi

if want latency; then
    for delay in 0 10ms; do
        newrepo "$BENCH_DIR/repo-lat"
        if [ "$delay" = 0 ]; then
            nbdkit -f -r -i 127.0.0.1 -p "$PORT" file "$W16" & KPID=$!
        else
            nbdkit -f -r -i 127.0.0.1 -p "$PORT" --filter=delay file "$W16" rdelay=$delay & KPID=$!
        fi
        for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$PORT" >/dev/null 2>&1 && break; sleep 0.1; done
        warm "$W16"
        measure "ferry-lat-$delay" "$FERRY" backup --repo "$BENCH_DIR/repo-lat" --vm lat --disk "nbd://127.0.0.1:$PORT/" --in-flight 16
        stop_pid "$KPID"
        [ "$delay" = 0 ] && L0=$WALL || L10=$WALL
    done
    row "W16 via nbdkit, +10 ms latency" "${L10}s" "" "" "$(echo "scale=2; $L0 / $L10" | bc)x" "no latency ${L0}s (ratio = throughput kept, target >= 0.8)"
    discard "$BENCH_DIR/repo-lat"
fi

if want random; then
    gen random random.raw
    newrepo "$BENCH_DIR/repo-rnd"
    warm "$BENCH_DIR/random.raw"
    measure ferry-random "$FERRY" backup --repo "$BENCH_DIR/repo-rnd" --vm rnd --disk "$BENCH_DIR/random.raw"
    F=$WALL; FC=$CPU; FR=$RSS_MIB
    discard "$BENCH_DIR/restic"; restic init -q -r "$BENCH_DIR/restic"
    warm "$BENCH_DIR/random.raw"
    measure restic-random restic -q -r "$BENCH_DIR/restic" backup "$BENCH_DIR/random.raw"
    row "4 GiB incompressible, local file" "${F}s" "${FC}s" "${FR}M" "$(echo "scale=1; $WALL / $F" | bc)x" "restic ${WALL}s; CPU/GiB $(echo "scale=2; $FC / 4" | bc)s"
    discard "$BENCH_DIR/restic" "$BENCH_DIR/repo-rnd"
fi

if want huge; then
    gen huge huge-v2.raw
    newrepo "$BENCH_DIR/repo-huge"
    warm "$BENCH_DIR/huge-v2.raw"
    measure ferry-huge "$FERRY" backup --repo "$BENCH_DIR/repo-huge" --vm huge --disk "$BENCH_DIR/huge-v2.raw"
    row "2 TiB sparse, 1 GiB data" "${WALL}s" "${CPU}s" "${RSS_MIB}M" "" "peak RSS target <= 256 MiB"
    discard "$BENCH_DIR/repo-huge"
fi

if want s3 || want azure; then
    # Object stores (no target in the issue; moto and Azurite are single-process emulators on
    # the same 2 cores, so this measures them as much as us): the first 4 GiB of W16 (1 GiB of
    # data, 256 MiB of written zeros).
    [ -f "$BENCH_DIR/w4-v2.raw" ] || { gen w16 w16-v2.raw; dd if="$BENCH_DIR/w16-v2.raw" of="$BENCH_DIR/w4-v2.raw.tmp" bs=1M count=4096 conv=sparse status=none; mv "$BENCH_DIR/w4-v2.raw.tmp" "$BENCH_DIR/w4-v2.raw"; }
    W4=$BENCH_DIR/w4-v2.raw
    OBJ_PORT=$((PORT + 1))
    # storage_row REPO: the store's own ceiling for W16-sized objects, 8 requests in flight
    # (`ferry benchmark --repo`), to read the backup line against.
    storage_row() {
        measure ferry-store "$FERRY" benchmark --repo "$1" --sample "$W4" --sample-size 256M --seconds 3 --json
        row "  storage alone (ferry benchmark)" "" "" "" "" "upload $(jget "$BENCH_DIR/ferry-store.stdout" "round(d['storage']['upload_bytes_per_sec']/2**20)") MiB/s, download $(jget "$BENCH_DIR/ferry-store.stdout" "round(d['storage']['download_bytes_per_sec']/2**20)") MiB/s of objects"
    }
fi
if want s3; then
    .peers/venv/bin/moto_server -H 127.0.0.1 -p "$OBJ_PORT" >"$BENCH_DIR/moto.log" 2>&1 & MOTO=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$OBJ_PORT/" && break; sleep 0.1; done
    curl -s -X PUT -o /dev/null "http://127.0.0.1:$OBJ_PORT/bench"
    export AWS_ENDPOINT_URL=http://127.0.0.1:$OBJ_PORT AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
    "$FERRY" repo init --repo s3://bench/repo >/dev/null
    warm "$W4"
    measure ferry-s3 "$FERRY" backup --repo s3://bench/repo --vm w4 --disk "$W4" --json
    UP=$(jget "$BENCH_DIR/ferry-s3.stdout" "d['disks'][0]['uploaded_bytes']>>20")
    row "1 GiB of W16 data to moto S3" "${WALL}s" "${CPU}s" "${RSS_MIB}M" "" "$(echo "scale=0; 1024 / $WALL" | bc) MiB/s of data; ${UP} MiB uploaded"
    storage_row s3://bench/repo
    stop_pid "$MOTO"
fi
if want azure; then
    rm -rf "$BENCH_DIR/azurite"
    .peers/node/node_modules/.bin/azurite-blob --blobHost 127.0.0.1 --blobPort "$OBJ_PORT" --location "$BENCH_DIR/azurite" --skipApiVersionCheck --loose --disableProductStyleUrl >"$BENCH_DIR/azurite.log" 2>&1 & AZ=$!
    AZ_KEY="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
    AZ_EP=http://127.0.0.1:$OBJ_PORT/devstoreaccount1
    for _ in $(seq 100); do curl -s -o /dev/null "$AZ_EP" && break; sleep 0.1; done
    .peers/venv/bin/python3 -c "import sys
from azure.storage.blob import BlobServiceClient
BlobServiceClient.from_connection_string(sys.argv[1]).create_container('bench')" "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=$AZ_KEY;BlobEndpoint=$AZ_EP;"
    export AZURE_STORAGE_ACCOUNT_NAME=devstoreaccount1 AZURE_STORAGE_ACCOUNT_KEY=$AZ_KEY AZURE_STORAGE_ENDPOINT=$AZ_EP AZURE_ALLOW_HTTP=true
    "$FERRY" repo init --repo az://bench/repo >/dev/null
    warm "$W4"
    measure ferry-azure "$FERRY" backup --repo az://bench/repo --vm w4 --disk "$W4" --json
    UP=$(jget "$BENCH_DIR/ferry-azure.stdout" "d['disks'][0]['uploaded_bytes']>>20")
    row "1 GiB of W16 data to Azurite" "${WALL}s" "${CPU}s" "${RSS_MIB}M" "" "$(echo "scale=0; 1024 / $WALL" | bc) MiB/s of data; ${UP} MiB uploaded"
    storage_row az://bench/repo
    stop_pid "$AZ"
    discard "$BENCH_DIR/azurite"
fi

echo
printf '%-34s %8s %8s %8s %9s  %s\n' workload wall cpu rss vs-ref notes
for r in "${ROWS[@]}"; do echo "$r"; done
