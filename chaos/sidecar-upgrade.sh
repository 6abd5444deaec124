#!/usr/bin/env bash
# Chaos: every host under its own watchdog; under steady SDK load (1000 req/s), the caller's
# sidecar and then the provider host's are upgraded to another binary (a copy at another path)
# with `detourctl upgrade`, then both rolled back with `detourctl upgrade --rollback`: each time
# the new sidecar takes the listening sockets over and the old one hands off. Expectation:
# lossless, and every request stays on the mesh (no connection refused, no fallback). Appended:
# upgrades (succeeded of 4), ready_ms and done_ms of each.
RATE=${RATE:-1000}
source "$(dirname "$0")/lib.sh"
WATCHED=yes
MOVES=no

start_mesh
cp "$BIN/detour-sidecar" "$TMP/detour-sidecar-next"
UPGRADED=0 READY=() DONE=()
upgrade() { # HOST ARGS...
  local host=$1 out; shift
  if out=$("$BIN/detourctl" upgrade "$@" --watchdog "$TMP/$host/watchdog.sock" 2>&1); then
    UPGRADED=$((UPGRADED + 1))
    READY+=("$(field "$out" ready_ms)"); DONE+=("$(field "$out" done_ms)")
  else
    echo "chaos: upgrade of $host ($*) failed: $out" >&2
  fi
}
start_load
at 2
FAULT=$(now_ms)
upgrade h1 --binary "$TMP/detour-sidecar-next"
at 5
upgrade h2 --binary "$TMP/detour-sidecar-next"
at 8
upgrade h1 --rollback
at 11
upgrade h2 --rollback
HEALED=$(now_ms)
extra_fields() { echo " upgrades=$UPGRADED/4 ready_ms=$(IFS=,; echo "${READY[*]}") done_ms=$(IFS=,; echo "${DONE[*]}")"; }
extra_check() { [ "$UPGRADED" -eq 4 ] && [ "$mesh" -eq "$sent" ]; }
finish sidecar-upgrade "$FAULT" "$HEALED" lossless
