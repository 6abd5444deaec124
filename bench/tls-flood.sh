#!/usr/bin/env bash
# A flood of TLS ClientHellos at a PA, and what it does to the mesh: a CA → PA chain over mutual
# TLS carries steady load (`detourctl load`, 1,000 req/s, GET) while a stranger opens RATE
# connections a second to the PA and sends each a ClientHello (no certificate: the handshakes
# can only fail, after the PA has done its part). Measured with the PA's handshake admission
# off (`handshake_* = 0`) and on (the defaults), each without and with the flood: the latency
# of the established traffic (p50/p99), the PA's `/live` answer time (p99 and max, sampled
# every 50 ms), the flood's connections a second actually made, and the PA's CPU.
#
#   bench/tls-flood.sh [RATE] [SECONDS] [SOURCES]      (default 3000 8 1)
#
# SOURCES > 1 spreads the flood over that many source addresses (127.0.1.x), so that the limit
# per source does not stop it and the PA's own rate must.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-3000}
SECS=${2:-8}
SOURCES=${3:-1}
source bench/lib.sh

# The flooder: python, a ClientHello made once with the ssl module, sent on RATE new
# connections a second for SECS seconds; prints the connections it made.
cat >"$TMP/flood.py" <<'PY'
import asyncio, ssl, sys, time
host, port, rate, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sources = int(sys.argv[5])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(incoming, outgoing, server_hostname=None)
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
made = 0
async def one(i):
    global made
    local = None if sources <= 1 else (f"127.0.1.{i % sources + 1}", 0)
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), 1)
        made += 1
        w.write(hello)
        await w.drain()
        try:
            await asyncio.wait_for(r.read(4096), 0.5)
        except Exception:
            pass
        w.close()
    except Exception:
        pass
async def main():
    tasks = set()
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < secs:
        due = int((time.monotonic() - start) * rate)
        while n < due:
            t = asyncio.ensure_future(one(n))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            n += 1
        await asyncio.sleep(0.002)
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"{made / secs:.0f}")
asyncio.run(main())
PY

# live_probe ADMIN SECONDS OUT: `/live` answer times (ms), one every 50 ms.
live_probe() {
  local end=$(( $(date +%s%3N) + $2 * 1000 ))
  while [ "$(date +%s%3N)" -lt "$end" ]; do
    curl -s -o /dev/null -m 5 -w '%{time_total}\n' "http://$1/live" >>"$3" || echo 5 >>"$3"
    sleep 0.05
  done
}

start_provider 127.0.0.2
printf '%-10s %-8s %10s %10s %12s %12s %12s %12s\n' admission flood "p50 ms" "p99 ms" "live p99 ms" "live max ms" "hellos/s" "PA CPU %"
for admission in off on; do
  if [ "$admission" = off ]; then
    export DETOUR_SIDECAR__TLS__HANDSHAKE_CONCURRENCY=0 DETOUR_SIDECAR__TLS__HANDSHAKE_RATE=0 \
      DETOUR_SIDECAR__TLS__HANDSHAKE_RATE_PER_SOURCE=0
  else
    unset DETOUR_SIDECAR__TLS__HANDSHAKE_CONCURRENCY DETOUR_SIDECAR__TLS__HANDSHAKE_RATE \
      DETOUR_SIDECAR__TLS__HANDSHAKE_RATE_PER_SOURCE
  fi
  start_detour "flood-$admission-mtls" "$BIN" "$PROVIDER"
  PA_ADMIN=$(sidecar_field "flood-$admission-mtls-2" admin)
  for flood in no yes; do
    rm -f "$TMP/live.ms"
    live_probe "$PA_ADMIN" "$SECS" "$TMP/live.ms" &
    probe=$!
    made=-
    before=$(cpu_ticks "$HOP2_PID")
    t0=$(date +%s%3N)
    if [ "$flood" = yes ]; then
      python3 "$TMP/flood.py" "${HOP2%:*}" "${HOP2##*:}" "$RATE" "$SECS" "$SOURCES" >"$TMP/made" &
      flooder=$!
    fi
    out=$("$BIN/detourctl" load --direct "http://$HOP1" --service hello --rate 1000 --duration "$SECS" 2>/dev/null | grep '^load:')
    [ "$flood" = yes ] && { wait "$flooder" || true; made=$(cat "$TMP/made"); }
    after=$(cpu_ticks "$HOP2_PID")
    elapsed=$(( $(date +%s%3N) - t0 ))
    wait "$probe" || true
    read -r live99 livemax < <(sort -n "$TMP/live.ms" | awk '{ v[NR] = $1 * 1000 } END { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.1f %.1f\n", v[i], v[NR] }')
    cpu=$(awk -v t="$((after - before))" -v hz="$TICK" -v ms="$elapsed" 'BEGIN { printf "%.0f", t / hz / (ms / 1000) * 100 }')
    printf '%-10s %-8s %10s %10s %12s %12s %12s %12s\n' "$admission" "$flood" \
      "$(echo "$out" | sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p')" "$(echo "$out" | sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p')" \
      "$live99" "$livemax" "$made" "$cpu"
  done
done
