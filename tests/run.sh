#!/usr/bin/env bash
# The test command: install what is missing, build every binary (the integration tests start
# real detour-sidecar and detourctl processes), run every test in the workspace, and end with
# one line `N passed, M failed` summed over all test binaries. With DETOUR_TEST_KEEP=1 a test's
# mesh directory (every process's log and state) is kept and its path printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo build --locked --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
