#!/usr/bin/env bash
# Chaos: a 3-member etcd cluster under steady SDK load; kill -9 the leader, bring it back, then
# kill -9 a follower. Expectation: nothing fails; the mesh path is never left.
source "$(dirname "$0")/lib.sh"
MOVES=no
start_etcd 3
start_mesh
start_load
at 3
FAULT=$(now_ms)
LEADER=$(etcd_leader)
stop_etcd_member "$LEADER" KILL
at 7
start_etcd_member "$LEADER"
etcd_healthy "$LEADER"
at 9
FOLLOWER=$(( ( $(etcd_leader) + 1 ) % 3 ))
stop_etcd_member "$FOLLOWER" KILL
HEALED=$(now_ms)
finish etcd-member-kill "$FAULT" "$HEALED" lossless
