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
source bench/lib.sh
start_provider 127.0.0.2
start_sidecar h2 127.0.0.2 "[[provide]]
service = \"hello\"
address = \"$PROVIDER\""
start_sidecar h1 127.0.0.1 ""
PA_PID=$(sidecar_field h2 pid)
CA_PID=$(sidecar_field h1 pid)

echo "bench: rate=$RATE req/s duration=${SECS}s rounds=$ROUNDS cores=$(nproc)"
for r in $(seq 1 "$ROUNDS"); do
  p0=$(cpu_ticks "$P_PID")
  line=$("$BIN/detourctl" load --direct "http://$PROVIDER" --service hello --rate "$RATE" --duration "$SECS" | grep "^load:")
  p1=$(cpu_ticks "$P_PID")
  n=$(sent_of "$line")
  echo "round $r direct:  $line"
  echo "round $r cpu:     provider_us_per_req=$(us_per_req $((p1 - p0)) "$n")"
  ca0=$(cpu_ticks "$CA_PID"); pa0=$(cpu_ticks "$PA_PID"); p0=$(cpu_ticks "$P_PID")
  line=$("$BIN/detourctl" load --sidecar "unix:$TMP/h1/outbound.sock" --service hello --rate "$RATE" --duration "$SECS" | grep "^load:")
  ca1=$(cpu_ticks "$CA_PID"); pa1=$(cpu_ticks "$PA_PID"); p1=$(cpu_ticks "$P_PID")
  n=$(sent_of "$line")
  echo "round $r mesh:    $line"
  echo "round $r cpu:     ca_us_per_req=$(us_per_req $((ca1 - ca0)) "$n") pa_us_per_req=$(us_per_req $((pa1 - pa0)) "$n") provider_us_per_req=$(us_per_req $((p1 - p0)) "$n")"
done
echo "memory: ca_rss_kib=$(rss_kib "$CA_PID") pa_rss_kib=$(rss_kib "$PA_PID")"
