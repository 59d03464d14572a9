#!/bin/sh
# Seeds the qmp fuzz corpus with messages qemu 7.2 sends.
set -eu
d="$(dirname "$0")/corpus/qmp"
mkdir -p "$d"
printf '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}\r\n' > "$d/greeting"
printf '{"return": {}}\r\n' > "$d/return"
printf '{"error": {"class": "GenericError", "desc": "Could not open '"'"'/x.png'"'"'"}}\r\n' > "$d/error"
printf '{"timestamp": {"seconds": 1764687000, "microseconds": 5}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}\r\n' > "$d/event"
