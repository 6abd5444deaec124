#!/usr/bin/env bash
# The cost of a mutual-TLS handshake at the PA: `openssl s_time` opens new TLS connections to a
# PA for SECONDS (each a full handshake with a client certificate of the mesh's CA, then closed),
# and the PA's CPU time from /proc is divided by the connections it handled: completed plus
# failed handshakes (`s_time` closes as soon as its side is done, so with TLS 1.3 most end
# before the PA has read the client's Finished and count as failed). Also: the same with a
# certificate of another CA (refused at the PA), the cost of turning strangers away.
#
#   bench/tls-handshake.sh [SECONDS]      (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
command -v openssl >/dev/null || { apt-get install -y openssl >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y openssl >/dev/null; }; }
source bench/lib.sh
start_provider 127.0.0.2
start_sidecar pa 127.0.0.2 "[[provide]]
service = \"hello\"
address = \"$PROVIDER\""
"$BIN/detourctl" certs --dir "$TMP/pki" --host client >/dev/null
"$BIN/detourctl" certs --dir "$TMP/other" --host client >/dev/null
PA=$(sidecar_field pa inbound)
PA_PID=$(sidecar_field pa pid)
ADMIN=$(sidecar_field pa admin)
counter() { # NAME LABEL
  curl -s "http://$ADMIN/metrics" | awk -v n="$1" -v l="$2" 'index($0, n "{") == 1 && index($0, l) { s += $NF } END { print s + 0 }'
}
handled() { echo $(( $(counter detour_tls_handshakes_total 'side="inbound"') + $(counter detour_tls_handshake_failures_total 'side="inbound"') )); }
run() { # LABEL PKI_DIR
  local before after n0 n1 ok0 ok1 out
  n0=$(handled)
  ok0=$(counter detour_tls_handshakes_total 'side="inbound"')
  before=$(cpu_ticks "$PA_PID")
  out=$(openssl s_time -connect "$PA" -new -time "$SECS" -cert "$2/client/cert.pem" \
    -key "$2/client/key.pem" -CAfile "$TMP/pki/client/bundle.pem" 2>/dev/null | grep 'connections in' | tail -1 || true)
  after=$(cpu_ticks "$PA_PID")
  n1=$(handled)
  ok1=$(counter detour_tls_handshakes_total 'side="inbound"')
  local n=$((n1 - n0))
  printf '%-28s %6d connections (%d completed) in %s s  PA CPU %s µs each   (openssl: %s)\n' \
    "$1" "$n" $((ok1 - ok0)) "$SECS" "$( [ "$n" -gt 0 ] && us_per_req $((after - before)) "$n" || echo -)" "$out"
}
run "mesh certificate (accepted)" "$TMP/pki"
run "another CA (refused)" "$TMP/other"
echo "PA RSS after: $(rss_kib "$PA_PID") KiB"
