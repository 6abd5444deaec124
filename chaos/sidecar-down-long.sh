#!/usr/bin/env bash
# Chaos: every host under its own watchdog, registry records with a 2 s TTL; the provider host
# h2's sidecar stays down for 6 s (3 TTLs: its binary crashes on every restart) while its
# watchdog keeps its provider registered, so callers reach it C→CA→P all along; then it comes
# back. Expectation: lossless. Appended: min_endpoints (the fewest endpoints of hello the
# caller's sidecar routed to while h2's was down, sampled every 100 ms: 1).
source "$(dirname "$0")/lib.sh"
WATCHED=yes
REGISTRY_DIR_EXTRA="ttl_ms = 2000"
WATCHDOG_EXTRA="[crash_loop]
crashes = 100
[restart]
max_backoff_ms = 500"
ensure_binaries
SIDECAR_BIN_OF[h2]=$(flaky_sidecar)
start_mesh
start_load
at 3
touch "$TMP/crash"
FAULT=$(now_ms)
kill -TERM "$(watched_sidecar_pid h2)"
MIN=9
while [ "$(now_ms)" -lt $(( FAULT + 6000 )) ]; do
  n=$(endpoints_at h1 hello); [ "$n" -lt "$MIN" ] && MIN=$n
  sleep 0.1
done
rm -f "$TMP/crash"
HEALED=$(now_ms)
extra_fields() { echo " min_endpoints=$MIN"; }
extra_check() { [ "$MIN" -eq 1 ]; }
finish sidecar-down-long "$FAULT" "$HEALED" lossless
