#!/usr/bin/env bash
# Runs every chaos scenario in turn (the soak with its 2-minute default), then prints a table of
# every scenario's RESULT fields, one row each, with the totals, and ends with
# `N passed, M failed`.
set -uo pipefail
cd "$(dirname "$0")"
passed=0; failed=0
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for s in *.sh; do
  case "$s" in lib.sh|run-all.sh) continue ;; esac
  echo "== $s"
  out=$(mktemp)
  if bash "$s" | tee "$out"; then status=ok; passed=$((passed + 1)); else status=FAILED; failed=$((failed + 1)); echo "== $s FAILED"; fi
  line=$(grep '^RESULT ' "$out" | tail -1)
  echo "${s%.sh} $status ${line#RESULT *: }" >>"$results"
  rm -f "$out"
done
python3 - "$results" <<'PY'
import sys
cols = ["sent", "ok", "failed", "failed_idempotent", "unknown_outcome", "mesh", "ca_direct", "direct", "switch_ms", "back_ms", "p99_ms"]
heads = ["scenario", "status", "sent", "ok", "failed", "failed_idem", "unknown", "mesh", "ca_direct", "direct", "switch_ms", "back_ms", "p99_ms"]
rows, totals = [], dict.fromkeys(cols[:5], 0)
for line in open(sys.argv[1]):
    parts = line.split()
    f = dict(kv.split("=", 1) for kv in parts[2:] if "=" in kv)
    rows.append([parts[0], parts[1]] + [f.get(c, "-") for c in cols])
    for c in totals:
        if f.get(c, "-").isdigit():
            totals[c] += int(f[c])
rows.append(["total", ""] + [str(totals[c]) if c in totals else "" for c in cols])
width = [max(len(str(r[i])) for r in rows + [heads]) for i in range(len(heads))]
print()
for r in [heads] + rows:
    print("  ".join(str(v).ljust(width[i]) if i < 2 else str(v).rjust(width[i]) for i, v in enumerate(r)))
PY
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
