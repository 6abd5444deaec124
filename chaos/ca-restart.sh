#!/usr/bin/env bash
# Chaos: SIGTERM the caller's sidecar (CA), restart it 3 s later. Under steady SDK load: the drain is announced, traffic goes C→P, and comes back after the restart. Expectation: nothing fails.
source "$(dirname "$0")/lib.sh"
start_mesh
start_load
at 4
FAULT=$(now_ms)
stop_sidecar h1 TERM
at 7
start_sidecar h1 127.0.0.1
HEALED=$(now_ms)
finish ca-restart "$FAULT" "$HEALED" lossless
