#!/usr/bin/env bash
# Chaos: SIGTERM the provider host's sidecar (PA), restart it 3 s later. Under steady SDK load: the drain is announced in the registry, the CA goes C→CA→P, and back after the restart. Expectation: nothing fails.
source "$(dirname "$0")/lib.sh"
start_mesh
start_load
at 4
FAULT=$(now_ms)
stop_sidecar h2 TERM
at 7
start_sidecar h2 127.0.0.2
HEALED=$(now_ms)
finish pa-restart "$FAULT" "$HEALED" lossless
