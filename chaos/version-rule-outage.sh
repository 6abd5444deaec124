#!/usr/bin/env bash
# Chaos: a version rule holds through a watchdog restart during a registry outage. Every host
# under its watchdog, on etcd; a gray version rule moves the caller's host h1 to another sidecar
# binary (a copy at another path); under steady SDK load etcd is stopped, h1's watchdog is
# killed (kill -9) and started again while etcd is down — it must carry on from the rules and
# the state it saved, not move the host back to its baseline binary — and etcd comes back.
# Expectation: lossless, every request over the mesh, and zero upgrades: h1 runs the ruled
# binary throughout, in the very sidecar process that ran before the outage. Appended:
# binary_kept, same_sidecar, upgrades (h1's watchdog after the restart: 0).
SECS=${SECS:-20}
source "$(dirname "$0")/lib.sh"
WATCHED=yes
MOVES=no
mkdir -p "$TMP/sidecars"
WATCHDOG_EXTRA="[upgrade]
binaries_dir = \"$TMP/sidecars\""
start_etcd 1
start_mesh
REG=$REGISTRY
NEXT="$TMP/sidecars/detour-sidecar-next"
cp "$BIN/detour-sidecar" "$NEXT"
T0=$(now_ms)
"$BIN/detourctl" gray set --id canary --sidecar-binary "$NEXT" --sidecar-version next --hosts h1 \
  --reason "chaos: canary" --registry "$REG" >&2
[ "$(wait_binary h1 "$NEXT" "$T0")" != - ] || { echo "chaos: h1 never moved to $NEXT" >&2; exit 1; }
wait_watchdog_ready h1 20
SC=$(watched_sidecar_pid h1)
start_load
at 3
FAULT=$(now_ms)
stop_etcd_member 0
at 5
kill -KILL "${WATCHDOG_PID[h1]}"
wait "${WATCHDOG_PID[h1]}" 2>/dev/null || true
at 7
start_watched h1 127.0.0.1
at 12
BINARY=$(binary_of h1)
UPGRADES=$(curl -sf --max-time 2 "http://$(json_field "$TMP/h1/watchdog.json" admin)/metrics" |
  awk '/^detour_watchdog_upgrades_total/ { n += $2 } END { print n + 0 }')
at 13
start_etcd_member 0
etcd_healthy 0
HEALED=$(now_ms)
at 17
SAME=$([ "$(watched_sidecar_pid h1)" = "$SC" ] && [ "$(binary_of h1)" = "$NEXT" ] && echo yes || echo no)
extra_fields() { echo " binary_kept=$([ "$BINARY" = "$NEXT" ] && echo yes || echo no) same_sidecar=$SAME upgrades=$UPGRADES"; }
extra_check() { [ "$BINARY" = "$NEXT" ] && [ "$SAME" = yes ] && [ "$UPGRADES" = 0 ] && [ "$mesh" -eq "$sent" ]; }
finish version-rule-outage "$FAULT" "$HEALED" lossless
