#!/usr/bin/env bash
# Chaos: long streams (a GET answered with 20 lines over 2 s, 10 a second) beside the steady load,
# through C→CA→PA→P, while the provider host's sidecar (PA) is stopped gracefully (SIGTERM) at
# 3 s and started again at 6 s, then killed with kill -9 at 10 s and started again at 13 s.
# Expectation: no idempotent request fails; no stream fails at the graceful stop (the PA drains:
# the streams in flight finish); at the kill -9 only the streams in flight through the PA are cut
# (their bytes pass through the killed process, and none can be sent again once the caller has
# begun to read it), and every stream due after it arrives whole.
SECS=${SECS:-18}
source "$(dirname "$0")/lib.sh"
start_mesh
start_load
"$BIN/detourctl" load --sidecar "unix:$TMP/h1/outbound.sock" --service hello --rate 10 \
  --duration "$SECS" --method STREAM --concurrency 1000 --timeout-ms 20000 \
  >"$TMP/streams.out" 2>"$TMP/streams.err" &
STREAMS_PID=$!
EXTRA_PIDS+=("$STREAMS_PID")
at 3
FAULT=$(now_ms)
stop_sidecar h2 TERM
at 6
start_sidecar h2 127.0.0.2
at 10
KILL_AT=$(now_ms)
stop_sidecar h2 KILL
at 13
start_sidecar h2 127.0.0.2
HEALED=$(now_ms)
wait "$STREAMS_PID" || true

# A failed stream is cut by the kill when the kill came while it was in flight (300 ms: from the
# logged time to the signal).
read -r STREAMS STREAMS_OK CUT LOST < <(python3 - "$TMP/streams.out" "$KILL_AT" <<'PY'
import sys
out, kill = sys.argv[1], int(sys.argv[2])
sent = ok = cut = lost = 0
for line in open(out):
    f = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    if line.startswith("load:"):
        sent, ok = int(f["sent"]), int(f["ok"])
    elif line.startswith("failed:"):
        if int(f["due_unix_ms"]) - 300 <= kill <= int(f["ended_unix_ms"]):
            cut += 1
        else:
            lost += 1
            print(f"chaos: stream lost: {line.strip()}", file=sys.stderr)
print(sent, ok, cut, lost)
PY
)
extra_fields() { echo " streams=$STREAMS streams_ok=$STREAMS_OK streams_cut_at_kill=$CUT streams_lost=$LOST"; }
extra_check() { [ "$STREAMS" -eq $(( 10 * SECS )) ] && [ "$LOST" -eq 0 ] && [ $(( STREAMS_OK + CUT )) -eq "$STREAMS" ]; }
finish streams-pa-faults "$FAULT" "$HEALED" no-idempotent-loss
