#!/usr/bin/env bash
# Runs every chaos scenario in turn and ends with `N passed, M failed`.
set -uo pipefail
cd "$(dirname "$0")"
passed=0; failed=0
for s in *.sh; do
  case "$s" in lib.sh|run-all.sh) continue ;; esac
  echo "== $s"
  if bash "$s"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "== $s FAILED"; fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
