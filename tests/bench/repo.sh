#!/usr/bin/env bash
# Repository benchmark: chunk encode/decode throughput per core (BLAKE3-keyed + zstd-1 +
# AES-256-GCM), end-to-end backup into a local repository at 1/2/4 MiB chunks, the chunk-size
# trade-off, and beside them, in the same run, the reference tools on the same data: `zstd -1`
# (compression alone) and `openssl speed` AES-256-GCM.
#
#   tests/bench/repo.sh [MIB_PER_CASE]     (default 256)
set -euo pipefail
cd "$(dirname "$0")/../.."
MIB="${1:-256}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/bench}"
cargo build -q --release -p ferry-repo --example repo_bench
BIN="$CARGO_TARGET_DIR/release/examples/repo_bench"
WORK="$(mktemp -d /tmp/ferry-repo-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

echo "== ferry-repo ($MIB MiB per case, one core unless noted)"
"$BIN" "$MIB" "$WORK/repos" | tee "$WORK/ferry.txt"

echo
echo "== references on this box, same run"
"$BIN" dump "$WORK/sample.bin" "$MIB"   # the same generator as the compressible case
start=$(date +%s.%N); zstd -q -1 -T1 -c "$WORK/sample.bin" > "$WORK/sample.zst"; end=$(date +%s.%N)
zmbps=$(python3 -c "print(round($MIB*1048576/($end-$start)/1e6))")
ratio=$(python3 -c "import os;print(round(os.path.getsize('$WORK/sample.bin')/os.path.getsize('$WORK/sample.zst'),2))")
echo "zstd -1 -T1 CLI compress: $zmbps MB/s (ratio $ratio)"
aes=$(openssl speed -seconds 2 -bytes 1048576 -evp aes-256-gcm 2>/dev/null | awk 'tolower($1) == "aes-256-gcm" {print $2}' | sed 's/k$//')
aes_mbps=$(python3 -c "print(round(float('$aes')*1000/1e6))")
echo "openssl AES-256-GCM 1 MiB: $aes_mbps MB/s"

echo
echo "== ratios (ferry encode of compressible 4 MiB chunks = hash + compress + encrypt, vs zstd -1 alone)"
enc=$(awk '/codec  compressible/ && / 4 MiB/ {print $6}' "$WORK/ferry.txt")
python3 -c "print(f'ferry encode / zstd-1 CLI = {float($enc)/$zmbps:.2f}')"
python3 -c "print(f'ferry encode / openssl AES-256-GCM alone = {float($enc)/$aes_mbps:.2f}')"
