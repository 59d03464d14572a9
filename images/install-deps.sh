#!/usr/bin/env bash
# Installs what images/build.sh and tests/appliance-boot.sh need on the build host (Debian),
# idempotently; fast when everything is present. Fails loudly.
#   debootstrap        the minimal Debian root file system
#   e2fsprogs, fdisk   mke2fs -d (an ext4 file system from a directory, no loop device), sfdisk
#   mtools, syslinux   the FAT EFI system partition without mounting it, the BIOS boot loader
#   qemu-utils         qemu-img: the qcow2 and the cross-checks (tests/peers/install.sh pins QEMU 10)
#   ovmf               UEFI firmware for booting the image under qemu (tests/appliance-boot.sh --uefi)
#   qemu-system-x86    the boot test
#   libxml2-utils      xmllint: the OVF descriptor against the DMTF schema (images/ovf-schema)
set -euo pipefail
die() { printf 'install-deps.sh: ERROR: %s\n' "$*" >&2; exit 1; }
pkgs=(debootstrap e2fsprogs fdisk mtools syslinux syslinux-common qemu-utils ovmf qemu-system-x86 curl python3 libxml2-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  printf 'install-deps.sh: installing %s\n' "${missing[*]}" >&2
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
for b in debootstrap mke2fs e2fsck sfdisk mformat mcopy syslinux qemu-img qemu-system-x86_64 curl python3 xmllint; do
  command -v "$b" >/dev/null || die "$b missing after installing ${pkgs[*]}"
done
[ -f /usr/lib/SYSLINUX/gptmbr.bin ] || die "/usr/lib/SYSLINUX/gptmbr.bin missing (Debian syslinux-common)"
[ -f /usr/share/OVMF/OVMF_CODE.fd ] || [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || die "OVMF firmware missing (Debian ovmf)"
