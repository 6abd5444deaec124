#!/usr/bin/env bash
# Chaos: a sidecar release that takes the listening sockets over and then never becomes ready.
# Every host under its own watchdog (upgrade.ready_timeout_ms = 3000); under steady SDK load
# (1000 req/s) the caller's sidecar (h1) and then the provider host's (h2) are "upgraded" with
# `detourctl upgrade` to a release that hangs after taking the sockets over: the real sidecar
# with a copy of the host's config that adds a provider whose first health check (GET /health)
# never answers (a listener that accepts and stays silent; check timeout 60 s). The watchdog
# gives up at the ready timeout and kills the new process; the running sidecar never stopped
# accepting, and the new one accepted nothing. Expectation: lossless, every request on the mesh, both upgrades
# refused, both old sidecars still the ones running. Appended: refused (of 2), kept (of 2).
RATE=${RATE:-1000}
source "$(dirname "$0")/lib.sh"
WATCHED=yes
MOVES=no
WATCHDOG_EXTRA="[upgrade]
ready_timeout_ms = 3000"

start_mesh
# A provider that accepts and never answers: what the hanging release waits for.
python3 - "$TMP/silent.addr" <<'PY' &
import socket, sys
s = socket.socket()
s.bind(("127.0.0.9", 0))
s.listen(64)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%s:%d" % s.getsockname())
import os
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
held = []
while True:
    held.append(s.accept()[0])
PY
EXTRA_PIDS+=($!)
wait_file "$TMP/silent.addr" 10

# hanging_release HOST: $TMP/HOST/hanging-sidecar, the hanging release for HOST.
hanging_release() {
  local host=$1 cfg="$TMP/$1/sidecar-hanging.toml"
  sed 's/^\[inbound\]$/[inbound]\ncheck_timeout_ms = 60000\ncheck_interval_ms = 120000/' \
    "$TMP/$host/sidecar.toml" >"$cfg"
  printf '[[provide]]\nservice = "silent"\naddress = "%s"\ncheck_path = "/health"\n' "$(cat "$TMP/silent.addr")" >>"$cfg"
  # The watchdog's arguments (--take-over) pass through; the config is the hanging one.
  printf '#!/bin/sh\n[ "$1" = --config ] && shift 2\nexec "%s" --config "%s" "$@"\n' \
    "$BIN/detour-sidecar" "$cfg" >"$TMP/$host/hanging-sidecar"
  chmod +x "$TMP/$host/hanging-sidecar"
}

REFUSED=0 KEPT=0
try_upgrade() { # HOST
  local host=$1 before out
  before=$(watched_sidecar_pid "$host")
  hanging_release "$host"
  if out=$("$BIN/detourctl" upgrade --binary "$TMP/$host/hanging-sidecar" \
      --watchdog "$TMP/$host/watchdog.sock" 2>&1); then
    echo "chaos: the hanging release of $host was taken: $out" >&2
  else
    REFUSED=$((REFUSED + 1))
    echo "chaos: $host: $(echo "$out" | head -${OUT_LINES:-1})" >&2
  fi
  [ "$(watched_sidecar_pid "$host")" = "$before" ] && KEPT=$((KEPT + 1))
  return 0
}
start_load
at 2
FAULT=$(now_ms)
try_upgrade h1
at 7
try_upgrade h2
HEALED=$(now_ms)
extra_fields() { echo " refused=$REFUSED/2 kept=$KEPT/2"; }
extra_check() { [ "$REFUSED" -eq 2 ] && [ "$KEPT" -eq 2 ] && [ "$mesh" -eq "$sent" ]; }
finish upgrade-bad-binary "$FAULT" "$HEALED" lossless
