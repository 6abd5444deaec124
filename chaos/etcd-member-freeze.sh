#!/usr/bin/env bash
# Chaos: a 3-member etcd cluster under steady SDK load; SIGSTOP the first-listed member (where
# every registry client starts) for 8 s, as a partition would: it accepts connections and never
# answers. A registration deleted during the freeze must still reach the caller's sidecar.
# Expectation: nothing fails, the mesh path is kept, and the deleted instance gets no request
# more than 1 s after the change was acknowledged (deregister_ms).
source "$(dirname "$0")/lib.sh"
MOVES=no
start_etcd 3
start_mesh 3
start_load
at 3
FAULT=$(now_ms)
kill -STOP "${ETCD_PID[0]}"
at 7
etcd_delete /detour/v1/services/hello/h4-hello # member 0 does not answer: another one does
DELETED=$(now_ms)                             # acknowledged
at 11
kill -CONT "${ETCD_PID[0]}"
HEALED=$(now_ms)
extra_fields() { echo " deregister_ms=$(served_after h4-hello "$DELETED")"; }
extra_check() { [ "$(served_after h4-hello "$DELETED")" -lt 1000 ]; }
finish etcd-member-freeze "$FAULT" "$HEALED" lossless
