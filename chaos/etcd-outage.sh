#!/usr/bin/env bash
# Chaos: stop etcd (the whole registry) for 20 s under steady SDK load, and restart the caller's
# sidecar while it is down: the SDK rides through on the direct path, the restarted sidecar
# routes from its disk cache alone, and everything converges when etcd is back.
# Expectation: nothing fails.
SECS=${SECS:-28}
source "$(dirname "$0")/lib.sh"
start_etcd 1
start_mesh
start_load
at 3
FAULT=$(now_ms)
stop_etcd_member 0
at 5
stop_sidecar h1 TERM
start_sidecar h1 127.0.0.1
at 23
start_etcd_member 0
etcd_healthy 0
HEALED=$(now_ms)
finish etcd-outage "$FAULT" "$HEALED" lossless
