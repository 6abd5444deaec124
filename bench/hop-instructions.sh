#!/usr/bin/env bash
# Instructions per request of each hop, counted by callgrind (valgrind): a count, not a time (how
# requests batch into wake-ups still moves it a little), broken down by function. Runs the Detour chain (CA → h2c → PA, plaintext)
# and the floor's mesh form (bench/floor: h1 → h2c → h1) in turn in front of one nginx backend,
# both hops of each under callgrind; counts only while wrk (-c8) drives the chain, after a 2 s
# warm-up; prints instructions per request per hop and leaves the callgrind files in OUT for
# `callgrind_annotate --inclusive=yes OUT/detour/ca.cg.1`.
#
#   bench/hop-instructions.sh [SECONDS]      (default 10)
#   env: OUT=DIR (default target/bench/hop-instructions-DATE), BIN=DIR (default target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
OUT=${OUT:-target/bench/hop-instructions-$(date -u +%Y%m%dT%H%M%SZ)}
command -v valgrind >/dev/null && command -v nginx >/dev/null && command -v wrk >/dev/null || {
  apt-get install -y valgrind nginx-light wrk >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y valgrind nginx-light wrk >/dev/null; }
}
source bench/lib.sh
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BACKEND=127.0.0.3:$(free_port 127.0.0.3)
mkdir -p "$TMP/backend"
cat >"$TMP/backend/nginx.conf" <<CFG
daemon off; master_process off; worker_processes 1;
pid $TMP/backend/nginx.pid; error_log $TMP/backend/error.log warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $TMP/backend/body; proxy_temp_path $TMP/backend/proxy;
  server { listen $BACKEND; location / { return 200 "hello\n"; } } }
CFG
nginx -c "$TMP/backend/nginx.conf" &
PIDS+=($!)
wait_http "http://$BACKEND/" 10
VG=(valgrind --tool=callgrind --instr-atstart=no --dump-instr=no)

# run KIND: starts KIND's two hops under callgrind, drives them, prints one line per hop.
run() {
  local kind=$1 dir=$OUT/$1 hop1 p1 p2
  mkdir -p "$dir"
  if [ "$kind" = floor ]; then
    local h2=127.0.0.2:$(free_port 127.0.0.2) h1=127.0.0.1:$(free_port 127.0.0.1)
    "${VG[@]}" --callgrind-out-file="$dir/pa.cg" "$BIN/detour-floor" --listen "$h2" --to "$BACKEND" \
      --accept h2 --upstream h1 2>"$dir/pa.log" &
    p2=$!
    "${VG[@]}" --callgrind-out-file="$dir/ca.cg" "$BIN/detour-floor" --listen "$h1" --to "$h2" \
      --accept h1 --upstream h2 2>"$dir/ca.log" &
    p1=$!
    PIDS+=("$p1" "$p2")
    hop1=$h1
  else
    local n
    for n in 2 1; do
      local run_dir=$TMP/$kind-$n provide=() role=ca
      mkdir -p "$run_dir"
      [ "$n" = 2 ] && provide=(--provide "hello=$BACKEND") && role=pa
      "$BIN/detourctl" sidecar-config --host "h$n" --ip "127.0.0.$n" --run-dir "$run_dir" \
        --registry "dir:$TMP/$kind-registry" --plaintext "${provide[@]}" >"$run_dir/sidecar.toml"
      RUST_LOG=warn "${VG[@]}" --callgrind-out-file="$dir/$role.cg" "$BIN/detour-sidecar" \
        --config "$run_dir/sidecar.toml" 2>"$dir/$role.log" &
      PIDS+=($!)
      eval "p$n=\$!"
      wait_file "$run_dir/sidecar.json" 120
    done
    hop1=$(sed -n 's/.*"outbound_tcp": "\([^"]*\)".*/\1/p' "$TMP/$kind-1/sidecar.json")
  fi
  local i=0
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: hello' "http://$hop1/")" = 200 ]; do
    i=$((i + 1)); [ "$i" -gt 1200 ] && { echo "$kind never answered" >&2; exit 1; }
    sleep 0.1
  done
  wrk -t1 -c8 -d2s -H 'Host: hello' "http://$hop1/" >/dev/null
  callgrind_control -i on "$p1" >/dev/null 2>&1
  callgrind_control -i on "$p2" >/dev/null 2>&1
  wrk -t1 -c8 -d"${SECS}s" -H 'Host: hello' "http://$hop1/" >"$dir/wrk.txt"
  callgrind_control -i off "$p1" >/dev/null 2>&1
  callgrind_control -i off "$p2" >/dev/null 2>&1
  callgrind_control -d "$p1" >/dev/null 2>&1
  callgrind_control -d "$p2" >/dev/null 2>&1
  sleep 1
  kill "$p1" "$p2" 2>/dev/null || true
  wait "$p1" "$p2" 2>/dev/null || true
  local reqs hop total
  reqs=$(awk '/requests in/ {print $1}' "$dir/wrk.txt")
  for hop in ca pa; do
    total=$(awk '/^totals:/ {print $2}' "$dir/$hop.cg".*)
    printf '%s\t%s\t%s\t%s\n' "$kind" "$hop" "$reqs" "$((total / reqs))"
  done
}
printf 'path\thop\trequests\tinstructions_per_request\n' | tee "$OUT/table.tsv"
run floor | tee -a "$OUT/table.tsv"
run detour | tee -a "$OUT/table.tsv"
echo "callgrind files: $OUT/{floor,detour}/{ca,pa}.cg.*"
