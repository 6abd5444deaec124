#!/usr/bin/env bash
# Chaos: under steady SDK load, `detourctl rollback --service hello` turns the mesh off for the
# service (the caller's SDK calls the provider directly, C→P), and `detourctl rollback --undo`
# 5 s later turns it back on (the SDK ramps back through the link machine). Expectation:
# lossless. Appended: rollback_ms (from the command until the caller's last answer over the
# mesh: when it had left the mesh) and undo_ms (from the undo until its last direct answer:
# when it was back on the mesh), and the rollback record.
source "$(dirname "$0")/lib.sh"
start_mesh
REG="dir:$TMP/registry"
start_load
at 4
FAULT=$(now_ms)
"$BIN/detourctl" rollback --service hello --reason "chaos: rollback" --registry "$REG" >&2
at 9
HEALED=$(now_ms)
"$BIN/detourctl" rollback --undo --registry "$REG" >&2
RECORDS=$("$BIN/detourctl" rollback --history --json --registry "$REG" |
  python3 -c 'import json,sys; r=json.load(sys.stdin); print(len(r), "undone" if r and r[-1].get("undone") else "open")')
# From the rollback until the caller's last answer over the mesh (0 when none came after it).
rollback_ms() {
  local from
  from=$(field "$(grep '^mesh_gap:' "$TMP/load.out" || true)" from_unix_ms)
  if [ "${from:--}" = - ]; then echo -; elif [ "$from" -lt "$FAULT" ]; then echo 0; else echo $(( from - FAULT )); fi
}
extra_fields() { echo " rollback_ms=$(rollback_ms) undo_ms=$back records=${RECORDS// /,}"; }
# The caller left the mesh within 2 s, came back, and the rollback was recorded and undone.
extra_check() {
  local ms
  ms=$(rollback_ms)
  [ "$ms" != - ] && [ "$ms" -le 2000 ] && [ "$back" != - ] && [ "$RECORDS" = "1 undone" ] && [ "$dir" -gt 0 ]
}
finish rollback "$FAULT" "$HEALED" lossless
