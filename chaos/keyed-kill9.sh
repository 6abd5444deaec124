#!/usr/bin/env bash
# Chaos: POSTs with idempotency keys (`detourctl load --keys`) to a slow provider (200 ms a request, about 100 in flight); kill -9 the provider host's sidecar (PA) at 4 s and restart it at 6 s, then kill -9 the caller's sidecar (CA) at 8 s and restart it at 10 s. The keyed POSTs in flight at each kill are sent again (C→CA→P, then C→P) and the provider answers a repeat from its record of the key. Expectation: nothing fails (where ca-kill9 and pa-kill9 lose their unkeyed POSTs in flight as unknown outcome); `replayed` counts the answers given from a record.
source "$(dirname "$0")/lib.sh"
PROVIDER_ARGS=(--delay-ms 200)
LOAD_METHOD=POST
LOAD_ARGS=--keys
extra_fields() { echo " replayed=$(field "$(grep '^paths:' "$TMP/load.out")" replayed)"; }
start_mesh
start_load
at 4
FAULT=$(now_ms)
stop_sidecar h2 KILL
at 6
start_sidecar h2 127.0.0.2
at 8
stop_sidecar h1 KILL
at 10
start_sidecar h1 127.0.0.1
HEALED=$(now_ms)
finish keyed-kill9 "$FAULT" "$HEALED" lossless
