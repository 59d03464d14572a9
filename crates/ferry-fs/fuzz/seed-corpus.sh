#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ with small disks made by sfdisk, mke2fs and mkswap (nothing binary
# is committed). Usage: crates/ferry-fs/fuzz/seed-corpus.sh   then   RUSTC_BOOTSTRAP=1 cargo fuzz run partitions
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export PATH=$PATH:/usr/sbin:/sbin
mkdir -p corpus/partitions corpus/ext4map corpus/ntfs_layout
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
truncate -s 1M "$tmp/gpt.img"
printf 'label: gpt\nstart=34, size=100, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\nstart=200, size=1000\n' | sfdisk -q "$tmp/gpt.img" >/dev/null
head -c 65536 "$tmp/gpt.img" > corpus/partitions/gpt.img
truncate -s 1M "$tmp/mbr.img"
printf 'label: dos\nstart=1, size=100, type=82\nstart=200, size=1500, type=5\nstart=300, size=100, type=83\nstart=500, size=100, type=7\n' | sfdisk -q "$tmp/mbr.img" >/dev/null
cp "$tmp/mbr.img" corpus/partitions/mbr.img
mkdir -p "$tmp/root/etc" "$tmp/root/d"
printf '/swapfile none swap sw 0 0\n' > "$tmp/root/etc/fstab"
head -c 65536 /dev/urandom > "$tmp/root/swapfile" && mkswap -q "$tmp/root/swapfile" >/dev/null
mke2fs -q -F -t ext4 -N 32 -d "$tmp/root" "$tmp/ext4.img" 512K >/dev/null
cp "$tmp/ext4.img" corpus/ext4map/ext4.img
truncate -s 2M "$tmp/ntfs.img" && mkntfs -F -Q -q "$tmp/ntfs.img" >/dev/null 2>&1
head -c 200000 /dev/urandom > "$tmp/base.vhdx" && ntfscp -q "$tmp/ntfs.img" "$tmp/base.vhdx" /base.vhdx
cp "$tmp/ntfs.img" corpus/ntfs_layout/ntfs.img
echo "corpus seeded under $(pwd)/corpus" >&2
