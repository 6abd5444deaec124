#!/usr/bin/env bash
# Compares the mesh path (SDK → CA → PA → provider) with calling the provider directly, at a
# fixed rate, on this machine: latency percentiles from `detourctl load`, and CPU time and
# resident memory of each sidecar from /proc. Builds the release binaries if they are missing.
#
#   bench/mesh-vs-direct.sh [RATE] [SECONDS] [ROUNDS]     (defaults: 1000 20 1)
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-1000}
SECS=${2:-20}
ROUNDS=${3:-1}
BIN=target/release
if [ ! -x "$BIN/detour-sidecar" ] || [ ! -x "$BIN/detourctl" ]; then
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

"$BIN/detourctl" provider --listen 127.0.0.2:0 --instance h2-hello --addr-file "$TMP/provider.addr" >/dev/null &
PIDS+=($!)
wait_file "$TMP/provider.addr" 10
PROVIDER=$(cat "$TMP/provider.addr")
P_PID=${PIDS[0]}

start_sidecar() { # HOST IP EXTRA
  mkdir -p "$TMP/$1"
  cat >"$TMP/$1/sidecar.toml" <<TOML
host = "$1"
run_dir = "$TMP/$1"
registry = "dir:$TMP/registry"
[outbound]
listen = "$2:0"
unix = "outbound.sock"
[inbound]
listen = "$2:0"
[admin]
listen = "$2:0"
$3
TOML
  RUST_LOG=warn "$BIN/detour-sidecar" --config "$TMP/$1/sidecar.toml" 2>"$TMP/$1/sidecar.log" &
  PIDS+=($!)
  wait_file "$TMP/$1/sidecar.json" 10
}
start_sidecar h2 127.0.0.2 "[[provide]]
service = \"hello\"
address = \"$PROVIDER\""
start_sidecar h1 127.0.0.1 ""
PA_PID=$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' "$TMP/h2/sidecar.json")
CA_PID=$(sed -n 's/.*"pid": \([0-9]*\).*/\1/p' "$TMP/h1/sidecar.json")

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
TICK=$(getconf CLK_TCK)

echo "bench: rate=$RATE req/s duration=${SECS}s rounds=$ROUNDS cores=$(nproc)"
for r in $(seq 1 "$ROUNDS"); do
  p0=$(cpu_ticks "$P_PID")
  line=$("$BIN/detourctl" load --direct "http://$PROVIDER" --service hello --rate "$RATE" --duration "$SECS" | head -1)
  p1=$(cpu_ticks "$P_PID")
  n=$(echo "$line" | sed -n 's/.*sent=\([0-9]*\).*/\1/p')
  echo "round $r direct:  $line"
  awk -v p=$((p1 - p0)) -v n="$n" -v t="$TICK" \
    'BEGIN { printf "round %d cpu:     provider_us_per_req=%.1f\n", '"$r"', p * 1e6 / t / n }'
  ca0=$(cpu_ticks "$CA_PID"); pa0=$(cpu_ticks "$PA_PID"); p0=$(cpu_ticks "$P_PID")
  line=$("$BIN/detourctl" load --sidecar "unix:$TMP/h1/outbound.sock" --service hello --rate "$RATE" --duration "$SECS" | head -1)
  ca1=$(cpu_ticks "$CA_PID"); pa1=$(cpu_ticks "$PA_PID"); p1=$(cpu_ticks "$P_PID")
  n=$(echo "$line" | sed -n 's/.*sent=\([0-9]*\).*/\1/p')
  echo "round $r mesh:    $line"
  awk -v ca=$((ca1 - ca0)) -v pa=$((pa1 - pa0)) -v p=$((p1 - p0)) -v n="$n" -v t="$TICK" \
    'BEGIN { printf "round %d cpu:     ca_us_per_req=%.1f pa_us_per_req=%.1f provider_us_per_req=%.1f\n", '"$r"', ca * 1e6 / t / n, pa * 1e6 / t / n, p * 1e6 / t / n }'
done
echo "memory: ca_rss_kib=$(rss_kib "$CA_PID") pa_rss_kib=$(rss_kib "$PA_PID")"
