#!/usr/bin/env bash
# Shared pieces of the chaos scenarios (sourced, not run): build-if-missing, a two-host mesh on
# loopback under a temporary directory (caller host h1 on 127.0.0.1, provider host h2 on
# 127.0.0.2 with a demo provider), steady load through the SDK, and the RESULT line.
# Every process started here is stopped by PID in the EXIT trap.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${DETOUR_BIN_DIR:-$ROOT/target/release}
case "$BIN" in /*) ;; *) BIN=$PWD/$BIN ;; esac # the watchdogs run it from their own directory
RATE=${RATE:-500}
SECS=${SECS:-15}

ensure_binaries() {
  if [ ! -x "$BIN/detour-sidecar" ] || [ ! -x "$BIN/detourctl" ] || [ ! -x "$BIN/detour-watchdog" ] \
    || [ ! -x "$BIN/detour-registry-sync" ]; then
    (cd "$ROOT" && cargo build --release --bins)
  fi
}

now_ms() { date +%s%3N; }

TMP=$(mktemp -d /tmp/detour-chaos-XXXXXX)
declare -A PID_OF=()
declare -A ZONE_OF=() # a host's zone (`zone` in its sidecar config), when set
EXTRA_PIDS=()
declare -A WATCHDOG_PID=()
cleanup() {
  local status=$? watched=() f
  # Sidecars run by a watchdog are not this shell's children: their pid files name them.
  for f in "$TMP"/*/sidecar.pid; do
    [ -f "$f" ] && watched+=("$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$f")")
  done
  for p in "${PID_OF[@]}" "${WATCHDOG_PID[@]}" "${EXTRA_PIDS[@]}" "${watched[@]}"; do
    kill -CONT "$p" 2>/dev/null || true; kill -KILL "$p" 2>/dev/null || true
  done
  for p in "${PID_OF[@]}" "${WATCHDOG_PID[@]}" "${EXTRA_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  # A failed scenario keeps its directory (every process's log, the load's output) to be read.
  if [ -n "${KEEP_TMP:-}" ] || [ "$status" -ne 0 ]; then
    echo "chaos: the run's directory is kept: $TMP" >&2
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_file() { # FILE SECONDS
  local deadline=$(( $(now_ms) + $2 * 1000 ))
  while [ ! -s "$1" ]; do
    [ "$(now_ms)" -gt "$deadline" ] && { echo "chaos: timed out waiting for $1" >&2; exit 1; }
    sleep 0.02
  done
}

# write_sidecar_config HOST IP [EXTRA_TOML]: the host's sidecar config, written once, with a
# certificate from the run's throw-away CA (mutual TLS between sidecars, as by default)
# (REGISTRY_DIR_EXTRA adds keys to its [registry_dir] section; SIDECAR_EXTRA adds sections to
# every host's config; ZONE_OF[HOST] its zone). Its state directory is $TMP/HOST/state.
write_sidecar_config() {
  local host=$1 ip=$2 extra=${3:-}
  mkdir -p "$TMP/$host"
  if [ ! -f "$TMP/$host/sidecar.toml" ]; then
    "$BIN/detourctl" certs --dir "$TMP/pki" --host "$host" >/dev/null
    "$BIN/detourctl" sidecar-config --host "$host" --ip "$ip" --run-dir "$TMP/$host" \
      --state-dir "$TMP/$host/state" --registry "${REGISTRY:-dir:$TMP/registry}" --pki "$TMP/pki" \
      ${ZONE_OF[$host]:+--zone "${ZONE_OF[$host]}"} \
      --registry-dir "poll_ms = 100
${REGISTRY_DIR_EXTRA:-}" --extra "${SIDECAR_EXTRA:-}
$extra" >"$TMP/$host/sidecar.toml"
  fi
}

# start_sidecar HOST IP [EXTRA_TOML]: writes the config once, starts the sidecar, waits until
# it is ready (it writes sidecar.json with its own pid only once ready).
start_sidecar() {
  local host=$1 ip=$2
  write_sidecar_config "$@"
  rm -f "$TMP/$host/sidecar.json"
  RUST_LOG=${RUST_LOG:-warn} "$BIN/detour-sidecar" --config "$TMP/$host/sidecar.toml" 2>>"$TMP/$host/sidecar.log" &
  PID_OF[$host]=$!
  wait_file "$TMP/$host/sidecar.json" 20
}

# json_field FILE KEY: a string or number field of a small JSON file.
json_field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# start_watched HOST IP [SIDECAR_EXTRA] [WATCHDOG_EXTRA] [SIDECAR_BINARY]: the host the
# production way — a watchdog that runs its sidecar; waits until the watchdog reports the
# sidecar ready. Sets WATCHDOG_PID[HOST]; the sidecar's pid is in $TMP/HOST/sidecar.pid.
start_watched() {
  local host=$1 ip=$2 wextra=${4:-} bin=${5:-$BIN/detour-sidecar}
  write_sidecar_config "$host" "$ip" "${3:-}"
  if [ ! -f "$TMP/$host/watchdog.toml" ]; then
    cat >"$TMP/$host/watchdog.toml" <<TOML
[sidecar]
binary = "$bin"
config = "sidecar.toml"
[admin]
listen = "$ip:0"
$wextra
TOML
  fi
  rm -f "$TMP/$host/watchdog.json"
  RUST_LOG=${RUST_LOG:-warn} "$BIN/detour-watchdog" --config "$TMP/$host/watchdog.toml" 2>>"$TMP/$host/watchdog.log" &
  WATCHDOG_PID[$host]=$!
  wait_file "$TMP/$host/watchdog.json" 20
  wait_watchdog_ready "$host" 30
}

# wait_watchdog_ready HOST SECONDS: until HOST's watchdog answers /ready (its sidecar is ready).
wait_watchdog_ready() {
  local admin deadline=$(( $(now_ms) + $2 * 1000 ))
  admin=$(json_field "$TMP/$1/watchdog.json" admin)
  until curl -sf --max-time 1 "http://$admin/ready" >/dev/null; do
    [ "$(now_ms)" -gt "$deadline" ] && { echo "chaos: $1's watchdog not ready" >&2; tail -20 "$TMP/$1/sidecar.log" >&2; exit 1; }
    sleep 0.02
  done
}

# watchdog_state HOST: the watchdog's /state (JSON).
watchdog_state() { curl -sf --max-time 2 "http://$(json_field "$TMP/$1/watchdog.json" admin)/state"; }

# watched_sidecar_pid HOST: the pid of the sidecar HOST's watchdog runs.
watched_sidecar_pid() { json_field "$TMP/$1/sidecar.pid" pid; }

# stop_sidecar HOST SIGNAL: signals it and waits until it has exited.
stop_sidecar() {
  local pid=${PID_OF[$1]}
  kill "-$2" "$pid"
  wait "$pid" 2>/dev/null || true
}

# start_provider HOST LISTEN: the demo provider of HOST (instance HOST-hello) on LISTEN
# (ip:0 for any port); its address goes to $TMP/HOST.provider.addr, its pid to PROVIDER_PID.
# PROVIDER_ARGS (an array) is passed on to every demo provider (`--dedupe-dir DIR`).
declare -A PROVIDER_PID=()
PROVIDER_ARGS=()
start_provider() {
  rm -f "$TMP/$1.provider.addr"
  "$BIN/detourctl" provider --listen "$2" --instance "$1-hello" --addr-file "$TMP/$1.provider.addr" \
    "${PROVIDER_ARGS[@]}" >/dev/null &
  PROVIDER_PID[$1]=$!
  EXTRA_PIDS+=($!)
  wait_file "$TMP/$1.provider.addr" 10
}

# start_provider_host HOST IP: a demo provider (instance HOST-hello) and its host's sidecar
# (under a watchdog with WATCHED=yes).
start_provider_host() {
  start_provider "$1" "$2:0"
  local offer="[[provide]]
service = \"hello\"
address = \"$(cat "$TMP/$1.provider.addr")\""
  if [ "${WATCHED:-no}" = yes ]; then
    start_watched "$1" "$2" "$offer" "${WATCHDOG_EXTRA:-}" "${SIDECAR_BIN_OF[$1]:-$BIN/detour-sidecar}"
  else
    start_sidecar "$1" "$2" "$offer"
  fi
}
declare -A SIDECAR_BIN_OF=()

# start_mesh [N]: N provider hosts h2.. on 127.0.0.2.. (default 1), then the caller host h1.
# With WATCHED=yes every host runs under its own watchdog.
start_mesh() {
  ensure_binaries
  local n=${1:-1} i
  for i in $(seq 2 $((n + 1))); do start_provider_host "h$i" "127.0.0.$i"; done
  if [ "${WATCHED:-no}" = yes ]; then start_watched h1 127.0.0.1 "" "${WATCHDOG_EXTRA:-}"; else start_sidecar h1 127.0.0.1; fi
}

# start_load: steady load through the SDK on h1, GET and POST alternating (LOAD_METHOD sets
# another mix, LOAD_ARGS adds arguments), in the background.
start_load() {
  LOAD_START=$(now_ms)
  "$BIN/detourctl" load --sidecar "unix:$TMP/h1/outbound.sock" --service hello --rate "$RATE" \
    --duration "$SECS" --method "${LOAD_METHOD:-MIX}" --body-bytes 256 --concurrency 8192 --timeout-ms 20000 ${LOAD_ARGS:-} \
    >"$TMP/load.out" 2>"$TMP/load.err" &
  LOAD_PID=$!
  EXTRA_PIDS+=("$LOAD_PID")
}

# at SECONDS: sleeps until SECONDS after the load started.
at() {
  local target=$(( LOAD_START + ${1%.*} * 1000 ))
  local now; now=$(now_ms)
  [ "$now" -lt "$target" ] && sleep "$(awk -v d=$(( target - now )) 'BEGIN { printf "%.3f", d / 1000 }')"
  return 0
}

field() { # LINE KEY
  echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1
}

# start_etcd N: N etcd members (1 or 3) on loopback ports chosen now; sets REGISTRY and
# ETCD_URLS (space-separated) and ETCD_PIDS.
# free_ports N: N distinct loopback ports free now, below the ephemeral range (no outgoing
# connection can take one before etcd binds it).
free_ports() {
  python3 -c '
import random, socket, sys
want, got = int(sys.argv[1]), []
while len(got) < want:
    p = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        if p not in got: got.append(p)
    except OSError:
        pass
    finally:
        s.close()
print(" ".join(map(str, got)))' "$1"
}
declare -a ETCD_URLS=() ETCD_PEERS=()
declare -A ETCD_PID=()
start_etcd_member() { # INDEX
  local i=$1 cluster="" j
  for j in "${!ETCD_PEERS[@]}"; do cluster="$cluster${cluster:+,}e$j=${ETCD_PEERS[$j]}"; done
  etcd --name "e$i" --data-dir "$TMP/etcd-e$i" --listen-client-urls "${ETCD_URLS[$i]}" \
    --advertise-client-urls "${ETCD_URLS[$i]}" --listen-peer-urls "${ETCD_PEERS[$i]}" \
    --initial-advertise-peer-urls "${ETCD_PEERS[$i]}" --initial-cluster "$cluster" \
    --initial-cluster-token chaos --initial-cluster-state new >"$TMP/etcd-e$i.log" 2>&1 &
  ETCD_PID[$i]=$!
  EXTRA_PIDS+=("$!")
}
etcd_healthy() { # INDEX
  local deadline=$(( $(now_ms) + 30000 ))
  until curl -sf "${ETCD_URLS[$1]}/health" | grep -q '"true"'; do
    [ "$(now_ms)" -gt "$deadline" ] && { echo "chaos: etcd e$1 not healthy" >&2; exit 1; }
    sleep 0.1
  done
}
start_etcd() {
  command -v etcd >/dev/null || { echo "chaos: etcd is required (tests/setup.sh installs it)" >&2; exit 1; }
  local n=$1 i ports
  read -r -a ports <<<"$(free_ports $((2 * n)))"
  for i in $(seq 0 $((n - 1))); do
    ETCD_URLS[$i]="http://127.0.0.1:${ports[$((2 * i))]}"; ETCD_PEERS[$i]="http://127.0.0.1:${ports[$((2 * i + 1))]}"
  done
  for i in $(seq 0 $((n - 1))); do start_etcd_member "$i"; done
  for i in $(seq 0 $((n - 1))); do etcd_healthy "$i"; done
  REGISTRY="etcd:$(IFS=,; echo "${ETCD_URLS[*]}")"
}
stop_etcd_member() { kill -"${2:-TERM}" "${ETCD_PID[$1]}" 2>/dev/null || true; wait "${ETCD_PID[$1]}" 2>/dev/null || true; }
# etcd_leader: the index of the member that leads.
etcd_leader() {
  local i
  for i in "${!ETCD_URLS[@]}"; do
    local st; st=$(curl -sf -X POST "${ETCD_URLS[$i]}/v3/maintenance/status" -d '{}' 2>/dev/null) || continue
    local leader member
    leader=$(echo "$st" | sed -n 's/.*"leader":"\([0-9]*\)".*/\1/p')
    member=$(echo "$st" | sed -n 's/.*"member_id":"\([0-9]*\)".*/\1/p')
    [ -n "$leader" ] && [ "$leader" = "$member" ] && { echo "$i"; return; }
  done
  echo 0
}
# etcd_delete KEY: deletes one key through etcd's JSON gateway.
etcd_delete() {
  local k; k=$(printf '%s' "$1" | base64 -w0)
  local i
  for i in "${!ETCD_URLS[@]}"; do
    curl -sf --max-time 2 -X POST "${ETCD_URLS[$i]}/v3/kv/deleterange" -d "{\"key\":\"$k\"}" >/dev/null && return 0
  done
  return 1
}

# served_after INSTANCE SINCE_MS: how long after SINCE_MS the instance answered its last request
# (0 when it answered none after it); reads SERVED, which finish sets.
served_after() {
  local last; last=$(echo "$SERVED" | tr ' ' '\n' | sed -n "s/^$1=[0-9]*@//p")
  local d=$(( ${last:-0} - $2 )); [ "$d" -lt 0 ] && d=0; echo "$d"
}

# finish NAME FAULT_MS HEALED_MS EXPECTATION: waits for the load, prints the RESULT line, and
# exits 0 only when EXPECTATION (lossless | no-idempotent-loss) holds and traffic went off the
# mesh and came back.
finish() {
  local name=$1 fault=$2 healed=$3 expect=$4
  wait "$LOAD_PID" || true
  local paths load
  paths=$(grep '^paths:' "$TMP/load.out" || true)
  load=$(grep '^load:' "$TMP/load.out" || true)
  if [ -z "$load" ]; then
    echo "chaos: the load generator printed no summary:" >&2; cat "$TMP/load.out" "$TMP/load.err" >&2
    echo "RESULT $name: sent=0 ok=0 failed=0 failed_idempotent=0 unknown_outcome=0 mesh=0 ca_direct=0 direct=0 switch_ms=- back_ms=-"
    exit 1
  fi
  grep '^failures:' "$TMP/load.out" >&2 || true
  SERVED=$(grep '^served:' "$TMP/load.out" || true)
  local sent ok failed fi uo mesh cad dir first last switch back
  sent=$(field "$load" sent); ok=$(field "$load" ok); failed=$(field "$load" failed)
  fi=$(field "$paths" failed_idempotent); uo=$(field "$paths" unknown_outcome)
  mesh=$(field "$paths" mesh); cad=$(field "$paths" ca_direct); dir=$(field "$paths" direct)
  first=$(field "$paths" first_off_mesh_unix_ms); last=$(field "$paths" last_off_mesh_unix_ms)
  switch=-; back=-
  [ "$first" != "-" ] && switch=$(( first - fault ))
  [ "$last" != "-" ] && back=$(( last - healed ))
  [ "$back" != "-" ] && [ "$back" -lt 0 ] && back=0
  local p99 lat; p99=$(field "$load" p99_ms)
  lat=$(grep '^latency:' "$TMP/load.out" || true)
  P99_IDEM=$(field "$lat" p99_idem_ms); MAX_IDEM=$(field "$lat" max_idem_ms)
  echo "RESULT $name: sent=$sent ok=$ok failed=$failed failed_idempotent=$fi unknown_outcome=$uo mesh=$mesh ca_direct=$cad direct=$dir switch_ms=$switch back_ms=$back p99_ms=$p99 p99_idem_ms=$P99_IDEM max_idem_ms=$MAX_IDEM$(declare -F extra_fields >/dev/null && extra_fields)"
  local okay=1
  [ "$sent" -eq $(( RATE * SECS )) ] || okay=0
  case "$expect" in
    lossless) [ "$failed" -eq 0 ] || okay=0 ;;
    no-idempotent-loss) { [ "$fi" -eq 0 ] && [ "$failed" -eq "$uo" ]; } || okay=0 ;;
  esac
  if [ "${MOVES:-yes}" = yes ]; then
    [ "$first" != "-" ] || okay=0                                  # traffic left the mesh path
    [ "$last" != "-" ] && [ $(( $(now_ms) - last )) -gt 1500 ] || okay=0  # and came back
  fi
  if declare -F extra_check >/dev/null; then extra_check || okay=0; fi
  [ "$okay" -eq 1 ]
}

# flaky_sidecar: a sidecar binary that exits at once while $TMP/crash exists (prints its path).
flaky_sidecar() {
  cat >"$TMP/flaky-sidecar" <<SH
#!/bin/sh
if [ -e "$TMP/crash" ]; then echo "flaky-sidecar: crashing on purpose" >&2; exit 3; fi
exec "$BIN/detour-sidecar" "\$@"
SH
  chmod +x "$TMP/flaky-sidecar"
  echo "$TMP/flaky-sidecar"
}

# endpoints_at HOST SERVICE: how many endpoints of SERVICE HOST's sidecar routes to now.
endpoints_at() {
  curl -sf --max-time 1 "http://$(json_field "$TMP/$1/sidecar.json" admin)/state" | python3 -c '
import json, sys
print(len(json.load(sys.stdin).get("services", {}).get(sys.argv[1], {}).get("endpoints", [])))' "$2" 2>/dev/null || echo 0
}

# binary_of HOST: the binary HOST's watchdog runs now.
binary_of() { watchdog_state "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["watchdog"]["binary"])' 2>/dev/null || echo -; }

# wait_binary HOST BINARY SINCE_MS: ms from SINCE_MS until HOST runs BINARY (- after 10 s).
wait_binary() {
  local deadline=$(( $(now_ms) + 10000 ))
  while [ "$(now_ms)" -lt "$deadline" ]; do
    [ "$(binary_of "$1")" = "$2" ] && { echo $(( $(now_ms) - $3 )); return; }
    sleep 0.05
  done
  echo -
}

# registry_status HOST: HOST's sidecar state as the directory registry holds it.
registry_status() {
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"]["sidecar"])' "$TMP/registry/$1.json" 2>/dev/null || echo -
}

# start_zookeeper: one ZooKeeper server (Debian's package, without its service) on a loopback
# port chosen now; sets ZK_ADDR and ZK_PID. restart_zookeeper starts it again on the same port.
start_zookeeper() {
  command -v java >/dev/null && [ -f /usr/share/java/zookeeper.jar ] \
    || { echo "chaos: ZooKeeper is required (tests/setup.sh installs it)" >&2; exit 1; }
  mkdir -p "$TMP/zookeeper/data"
  ZK_PORT=$(free_ports 1)
  ZK_ADDR="127.0.0.1:$ZK_PORT"
  cat >"$TMP/zookeeper/zoo.cfg" <<CFG
tickTime=500
dataDir=$TMP/zookeeper/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok
maxSessionTimeout=20000
CFG
  restart_zookeeper
}
restart_zookeeper() {
  java -Xmx256m -cp "$TMP/zookeeper:/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-log4j12.jar:/usr/share/java/log4j-1.2.jar" \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$TMP/zookeeper/zoo.cfg" >>"$TMP/zookeeper/zookeeper.log" 2>&1 &
  ZK_PID=$!
  EXTRA_PIDS+=("$ZK_PID")
  local deadline=$(( $(now_ms) + 30000 ))
  until [ "$(zk_ruok)" = imok ]; do
    [ "$(now_ms)" -gt "$deadline" ] && { echo "chaos: ZooKeeper not answering" >&2; tail -20 "$TMP/zookeeper/zookeeper.log" >&2; exit 1; }
    sleep 0.1
  done
}
zk_ruok() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$ZK_PORT; printf ruok >&3; cat <&3" 2>/dev/null || true; }
stop_zookeeper() { kill -KILL "$ZK_PID" 2>/dev/null || true; wait "$ZK_PID" 2>/dev/null || true; }

# start_zk_provider NAME IP [GRACE_MS]: a demo provider (instance NAME) that registers itself in
# ZooKeeper under com.acme.Hello as a Dubbo application does, and on SIGTERM de-registers, keeps
# serving GRACE_MS, then stops. Its pid is PROVIDER_PID[NAME].
start_zk_provider() {
  rm -f "$TMP/$1.provider.addr"
  "$BIN/detourctl" provider --listen "$2:0" --instance "$1" --addr-file "$TMP/$1.provider.addr" \
    --zookeeper "$ZK_ADDR" --interface com.acme.Hello --release-grace-ms "${3:-0}" "${PROVIDER_ARGS[@]}" >/dev/null 2>>"$TMP/$1.provider.log" &
  PROVIDER_PID[$1]=$!
  EXTRA_PIDS+=($!)
  wait_file "$TMP/$1.provider.addr" 10
}

# start_sync NAME: a detour-registry-sync replica (id NAME) mirroring ZooKeeper into the etcd of
# start_etcd (com.acme.Hello → hello); waits until it answers /ready. Its pid is SYNC_PID[NAME].
declare -A SYNC_PID=()
start_sync() {
  mkdir -p "$TMP/sync-$1"
  cat >"$TMP/sync-$1/sync.toml" <<TOML
name = "zk"
replica = "$1"
[source]
servers = "$ZK_ADDR"
[source.services]
"com.acme.Hello" = "hello"
[target]
etcd = [$(printf '"%s",' "${ETCD_URLS[@]}" | sed 's/,$//')]
election_ttl_s = ${SYNC_ELECTION_TTL_S:-2}
lease_ttl_s = ${SYNC_LEASE_TTL_S:-10}
request_timeout_ms = 1000
[admin]
listen = "127.0.0.1:0"
address_file = "$TMP/sync-$1/admin.addr"
TOML
  RUST_LOG=${RUST_LOG:-info} "$BIN/detour-registry-sync" --config "$TMP/sync-$1/sync.toml" 2>>"$TMP/sync-$1/sync.log" &
  SYNC_PID[$1]=$!
  EXTRA_PIDS+=($!)
  wait_file "$TMP/sync-$1/admin.addr" 10
  local deadline=$(( $(now_ms) + 20000 ))
  until curl -sf --max-time 1 "http://$(cat "$TMP/sync-$1/admin.addr")/ready" >/dev/null; do
    [ "$(now_ms)" -gt "$deadline" ] && { echo "chaos: sync $1 not ready" >&2; tail -20 "$TMP/sync-$1/sync.log" >&2; exit 1; }
    sleep 0.05
  done
}
sync_state() { curl -sf --max-time 2 "http://$(cat "$TMP/sync-$1/admin.addr")/state"; }
sync_role() { sync_state "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["role"])' 2>/dev/null || echo -; }

# mirrored_count: how many entries of hello etcd holds now (any source).
mirrored_count() {
  local k e
  k=$(printf '%s' /detour/v1/services/hello/ | base64 -w0)
  e=$(printf '%s' /detour/v1/services/hello0 | base64 -w0)
  curl -sf --max-time 1 -X POST "${ETCD_URLS[0]}/v3/kv/range" -d "{\"key\":\"$k\",\"range_end\":\"$e\",\"count_only\":true}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("count", 0))' 2>/dev/null || echo "?"
}

# watch_mirrored SECONDS: samples mirrored_count every 50 ms in the background into
# $TMP/mirrored.counts; mirrored_min prints the smallest sample.
watch_mirrored() {
  ( local end=$(( $(now_ms) + $1 * 1000 ))
    while [ "$(now_ms)" -lt "$end" ]; do mirrored_count >>"$TMP/mirrored.counts"; sleep 0.05; done ) &
  EXTRA_PIDS+=($!)
  MIRROR_WATCH_PID=$!
}
mirrored_min() { wait "$MIRROR_WATCH_PID" 2>/dev/null || true; grep -E '^[0-9]+$' "$TMP/mirrored.counts" | sort -n | head -1; }

# start_legacy_mesh N: etcd, ZooKeeper, N providers p2.. registered in ZooKeeper, sync replica a,
# and the caller host h1 routing hello from etcd; returns once etcd holds the N entries.
start_legacy_mesh() {
  ensure_binaries
  start_etcd 1
  start_zookeeper
  local i
  for i in $(seq 2 $(( $1 + 1 ))); do start_zk_provider "p$i" "127.0.0.$i" "${RELEASE_GRACE_MS:-0}"; done
  start_sync a
  start_sidecar h1 127.0.0.1
  local deadline=$(( $(now_ms) + 20000 ))
  until [ "$(mirrored_count)" = "$1" ]; do
    [ "$(now_ms)" -gt "$deadline" ] && { echo "chaos: etcd never held $1 entries of hello" >&2; exit 1; }
    sleep 0.1
  done
}

# health_at HOST INSTANCE: true, false or absent, as HOST's sidecar catalog shows INSTANCE of
# hello.
health_at() {
  curl -sf --max-time 1 "http://$(json_field "$TMP/$1/sidecar.json" admin)/state" | python3 -c '
import json, sys
eps = json.load(sys.stdin).get("services", {}).get("hello", {}).get("endpoints", [])
e = [e for e in eps if e["instance"] == sys.argv[1]]
print("absent" if not e else str(e[0].get("healthy", True)).lower())' "$2" 2>/dev/null || echo absent
}

# wait_health_at HOST INSTANCE WANT SINCE_MS [SECONDS]: ms from SINCE_MS until HOST shows
# INSTANCE as WANT (or - after SECONDS, default 4).
wait_health_at() {
  local deadline=$(( $(now_ms) + ${5:-4} * 1000 ))
  while [ "$(now_ms)" -lt "$deadline" ]; do
    [ "$(health_at "$1" "$2")" = "$3" ] && { echo $(( $(now_ms) - $4 )); return; }
    sleep 0.02
  done
  echo -
}
