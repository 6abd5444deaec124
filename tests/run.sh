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
# One build of every target: binaries, tests and examples with the same features (the
# dev-dependencies' too), so that no test run below builds anything again.
cargo build --locked --workspace --all-targets

TIMELINES=(etcd_mesh failover gray gray_versions registry_sync_load watchdog watchdog_adopt)
# Both halves select the whole workspace, as the build above did: the same features, nothing
# built again. The timelines are named exactly, so no other test binary's names can match.
timelines=()
while read -r name; do
  for m in "${TIMELINES[@]}"; do
    if [[ $name == "$m::"* ]]; then timelines+=("$name"); fi
  done
done < <(cargo test --locked -q --workspace --test process -- --list 2>/dev/null | sed -n 's/: test$//p')
if [ "${#timelines[@]}" -eq 0 ]; then
  echo "tests/run.sh: no process test found in the modules ${TIMELINES[*]}" >&2
  exit 1
fi
skip=()
for name in "${timelines[@]}"; do
  skip+=(--skip "$name")
done

log=$(mktemp) timeline_log=$(mktemp)
timeline_pid=
cleanup() {
  # The timelines run in a session of their own: stopping the command stops them too.
  [ -n "$timeline_pid" ] && kill -- -"$timeline_pid" 2>/dev/null
  rm -f "$log" "$timeline_log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
setsid cargo test --locked --workspace --test process --no-fail-fast -- --exact "${timelines[@]}" \
  --test-threads=1 >"$timeline_log" 2>&1 &
timeline_pid=$!
echo "tests/run.sh: ${#timelines[@]} load timelines run in the background; their output follows the rest's"

status=0
cargo test --locked --workspace --no-fail-fast -- --exact "${skip[@]}" --test-threads=1 2>&1 |
  tee "$log" || status=$?
timeline_status=0
wait "$timeline_pid" || timeline_status=$?
timeline_pid=
tee -a "$log" <"$timeline_log"
[ "$timeline_status" -eq 0 ] || status=$timeline_status
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
