#!/usr/bin/env bash
# Chaos: kill -9 the caller's sidecar (CA), restart it 3 s later. Under steady SDK load: traffic goes C→P at once and back to the mesh after the restart. Expectation: no idempotent request fails; only requests in flight at the kill may fail, as unknown outcome.
source "$(dirname "$0")/lib.sh"
start_mesh
start_load
at 4
FAULT=$(now_ms)
stop_sidecar h1 KILL
at 7
start_sidecar h1 127.0.0.1
HEALED=$(now_ms)
finish ca-kill9 "$FAULT" "$HEALED" no-idempotent-loss
