#!/usr/bin/env bash
# The same two proxy hops done by Detour, HAProxy and nginx on this machine, at one fixed rate:
#   client → hop 1 (127.0.0.1) → hop 2 (127.0.0.2) → demo provider
# Detour: CA → PA over pooled h2c. HAProxy and nginx: HTTP/1.1 with upstream keep-alive, each
# hop its own process with default threading (nginx: one worker). The client is `detourctl load`
# over HTTP/1.1 (through the SDK for Detour, plain HTTP for the others). Prints latency
# percentiles and the CPU each hop spent per request (from /proc). Installs haproxy and
# nginx-light with apt when missing (needs root).
#
#   bench/mesh-vs-proxies.sh [RATE] [SECONDS]     (defaults: 8000 10)
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-8000}
SECS=${2:-10}
if ! command -v haproxy >/dev/null || ! command -v nginx >/dev/null; then
  apt-get install -y haproxy nginx-light >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y haproxy nginx-light >/dev/null; }
fi
source bench/lib.sh
start_provider 127.0.0.2

# run NAME HOP1_PID HOP2_PID LOAD_ARGS...: one measured run.
run() {
  local name=$1 h1=$2 h2=$3
  shift 3
  local a0 b0 a1 b1 line n
  a0=$(cpu_ticks "$h1"); b0=$(cpu_ticks "$h2")
  line=$("$BIN/detourctl" load "$@" --service hello --rate "$RATE" --duration "$SECS" | grep "^load:")
  a1=$(cpu_ticks "$h1"); b1=$(cpu_ticks "$h2")
  n=$(sent_of "$line")
  echo "$name: $line"
  echo "$name cpu: hop1_us_per_req=$(us_per_req $((a1 - a0)) "$n") hop2_us_per_req=$(us_per_req $((b1 - b0)) "$n") rss_kib=$(rss_kib "$h1")/$(rss_kib "$h2")"
}

# two_hops NAME HOP_FN: hop 2 on 127.0.0.2 to the provider, hop 1 on 127.0.0.1 to hop 2, both
# started by HOP_FN N LISTEN NEXT (which runs the proxy in the background); then measures them.
two_hops() {
  local a2 a1 p2 p1
  a2=127.0.0.2:$(free_port 127.0.0.2)
  a1=127.0.0.1:$(free_port 127.0.0.1)
  "$2" 2 "$a2" "$PROVIDER"
  p2=$!
  "$2" 1 "$a1" "$a2"
  p1=$!
  wait_http "http://$a1/" 10
  run "$1" "$p1" "$p2" --direct "http://$a1"
}

echo "bench: rate=$RATE req/s duration=${SECS}s cores=$(nproc) $(haproxy -v | head -1 | cut -d' ' -f1-3) $(nginx -v 2>&1 | cut -d' ' -f3)"

# Detour.
start_sidecar h2 127.0.0.2 "[[provide]]
service = \"hello\"
address = \"$PROVIDER\""
start_sidecar h1 127.0.0.1 ""
run detour "$(sidecar_field h1 pid)" "$(sidecar_field h2 pid)" --sidecar "$(sidecar_field h1 outbound_tcp)"

# HAProxy: hop N listens on 127.0.0.N and forwards to NEXT.
two_hops haproxy haproxy_hop

# nginx: one process per hop.
nginx_hop() { # N LISTEN NEXT
  mkdir -p "$TMP/nginx$1"
  cat >"$TMP/nginx$1/nginx.conf" <<CFG
daemon off; master_process off; worker_processes 1;
pid $TMP/nginx$1/nginx.pid; error_log $TMP/nginx$1/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx$1/body; proxy_temp_path $TMP/nginx$1/proxy;
  upstream next { server $3; keepalive 256; }
  server {
    listen $2;
    location / { proxy_pass http://next; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CFG
  nginx -c "$TMP/nginx$1/nginx.conf" &
  PIDS+=($!)
}
two_hops nginx nginx_hop
