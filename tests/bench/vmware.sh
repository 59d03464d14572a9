#!/bin/sh
# vSphere driver: inventory of N VMs from vcsim and per-disk QueryChangedDiskAreas time against
# `ferry sim vmware`, each beside pyvmomi doing the same calls in the same run.
# Usage: tests/bench/vmware.sh [VMS] [DISK_MIB]   (default 1000 VMs, a 1024 MiB disk)
set -eu
cd "$(dirname "$0")/../.."
export FERRY_PEERS_DIR="${FERRY_PEERS_DIR:-$PWD/.peers}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/bench}"
cargo build --release -q -p ferry-hv-vmware --example vmware_bench
"$CARGO_TARGET_DIR/release/examples/vmware_bench" "${1:-1000}" "${2:-1024}"
