#!/usr/bin/env bash
# Chaos: zone-aware balancing. The caller host h1 and the provider host h2 are in zone a, the
# provider host h3 in zone b. Under steady SDK load (GET), h1's CA sends every call to zone a;
# h2's provider process is killed (kill -9) and started again on the same address 6 s later:
# h2's PA answers that it could not reach its provider, the CA sends each such request to h3
# (it never reached a provider), h2's sidecar marks its provider unhealthy, and h1 spills over
# to zone b until zone a is healthy again. Expectation: lossless; zone a takes ≥ 99% of the
# answers before the kill and after it is back, zone b ≥ 99% while it is down (from 1 s after
# h1 saw it unhealthy). Appended: zone_a_before, zone_b_during, zone_a_after (% of the answers,
# with their count), drawn_ms and restored_ms (as in provider-crash).
source "$(dirname "$0")/lib.sh"
MOVES=no
SECS=18
LOAD_METHOD=GET
LOAD_ARGS=--progress
ZONE_OF=([h1]=a [h2]=a [h3]=b)
start_mesh 2
start_load
at 5
ADDR=$(cat "$TMP/h2.provider.addr")
FAULT=$(now_ms)
kill -KILL "${PROVIDER_PID[h2]}"
wait "${PROVIDER_PID[h2]}" 2>/dev/null || true
DRAWN=$(wait_health_at h1 h2-hello false "$FAULT" 5)
at 11
start_provider h2 "$ADDR"
HEALED=$(now_ms)
RESTORED=$(wait_health_at h1 h2-hello true "$HEALED" 5)
wait "$LOAD_PID" || true
# Shares of zone a (h2) and b (h3) over whole seconds within each window.
read -r BEFORE DURING AFTER ZONES_OK < <(python3 - "$TMP/load.out" "$LOAD_START" "$FAULT" "${DRAWN/-/99999}" "$HEALED" "${RESTORED/-/99999}" <<'PY'
import sys
path, start, fault, drawn, healed, restored = sys.argv[1], *map(int, sys.argv[2:])
lines = [l.split() for l in open(path) if l.startswith("served_at:")]
def share(lo, hi, who):
    total = n = 0
    for l in lines:
        at = int(l[1])
        if at - 1000 < lo or at > hi:
            continue
        for x in l[2:]:
            name, rest = x.split("=", 1)
            c = int(rest.split("@")[0])
            total += c
            n += c if name == who else 0
    return (100.0 * n / total if total else 0.0), total
b = share(start + 1000, fault, "h2-hello")
d = share(fault + drawn + 1000, healed, "h3-hello")
a = share(healed + restored + 1000, start + 18000, "h2-hello")
ok = all(s >= 99.0 and t >= 1000 for s, t in (b, d, a))
print(*(f"{s:.1f}%/{t}" for s, t in (b, d, a)), int(ok))
PY
)
extra_fields() { echo " zone_a_before=$BEFORE zone_b_during=$DURING zone_a_after=$AFTER drawn_ms=$DRAWN restored_ms=$RESTORED"; }
extra_check() { [ "$ZONES_OK" = 1 ]; }
finish zone-failover "$FAULT" "$HEALED" lossless
