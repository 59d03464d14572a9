#!/usr/bin/env bash
# The appliance boot test (long: a few minutes under TCG; not part of tests/run.sh, see docs/testing.md).
#
#   tests/appliance-boot.sh [--image ferry-appliance-VERSION.qcow2] [--uefi] [--timeout SECS]
#
# Boots the qcow2 (through a throw-away overlay: the image never changes) in qemu-system-x86_64 with
# TCG, BIOS by default or UEFI (OVMF) with --uefi, the appliance's HTTPS port and SSH forwarded to
# loopback. Passes when:
#   1. first boot ran: the generated first-admin password appears on the serial console;
#   2. `/health` answers `ok` over HTTPS on the forwarded port;
#   3. logging in as `admin` with that password gives a token (first boot's password reached ferry);
#   4. /health carries the certificate fingerprint ferry generated on its first start;
#   5. SSH answers on the forwarded port (the firewall lets it in).
# qemu is always stopped; its serial log is shown on failure.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)
image=$root/images/out/ferry-appliance-$version.qcow2
uefi=0 timeout=900
while (($#)); do
  case $1 in
    --image) image=$2; shift 2 ;;
    --uefi) uefi=1; shift ;;
    --timeout) timeout=$2; shift 2 ;;
    *) echo "usage: $0 [--image QCOW2] [--uefi] [--timeout SECS]" >&2; exit 2 ;;
  esac
done
say() { printf 'appliance-boot: %s\n' "$*" >&2; }
"$root/images/install-deps.sh"
[ -f "$image" ] || { say "ERROR: $image not found: build it with images/build.sh"; exit 1; }

work=$(mktemp -d)
qpid=""
finish() {
  rc=$?
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null || true
  if [ $rc -ne 0 ] && [ -f "$work/serial.log" ]; then
    say "FAILED; the serial console's last lines:"
    tail -n 60 "$work/serial.log" | sed 's/\x1b\[[0-9;]*[a-zA-Z]//g' >&2
  fi
  rm -rf "$work"
  exit $rc
}
trap finish EXIT
fail() { say "ERROR: $*"; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
https=$(free_port) ssh=$(free_port)
qemu-img create -q -f qcow2 -b "$(readlink -f "$image")" -F qcow2 "$work/overlay.qcow2"
fw=()
if ((uefi)); then
  code=/usr/share/OVMF/OVMF_CODE_4M.fd vars=/usr/share/OVMF/OVMF_VARS_4M.fd
  [ -f "$code" ] || { code=/usr/share/OVMF/OVMF_CODE.fd vars=/usr/share/OVMF/OVMF_VARS.fd; }
  cp "$vars" "$work/vars.fd"
  fw=(-drive "if=pflash,format=raw,readonly=on,file=$code" -drive "if=pflash,format=raw,file=$work/vars.fd")
fi
say "booting $(basename "$image") ($( ((uefi)) && echo UEFI || echo BIOS), TCG); HTTPS on 127.0.0.1:$https, SSH on :$ssh"
start=$(date +%s)
qemu-system-x86_64 -accel tcg -machine q35 -m 2048 -smp 2 -display none -no-reboot "${fw[@]}" \
  -drive "file=$work/overlay.qcow2,if=virtio,format=qcow2" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$https-:443,hostfwd=tcp:127.0.0.1:$ssh-:22" \
  -device virtio-net-pci,netdev=n0 -serial "file:$work/serial.log" >"$work/qemu.log" 2>&1 &
qpid=$!

deadline=$((start + timeout))
wait_for() { # DESCRIPTION COMMAND...: until COMMAND succeeds, qemu dies or time runs out
  local what=$1; shift
  until "$@"; do
    kill -0 "$qpid" 2>/dev/null || { cat "$work/qemu.log" >&2; fail "qemu exited while waiting for $what"; }
    (($(date +%s) < deadline)) || fail "no $what within ${timeout}s"
    sleep 3
  done
  say "$what after $(($(date +%s) - start)) s"
}

pw_line() { grep -a -m1 'Ferry appliance: first admin' "$work/serial.log" 2>/dev/null; }
has_pw() { pw_line >/dev/null; }
wait_for "first-boot password on the console" has_pw
password=$(pw_line | sed -n 's/.*password: \([^ ]*\) \*\*\*.*/\1/p' | tr -d '\r')
[ ${#password} -eq 20 ] || fail "the console's first-admin line has no 20-character password: $(pw_line)"

health() { curl -fsk --max-time 5 "https://127.0.0.1:$https/health" >"$work/health.json" 2>/dev/null; }
wait_for "/health over HTTPS" health
python3 - "$work/health.json" <<'EOF' || fail "/health is not ok: $(cat "$work/health.json")"
import json, sys
h = json.load(open(sys.argv[1]))
assert h.get("status") == "ok", h
assert str(h.get("tls_fingerprint", "")).startswith("sha256:"), h
EOF

body=$(printf '{"username":"admin","password":"%s"}' "$password")
token=$(curl -fsk --max-time 10 "https://127.0.0.1:$https/api/login" -H 'content-type: application/json' -d "$body" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])') \
  || fail "logging in as admin with the console's password failed"
[ -n "$token" ] || fail "no token"
curl -fsk --max-time 10 -H "Authorization: Bearer $token" "https://127.0.0.1:$https/api/jobs" >/dev/null \
  || fail "an authenticated API call failed"
say "admin login with the first-boot password works"
wrong=$(curl -sk -o /dev/null -w '%{http_code}' "https://127.0.0.1:$https/api/login" -H 'content-type: application/json' \
  -d '{"username":"admin","password":"not-the-password"}')
[ "$wrong" = 401 ] || [ "$wrong" = 403 ] || fail "a wrong password got HTTP $wrong"

banner() { timeout 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ssh && head -n 1 <&3" 2>/dev/null | grep -q '^SSH-2.0-'; }
wait_for "SSH banner" banner
say "PASS: first boot, /health, admin login and SSH in $(($(date +%s) - start)) s"
