#!/usr/bin/env bash
# Chaos: five provider hosts; 80% of the service's registrations vanish from etcd at once (as a
# partition would do) under steady SDK load. Expectation: self-protection engages on the
# caller's sidecar, the healthy instances stay in rotation, nothing fails.
source "$(dirname "$0")/lib.sh"
MOVES=no
start_etcd 1
start_mesh 5
start_load
at 4
FAULT=$(now_ms)
for h in h3 h4 h5 h6; do etcd_delete "/detour/v1/services/hello/$h-hello"; done
sleep 1
ADMIN=$(sed -n 's/.*"admin": "\([^"]*\)".*/\1/p' "$TMP/h1/sidecar.json")
STATE=$(curl -sf "http://$ADMIN/state")
HEALED=$(now_ms)
extra_fields() { echo " protected=$(echo "$STATE" | grep -q '"protected":true' && echo yes || echo no)"; }
extra_check() {
  echo "$STATE" | grep -q '"protected":true' || return 1
  # The de-registered but healthy instances kept taking traffic after the event.
  local h last
  for h in h3 h4 h5 h6; do
    last=$(echo "$SERVED" | tr ' ' '\n' | sed -n "s/^$h-hello=[0-9]*@//p")
    [ -n "$last" ] && [ "$last" -gt $(( FAULT + 2000 )) ] || return 1
  done
}
finish mass-deregistration "$FAULT" "$HEALED" lossless
