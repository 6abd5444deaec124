#!/usr/bin/env bash
# The test command: install what is missing, build every binary (the integration tests start
# real detour-sidecar and detourctl processes), run every test in the workspace, and end with
# one line `N passed, M failed` summed over all test binaries. With DETOUR_TEST_KEEP=1 a test's
# mesh directory (every process's log and state) is kept and its path printed.
#
# The process tests' load timelines (the modules in TIMELINES below, one at a time under
# `detour_tests::serial`) run on one test thread beside every other test on another, so the two
# cores hold at most one timeline and one other test at any moment; their output follows the
# rest's. (`registry_sync`'s tests hold the lock too when the binary runs whole, but carry no
# request load: they run with the rest.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo build --locked --workspace --bins
cargo test --locked --workspace --no-run

TIMELINES=(etcd_mesh failover gray gray_versions registry_sync_load watchdog watchdog_adopt)
take=() skip=()
for m in "${TIMELINES[@]}"; do
  take+=("$m::")
  skip+=(--skip "$m::")
done

# Every process test runs in exactly one of the two halves.
process_list() { cargo test --locked -q -p detour-tests --test process -- --list "$@" 2>/dev/null | grep -c ': test$' || true; }
all=$(process_list)
in_timelines=$(process_list "${take[@]}")
in_rest=$(process_list "${skip[@]}")
if [ "$all" -eq 0 ] || [ $((in_timelines + in_rest)) -ne "$all" ]; then
  echo "tests/run.sh: the process tests do not split cleanly: $all in all, $in_timelines timelines, $in_rest others" >&2
  exit 1
fi

log=$(mktemp) timeline_log=$(mktemp)
timeline_pid=
cleanup() {
  # The timelines run in a session of their own: stopping the command stops them too.
  [ -n "$timeline_pid" ] && kill -- -"$timeline_pid" 2>/dev/null
  rm -f "$log" "$timeline_log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
setsid cargo test --locked -p detour-tests --test process --no-fail-fast -- "${take[@]}" \
  --test-threads=1 >"$timeline_log" 2>&1 &
timeline_pid=$!
echo "tests/run.sh: $in_timelines load timelines run in the background; their output follows the rest's"

status=0
cargo test --locked --workspace --exclude detour-tests --no-fail-fast 2>&1 | tee "$log" || status=$?
cargo test --locked -p detour-tests --no-fail-fast -- "${skip[@]}" --test-threads=1 2>&1 |
  tee -a "$log" || status=$?
timeline_status=0
wait "$timeline_pid" || timeline_status=$?
timeline_pid=
tee -a "$log" <"$timeline_log"
[ "$timeline_status" -eq 0 ] || status=$timeline_status
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
