#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ with small images made by qemu-img (nothing binary is committed).
# Usage: crates/ferry-image/fuzz/seed-corpus.sh   then   RUSTC_BOOTSTRAP=1 cargo fuzz run vhdx
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mk() { # target name format options size
  local target=$1 name=$2 fmt=$3 opts=$4 size=$5
  mkdir -p "corpus/$target"
  qemu-img create -q -f "$fmt" ${opts:+-o "$opts"} "$tmp/$name" "$size"
  qemu-io -f "$fmt" -c "write -P 0x11 0 4096" -c "write -P 0x22 70000 5000" -c "write -z 8192 4096" "$tmp/$name" >/dev/null
  cp "$tmp/$name" "corpus/$target/$name"
  mkdir -p corpus/detect && cp "$tmp/$name" "corpus/detect/$name"
}
mk vhd dyn.vhd vpc subformat=dynamic 1M
mk vhd fixed.vhd vpc subformat=fixed 256K
mk vhd force.vhd vpc subformat=dynamic,force_size=on 1M
mk vhdx small.vhdx vhdx block_size=1M 2M
mk vmdk sparse.vmdk vmdk subformat=monolithicSparse 1M
qemu-img create -q -f raw "$tmp/src.raw" 1M
qemu-io -f raw -c "write -P 0x33 0 65536" "$tmp/src.raw" >/dev/null
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$tmp/src.raw" corpus/vmdk/stream.vmdk
mkdir -p corpus/vmdk_descriptor
qemu-img create -q -f vmdk -o subformat=monolithicFlat "$tmp/flat.vmdk" 1M
cp "$tmp/flat.vmdk" corpus/vmdk_descriptor/flat.vmdk
qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse "$tmp/two.vmdk" 3G
cp "$tmp/two.vmdk" corpus/vmdk_descriptor/two.vmdk
echo "corpus seeded under $(pwd)/corpus" >&2
