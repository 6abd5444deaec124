#!/usr/bin/env bash
# The cost of tracing per hop, as CPU per request: release binaries from before tracing
# (BEFORE: a directory with detour-sidecar and detourctl), the current ones with export off
# (trace context still read, started and passed on), and the current ones exporting every
# request's spans (100% sampling, SDK, CA and PA) to a local OTLP sink. Interleaved rounds of
# bench/mesh-vs-direct.sh at RATE for SECONDS.
#
#   bench/tracing-cost.sh BEFORE [RATE] [SECONDS] [ROUNDS]     (defaults: 2000 15 3)
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?a directory with the binaries from before}
RATE=${2:-2000}
SECS=${3:-15}
ROUNDS=${4:-3}
AFTER=${AFTER:-target/release}
[ -x "$AFTER/detour-sidecar" ] || cargo build --release --bins
SINK_DIR=$(mktemp -d /tmp/detour-sink-XXXXXX)
python3 bench/otlp-sink.py "$SINK_DIR/port" >"$SINK_DIR/out" &
SINK=$!
trap 'kill $SINK 2>/dev/null; wait $SINK 2>/dev/null; cat "$SINK_DIR/out"; rm -rf "$SINK_DIR"' EXIT
for _ in $(seq 1 500); do [ -s "$SINK_DIR/port" ] && break; sleep 0.01; done
URL="http://127.0.0.1:$(cat "$SINK_DIR/port")"

one() { # LABEL BIN [env…]
  local label=$1 bin=$2; shift 2
  env "$@" BIN="$bin" bench/mesh-vs-direct.sh "$RATE" "$SECS" 1 | sed "s/^/$label /"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r"
  one before "$BEFORE"
  one off "$AFTER"
  one export "$AFTER" DETOUR_SIDECAR__TRACING__OTLP_ENDPOINT="$URL" OTEL_EXPORTER_OTLP_ENDPOINT="$URL"
done
