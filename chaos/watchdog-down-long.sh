#!/usr/bin/env bash
# Chaos: a provider host's watchdog is frozen (SIGSTOP) for three times the registry's
# time-to-live under steady SDK load, on etcd (lease TTL 4 s). The watchdog holds the host's
# registrations under its lease; frozen, it cannot keep the lease, so its sidecar must keep the
# registrations alive itself, and hand them back without a gap when the watchdog thaws.
# Expectation: lossless, every request over the mesh, and h2's provider registered in etcd at
# every sample (every 50 ms) throughout. Appended: min_registered (the fewest keys of hello in
# etcd seen: 1), taken_over and returned (h2's sidecar kept the registrations while the watchdog
# was away, and gave them back: 1 and 1).
SECS=${SECS:-22}
SIDECAR_EXTRA='[registry_etcd]
ttl_ms = 4000'
source "$(dirname "$0")/lib.sh"
WATCHED=yes
MOVES=no
start_etcd 1
start_mesh
watch_mirrored $(( SECS - 1 ))
start_load
at 3
FAULT=$(now_ms)
kill -STOP "${WATCHDOG_PID[h2]}"
at 15
kill -CONT "${WATCHDOG_PID[h2]}"
HEALED=$(now_ms)
at 19
sidecar_metric() { # HOST NAME LABEL
  curl -sf --max-time 2 "http://$(json_field "$TMP/$1/sidecar.json" admin)/metrics" |
    awk -v n="$2" -v l="$3" 'index($0, n) == 1 && index($0, l) { v += $2 } END { print v + 0 }'
}
TAKEN=$(sidecar_metric h2 detour_watchdog_takeovers_total 'event="taken"')
RETURNED=$(sidecar_metric h2 detour_watchdog_takeovers_total 'event="returned"')
MIN=$(mirrored_min)
extra_fields() { echo " min_registered=$MIN taken_over=$TAKEN returned=$RETURNED"; }
extra_check() { [ "$MIN" = 1 ] && [ "$TAKEN" -ge 1 ] && [ "$RETURNED" -ge 1 ] && [ "$mesh" -eq "$sent" ]; }
finish watchdog-down-long "$FAULT" "$HEALED" lossless
