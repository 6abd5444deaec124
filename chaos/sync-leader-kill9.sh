#!/usr/bin/env bash
# Chaos: the leading detour-registry-sync replica is killed with SIGKILL under steady SDK load to
# providers it mirrors from ZooKeeper. Expectation: the standby is elected within the election
# lease (takeover_ms), the etcd entries never drop (min_entries, sampled every 50 ms, over the
# dead leader's entry lease), nothing fails.
SECS=${SECS:-20}
source "$(dirname "$0")/lib.sh"
MOVES=no
start_legacy_mesh 3
start_sync b
start_load
watch_mirrored 18
at 4
FAULT=$(now_ms)
kill -KILL "${SYNC_PID[a]}"
wait "${SYNC_PID[a]}" 2>/dev/null || true
until [ "$(sync_role b)" = leader ]; do
  [ $(( $(now_ms) - FAULT )) -gt 15000 ] && break
  sleep 0.05
done
HEALED=$(now_ms)
MIN=$(mirrored_min)
extra_fields() { echo " takeover_ms=$(( HEALED - FAULT )) min_entries=$MIN role_b=$(sync_role b)"; }
extra_check() { [ "$(sync_role b)" = leader ] && [ "$MIN" = 3 ]; }
finish sync-leader-kill9 "$FAULT" "$HEALED" lossless
