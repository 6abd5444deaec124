#!/usr/bin/env bash
# The latency-aware balancer against the least-loaded one: two provider hosts, one of them slow
# (its provider waits DELAY_MS before every answer), and two caller hosts, one with
# `proxy.balance = "p2c"` (fewest requests in flight of two), one with `"peak-ewma"` (the
# default: lower latency estimate times requests in flight). Interleaved rounds of steady load through each caller's
# sidecar: latency percentiles, and the share of answers the slow provider gave.
#
#   bench/balance.sh [RATE] [SECONDS] [ROUNDS] [DELAY_MS]     (defaults: 500 15 3 10)
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-500}
SECS=${2:-15}
ROUNDS=${3:-3}
DELAY=${4:-10}
source bench/lib.sh
provider() { # HOST IP DELAY_MS
  "$BIN/detourctl" provider --listen "$2:0" --instance "$1-hello" --delay-ms "$3" --addr-file "$TMP/$1.addr" >/dev/null &
  PIDS+=($!)
  wait_file "$TMP/$1.addr" 10
  start_sidecar "$1" "$2" "[[provide]]
service = \"hello\"
address = \"$(cat "$TMP/$1.addr")\""
}
provider fast 127.0.0.2 0
provider slow 127.0.0.3 "$DELAY"
DETOUR_SIDECAR__PROXY__BALANCE=p2c start_sidecar p2c 127.0.0.1 ""
DETOUR_SIDECAR__PROXY__BALANCE=peak-ewma start_sidecar ewma 127.0.0.4 ""
echo "bench: rate=$RATE req/s duration=${SECS}s rounds=$ROUNDS slow_provider_delay_ms=$DELAY cores=$(nproc)"
for r in $(seq 1 "$ROUNDS"); do
  for b in p2c ewma; do
    out=$("$BIN/detourctl" load --sidecar "unix:$TMP/$b/outbound.sock" --service hello --rate "$RATE" --duration "$SECS")
    load=$(echo "$out" | grep '^load:')
    served=$(echo "$out" | grep '^served:')
    slow=$(echo "$served" | sed -n 's/.*slow-hello=\([0-9]*\).*/\1/p')
    fast=$(echo "$served" | sed -n 's/.*fast-hello=\([0-9]*\).*/\1/p')
    share=$(awk -v s="${slow:-0}" -v f="${fast:-0}" 'BEGIN { if (s + f) printf "%.1f", 100 * s / (s + f); else print "-" }')
    echo "round $r $b: ${load#load: } slow_share_pct=$share"
  done
done
