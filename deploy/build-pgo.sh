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
# train MODE: a PA on 127.0.0.2 in front of the provider and a CA on 127.0.0.1, TLS as MODE
# (plaintext or mtls); load through the CA; both sidecars stopped and waited for.
train() {
  local mode=$1 n pids=() tls ca
  for n in 2 1; do
    local dir=$TMP/$mode-$n provide=""
    mkdir -p "$dir"
    [ "$n" = 2 ] && provide="[[provide]]
service = \"hello\"
address = \"$PROVIDER\""
    if [ "$mode" = mtls ]; then
      "$BIN/detourctl" certs --dir "$TMP/pki" --host "$mode-$n" >/dev/null
      tls="[tls]
cert = \"$TMP/pki/$mode-$n/cert.pem\"
key = \"$TMP/pki/$mode-$n/key.pem\"
bundle = \"$TMP/pki/$mode-$n/bundle.pem\""
    else
      tls='[tls]
mode = "plaintext"'
    fi
    cat >"$dir/sidecar.toml" <<TOML
host = "$mode-$n"
run_dir = "$dir"
registry = "dir:$TMP/$mode-registry"
[outbound]
listen = "127.0.0.$n:0"
unix = "outbound.sock"
[inbound]
listen = "127.0.0.$n:0"
[admin]
listen = "127.0.0.$n:0"
$tls
$provide
TOML
    RUST_LOG=warn "$TMP/bin/detour-sidecar" --config "$dir/sidecar.toml" 2>"$dir/sidecar.log" &
    pids+=($!)
    PIDS+=($!)
    wait_file "$dir/sidecar.json" 20
  done
  ca=$(sidecar_field "$mode-1" outbound_tcp)
  local i=0
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: hello' "http://$ca/")" = 200 ]; do
    i=$((i + 1)); [ "$i" -gt 2000 ] && { echo "build-pgo: the $mode chain never answered" >&2; exit 1; }
    sleep 0.01
  done
  local load=("$BIN/detourctl" load --sidecar "$ca" --service hello --duration "$SECS" --concurrency 32)
  "${load[@]}" --rate 4000 >&2
  "${load[@]}" --rate 1000 --method MIX --body-bytes 512 >&2
  "${load[@]}" --rate 1000 --protocol http2 >&2
  kill -TERM "${pids[@]}"
  for n in "${pids[@]}"; do wait "$n" || { echo "build-pgo: a $mode sidecar exited $?" >&2; exit 1; }; done
}
echo "build-pgo: training ($SECS s per load)" >&2
train plaintext
train mtls

shopt -s nullglob
raw=("$PROFILES"/*.profraw)
[ ${#raw[@]} -gt 0 ] || { echo "build-pgo: the training wrote no profile" >&2; exit 1; }
"$PROFDATA" merge -o "$ROOT/target/pgo-profiles.profdata" "${raw[@]}"

echo "build-pgo: the optimised sidecar" >&2
RUSTFLAGS="-Cprofile-use=$ROOT/target/pgo-profiles.profdata" \
  cargo build --release -p detour-sidecar --bin detour-sidecar --target-dir target/pgo
echo "$ROOT/target/pgo/release/detour-sidecar"
