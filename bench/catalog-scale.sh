#!/usr/bin/env bash
# The catalog at scale against a real etcd on loopback: N services x M instances (default
# 10,000 x 10). Prints write time, full load from etcd, memory, write-to-catalog delay, and the
# start from the disk cache alone. Needs etcd (tests/setup.sh installs it).
#   bench/catalog-scale.sh [N] [M]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}; M=${2:-10}
TMP=$(mktemp -d /tmp/detour-bench-XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PEER=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
etcd --data-dir "$TMP/etcd" --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER" --initial-advertise-peer-urls "http://127.0.0.1:$PEER" \
  --initial-cluster "default=http://127.0.0.1:$PEER" --quota-backend-bytes 4294967296 >"$TMP/etcd.log" 2>&1 &
ETCD=$!
trap 'kill $ETCD 2>/dev/null; wait $ETCD 2>/dev/null; rm -rf "$TMP"' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 0.1; done
cargo build --release -q -p detour-registry-sync --example catalog_scale
BIN=target/release/examples/catalog_scale
"$BIN" "http://127.0.0.1:$PORT" "$N" "$M" "$TMP"
# A second process, as a restarted sidecar: etcd unreachable, the disk cache alone.
"$BIN" --from-cache "$TMP" "$N" "$M"
