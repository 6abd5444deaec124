#!/usr/bin/env bash
# Chaos: a legacy application released under steady SDK load. Three providers register in
# ZooKeeper (Dubbo's layout) and detour-registry-sync mirrors them into etcd, where the caller's
# sidecar routes from. One is released as Dubbo does it: de-registered from ZooKeeper, serving
# RELEASE_GRACE_MS (2 s) more, then stopped. Expectation: nothing fails, and the released
# instance gets no new request well before its process stops (last_ms).
source "$(dirname "$0")/lib.sh"
MOVES=no
RELEASE_GRACE_MS=${RELEASE_GRACE_MS:-2000}
start_legacy_mesh 3
start_load
at 4
FAULT=$(now_ms)
kill -TERM "${PROVIDER_PID[p4]}"
wait "${PROVIDER_PID[p4]}" 2>/dev/null || true
HEALED=$(now_ms)
extra_fields() { echo " last_ms=$(served_after p4 "$FAULT") grace_ms=$RELEASE_GRACE_MS stopped_ms=$(( HEALED - FAULT ))"; }
extra_check() { [ "$(served_after p4 "$FAULT")" -lt "$RELEASE_GRACE_MS" ]; }
finish app-release "$FAULT" "$HEALED" lossless
