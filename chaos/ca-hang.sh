#!/usr/bin/env bash
# Chaos: SIGSTOP the caller's sidecar (CA) for 5 s, then SIGCONT. Under steady SDK load: probes detect the hang, traffic goes C→P, and comes back after recovery. Expectation: no idempotent request fails.
source "$(dirname "$0")/lib.sh"
start_mesh
start_load
at 4
FAULT=$(now_ms)
kill -STOP "${PID_OF[h1]}"
at 9
kill -CONT "${PID_OF[h1]}"
HEALED=$(now_ms)
finish ca-hang "$FAULT" "$HEALED" no-idempotent-loss
