#!/usr/bin/env bash
# Builds the file-level restore and swap-exclusion test disks with Debian tools only: partition
# images made separately (mke2fs -d, mkntfs + ntfscp, mkswap) and placed into a GPT and an MBR
# disk with sfdisk scripts and dd conv=notrunc. No loop devices, no mounts, no root needed.
#
#   make-disks.sh OUTDIR [BIG_MIB]
#
# OUTDIR/src        the files put into both file systems (compare against these)
# OUTDIR/gpt.img    GPT: 1 ext4 (files, /etc/fstab, /swapfile), 2 Linux swap, 3 NTFS (files, pagefile.sys)
# OUTDIR/mbr.img    MBR: 1 NTFS, 2 extended holding 5 ext4
# OUTDIR/layout     partition offsets and sizes in bytes (name start size)
set -euo pipefail
out=$1
big=${2:-5}
mkdir -p "$out"
cd "$out"
rm -rf src root ./*.img layout
export PATH=$PATH:/usr/sbin:/sbin

# --- the files ---------------------------------------------------------------------------------
mkdir -p src/sub/deeper
head -c $((big << 20)) /dev/urandom > src/big.bin
printf 'hello from ferry\n' > src/hello.txt
head -c 70000 /dev/urandom > src/sub/deeper/nested.bin
printf 'short\n' > src/sub/note.txt
: > src/empty
# Sparse: a hole, 4 KiB of data at 2 MiB, a hole to 3 MiB.
truncate -s 3M src/sparse.bin
head -c 4096 /dev/urandom | dd of=src/sparse.bin bs=4096 seek=512 conv=notrunc status=none

# --- ext4: the files plus a root file system's swap file ------------------------------------------
mkdir root
cp -a src/. root/
mkdir -p root/etc
printf 'UUID=0000 / ext4 defaults 0 1\n/swapfile none swap sw 0 0\n' > root/etc/fstab
head -c $((8 << 20)) /dev/urandom > root/swapfile
chmod 600 root/swapfile
mkswap -q root/swapfile >/dev/null
mke2fs -q -F -t ext4 -L ferry-root -d root ext4.img 64M >/dev/null

# --- NTFS: the files (ntfscp cannot create directories: the subdirectory is $Extend) ------------
truncate -s 64M ntfs.img
mkntfs -q -F -Q -s 512 -p 2048 -H 16 -S 63 -L ferry-ntfs ntfs.img >/dev/null
for f in big.bin hello.txt empty sparse.bin; do ntfscp -q ntfs.img "src/$f" "$f"; done
ntfscp -q ntfs.img src/sub/deeper/nested.bin '$Extend/nested.bin'
head -c $((16 << 20)) /dev/urandom > pagefile.src
ntfscp -q ntfs.img pagefile.src pagefile.sys
rm pagefile.src

# --- swap partition: random data behind a swap header -------------------------------------------
head -c $((16 << 20)) /dev/urandom > swap.img
mkswap -q swap.img >/dev/null

# --- GPT disk ------------------------------------------------------------------------------------
# sectors: ext4 2048+131072, swap 133120+32768, NTFS 165888+131072; 34 sectors of backup GPT after.
truncate -s 150M gpt.img
sfdisk -q gpt.img <<'SF' >/dev/null
label: gpt
unit: sectors
start=2048, size=131072, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root
start=133120, size=32768, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=swap
start=165888, size=131072, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=data
SF
dd if=ext4.img of=gpt.img bs=512 seek=2048 conv=notrunc status=none
dd if=swap.img of=gpt.img bs=512 seek=133120 conv=notrunc status=none
dd if=ntfs.img of=gpt.img bs=512 seek=165888 conv=notrunc status=none

# --- MBR disk: NTFS primary, ext4 logical in an extended partition --------------------------------
truncate -s 140M mbr.img
sfdisk -q mbr.img <<'SF' >/dev/null
label: dos
unit: sectors
start=2048, size=131072, type=7
start=133120, size=151552, type=5
start=135168, size=131072, type=83
SF
dd if=ntfs.img of=mbr.img bs=512 seek=2048 conv=notrunc status=none
dd if=ext4.img of=mbr.img bs=512 seek=135168 conv=notrunc status=none

cat > layout <<'L'
gpt-ext4 1048576 67108864
gpt-swap 68157440 16777216
gpt-ntfs 84934656 67108864
mbr-ntfs 1048576 67108864
mbr-ext4 69206016 67108864
L
rm -f ext4.img ntfs.img swap.img
rm -rf root
