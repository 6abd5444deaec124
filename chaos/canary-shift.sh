#!/usr/bin/env bash
# Chaos: a canary release by routes. Provider hosts h2 (version 1) and h3 (version 2); under
# steady SDK load (GET) from h1, `detourctl route set` shifts the share of version 2 through
# 0 → 5 → 50 → 100 → 50 → 5 → 0 %, 10 s a step; h3's sidecar is killed with kill -9 in the middle
# of the first 50% step and started again 3 s later (meanwhile h1's CA reaches h3's provider
# straight, C→CA→P, by the same routes). Expectation: lossless; the share of version 2 seen in
# each step (its first second left out, while sidecars take the change) within 2 points of the
# weight; no answer from version 2 later than 1 s after the last step took it to 0%.
# Appended: shares (weight:observed% per step, with the requests counted) and last_v2_ms.
RATE=${RATE:-1000}
source "$(dirname "$0")/lib.sh"
STEPS=(0 5 50 100 50 5 0)
STEP_S=10
SECS=$(( ${#STEPS[@]} * STEP_S + 4 ))
LOAD_METHOD=GET
LOAD_ARGS=--progress
REG="dir:$TMP/registry"
ensure_binaries
versioned_host() { # HOST IP VERSION
  start_provider "$1" "$2:0"
  start_sidecar "$1" "$2" "[[provide]]
service = \"hello\"
address = \"$(cat "$TMP/$1.provider.addr")\"
version = \"$3\""
}
versioned_host h2 127.0.0.2 1
versioned_host h3 127.0.0.3 2
start_sidecar h1 127.0.0.1
route() { # WEIGHT_OF_V2
  "$BIN/detourctl" route set --service hello --registry "$REG" --reason "chaos: canary $1%" \
    --routes "{\"subsets\":{\"v1\":{\"version\":\"1\"},\"v2\":{\"version\":\"2\"}},\"default\":{\"v1\":$(( 100 - $1 )),\"v2\":$1}}" >/dev/null
}
route 0
sleep 1
start_load
CHANGES=()
for i in "${!STEPS[@]}"; do
  at $(( 2 + i * STEP_S ))
  CHANGES+=("$(now_ms)")
  route "${STEPS[$i]}"
  if [ "$i" -eq 2 ]; then
    at $(( 2 + i * STEP_S + 2 )); FAULT=$(now_ms); stop_sidecar h3 KILL
    at $(( 2 + i * STEP_S + 5 )); start_sidecar h3 127.0.0.3; HEALED=$(now_ms)
  fi
done
CHANGES+=("$(( CHANGES[-1] + STEP_S * 1000 ))")
wait "$LOAD_PID" || true
# Per step: v2's share of the answers of the seconds that began at least 1 s after the change.
read -r SHARES SHARES_OK LAST_V2 < <(python3 - "$TMP/load.out" "${STEPS[*]}" "${CHANGES[*]}" <<'PY'
import sys
lines = [l.split() for l in open(sys.argv[1]) if l.startswith("served_at:")]
steps = [int(x) for x in sys.argv[2].split()]
changes = [int(x) for x in sys.argv[3].split()]
out, ok, last_v2 = [], True, 0
for i, w in enumerate(steps):
    lo, hi = changes[i] + 1000, changes[i + 1]
    total = v2 = 0
    for l in lines:
        at = int(l[1])
        counts = {k: (int(c), int(t)) for k, c, t in (x.replace("@", "=").split("=") for x in l[2:])}
        if i == len(steps) - 1 and "h3-hello" in counts:
            last_v2 = max(last_v2, counts["h3-hello"][1])
        if at - 1000 < lo or at > hi:
            continue
        total += sum(c for c, _ in counts.values())
        v2 += counts.get("h3-hello", (0, 0))[0]
    share = 100.0 * v2 / total if total else -1
    ok = ok and total >= 2000 and abs(share - w) <= 2.0
    out.append(f"{w}:{share:.1f}%/{total}")
last_ms = max(0, last_v2 - changes[-2]) if last_v2 else 0
print(",".join(out), int(ok), last_ms)
PY
)
extra_fields() { echo " shares=$SHARES last_v2_ms=$LAST_V2"; }
extra_check() { [ "$SHARES_OK" = 1 ] && [ "$LAST_V2" -le 1000 ]; }
finish canary-shift "$FAULT" "$HEALED" lossless
