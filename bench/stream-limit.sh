#!/usr/bin/env bash
# The advertised HTTP/2 stream limit (`limits.max_concurrent_streams`): what it costs and what it
# buys. A CA → PA chain over mutual TLS, with the limit set on both; the load is one HTTP/2
# connection from `detourctl load` to the CA (one connection CA → PA, as between two hosts).
# For each limit, three rounds:
#
#   fast: 5,000 req/s for SECONDS, the provider answering at once
#   slow: 2,000 req/s for SECONDS, the provider answering after 100 ms (200 requests in flight)
#   hold: 2,000 req/s for 2 s, the provider answering after 3 s (up to 4,000 streams held open);
#         the peak RSS of the CA and the PA meanwhile
#
# and prints answered req/s, p50/p99 and failures of each round.
#
#   bench/stream-limit.sh [SECONDS] [LIMITS...]      (default 6, limits 100 128 256 1024 4096)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-6}
shift || true
LIMITS=("$@")
[ ${#LIMITS[@]} -gt 0 ] || LIMITS=(100 128 256 1024 4096)
source bench/lib.sh

# round NAME RATE SECONDS PATH: one load; prints `ok/s p50 p99 failed`.
round() {
  local out
  out=$("$BIN/detourctl" load --direct "http://$HOP1" --protocol http2 --service hello \
    --rate "$2" --duration "$3" --path "$4" --concurrency 8192 --timeout-ms 10000 2>/dev/null || true)
  local line
  line=$(echo "$out" | grep '^load:')
  awk -v l="$line" -v s="$3" 'BEGIN {
    n = split(l, f, " "); for (i = 2; i <= n; i++) { split(f[i], kv, "="); v[kv[1]] = kv[2] }
    printf "%8.0f %8.1f %8.1f %7d", v["ok"] / s, v["p50_ms"], v["p99_ms"], v["failed"] }'
}

# peak_rss PID SECONDS OUT: the largest RSS (KiB) seen every 100 ms.
peak_rss() {
  local end=$(( $(date +%s%3N) + $2 * 1000 )) max=0 r
  while [ "$(date +%s%3N)" -lt "$end" ]; do
    r=$(rss_kib "$1" 2>/dev/null || echo 0)
    [ "$r" -gt "$max" ] && max=$r
    sleep 0.1
  done
  echo "$max" >"$3"
}

start_provider 127.0.0.2
printf '%-7s | %8s %8s %8s %7s | %8s %8s %8s %7s | %8s %8s %7s\n' limit \
  "fast/s" "p50 ms" "p99 ms" failed "slow/s" "p50 ms" "p99 ms" failed "CA MiB" "PA MiB" failed
for limit in "${LIMITS[@]}"; do
  export DETOUR_SIDECAR__LIMITS__MAX_CONCURRENT_STREAMS=$limit
  start_detour "streams-$limit-mtls" "$BIN" "$PROVIDER"
  fast=$(round fast 5000 "$SECS" /)
  slow=$(round slow 2000 "$SECS" "/?ms=100")
  peak_rss "$HOP1_PID" 5 "$TMP/ca.rss" &
  a=$!
  peak_rss "$HOP2_PID" 5 "$TMP/pa.rss" &
  b=$!
  hold=$(round hold 2000 2 "/?ms=3000")
  wait "$a" "$b" || true
  printf '%-7s | %s | %s | %8.1f %8.1f %7s\n' "$limit" "$fast" "$slow" \
    "$(awk -v k="$(cat "$TMP/ca.rss")" 'BEGIN { print k / 1024 }')" \
    "$(awk -v k="$(cat "$TMP/pa.rss")" 'BEGIN { print k / 1024 }')" "$(echo "$hold" | awk '{ print $4 }')"
  kill "$HOP1_PID" "$HOP2_PID" 2>/dev/null || true
  wait "$HOP1_PID" "$HOP2_PID" 2>/dev/null || true
done
