# Shared by the bench scripts: temporary directory and process cleanup, the demo provider, a
# sidecar on the directory registry, and CPU/memory readings from /proc. Source it after `cd`
# to the repository root.
BIN=${BIN:-target/release}
if [ ! -x "$BIN/detour-sidecar" ] || [ ! -x "$BIN/detourctl" ] || [ ! -x "$BIN/detour-floor" ]; then
  cargo build --release --bins
fi
TMP=$(mktemp -d /tmp/detour-bench-XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

wait_file() { # FILE SECONDS
  local i=0
  while [ ! -s "$1" ]; do
    i=$((i + 1)); [ "$i" -gt $(($2 * 100)) ] && { echo "timed out waiting for $1" >&2; exit 1; }
    sleep 0.01
  done
}

wait_http() { # URL SECONDS: until it answers at all
  local i=0
  until curl -s -o /dev/null "$1"; do
    i=$((i + 1)); [ "$i" -gt $(($2 * 100)) ] && { echo "timed out waiting for $1" >&2; exit 1; }
    sleep 0.01
  done
}

# start_provider IP: the demo provider; sets PROVIDER (ip:port) and P_PID.
start_provider() {
  "$BIN/detourctl" provider --listen "$1:0" --instance h2-hello --addr-file "$TMP/provider.addr" >/dev/null &
  P_PID=$!
  PIDS+=("$P_PID")
  wait_file "$TMP/provider.addr" 10
  PROVIDER=$(cat "$TMP/provider.addr")
}

# start_sidecar HOST IP EXTRA_TOML: a sidecar on the directory registry, with a certificate from
# the run's throw-away CA (mutual TLS between sidecars, the default); prints its pid.
start_sidecar() {
  mkdir -p "$TMP/$1"
  "$BIN/detourctl" certs --dir "$TMP/pki" --host "$1" >/dev/null
  "$BIN/detourctl" sidecar-config --host "$1" --ip "$2" --run-dir "$TMP/$1" \
    --registry "dir:$TMP/registry" --pki "$TMP/pki" --extra "$3" >"$TMP/$1/sidecar.toml"
  RUST_LOG=warn "$BIN/detour-sidecar" --config "$TMP/$1/sidecar.toml" 2>"$TMP/$1/sidecar.log" &
  PIDS+=($!)
  wait_file "$TMP/$1/sidecar.json" 10
}

# start_detour NAME BINDIR BACKEND: CA NAME-1 on 127.0.0.1 and PA NAME-2 on 127.0.0.2 (which
# provides the service hello at BACKEND, ip:port), on a directory registry of their own, running
# BINDIR/detour-sidecar; mutual TLS when NAME ends in -mtls (certificates from a throw-away CA),
# plaintext otherwise. Once the chain answers, sets HOP1 (the CA's outbound address), HOP1_PID,
# HOP2 (the PA's inbound address) and HOP2_PID. DETOUR_EXTRA_TOML and DETOUR_TOML_<NAME> (dashes
# as underscores) add config.
start_detour() {
  local bin=$2/detour-sidecar reg=$TMP/$1-registry n
  for n in 2 1; do
    mkdir -p "$TMP/$1-$n"
    local tls=(--plaintext)
    if [[ "$1" == *-mtls ]]; then
      "$BIN/detourctl" certs --dir "$TMP/pki" --host "$1-$n" >/dev/null
      tls=(--pki "$TMP/pki")
    fi
    local ip=127.0.0.$n provide=()
    [ "$n" = 2 ] && provide=(--provide "hello=$3")
    local v="DETOUR_TOML_${1//-/_}"
    "$BIN/detourctl" sidecar-config --host "$1-$n" --ip "$ip" --run-dir "$TMP/$1-$n" \
      --registry "dir:$reg" "${tls[@]}" "${provide[@]}" \
      --extra "${DETOUR_EXTRA_TOML:-}
$(printf '%b' "${!v:-}")" >"$TMP/$1-$n/sidecar.toml"
    RUST_LOG=warn "$bin" --config "$TMP/$1-$n/sidecar.toml" 2>"$TMP/$1-$n/sidecar.log" &
    PIDS+=($!)
    wait_file "$TMP/$1-$n/sidecar.json" 10
  done
  HOP2_PID=$(sidecar_field "$1-2" pid)
  HOP2=$(sidecar_field "$1-2" inbound)
  HOP1_PID=$(sidecar_field "$1-1" pid)
  HOP1=$(sidecar_field "$1-1" outbound_tcp)
  local i=0
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: hello' "http://$HOP1/")" = 200 ]; do
    i=$((i + 1)); [ "$i" -gt 1000 ] && { echo "detour chain $1 never answered" >&2; exit 1; }
    sleep 0.01
  done
}

# sidecar_field HOST KEY: a value from the sidecar's address file (pid, outbound_tcp, …).
sidecar_field() {
  sed -n "s/.*\"$2\": \"\{0,1\}\([^\",]*\)\"\{0,1\}.*/\1/p" "$TMP/$1/sidecar.json"
}

free_port() {
  python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
TICK=$(getconf CLK_TCK)

# us_per_req TICKS REQUESTS
us_per_req() { awk -v p="$1" -v n="$2" -v t="$TICK" 'BEGIN { printf "%.1f", p * 1e6 / t / n }'; }
sent_of() { echo "$1" | sed -n 's/.*sent=\([0-9]*\).*/\1/p'; }

# haproxy_hop N LISTEN NEXT: HAProxy hop N (config in $TMP/haproxyN.cfg) listening on LISTEN and
# forwarding to NEXT with server-side keep-alive, in the background; HAPROXY_THREADS sets
# nbthread (default: HAProxy's own).
haproxy_hop() {
  cat >"$TMP/haproxy$1.cfg" <<CFG
global
  ${HAPROXY_THREADS:+nbthread $HAPROXY_THREADS}
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind $2
  default_backend b
backend b
  server s1 $3
CFG
  haproxy -db -f "$TMP/haproxy$1.cfg" >"$TMP/haproxy$1.log" 2>&1 &
  PIDS+=($!)
}
