#!/usr/bin/env bash
# The production build of detour-sidecar, optimised with a profile of its own request path
# (profile-guided optimisation, PGO):
#
#   1. an instrumented build of the sidecar (target/pgo-gen);
#   2. a training run: a demo provider, a PA and a CA on loopback, in plaintext and over mutual
#      TLS, with `detourctl load` sending GETs over HTTP/1.1, GETs and POSTs with bodies, and
#      GETs over HTTP/2 through the CA; the sidecars are stopped with SIGTERM, and write their
#      profiles as they exit;
#   3. the profiles merged with the toolchain's llvm-profdata (`rustup component add
#      llvm-tools` when it is missing);
#   4. the optimised build: target/pgo/release/detour-sidecar.
#
# The profile only steers the compiler's choices (inlining, code layout, which branches are
# hot); the program is the same source, and does the same. What the training does not run
# (failover, upgrades, the registry back-ends) is optimised for size, as cold code.
#
#   deploy/build-pgo.sh        (12–16 minutes on 2 cores; prints the binary's path)
#   env: PGO_SECONDS=N (seconds of each training load, default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${PGO_SECONDS:-5}
ROOT=$PWD
PROFILES=$ROOT/target/pgo-profiles

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
  command -v rustup >/dev/null ||
    { echo "build-pgo: needs llvm-profdata from rustup's llvm-tools, for rustc's own LLVM" >&2; exit 1; }
  rustup component add llvm-tools
fi

echo "build-pgo: the tools and the instrumented sidecar" >&2
cargo build --release --bins
RUSTFLAGS="-Cprofile-generate=$PROFILES" \
  cargo build --release -p detour-sidecar --bin detour-sidecar --target-dir target/pgo-gen
# Build scripts ran instrumented too; only the sidecar's own runs below count.
rm -rf "$PROFILES"

BIN=target/release
source bench/lib.sh
mkdir -p "$TMP/bin"
ln -s "$ROOT/target/pgo-gen/release/detour-sidecar" "$TMP/bin/detour-sidecar"

start_provider 127.0.0.3
# train NAME: a PA in front of the provider and a CA (mutual TLS when NAME ends in -mtls), load
# through the CA, then both sidecars stopped and waited for: they write their profiles as they
# exit.
train() {
  start_detour "$1" "$TMP/bin" "$PROVIDER"
  local load=("$BIN/detourctl" load --sidecar "$HOP1" --service hello --duration "$SECS" --concurrency 32)
  "${load[@]}" --rate 4000 >&2
  "${load[@]}" --rate 1000 --method MIX --body-bytes 512 >&2
  "${load[@]}" --rate 1000 --protocol http2 >&2
  kill -TERM "$HOP1_PID" "$HOP2_PID"
  local pid
  for pid in "$HOP1_PID" "$HOP2_PID"; do
    wait "$pid" || { echo "build-pgo: a $1 sidecar exited $?" >&2; exit 1; }
  done
}
echo "build-pgo: training ($SECS s per load)" >&2
train train
train train-mtls

shopt -s nullglob
raw=("$PROFILES"/*.profraw)
[ ${#raw[@]} -gt 0 ] || { echo "build-pgo: the training wrote no profile" >&2; exit 1; }
"$PROFDATA" merge -o "$ROOT/target/pgo-profiles.profdata" "${raw[@]}"

echo "build-pgo: the optimised sidecar" >&2
RUSTFLAGS="-Cprofile-use=$ROOT/target/pgo-profiles.profdata" \
  cargo build --release -p detour-sidecar --bin detour-sidecar --target-dir target/pgo
echo "$ROOT/target/pgo/release/detour-sidecar"
