#!/bin/sh
# Xen driver transports against the XenAPI simulator, beside qemu-img reading the same VHDs.
# Usage: tests/bench/xen.sh [DISK_MIB]   (default 256: the VM has disks of N and N/2 MiB)
set -eu
cd "$(dirname "$0")/../.."
export PATH="$PWD/.peers/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/bench}"
cargo build --release -q -p ferry-hv-xen --example xen_bench
"$CARGO_TARGET_DIR/release/examples/xen_bench" "${1:-256}"
