#!/usr/bin/env bash
# Chaos: ZooKeeper is killed for ZK_OUTAGE_S (30 s) under steady SDK load to providers mirrored
# from it. Expectation: detour-registry-sync deletes nothing from etcd (min_entries, sampled
# every 50 ms), traffic is unaffected, and the source is connected again afterwards.
ZK_OUTAGE_S=${ZK_OUTAGE_S:-30}
SECS=${SECS:-$(( ZK_OUTAGE_S + 12 ))}
source "$(dirname "$0")/lib.sh"
MOVES=no
start_legacy_mesh 3
start_load
watch_mirrored $(( ZK_OUTAGE_S + 8 ))
at 3
FAULT=$(now_ms)
stop_zookeeper
at $(( 3 + ZK_OUTAGE_S ))
restart_zookeeper
HEALED=$(now_ms)
deadline=$(( $(now_ms) + 15000 ))
until sync_state a | grep -q '"connected": true'; do
  [ "$(now_ms)" -gt "$deadline" ] && break
  sleep 0.1
done
CONNECTED=$(sync_state a | grep -q '"connected": true' && echo yes || echo no)
MIN=$(mirrored_min)
extra_fields() { echo " outage_s=$ZK_OUTAGE_S min_entries=$MIN reconnected=$CONNECTED"; }
extra_check() { [ "$MIN" = 3 ] && [ "$CONNECTED" = yes ]; }
finish zookeeper-outage "$FAULT" "$HEALED" lossless
