# Shared by tests/bench/hyperv-agent.sh and hyperv-restore-agent.sh (sourced): builds ferry and
# ferry-agent, starts `ferry sim hyperv` (DISK_MIB) under DIR and one `ferry-agent` over its volumes
# (extra flags in AGENT_ARGS) pinning the appliance and nbdcopy's client certificate (TLS files in
# $t, as libnbd reads them); writes ferry.toml (source `lab`, `network` only) and a repository.
# Sets FERRY, AGENT, port, t and j() (a Python expression over the simulator's JSON line `d`).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/bench}

echo "building ($PROFILE)..." >&2
cargo build -q --profile "$PROFILE" -p ferry-cli -p ferry-agent
out=$([[ $PROFILE == dev ]] && echo debug || echo "$PROFILE")
FERRY=$CARGO_TARGET_DIR/$out/ferry
AGENT=$CARGO_TARGET_DIR/$out/ferry-agent

rm -rf "$DIR"
mkdir -p "$DIR/tls"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT

# A CA, the agent's certificate and nbdcopy's client certificate, as libnbd reads them.
t=$DIR/tls
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$t/ca-key.pem" -out "$t/ca-cert.pem" 2>/dev/null
leaf() { # name cn usage
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$t/$1-key.pem" -out "$t/$1.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=%s\n' "$3" >"$t/$1.ext"
  openssl x509 -req -in "$t/$1.csr" -CA "$t/ca-cert.pem" -CAkey "$t/ca-key.pem" -CAcreateserial \
    -days 2 -extfile "$t/$1.ext" -out "$t/$1-cert.pem" 2>/dev/null
}
leaf server localhost serverAuth
leaf client bench-client clientAuth

# The simulated host (its own in-process agent is not used here: libnbd cannot pin).
"$FERRY" sim hyperv --listen 127.0.0.1:0 --disk-mib "$DISK_MIB" --dir "$DIR/host" >"$DIR/sim.json" &
pids+=($!)
for _ in $(seq 600); do [[ -s $DIR/sim.json ]] && break; sleep 0.1; done
j() { python3 -c "import json,sys; d=json.load(open('$DIR/sim.json')); print($1)"; }
printf '%s' "$(j 'd["password"]')" >"$DIR/hv.pw"

cat >"$DIR/ferry.toml" <<EOF
[sources.lab]
kind = "hyperv"
url = "$(j 'd["url"]')"
username = "$(j 'd["username"]')"
password-file = "$DIR/hv.pw"
tls-fingerprint = "$(j 'd["tls_fingerprint"]')"
state-dir = "$DIR/state"
proxy = "none"
transports = ["network"]
[sources.lab.agent]
port = 1
fingerprint = "$(openssl x509 -in "$t/server-cert.pem" -noout -fingerprint -sha256 | sed 's/.*=/sha256:/')"
[sources.lab.agent.nodes]
'$(j 'd["host"]')' = "agent-not-started-yet"
EOF
export FERRY_CONFIG=$DIR/ferry.toml FERRY_REPO=$DIR/repo FERRY_PASSWORD=bench
appliance_pin=$("$FERRY" source agent-pin lab 2>/dev/null)
client_pin=$(openssl x509 -in "$t/client-cert.pem" -noout -fingerprint -sha256 | sed 's/.*=/sha256:/')

# One agent for both sides of the measurement, over the simulator's volumes.
"$AGENT" --listen 127.0.0.1:0 --root "$DIR/host/volumes" "${AGENT_ARGS[@]}" --map "C:\\=$DIR/host/volumes/C" \
  --cert "$t/server-cert.pem" --key "$t/server-key.pem" \
  --client-pin "$appliance_pin" --client-pin "$client_pin" >"$DIR/agent.json" 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do [[ -s $DIR/agent.json ]] && break; sleep 0.1; done
port=$(python3 -c "import json; print(json.load(open('$DIR/agent.json'))['listen'].rsplit(':',1)[1])")
sed -i "s/agent-not-started-yet/127.0.0.1:$port/" "$DIR/ferry.toml"
"$FERRY" repo init -q >/dev/null

