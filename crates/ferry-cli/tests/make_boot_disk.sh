#!/usr/bin/env bash
# Builds a tiny BIOS-bootable raw disk for the boot-verification test: syslinux's MBR, one FAT
# partition (made and filled with mtools, so no mount and no loop device) holding syslinux, a
# Debian kernel and a busybox initramfs whose /init prints a login-prompt-like heartbeat on
# ttyS0 and then sleeps. With MODULES (a directory of .ko files and an `order` file, from
# tests/peers/install.sh) the initramfs also loads the IDE disk driver and, once a second, writes
# `ferry-guest-write N` into sector 1024 of its own disk (unused: between the MBR and the
# partition) and prints `ferry-heartbeat N`: proof for instant recovery that the guest runs and
# writes.
# Usage: make_boot_disk.sh VMLINUZ OUT.raw [MODULES]
set -euo pipefail
vmlinuz=$1 out=$2 modules=${3:-}
for t in busybox cpio gzip mformat mcopy syslinux sfdisk; do
  command -v "$t" >/dev/null || { echo "make_boot_disk.sh: $t missing: run tests/peers/install.sh" >&2; exit 1; }
done
mbr=/usr/lib/syslinux/mbr/mbr.bin
[ -s "$mbr" ] || { echo "make_boot_disk.sh: $mbr missing (syslinux-common)" >&2; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin" "$work/root/dev" "$work/root/proc"
cp "$(command -v busybox)" "$work/root/bin/busybox"
if [ -n "$modules" ]; then
  mkdir -p "$work/root/lib/modules"
  cp "$modules"/order "$modules"/*.ko "$work/root/lib/modules/"
fi
ln -s busybox "$work/root/bin/sh"
cat > "$work/root/init" <<'INIT'
#!/bin/sh
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "ferry boot test: init started" > /dev/ttyS0
if [ -f /lib/modules/order ]; then
  for m in $(/bin/busybox cat /lib/modules/order); do
    /bin/busybox insmod "/lib/modules/$m" 2>/dev/ttyS0
  done
  i=0
  while [ ! -b /dev/sda ] && [ $i -lt 30 ]; do /bin/busybox sleep 1; i=$((i + 1)); done
fi
printf '\nferry-boot login: ' > /dev/ttyS0
if [ -b /dev/sda ]; then
  n=0
  while true; do
    n=$((n + 1))
    printf 'ferry-guest-write %08d\n' $n \
      | /bin/busybox dd of=/dev/sda bs=512 seek=1024 conv=notrunc,sync,fsync 2>/dev/null
    echo "ferry-heartbeat $n" > /dev/ttyS0
    /bin/busybox sleep 1
  done
fi
exec /bin/busybox sleep 3600
INIT
chmod 755 "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) | gzip -1 > "$work/initrd.img"
part_mib=20
mformat -i "$work/fat.img" -C -T $((part_mib * 2048)) -h 64 -s 32 -v FERRYBOOT ::
cat > "$work/syslinux.cfg" <<CFG
DEFAULT linux
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.img console=ttyS0,115200 quiet panic=-1
CFG
mcopy -i "$work/fat.img" "$vmlinuz" ::vmlinuz
mcopy -i "$work/fat.img" "$work/initrd.img" ::initrd.img
mcopy -i "$work/fat.img" "$work/syslinux.cfg" ::syslinux.cfg
syslinux --install "$work/fat.img"
# 1 MiB for the MBR, then the active partition that syslinux's MBR boots.
truncate -s $(( (part_mib + 1) * 1024 * 1024 )) "$work/disk.raw"
printf 'label: dos\nstart=2048, size=%d, type=c, bootable\n' $((part_mib * 2048)) | sfdisk -q "$work/disk.raw"
dd if="$mbr" of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/fat.img" of="$work/disk.raw" bs=1M seek=1 conv=notrunc status=none
mv "$work/disk.raw" "$out"
