#!/usr/bin/env bash
# Installs every peer the test suite uses, idempotently. Fast when everything is present.
#
#   Debian:  qemu-utils (qemu-img, qemu-nbd, qemu-io), nbdkit, libnbd-bin (nbdinfo, nbdcopy),
#            qemu-system-x86, syslinux, syslinux-common, mtools, busybox-static, cpio (boot verification),
#            golang-go + golang-github-vmware-govmomi-dev (vcsim, built offline into $FERRY_PEERS_DIR/bin),
#            chromium (the web console's end-to-end test, driven headless by playwright-core),
#            systemd (systemd-analyze: the appliance unit's security assessment),
#            libxml2-utils (xmllint: the appliance OVA's OVF against the DMTF schema, images/ovf-schema),
#            krb5-kdc, krb5-admin-server, krb5-user, faketime (a throwaway MIT realm for WinRM Kerberos)
#   Debian kernel: vmlinuz and the IDE disk modules of linux-image-amd64's kernel package, extracted
#            (not installed) into $FERRY_PEERS_DIR/boot/{vmlinuz,modules/} for the bootable test disk
#   PyPI:    tests/peers/requirements.txt into $FERRY_PEERS_DIR/venv  (moto server, xenapi, azure-storage-blob,
#            schemathesis, pyvmomi, aiosmtpd, pywinrm, pypsrp); pykerberos==1.2.4 after libkrb5-dev (Kerberos block)
#   npm:     tests/peers/package.json into $FERRY_PEERS_DIR/node      (azurite, playwright-core)
#
# FERRY_PEERS_DIR defaults to <repo>/.peers (git-ignored). Fails loudly on any error.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
peers=${FERRY_PEERS_DIR:-$root/.peers}
mkdir -p "$peers"

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { printf 'install.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# --- QEMU: one version for qemu-img and qemu-system -------------------------------------------
# The tests use qemu-img as the image-format oracle and were written against QEMU 10 (bookworm-backports,
# as this machine's qemu-utils comes). Bookworm's own qemu-system-x86 is 7.2, and installing it pulls
# qemu-utils back to 7.2, whose VHD handling differs. So both come from one suite: backports on bookworm.
sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
qemu_ver() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | awk '/install ok installed/{print $4}'; }
qemu_ok() {
  local u s; u=$(qemu_ver qemu-utils); s=$(qemu_ver qemu-system-x86)
  [ -n "$u" ] && [ "$u" = "$s" ] && [ "${u#1:}" != "$u" ] && [ "$(echo "${u#1:}" | cut -d. -f1)" -ge 10 ]
}
if ! qemu_ok; then
  command -v apt-get >/dev/null || die "apt-get not found; install qemu-utils and qemu-system-x86 (>= 10) by hand"
  . /etc/os-release
  suite=""
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    suite=bookworm-backports
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      say "adding Debian's bookworm-backports suite (for QEMU 10)"
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        | $sudo tee /etc/apt/sources.list.d/ferry-backports.sources >/dev/null
    fi
  fi
  say "installing qemu-utils and qemu-system-x86 from ${suite:-the default suite}"
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq ${suite:+-t "$suite"} \
    qemu-utils qemu-system-x86 qemu-system-common qemu-block-extra >/dev/null \
    || die "apt-get install qemu-utils qemu-system-x86 failed"
  qemu_ok || die "qemu-utils and qemu-system-x86 are not the same version >= 10: $(qemu_ver qemu-utils) / $(qemu_ver qemu-system-x86)"
fi

# --- Debian packages -------------------------------------------------------------------------
apt_pkgs=(nbdkit libnbd-bin curl syslinux syslinux-common mtools busybox-static cpio
          ntfs-3g e2fsprogs fdisk util-linux golang-go golang-github-vmware-govmomi-dev chromium systemd
          libxml2-utils)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
for b in qemu-img qemu-nbd qemu-io nbdkit nbdinfo nbdcopy curl qemu-system-x86_64 syslinux mcopy busybox cpio \
         mkntfs ntfscp ntfsfix ntfsfallocate ntfscat ntfsls mke2fs e2fsck debugfs sfdisk mkswap go chromium systemd-analyze xmllint; do
  command -v "$b" >/dev/null || die "$b missing after installing ${apt_pkgs[*]}"
done

# --- A Debian kernel for the boot-verification test disk (extracted, never installed) ----------
# vmlinuz plus the modules a guest needs to see its IDE disk as /dev/sda (the instant-recovery test's
# guest writes to it), all from the same package so they match; modules/order lists them in load order.
boot=$peers/boot
disk_modules=(scsi_common scsi_mod libata ata_piix crct10dif_common crct10dif_generic crc-t10dif crc64
              crc64_rocksoft_generic crc64-rocksoft t10-pi sd_mod)
if [ ! -s "$boot/vmlinuz" ] || [ ! -s "$boot/modules/order" ]; then
  kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
  kpkg=$(kernel_pkg)
  if [ -z "$kpkg" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq || die "apt-get update failed"
    kpkg=$(kernel_pkg)
  fi
  [ -n "$kpkg" ] || die "cannot find the kernel package linux-image-amd64 depends on (apt-get update?)"
  say "extracting the kernel and disk modules of $kpkg into $boot"
  ktmp=$(mktemp -d)
  (cd "$ktmp" && apt-get download -qq "$kpkg" >/dev/null 2>&1) || { rm -rf "$ktmp"; die "apt-get download $kpkg failed"; }
  dpkg-deb --fsys-tarfile "$ktmp"/*.deb | tar -x -C "$ktmp" --wildcards './boot/vmlinuz-*' './lib/modules/*.ko' \
    || { rm -rf "$ktmp"; die "cannot extract vmlinuz and modules from $kpkg"; }
  rm -rf "$boot/modules.tmp" && mkdir -p "$boot" "$boot/modules.tmp"
  for m in "${disk_modules[@]}"; do
    f=$(find "$ktmp/lib/modules" -name "$m.ko" | head -1)
    [ -n "$f" ] || { rm -rf "$ktmp"; die "module $m.ko not in $kpkg"; }
    cp "$f" "$boot/modules.tmp/" && echo "$m.ko" >> "$boot/modules.tmp/order"
  done
  cp "$ktmp"/boot/vmlinuz-* "$boot/vmlinuz.tmp" && mv "$boot/vmlinuz.tmp" "$boot/vmlinuz"
  rm -rf "$boot/modules" && mv "$boot/modules.tmp" "$boot/modules"
  rm -rf "$ktmp"
fi

# --- vcsim (govmomi's vCenter simulator) ------------------------------------------------------
# Debian ships govmomi's `simulator` package but not the vcsim command: tests/peers/vcsim/main.go is
# a small command around it, built in GOPATH mode from /usr/share/gocode (no network).
vcsim=$peers/bin/vcsim
vstamp=$peers/bin/.ferry-vcsim.go
if [ ! -x "$vcsim" ] || ! cmp -s "$here/vcsim/main.go" "$vstamp"; then
  say "building vcsim into $vcsim"
  mkdir -p "$peers/bin" "$peers/go-cache"
  (cd "$here/vcsim" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$peers/go-cache" \
     go build -o "$vcsim.tmp" .) || die "building vcsim from golang-github-vmware-govmomi-dev failed"
  mv "$vcsim.tmp" "$vcsim"
  cp "$here/vcsim/main.go" "$vstamp"
fi
[ -x "$vcsim" ] || die "vcsim missing from $peers/bin"

# --- Python venv -----------------------------------------------------------------------------
venv=$peers/venv
req=$here/requirements.txt
stamp=$venv/.ferry-requirements
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$stamp"; then
  command -v python3 >/dev/null || die "python3 not found"
  say "creating Python venv at $venv with $(grep -v '^#' "$req" | tr '\n' ' ')"
  python3 -m venv "$venv" || die "python3 -m venv failed"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" || die "pip install failed"
  cp "$req" "$stamp"
fi
[ -x "$venv/bin/moto_server" ] || die "moto_server missing from $venv"
[ -x "$venv/bin/schemathesis" ] || die "schemathesis missing from $venv"
"$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null || die "aiosmtpd missing from $venv"

# --- npm -------------------------------------------------------------------------------------
node_dir=$peers/node
pkg=$here/package.json
nstamp=$node_dir/.ferry-package.json
if [ ! -x "$node_dir/node_modules/.bin/azurite-blob" ] || [ ! -d "$node_dir/node_modules/playwright-core" ] \
   || ! cmp -s "$pkg" "$nstamp"; then
  command -v npm >/dev/null || die "npm not found"
  say "installing npm peers into $node_dir: azurite, playwright-core"
  mkdir -p "$node_dir"
  cp "$pkg" "$node_dir/package.json"
  (cd "$node_dir" && npm install --no-audit --no-fund --loglevel=error >/dev/null 2>"$node_dir/npm.log") \
    || { cat "$node_dir/npm.log" >&2; die "npm install failed"; }
  cp "$pkg" "$nstamp"
fi
[ -x "$node_dir/node_modules/.bin/azurite-blob" ] || die "azurite-blob missing from $node_dir"
[ -d "$node_dir/node_modules/playwright-core" ] || die "playwright-core missing from $node_dir"

# --- MIT Kerberos (WinRM Kerberos tests, ADR 0159) ---------------------------------------------
# A throwaway realm per test (ferry_testkit::MitKdc): kdb5_util/kadmin.local/krb5kdc from krb5-kdc and
# krb5-admin-server, kinit/klist from krb5-user; faketime runs a KDC with its clock off (skew test).
# Their services are not started: the tests run krb5kdc -n on a free port. pywinrm's transport='kerberos'
# needs pykerberos (no wheel on PyPI: built with gcc against libkrb5-dev), pinned here rather than in
# requirements.txt because it needs those Debian packages first.
krb_pkgs=(krb5-kdc krb5-admin-server krb5-user faketime libkrb5-dev gcc)
krb_missing=()
for p in "${krb_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || krb_missing+=("$p")
done
if ((${#krb_missing[@]})); then
  command -v apt-get >/dev/null || die "apt-get not found; install ${krb_missing[*]} by hand"
  say "installing Debian packages: ${krb_missing[*]}"
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${krb_missing[@]}" >/dev/null \
    || die "apt-get install ${krb_missing[*]} failed"
fi
for b in /usr/sbin/krb5kdc /usr/sbin/kdb5_util /usr/sbin/kadmin.local /usr/bin/kinit /usr/bin/faketime; do
  [ -x "$b" ] || die "$b missing after installing ${krb_pkgs[*]}"
done
if ! "$venv/bin/python" -c 'import kerberos' 2>/dev/null; then
  say "building pykerberos 1.2.4 into $venv (pywinrm's transport='kerberos')"
  "$venv/bin/pip" install -q --disable-pip-version-check pykerberos==1.2.4 || die "pip install pykerberos==1.2.4 failed"
fi
"$venv/bin/python" -c 'import kerberos' 2>/dev/null || die "pykerberos missing from $venv"

say "peers ready in $peers"
