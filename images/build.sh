#!/usr/bin/env bash
# Builds the Ferry appliance images from one Debian root file system:
#
#   ferry-appliance-VERSION.qcow2   KVM / Proxmox / OpenStack        (qemu-img)
#   ferry-appliance-VERSION.ova     vSphere: OVF + streamOptimized VMDK (ferry image convert)
#   ferry-appliance-VERSION.vhdx    Hyper-V (generation 1 or 2)      (ferry image convert)
#   ferry-appliance-VERSION.vhd     XCP-ng / Citrix Hypervisor        (ferry image convert)
#   SHA256SUMS
#
# Usage:
#   images/build.sh [--out DIR]                  the whole build (root; network for the first debootstrap)
#   images/build.sh --check-reproducible         builds twice from the same inputs, compares the hashes
#   images/build.sh --package DISK.raw --out DIR only the packaging (formats, OVA, checks) of a raw disk
#
# Environment: FERRY_BIN (default target/release/ferry), SOURCE_DATE_EPOCH (default: the commit time
# of HEAD), FERRY_IMAGE_CACHE (downloaded packages; default images/.cache), FERRY_IMAGE_SIZE (virtual
# disk, default 8G), DEBIAN_MIRROR, FERRY_IMAGE_KEEP_WORK=1 (keep the work directory). See docs/appliance.md and ADRs 0120-0125.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
say() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: ERROR: %s\n' "$*" >&2; exit 1; }

mode=build out="" raw_in=""
while (($#)); do
  case $1 in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --package) mode=package; raw_in=${2:?--package needs a raw disk}; shift 2 ;;
    --check-reproducible) mode=reproducible; shift ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)
[ -n "$version" ] || die "no version in $root/Cargo.toml"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct 2>/dev/null || true)
  [ -n "$SOURCE_DATE_EPOCH" ] || die "SOURCE_DATE_EPOCH is not set and $root is not a git checkout"
fi
export SOURCE_DATE_EPOCH
export TZ=UTC LC_ALL=C.UTF-8
umask 022
ferry_bin=${FERRY_BIN:-$root/target/release/ferry}
# Temporary directories, removed however the script ends (nothing half-made stays in --out).
work="" rootfs="" pkg_tmp=""
on_exit() {
  if [ -n "$rootfs" ]; then
    for m in dev/pts dev proc sys run; do mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m"; done
  fi
  [ -n "$pkg_tmp" ] && rm -rf "$pkg_tmp"
  if [ -n "$work" ]; then
    if [ -n "${FERRY_IMAGE_KEEP_WORK:-}" ]; then say "kept $work"; else rm -rf "$work"; fi
  fi
  return 0
}
trap on_exit EXIT
name=ferry-appliance-$version
out=${out:-$root/images/out}

# A name-based UUID (RFC 9562 version 8: SHA-256 of the product, version and purpose), so every
# identity in the image is fixed by the version and nothing random enters the bytes.
uuid_for() {
  local h
  h=$(printf 'ferry-appliance/%s/%s' "$version" "$1" | sha256sum | cut -c1-32)
  printf '%s-%s-8%s-%x%s-%s\n' "${h:0:8}" "${h:8:4}" "${h:13:3}" $(((0x${h:16:1} & 3) | 8)) "${h:17:3}" "${h:20:12}"
}

# ---------------------------------------------------------------------------------------------
# Packaging: raw disk -> qcow2, streamOptimized VMDK in an OVA, VHDX, VHD; cross-checks.
# ---------------------------------------------------------------------------------------------
package() { # RAW OUTDIR
  local raw=$1 dir=$2
  [ -x "$ferry_bin" ] || die "$ferry_bin not found: cargo build --release -p ferry-cli (or set FERRY_BIN)"
  command -v qemu-img >/dev/null || die "qemu-img not found: images/install-deps.sh"
  mkdir -p "$dir"
  local tmp; tmp=$(mktemp -d "$dir/.package.XXXXXX")
  pkg_tmp=$tmp
  local size; size=$(stat -c %s "$raw")
  ((size % 512 == 0)) || die "$raw: size $size is not a multiple of 512"

  say "qcow2 (qemu-img)"
  qemu-img convert -q -f raw -O qcow2 -o compat=1.1,cluster_size=65536 "$raw" "$tmp/$name.qcow2"
  say "VMDK streamOptimized, VHDX, VHD (ferry image convert)"
  "$ferry_bin" -q image convert "$raw" "$tmp/$name-disk1.vmdk" --format vmdk-stream --uuid "$(uuid_for vmdk)" >/dev/null
  "$ferry_bin" -q image convert "$raw" "$tmp/$name.vhdx" --format vhdx --uuid "$(uuid_for vhdx)" >/dev/null
  "$ferry_bin" -q image convert "$raw" "$tmp/$name.vhd" --format vhd --uuid "$(uuid_for vhd)" >/dev/null

  say "OVA (OVF 1.0 descriptor, SHA-256 manifest, ustar)"
  local populated
  populated=$("$ferry_bin" image info --json "$raw" | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated_bytes"])')
  python3 "$here/ovf.py" --name "$name" --version "$version" --vmdk "$tmp/$name-disk1.vmdk" \
    --capacity "$size" --populated "$populated" >"$tmp/$name.ovf"
  python3 "$here/check-ovf.py" "$tmp/$name.ovf" "$tmp/$name-disk1.vmdk"
  (cd "$tmp" && for f in "$name.ovf" "$name-disk1.vmdk"; do
     printf 'SHA256(%s)= %s\n' "$f" "$(sha256sum "$f" | cut -d' ' -f1)"
   done >"$name.mf")
  # The OVF specification: ustar; the descriptor first, then the manifest, then the files.
  touch -d "@$SOURCE_DATE_EPOCH" "$tmp/$name.ovf" "$tmp/$name.mf" "$tmp/$name-disk1.vmdk"
  (cd "$tmp" && tar --format=ustar --owner=0 --group=0 --numeric-owner --mode=0644 \
     --mtime="@$SOURCE_DATE_EPOCH" -cf "$name.ova" "$name.ovf" "$name.mf" "$name-disk1.vmdk")

  say "cross-checks: qemu-img info/check/compare on every disk"
  local f fmt
  for f in qcow2:"$name.qcow2" vmdk:"$name-disk1.vmdk" vhdx:"$name.vhdx" vpc:"$name.vhd"; do
    fmt=${f%%:*}; f=$tmp/${f#*:}
    local info; info=$(qemu-img info --output=json -f "$fmt" "$f") || die "qemu-img info refuses $f"
    local vsize; vsize=$(printf '%s' "$info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    # VHD: qemu sizes a disk by its CHS geometry unless the creator is known; Ferry's size is exact.
    [ "$vsize" = "$size" ] || die "$f: qemu-img says $vsize bytes, expected $size"
    local rc=0
    qemu-img check -q -f "$fmt" "$f" || rc=$?
    # 63: qemu has no checker for VHD ("does not support checks"); the compare below reads it whole.
    [ "$rc" = 0 ] || { [ "$fmt" = vpc ] && [ "$rc" = 63 ]; } || die "qemu-img check finds errors in $f (exit $rc)"
    qemu-img compare -q -f raw -F "$fmt" "$raw" "$f" || die "$f does not hold the same bytes as $raw"
  done

  rm -f "$tmp/$name.ovf" "$tmp/$name.mf" "$tmp/$name-disk1.vmdk"
  (cd "$tmp" && sha256sum "$name.qcow2" "$name.ova" "$name.vhdx" "$name.vhd" >SHA256SUMS)
  for f in "$name.qcow2" "$name.ova" "$name.vhdx" "$name.vhd" SHA256SUMS; do mv -f "$tmp/$f" "$dir/$f"; done
  rmdir "$tmp"
  pkg_tmp=""
  say "images in $dir:"
  sed 's/^/  /' "$dir/SHA256SUMS" >&2
}

if [ "$mode" = package ]; then
  [ -f "$raw_in" ] || die "$raw_in: no such file"
  package "$raw_in" "$out"
  exit 0
fi

if [ "$mode" = reproducible ]; then
  # Two complete builds from the same inputs (packages, binary, SOURCE_DATE_EPOCH); every byte must match.
  base=${out:-$root/images/out}
  "${BASH_SOURCE[0]}" --out "$base/a"
  "${BASH_SOURCE[0]}" --out "$base/b"
  if cmp -s "$base/a/SHA256SUMS" "$base/b/SHA256SUMS"; then
    say "reproducible: both builds give the same bytes"
    cat "$base/a/SHA256SUMS"
    exit 0
  fi
  diff "$base/a/SHA256SUMS" "$base/b/SHA256SUMS" >&2 || true
  die "not reproducible: the two builds differ (see above)"
fi

# ---------------------------------------------------------------------------------------------
# The whole build.
# ---------------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "the build needs root (debootstrap, chroot)"
"$here/install-deps.sh"
[ -x "$ferry_bin" ] || die "$ferry_bin not found: cargo build --release -p ferry-cli (or set FERRY_BIN)"

suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
disk_size=${FERRY_IMAGE_SIZE:-8G}
esp_mib=256
cache=${FERRY_IMAGE_CACHE:-$here/.cache}
# What the appliance runs: systemd with networkd/resolved/timesyncd, a kernel, SSH, nftables, the
# guest agents of the four hypervisors, curl (health checks of the scripts), systemd-boot (UEFI).
packages=systemd,systemd-sysv,udev,dbus,systemd-resolved,systemd-timesyncd,linux-image-amd64,initramfs-tools
packages+=,kmod,nftables,openssh-server,ca-certificates,curl,systemd-boot-efi,iproute2,e2fsprogs,dosfstools
packages+=,procps,less,qemu-guest-agent,open-vm-tools,hyperv-daemons
debs=$cache/debs-$suite-$(printf '%s %s' "$mirror" "$packages" | sha256sum | cut -c1-12).tgz

mkdir -p "$cache" "$out"
if [ ! -s "$debs" ]; then
  say "downloading Debian $suite packages into $debs (once; later builds reuse them)"
  debootstrap --variant=minbase --arch=amd64 --include="$packages" --make-tarball="$debs.tmp" \
    "$suite" "$cache/.dl-root" "$mirror" >"$cache/debootstrap-download.log" 2>&1 \
    || { tail -n 20 "$cache/debootstrap-download.log" >&2; die "debootstrap --make-tarball failed"; }
  mv "$debs.tmp" "$debs"
fi

work=$(mktemp -d "$out/.work.XXXXXX")
rootfs=$work/root

say "debootstrap $suite (minbase + $(echo "$packages" | tr ',' ' ' | wc -w) packages) into $rootfs"
debootstrap --variant=minbase --arch=amd64 --include="$packages" --unpack-tarball="$debs" \
  "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
in_root() { chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" TZ=UTC LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

root_uuid=$(uuid_for rootfs)
esp_serial=$(uuid_for esp | cut -c1-8)
esp_vol="${esp_serial:0:4}-${esp_serial:4:4}"
esp_vol=${esp_vol^^}

say "installing ferry $("$ferry_bin" --version | awk '{print $NF}') and appliance/"
install -m 0755 "$ferry_bin" "$rootfs/usr/bin/ferry"
install -d -m 0755 "$rootfs/usr/lib/ferry" "$rootfs/usr/share/ferry" "$rootfs/usr/share/doc/ferry" \
  "$rootfs/etc/ferry" "$rootfs/etc/systemd/network" "$rootfs/etc/systemd/journald.conf.d" \
  "$rootfs/etc/ssh/sshd_config.d" "$rootfs/etc/kernel/postinst.d" "$rootfs/boot/efi" "$rootfs/srv/ferry"
install -m 0755 "$root/appliance/systemd/ferry-serve" "$root/appliance/firstboot/ferry-firstboot" "$rootfs/usr/lib/ferry/"
install -m 0755 "$root/appliance/ferry-upgrade" "$rootfs/usr/sbin/ferry-upgrade"
install -m 0644 "$root/appliance/systemd/ferry.service" "$root/appliance/systemd/ferry-firstboot.service" \
  "$rootfs/etc/systemd/system/"
install -m 0644 "$root/appliance/ferry.toml" "$rootfs/usr/share/ferry/ferry.toml"
install -m 0644 "$root/appliance/network/10-ferry-dhcp.network" "$rootfs/etc/systemd/network/"
install -m 0644 "$root/appliance/journald/50-ferry.conf" "$rootfs/etc/systemd/journald.conf.d/"
install -m 0755 "$root/appliance/nftables/nftables.conf" "$rootfs/etc/nftables.conf"
install -m 0644 "$root/docs/appliance.md" "$rootfs/usr/share/doc/ferry/appliance.md"
install -m 0755 "$root/appliance/boot/zz-ferry-esp" "$rootfs/etc/kernel/postinst.d/zz-ferry-esp"
install -d -m 0755 "$rootfs/etc/initramfs/post-update.d" "$rootfs/etc/repart.d"
ln -sf /etc/kernel/postinst.d/zz-ferry-esp "$rootfs/etc/initramfs/post-update.d/zz-ferry-esp"
install -m 0644 "$root/appliance/repart/50-root.conf" "$rootfs/etc/repart.d/50-root.conf"
printf 'ferry\n' >"$rootfs/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$rootfs/etc/hosts"
cat >"$rootfs/etc/fstab" <<EOF
# <file system>        <mount point>  <type>  <options>                   <dump> <pass>
UUID=$root_uuid  /          ext4  errors=remount-ro,x-systemd.growfs  0  1
UUID=$esp_vol                                 /boot/efi  vfat  umask=0077,noatime        0  2
EOF
# SSH: the appliance's root login (password set at first boot) and keys.
printf 'PermitRootLogin yes\nPasswordAuthentication yes\n' >"$rootfs/etc/ssh/sshd_config.d/50-ferry.conf"
printf 'FERRY_LISTEN=0.0.0.0:443\n' >"$rootfs/etc/ferry/serve.env"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"

say "users, services"
in_root useradd --system --user-group --home-dir /var/lib/ferry --no-create-home --shell /usr/sbin/nologin ferry
in_root chown ferry:ferry /srv/ferry
in_root passwd -l root >/dev/null
systemctl --root="$rootfs" enable ferry.service ferry-firstboot.service systemd-networkd.service \
  systemd-resolved.service systemd-timesyncd.service nftables.service ssh.service >/dev/null 2>&1
systemctl --root="$rootfs" disable systemd-networkd-wait-online.service >/dev/null 2>&1 || true
# ferry-firstboot does first boot; systemd's own would stop at the console to ask for a locale.
systemctl --root="$rootfs" mask systemd-firstboot.service >/dev/null 2>&1
printf 'LANG=C.UTF-8\n' >"$rootfs/etc/locale.conf"
ln -sf /usr/share/zoneinfo/Etc/UTC "$rootfs/etc/localtime"
printf 'Etc/UTC\n' >"$rootfs/etc/timezone"
systemctl --root="$rootfs" set-default multi-user.target >/dev/null 2>&1

say "initramfs"
in_root update-initramfs -c -k all >"$work/initramfs.log" 2>&1 \
  || in_root update-initramfs -u -k all >>"$work/initramfs.log" 2>&1 \
  || { tail -n 20 "$work/initramfs.log" >&2; die "update-initramfs failed"; }

say "removing what is per-machine or per-build (machine-id, SSH host keys, caches, logs)"
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/var/lib/dbus/machine-id" "$rootfs"/etc/ssh/ssh_host_* "$rootfs/var/lib/systemd/random-seed" \
  "$rootfs/var/cache/ldconfig/aux-cache" "$rootfs"/var/lib/dpkg/*-old "$rootfs"/etc/*- \
  "$rootfs/var/lib/systemd/catalog/database"
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/* \
  "$rootfs"/var/tmp/* "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/initramfs-tools/* \
  "$rootfs"/usr/share/doc/*/changelog* "$rootfs"/usr/share/man/*
mkdir -p "$rootfs/var/log/journal"
# Clamp every time stamp to SOURCE_DATE_EPOCH.
find "$rootfs" -xdev -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

kernel=$(cd "$rootfs/boot" && ls vmlinuz-* | sort -V | tail -n 1)
kver=${kernel#vmlinuz-}
[ -f "$rootfs/boot/initrd.img-$kver" ] || die "no initrd for $kver"
cmdline="root=UUID=$root_uuid ro console=ttyS0,115200n8 console=tty0"

say "EFI system partition ($esp_mib MiB FAT32): kernel $kver, systemd-boot (UEFI), syslinux (BIOS)"
esp=$work/esp.img
truncate -s "${esp_mib}M" "$esp"
mformat -i "$esp" -F -N "$esp_serial" -v FERRY-ESP :: || die "mformat failed"
mkdir -p "$work/esp/EFI/BOOT" "$work/esp/loader/entries" "$work/esp/syslinux"
cp "$rootfs/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$work/esp/EFI/BOOT/BOOTX64.EFI"
cp "$rootfs/boot/$kernel" "$work/esp/vmlinuz"
cp "$rootfs/boot/initrd.img-$kver" "$work/esp/initrd.img"
printf 'default ferry.conf\ntimeout 2\nconsole-mode keep\n' >"$work/esp/loader/loader.conf"
printf 'title Ferry appliance %s\nlinux /vmlinuz\ninitrd /initrd.img\noptions %s\n' "$version" "$cmdline" \
  >"$work/esp/loader/entries/ferry.conf"
printf 'SERIAL 0 115200\nDEFAULT ferry\nPROMPT 0\nTIMEOUT 20\nLABEL ferry\n  MENU LABEL Ferry appliance %s\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND %s\n' \
  "$version" "$cmdline" >"$work/esp/syslinux/syslinux.cfg"
find "$work/esp" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
# mtools keeps the files' times (-m) and takes no time of its own for them.
(cd "$work/esp" && mcopy -i "$esp" -s -m -Q EFI loader syslinux vmlinuz initrd.img ::/) || die "mcopy failed"
syslinux --install --directory /syslinux "$esp" || die "syslinux --install failed"

say "root file system (ext4 from the directory, no loop device)"
total=$(numfmt --from=iec "$disk_size")
root_off=$(((1 + esp_mib) * 1048576))
root_len=$(((total - root_off - 1048576) / 4096 * 4096))
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -F -t ext4 -L ferry-root -U "$root_uuid" \
  -E "hash_seed=$(uuid_for ext4-hash),root_owner=0:0" -m 1 -d "$rootfs" "$work/root.img" "$((root_len / 1024))k" \
  || die "mke2fs -d failed"
# mke2fs -d copies each file's ctime and atime into its inode. No one can set a ctime (it is when we
# clamped the other times), and the atime of every file the build read (libraries, the kernel for the
# initramfs) or left alone is when that happened: the clamp above only moves times newer than
# SOURCE_DATE_EPOCH by mtime. Both differ from build to build and sit in the inode table (the first
# bytes two builds differed in), so every inode's are set to SOURCE_DATE_EPOCH in one debugfs run.
(cd "$rootfs" && find . -print | sed 's|^\.||; s|^$|/|') >"$work/paths"
! grep -q '"' "$work/paths" || die "a path in the root file system holds a double quote"
sed "s|.*|sif \"&\" ctime @$SOURCE_DATE_EPOCH\nsif \"&\" atime @$SOURCE_DATE_EPOCH|" "$work/paths" >"$work/times.debugfs"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$work/times.debugfs" "$work/root.img" >/dev/null 2>"$work/debugfs.log" \
  || { tail -n 5 "$work/debugfs.log" >&2; die "debugfs (ctime, atime) failed"; }
if grep -v '^debugfs [0-9]' "$work/debugfs.log" | grep -q .; then
  head -n 5 "$work/debugfs.log" >&2; die "debugfs could not set every ctime and atime"
fi
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH e2fsck -fn "$work/root.img" >/dev/null || die "e2fsck finds errors in the new root file system"

say "disk: GPT (ESP legacy-BIOS-bootable + root), syslinux's GPT MBR"
disk=$work/$name.raw
truncate -s "$total" "$disk"
sfdisk -q --no-reread --no-tell-kernel "$disk" <<EOF || die "sfdisk failed"
label: gpt
label-id: $(uuid_for gpt-disk)
first-lba: 2048
start=2048, size=$((esp_mib * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$(uuid_for gpt-esp), name="EFI system", attrs="LegacyBIOSBootable"
start=$((root_off / 512)), size=$((root_len / 512)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$(uuid_for gpt-root), name="ferry-root"
EOF
dd if=/usr/lib/SYSLINUX/gptmbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$esp" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$disk" bs=1M seek=$((1 + esp_mib)) conv=notrunc,sparse status=none

package "$disk" "$out"
