#!/usr/bin/env bash
# Chaos: every host under its own watchdog; the provider host h2's sidecar binary starts
# crashing at once (a wrapper that exits while a flag file exists) and h2's sidecar is stopped
# (SIGTERM): every restart crashes, and after 3 crashes the watchdog marks h2 `failed` in the
# registry — callers reach its provider C→CA→P. 6 s later the binary is fixed: the sidecar comes
# back and, once it has stayed ready for 2 s, the mark clears. Expectation: lossless. Appended:
# failed_ms (first stop → marked failed), cleared_ms (fix → mark cleared), marked (the registry's
# status of h2 while looping).
source "$(dirname "$0")/lib.sh"
WATCHED=yes
WATCHDOG_EXTRA="[crash_loop]
crashes = 3
retry_ms = 1000
clear_after_ms = 2000"
ensure_binaries
SIDECAR_BIN_OF[h2]=$(flaky_sidecar)
start_mesh
# until_state HOST EXPR SECONDS: ms until HOST's watchdog state satisfies the Python EXPR on s.
until_state() {
  local t0 deadline; t0=$(now_ms); deadline=$(( t0 + $3 * 1000 ))
  while [ "$(now_ms)" -lt "$deadline" ]; do
    if watchdog_state "$1" | python3 -c "import json,sys; s=json.load(sys.stdin)['watchdog']; sys.exit(0 if ($2) else 1)" 2>/dev/null; then
      echo $(( $(now_ms) - t0 )); return
    fi
    sleep 0.05
  done
  echo -
}
start_load
at 3
touch "$TMP/crash"
FAULT=$(now_ms)
kill -TERM "$(watched_sidecar_pid h2)"
W=$(until_state h2 "s['crash_loop']" 10)
FAILED_MS=-; [ "$W" != - ] && FAILED_MS=$(( $(now_ms) - FAULT ))
MARKED=$(registry_status h2)
at 9
rm -f "$TMP/crash"
HEALED=$(now_ms)
C=$(until_state h2 "not s['crash_loop'] and s['sidecar_state'] == 'ready'" 10)
CLEARED_MS=-; [ "$C" != - ] && CLEARED_MS=$(( $(now_ms) - HEALED ))
extra_fields() { echo " failed_ms=$FAILED_MS cleared_ms=$CLEARED_MS marked=$MARKED"; }
extra_check() { [ "$MARKED" = failed ] && [ "$CLEARED_MS" != - ] && [ "$(registry_status h2)" = ready ]; }
finish crash-loop "$FAULT" "$HEALED" lossless
