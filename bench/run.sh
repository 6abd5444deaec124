#!/usr/bin/env bash
# The comparison a user would run: one hop chain each for Detour, HAProxy and nginx, and the
# backend alone, measured with independent load generators (wrk, oha) in interleaved rounds.
#
#   direct:  load → backend
#   detour:  load → CA (127.0.0.1, Host: hello) → h2c → PA (127.0.0.2) → backend
#            (tls.mode = "plaintext", as the peers' hops are)
#   detour-mtls: the same over mutual TLS between CA and PA (h2 over TLS 1.3), the default
#   floor:   load → detour-floor (127.0.0.1) → h2c → detour-floor (127.0.0.2) → backend
#            (bench/floor: a bare hyper hop with the sidecar's runtime, socket options and pool
#            shape and none of Detour's code — what Detour adds per hop is detour / floor)
#   floor-h1: the same floor as HTTP/1.1 all the way (load → h1 → h1 → backend)
#   haproxy: load → haproxy (127.0.0.1) → haproxy (127.0.0.2) → backend      (nbthread 1 each)
#   nginx:   load → nginx (127.0.0.1) → nginx (127.0.0.2) → backend          (1 worker each)
#
# The backend is one nginx worker on 127.0.0.3 answering a fixed 200. Per path and round:
# closed-loop max throughput (wrk, 32 connections), then open-loop 2,000 and 5,000 req/s (oha
# with latency correction, 32 connections); CPU per request of each process from /proc, and
# during the max run the share of the machine left idle; RSS of each hop after the load, and
# once more at rest, 11 s after the last run; a
# keep-alive check (no hop may open a connection per request: the connections the next hop and
# the backend accepted are counted). Before each run the machine
# must be quiet (< 15% CPU busy over a second, waited for up to 20 s; a run that started on a
# busy machine is marked). Prints one table of medians with ratios against HAProxy and nginx and
# writes the raw results (one line per run) to OUT.
#
#   bench/run.sh [ROUNDS] [SECONDS]        (defaults: 4 rounds of 8 s per measurement)
#   env: OUT=DIR (default target/bench/run-DATE),
#        PATHS="direct detour detour-mtls floor floor-h1 haproxy nginx",
#        RATES="2000 5000", DETOUR_EXTRA_TOML (added to both sidecars' config),
#        BIN=DIR (the Detour binaries, default target/release),
#        DETOUR_VARIANTS="name=BINDIR …" (other Detour builds or settings, as paths detour-name,
#        over mutual TLS when the name ends in -mtls; the profile-guided build of
#        deploy/build-pgo.sh: DETOUR_VARIANTS="pgo=target/pgo/release pgo-mtls=target/pgo/release";
#        DETOUR_TOML_detour_name="[proxy]\npa_protocol = \"http1\"" adds config to one of them)
#
# Installs what it lacks: haproxy, nginx-light and wrk with apt (needs root), oha with cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-4}
SECS=${2:-8}
PATHS=${PATHS:-direct detour detour-mtls floor floor-h1 haproxy nginx}
RATES=${RATES:-2000 5000}
CONNS=32
OUT=${OUT:-target/bench/run-$(date -u +%Y%m%dT%H%M%SZ)}

need_apt=()
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v wrk >/dev/null || need_apt+=(wrk)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get install -y "${need_apt[@]}" >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y "${need_apt[@]}" >/dev/null; }
fi
if ! command -v oha >/dev/null; then
  cargo install oha --locked >/dev/null 2>&1 || cargo install oha
  export PATH="$HOME/.cargo/bin:$PATH"
fi
source bench/lib.sh
HAPROXY_THREADS=1
mkdir -p "$OUT"
RAW="$OUT/raw.tsv"
printf 'round\tpath\tload\treq_per_s\tp50_us\tp99_us\terrors\tcpu_hop1_us\tcpu_hop2_us\tcpu_backend_us\trss_hop1_kib\trss_hop2_kib\tconns_hop2\tconns_backend\tquiet\tidle_pct\n' >"$RAW"

# --- the backend: one nginx worker, a fixed answer, its own accept counter ---
nginx_conf() { # DIR LISTEN BODY_OF_SERVER
  mkdir -p "$1"
  cat >"$1/nginx.conf" <<CFG
daemon off; master_process off; worker_processes 1;
pid $1/nginx.pid; error_log $1/error.log warn;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $1/body; proxy_temp_path $1/proxy;
  server {
    listen $2 backlog=4096 reuseport;
    $3
  }
}
CFG
}
BACKEND=127.0.0.3:$(free_port 127.0.0.3)
nginx_conf "$TMP/backend" "$BACKEND" 'location / { return 200 "hello\n"; } location = /__status { stub_status; }'
nginx -c "$TMP/backend/nginx.conf" &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
wait_http "http://$BACKEND/" 10
# Connections the backend accepted so far.
backend_accepts() { curl -s "http://$BACKEND/__status" | awk 'NR == 3 {print $1}'; }

# --- the chains: each sets HOP1 (address the load goes to), HOP1_PID, HOP2_PID, HOP2 ---
nginx_hop() { # N LISTEN NEXT
  nginx_conf "$TMP/nginx$1" "$2" "location / { proxy_pass http://next; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
  sed -i "s|^http {|http {\n  upstream next { server $3; keepalive 256; keepalive_requests 1000000; }|" "$TMP/nginx$1/nginx.conf"
  nginx -c "$TMP/nginx$1/nginx.conf" &
  PIDS+=($!)
}
start_chain() { # NAME HOP_FN
  HOP2=127.0.0.2:$(free_port 127.0.0.2)
  HOP1=127.0.0.1:$(free_port 127.0.0.1)
  "$2" 2 "$HOP2" "$BACKEND"
  HOP2_PID=$!
  "$2" 1 "$HOP1" "$HOP2"
  HOP1_PID=$!
  wait_http "http://$HOP1/" 10
}
# The floor: hop 1 takes HTTP/1.1 and sends UP1, hop 2 takes that and sends HTTP/1.1.
floor_hop() { # N LISTEN NEXT
  local accept=h1 upstream=h1
  if [ "$1" = 1 ]; then upstream=$FLOOR_UP; else accept=$FLOOR_UP; fi
  "$BIN/detour-floor" --listen "$2" --to "$3" --accept "$accept" --upstream "$upstream" &
  PIDS+=($!)
}
declare -A ADDR P1 P2 NEXT VARIANT
# Other Detour builds, measured in the same rounds: DETOUR_VARIANTS="name=BINDIR …" adds the
# path detour-name.
for v in ${DETOUR_VARIANTS:-}; do
  VARIANT[detour-${v%%=*}]=${v#*=}
  PATHS="$PATHS detour-${v%%=*}"
done
for p in $PATHS; do
  case $p in
    direct) ADDR[$p]=$BACKEND; P1[$p]=; P2[$p]=; NEXT[$p]= ;;
    detour | detour-mtls) start_detour "$p" "$BIN" "$BACKEND" ;;
    detour-*) start_detour "$p" "${VARIANT[$p]}" "$BACKEND" ;;
    floor) FLOOR_UP=h2 start_chain floor floor_hop ;;
    floor-h1) FLOOR_UP=h1 start_chain floor-h1 floor_hop ;;
    haproxy) start_chain haproxy haproxy_hop ;;
    nginx) start_chain nginx nginx_hop ;;
    *) echo "unknown path $p" >&2; exit 2 ;;
  esac
  if [ "$p" != direct ]; then ADDR[$p]=$HOP1; P1[$p]=$HOP1_PID; P2[$p]=$HOP2_PID; NEXT[$p]=$HOP2; fi
done

# Connections to a listening address, open or in TIME_WAIT, seen from the connecting side (a
# hop that opened a connection per request leaves thousands).
accepted_on() { # IP:PORT
  ss -Htan dst "$1" 2>/dev/null | wc -l
}

# Waits until the machine is quiet; prints yes or no.
quiet() {
  local i a b
  for i in $(seq 20); do
    read -r a b < <(awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    sleep 1
    local c d
    read -r c d < <(awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    if [ $(( (c - a) * 100 )) -lt $(( (d - b) * 15 )) ]; then echo yes; return; fi
  done
  echo no
}
ticks() { [ -n "$1" ] && cpu_ticks "$1" || echo 0; }
# The machine's idle and total CPU ticks so far (idle_pct: the idle share between two readings).
stat_ticks() { awk '/^cpu / {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }
idle_pct() { # IDLE0 TOTAL0 IDLE1 TOTAL1
  [ "$4" -gt "$2" ] && echo $(( ($3 - $1) * 100 / ($4 - $2) )) || echo -
}
per_req() { [ -n "$2" ] && [ "$2" -gt 0 ] && us_per_req "$1" "$2" || echo -; }

# measure ROUND PATH LOAD: one run; appends a raw line.
measure() {
  local r=$1 p=$2 load=$3 addr=${ADDR[$2]} q a1 a2 ab b1 b2 bb acc0 acc1 n rps p50 p99 err
  local idle=- i0 t0 i1 t1 wpid
  q=$(quiet)
  a1=$(ticks "${P1[$p]}"); a2=$(ticks "${P2[$p]}"); ab=$(ticks "$BACKEND_PID")
  acc0=$(backend_accepts)
  if [ "$load" = max ]; then
    wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -H 'Host: hello' "http://$addr/" >"$OUT/wrk.out" 2>&1 &
    wpid=$!
    # How much of the machine stays idle while the chain runs flat out: the middle half of the
    # run (a chain whose stages wait on each other leaves cores idle at its maximum).
    sleep "$(awk -v s="$SECS" 'BEGIN {print s / 4}')"
    read -r i0 t0 < <(stat_ticks)
    sleep "$(awk -v s="$SECS" 'BEGIN {print s / 2}')"
    read -r i1 t1 < <(stat_ticks)
    idle=$(idle_pct "$i0" "$t0" "$i1" "$t1")
    wait "$wpid"
    n=$(awk '/requests in/ {print $1}' "$OUT/wrk.out")
    rps=$(awk '/^Requests\/sec/ {printf "%d", $2}' "$OUT/wrk.out")
    p50=$(awk '$1 == "50%" {print $2}' "$OUT/wrk.out" | to_us)
    p99=$(awk '$1 == "99%" {print $2}' "$OUT/wrk.out" | to_us)
    err=$(awk '/Non-2xx/ {e += $NF} /Socket errors/ {gsub(/,/, ""); e += $4 + $6 + $8 + $10} END {print e + 0}' "$OUT/wrk.out")
  else
    oha -z "${SECS}s" -q "$load" -c "$CONNS" --latency-correction --no-tui --output-format json \
      -H 'Host: hello' "http://$addr/" >"$OUT/oha.json" 2>"$OUT/oha.err"
    read -r n rps p50 p99 err < <(python3 - "$OUT/oha.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]; p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
ok = int(codes.get("200", 0)); n = sum(int(v) for v in codes.values())
# Requests still in flight when the duration ends are cut off by oha, not failed.
errs = {k: int(v) for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k}
bad = n - ok + sum(errs.values())
print(n, int(s["requestsPerSec"]), int(p["p50"] * 1e6), int(p["p99"] * 1e6), bad)
PY
)
  fi
  b1=$(ticks "${P1[$p]}"); b2=$(ticks "${P2[$p]}"); bb=$(ticks "$BACKEND_PID")
  acc1=$(backend_accepts)
  local rss1=- rss2=- c2=-
  [ -n "${P1[$p]}" ] && rss1=$(rss_kib "${P1[$p]}") && rss2=$(rss_kib "${P2[$p]}") && c2=$(accepted_on "${NEXT[$p]}")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$p" "$load" "$rps" "$p50" "$p99" "$err" \
    "$(per_req $((b1 - a1)) "$n")" "$(per_req $((b2 - a2)) "$n")" "$(per_req $((bb - ab)) "$n")" \
    "$rss1" "$rss2" "$c2" "$((acc1 - acc0))" "$q" "$idle" | tee -a "$RAW" >&2
}
# wrk prints 812.00us, 1.20ms, 2.00s: to whole µs.
to_us() { awk '{v = $1; u = 1; if (v ~ /us$/) u = 1; else if (v ~ /ms$/) u = 1000; else if (v ~ /s$/) u = 1e6; sub(/[a-z]+$/, "", v); printf "%d", v * u}'; }

echo "bench: $(date -u +%FT%TZ) rounds=$ROUNDS seconds=$SECS conns=$CONNS cores=$(nproc) $(uname -r)" \
  "$(haproxy -v | head -1 | cut -d' ' -f1-3) nginx/$(nginx -v 2>&1 | sed 's/.*nginx\///') $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2) $(oha --version)" | tee "$OUT/header.txt"
# Each round starts one path further along (A B C D, B C D A, …), so that no path always runs
# right after the same neighbour or first in its round.
read -r -a ORDER <<<"$PATHS"
for r in $(seq "$ROUNDS"); do
  for load in max $RATES; do
    for i in $(seq 0 $((${#ORDER[@]} - 1))); do
      measure "$r" "${ORDER[$(( (i + r - 1) % ${#ORDER[@]} ))]}" "$load"
    done
  done
done
# Resident sets at rest: once more, 11 s after the last run (a sidecar gives its free heap pages
# back every 10 s; the peers keep theirs as they are).
sleep 11
for p in $PATHS; do
  [ -n "${P1[$p]}" ] || continue
  printf 'rest\t%s\trest\t-\t-\t-\t0\t-\t-\t-\t%s\t%s\t-\t-\t-\t-\n' "$p" "$(rss_kib "${P1[$p]}")" "$(rss_kib "${P2[$p]}")" |
    tee -a "$RAW" >&2
done
python3 bench/table.py "$RAW" | tee "$OUT/table.md"
echo "raw results: $RAW"
