#!/usr/bin/env bash
# Chaos: two provider hosts; h2's provider process is killed (kill -9) while h2's sidecar stays
# up, and started again on the same address 5 s later. Under steady SDK load: h2's PA answers
# that it could not reach its provider, the caller's CA sends each such request to h3 whatever
# its method, and h2's sidecar marks its provider unhealthy in the registry until it answers
# again. Expectation: no idempotent request fails; a POST the provider process may have taken
# when it was killed (written to its socket before the kernel closed it) fails as unknown
# outcome and is never sent again. Appended: drawn_ms (from the kill until the caller's sidecar
# shows h2's provider unhealthy: how long it could still draw traffic), bounced (requests h2's
# PA could not hand to its provider, each sent elsewhere by the CA), restored_ms (from the
# restart until the caller's sidecar shows it healthy again).
source "$(dirname "$0")/lib.sh"
MOVES=no
start_mesh 2
ADMIN_H2=$(json_field "$TMP/h2/sidecar.json" admin)

start_load
at 4
ADDR=$(cat "$TMP/h2.provider.addr")
FAULT=$(now_ms)
kill -KILL "${PROVIDER_PID[h2]}"
wait "${PROVIDER_PID[h2]}" 2>/dev/null || true
DRAWN=$(wait_health_at h1 h2-hello false "$FAULT")
at 9
start_provider h2 "$ADDR"
HEALED=$(now_ms)
RESTORED=$(wait_health_at h1 h2-hello true "$HEALED")
bounced() {
  curl -sf --max-time 1 "http://$ADMIN_H2/metrics" |
    awk '/^detour_mesh_errors_total\{reason="upstream-connect"\}/ { n += $2 } END { print n + 0 }'
}
BOUNCED=$(bounced)
extra_fields() { echo " drawn_ms=$DRAWN bounced=$BOUNCED restored_ms=$RESTORED"; }
# h2's provider was marked unhealthy and healthy again, and served again after its restart.
extra_check() { [ "$DRAWN" != - ] && [ "$RESTORED" != - ] && [ "$(served_after h2-hello "$HEALED")" -gt 0 ]; }
finish provider-crash "$FAULT" "$HEALED" no-idempotent-loss
