#!/usr/bin/env bash
# Chaos: five provider hosts; one registration is deliberately removed from etcd under steady SDK
# load. Expectation: that instance gets no new request within 1 s of the change (deregister_ms),
# and nothing fails.
source "$(dirname "$0")/lib.sh"
MOVES=no
start_etcd 1
start_mesh 5
start_load
at 4
FAULT=$(now_ms)
etcd_delete /detour/v1/services/hello/h4-hello
HEALED=$FAULT
extra_fields() { echo " deregister_ms=$(served_after h4-hello "$FAULT")"; }
extra_check() { [ "$(served_after h4-hello "$FAULT")" -lt 1000 ]; }
finish deregister-one "$FAULT" "$HEALED" lossless
