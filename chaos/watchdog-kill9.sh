#!/usr/bin/env bash
# Chaos: every host under its own watchdog; the caller host's watchdog is killed (kill -9) under
# load and started again 3 s later. The sidecar runs on throughout and the new watchdog adopts
# it. Expectation: lossless, every request on the mesh. Appended: adopted (the new watchdog runs
# the very sidecar that ran before), most_sidecars (the most sidecar processes of h1 seen at once,
# sampled every 20 ms: exactly 1).
source "$(dirname "$0")/lib.sh"
WATCHED=yes
MOVES=no
start_mesh
SC=$(watched_sidecar_pid h1)
( most=0; end=$(( $(now_ms) + 16000 ))
  while [ "$(now_ms)" -lt "$end" ]; do
    n=$(pgrep -fc -- "--config $TMP/h1/sidecar.toml" || true)
    [ "$n" -gt "$most" ] && most=$n
    echo "$most" >"$TMP/most"; sleep 0.02
  done ) &
EXTRA_PIDS+=($!)
start_load
at 4
FAULT=$(now_ms)
kill -KILL "${WATCHDOG_PID[h1]}"
wait "${WATCHDOG_PID[h1]}" 2>/dev/null || true
at 7
start_watched h1 127.0.0.1
HEALED=$(now_ms)
ADOPTED=no
watchdog_state h1 | python3 -c "import json,sys; s=json.load(sys.stdin)['watchdog']; sys.exit(0 if s['adopted'] and s['sidecar_pid'] == $SC else 1)" && ADOPTED=yes
extra_fields() { echo " adopted=$ADOPTED most_sidecars=$(cat "$TMP/most")"; }
extra_check() { [ "$ADOPTED" = yes ] && [ "$(cat "$TMP/most")" = 1 ] && [ "$mesh" -eq "$sent" ]; }
finish watchdog-kill9 "$FAULT" "$HEALED" lossless
