#!/usr/bin/env bash
# Chaos: a rollback survives a restart during a registry outage. Every host under its
# watchdog, on etcd; under steady SDK load `detourctl rollback --service hello` turns the mesh
# off for the service; etcd is stopped; the caller's sidecar is killed (kill -9) and restarted by
# its watchdog while etcd is down — it must start from the rules it saved, not from "no rules";
# etcd comes back, and `detourctl rollback --undo` turns the mesh on again.
# Expectation: lossless, and no answer over the mesh from 2 s after the rollback until the undo.
# Appended: restarted (a new sidecar pid after the kill), rules_source (where the restarted
# sidecar's rules came from while etcd was down: disk), mesh_after_restart (answers over the
# mesh between the restart and the undo: 0).
SECS=${SECS:-24}
source "$(dirname "$0")/lib.sh"
WATCHED=yes
start_etcd 1
start_mesh
REG=$REGISTRY
start_load
at 3
FAULT=$(now_ms)
"$BIN/detourctl" rollback --service hello --reason "chaos: rollback during an outage" --registry "$REG" >&2
at 6
stop_etcd_member 0
at 8
OLD=$(watched_sidecar_pid h1)
kill -KILL "$OLD"
RESTART=$(now_ms)
# The watchdog starts a new sidecar; it routes from its disk cache and its saved rules.
deadline=$(( $(now_ms) + 15000 ))
until [ -f "$TMP/h1/sidecar.pid" ] && [ "$(watched_sidecar_pid h1 2>/dev/null || echo "$OLD")" != "$OLD" ]; do
  [ "$(now_ms)" -gt "$deadline" ] && { echo "chaos: h1's sidecar was not restarted" >&2; exit 1; }
  sleep 0.05
done
wait_watchdog_ready h1 20
NEW=$(watched_sidecar_pid h1)
SOURCE=$(curl -sf --max-time 2 "http://$(json_field "$TMP/h1/sidecar.json" admin)/state" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["documents"]["gray/rules"]["source"])' 2>/dev/null || echo -)
at 15
start_etcd_member 0
etcd_healthy 0
at 18
HEALED=$(now_ms)
"$BIN/detourctl" rollback --undo --registry "$REG" >&2
# Answers over the mesh between the restart and the undo (the longest gap must cover both).
mesh_after_restart() {
  local gap from to
  gap=$(grep '^mesh_gap:' "$TMP/load.out" || true)
  from=$(field "$gap" from_unix_ms); to=$(field "$gap" to_unix_ms)
  if [ "${from:--}" = - ] || [ "$from" -gt $(( FAULT + 2000 )) ] || [ "$to" -lt "$HEALED" ]; then echo some; else echo 0; fi
}
extra_fields() { echo " restarted=$([ "$NEW" != "$OLD" ] && echo yes || echo no) rules_source=$SOURCE mesh_after_restart=$(mesh_after_restart)"; }
extra_check() { [ "$NEW" != "$OLD" ] && [ "$SOURCE" = disk ] && [ "$(mesh_after_restart)" = 0 ] && [ "$dir" -gt 0 ]; }
finish rollback-outage "$FAULT" "$HEALED" lossless
