#!/usr/bin/env bash
# Chaos: kill -9 the provider host's sidecar (PA), restart it 3 s later. Under steady SDK load: the caller's CA goes C→CA→P at once and back after the restart. Expectation: no idempotent request fails; only requests in flight at the kill may fail, as unknown outcome.
source "$(dirname "$0")/lib.sh"
start_mesh
start_load
at 4
FAULT=$(now_ms)
stop_sidecar h2 KILL
at 7
start_sidecar h2 127.0.0.2
HEALED=$(now_ms)
finish pa-kill9 "$FAULT" "$HEALED" no-idempotent-loss
