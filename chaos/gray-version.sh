#!/usr/bin/env bash
# Chaos: every host under its own watchdog; under steady SDK load, a gray version rule moves
# the caller's host (h1) to another sidecar binary (a copy at another path) — its watchdog
# applies it through the lossless upgrade — and `detourctl rollback --version` moves it back.
# Expectation: lossless. Appended: moved_ms (from the rule until h1's watchdog runs the new
# binary) and rolled_back_ms (from the rollback until it runs its previous one again).
source "$(dirname "$0")/lib.sh"
WATCHED=yes
MOVES=no
# A version rule names a binary of this directory (and its sha256, which detourctl computes).
mkdir -p "$TMP/sidecars"
WATCHDOG_EXTRA="[upgrade]
binaries_dir = \"$TMP/sidecars\""
start_mesh
REG="dir:$TMP/registry"
NEXT="$TMP/sidecars/detour-sidecar-next"
cp "$BIN/detour-sidecar" "$NEXT"
BEFORE=$(binary_of h1)
start_load
at 2
FAULT=$(now_ms)
"$BIN/detourctl" gray set --id canary --sidecar-binary "$NEXT" --sidecar-version next --hosts h1 --registry "$REG" >&2
MOVED=$(wait_binary h1 "$NEXT" "$FAULT")
at 8
HEALED=$(now_ms)
"$BIN/detourctl" rollback --version --reason "chaos: version rollback" --registry "$REG" >&2
BACK=$(wait_binary h1 "$BEFORE" "$HEALED")
H2=$(binary_of h2)
extra_fields() { echo " moved_ms=$MOVED rolled_back_ms=$BACK h2_binary_unchanged=$([ "$H2" = "$BEFORE" ] && echo yes || echo no)"; }
extra_check() { [ "$MOVED" != - ] && [ "$BACK" != - ] && [ "$H2" = "$BEFORE" ]; }
finish gray-version "$FAULT" "$HEALED" lossless
