#!/usr/bin/env bash
# Soak: the mesh under steady load for a long time and a seeded random schedule of faults of many
# kinds, overlapping as in real incidents; reports requests lost per million and availability in
# nines (docs/availability.md).
#
#   chaos/soak.sh [--duration 2m] [--rate 1000] [--seed N] [--hosts 3] [--legacy] [--no-keys]
#
# The mesh: a 3-member etcd; HOSTS provider hosts (h2.., a demo provider each) and two caller
# hosts (h1 on 127.0.0.1, hc on 127.0.0.30), every host under its watchdog, mutual TLS between
# sidecars. Load: `detourctl load --method SOAK` through the SDK on each caller host, RATE/2
# each: of every 20 requests one long stream (20 chunks over about 2 s), two gRPC unary calls
# and GET and POST alternating; HTTP/1.1 from h1 and HTTP/2 from hc (gRPC is HTTP/2 from both).
# Every POST and gRPC call carries an idempotency key (`detourctl load --keys`) and the demo
# providers keep the keys' records in one directory they share (`--dedupe-dir`, on /dev/shm
# when there is one), so a POST
# whose outcome a kill -9 left unknown is sent again and carried out once, and counts as
# idempotent; with --no-keys they carry none, and such POSTs end as outcome unknown. First a fault-free baseline (a quarter
# of the duration, at most 60 s), then the soak proper with faults scheduled from SEED (the
# schedule is printed first: the same seed, duration and hosts replay it). With --legacy, also
# ZooKeeper with two providers registered as a Dubbo application does (com.acme.Hello) and two
# detour-registry-sync replicas mirroring them into etcd as more instances of `hello`, and their
# faults. Ends with a table and one `RESULT soak:` line (chaos/soak_report.py, which reads the
# run's directory: with KEEP_TMP=1 it stays, and the report can be made again from it); exits
# non-zero when an idempotent request failed, or a long stream failed without a kill -9 of a
# process carrying it (a sidecar or a provider) while it was in flight.
set -euo pipefail
# Read whole before it runs (bash reads a script as it goes): editing it during a long soak
# changes nothing of the run.
{
DURATION=2m RATE_ARG=1000 SEED=$(date +%Y%m%d) HOSTS=3 LEGACY=no KEYS=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --rate) RATE_ARG=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --hosts) HOSTS=$2; shift 2 ;;
    --legacy) LEGACY=yes; shift ;;
    --no-keys) KEYS=no; shift ;;
    -h|--help) sed -n '2,/^set -euo pipefail$/{/^set/!p}' "$0"; exit 0 ;;
    *) echo "soak: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
secs_of() { # 90 | 90s | 30m | 1h
  case "$1" in
    *h) echo $(( ${1%h} * 3600 )) ;; *m) echo $(( ${1%m} * 60 )) ;; *s) echo "${1%s}" ;; *) echo "$1" ;;
  esac
}
TOTAL=$(secs_of "$DURATION")
[ "$TOTAL" -ge 40 ] || { echo "soak: --duration must be at least 40 s" >&2; exit 2; }
[ "$HOSTS" -ge 1 ] && [ "$HOSTS" -le 20 ] || { echo "soak: --hosts must be 1..20" >&2; exit 2; }
BASE=$(( TOTAL / 4 )); [ "$BASE" -gt 60 ] && BASE=60
SOAK=$(( TOTAL - BASE ))
RATE=$RATE_ARG
source "$(dirname "$0")/lib.sh"
# Processes restarted by a fault run in subshells: stop everything of this run by its path too.
soak_cleanup() {
  { pkill -KILL -f -- "$TMP/" || true; cleanup; } 2>/dev/null
  case "${DEDUPE_DIR:-}" in /dev/shm/detour-dedupe.*) rm -rf "$DEDUPE_DIR" ;; esac
}
trap soak_cleanup EXIT
WATCHED=yes
MOVES=no
ensure_binaries
LOAD_KEYS=() DEDUPE_DIR=
if [ "$KEYS" = yes ]; then
  # The providers' shared record of keys, in memory (tmpfs) where the machine has one: as a
  # provider's database would, it keeps its files off the disk's journal.
  if [ -d /dev/shm ] && [ -w /dev/shm ]; then DEDUPE_DIR=$(mktemp -d /dev/shm/detour-dedupe.XXXXXX); else DEDUPE_DIR=$TMP/dedupe; fi
  PROVIDER_ARGS=(--dedupe-dir "$DEDUPE_DIR" --dedupe-ttl-secs 120); LOAD_KEYS=(--keys)
fi
command -v etcd >/dev/null || { echo "soak: etcd is required (tests/setup.sh installs it)" >&2; exit 1; }

echo "soak: seed=$SEED duration=${TOTAL}s (baseline ${BASE}s, faults ${SOAK}s) rate=$RATE hosts=$HOSTS keys=$KEYS tmp=$TMP" >&2
start_etcd 3
if [ "$LEGACY" = yes ]; then
  start_zookeeper
  start_zk_provider l1 127.0.0.41
  start_zk_provider l2 127.0.0.42
  start_sync a
  start_sync b
fi
start_mesh "$HOSTS"
start_watched hc 127.0.0.30 "" ""
PROVIDERS=() CALLERS=(h1 hc)
for i in $(seq 2 $((HOSTS + 1))); do PROVIDERS+=("h$i"); done
cp "$BIN/detour-sidecar" "$TMP/detour-sidecar-next"
declare -A PROVIDER_ADDR=()
for h in "${PROVIDERS[@]}"; do PROVIDER_ADDR[$h]=$(cat "$TMP/$h.provider.addr"); done
ctl() { "$BIN/detourctl" "$@" --registry "$REGISTRY" --timeout-ms 2000; }
# ctl_retry WHAT ARGS…: as an operator does when the registry is down, tries again every second
# for up to 60 s (a rule left in place holds its hosts off the mesh until it is cleared).
ctl_retry() {
  local what=$1 i; shift
  for i in $(seq 60); do ctl "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "soak: $what refused for 60 s" >&2; return 1
}

# load PHASE SECONDS [ARGS…]: one load per caller host, in the background; pids in LOADS.
load() {
  local phase=$1 secs=$2 h proto
  shift 2
  LOADS=()
  for h in "${CALLERS[@]}"; do
    proto=http1; [ "$h" = hc ] && proto=http2
    "$BIN/detourctl" load --sidecar "unix:$TMP/$h/outbound.sock" --service hello \
      --rate $(( RATE / 2 )) --duration "$secs" --method SOAK --body-bytes 256 --protocol "$proto" \
      --concurrency 8192 --timeout-ms 20000 --progress "${LOAD_KEYS[@]}" "$@" >"$TMP/$phase-$h.out" 2>"$TMP/$phase-$h.err" &
    LOADS+=($!); EXTRA_PIDS+=($!)
  done
}

echo "soak: baseline, ${BASE}s without faults" >&2
load baseline "$BASE"
for p in "${LOADS[@]}"; do wait "$p" || true; done

# The schedule: one line per fault, `AT_MS KIND TARGET HOLD_MS`, AT_MS from the soak's start.
python3 - "$SEED" "$SOAK" "$HOSTS" "$LEGACY" >"$TMP/schedule" <<'PY'
import random, sys
seed, soak, hosts = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
legacy = sys.argv[4] == "yes"
rnd = random.Random(seed)
providers = [f"h{i}" for i in range(2, hosts + 2)]
callers = ["h1", "hc"]
everyone = providers + callers
# kind: (weight, targets, hold ms (how long the fault lasts), busy ms (target left alone after))
kinds = {
    "sidecar_kill9": (3, everyone, 0, 6000),
    "sidecar_term": (2, everyone, 0, 6000),
    "sidecar_stop_short": (2, everyone, 300, 3000),
    "sidecar_stop_long": (1, everyone, 3000, 9000),
    "watchdog_kill9": (2, everyone, 3000, 6000),
    "provider_kill9": (2, providers, 3000, 6000),
    "etcd_member_kill": (1, ["e0", "e1", "e2"], 5000, 8000),
    "etcd_member_freeze": (1, ["e0", "e1", "e2"], 5000, 8000),
    "etcd_stop_all": (1, ["etcd"], 10000, 15000),
    "upgrade_and_rollback": (2, everyone, 5000, 12000),
    "mesh_rollback_and_undo": (1, callers, 5000, 8000),
    "gray_percent": (1, ["gray"], 5000, 8000),
    "cert_rotation": (1, everyone, 0, 3000),
}
if legacy:
    kinds.update({
        "sync_leader_kill9": (2, ["sync"], 3000, 8000),
        "zookeeper_restart": (1, ["zookeeper"], 10000, 15000),
        "legacy_provider_kill9": (1, ["l1", "l2"], 3000, 25000),
    })
names = list(kinds)
weights = [kinds[k][0] for k in names]
busy = {}
t = 3000
end = soak * 1000 - 12000
while True:
    t += int(rnd.expovariate(1 / 5000)) + 500
    if t >= end:
        break
    kind = rnd.choices(names, weights)[0]
    _, targets, hold, after = kinds[kind]
    free = [x for x in targets if busy.get(x, 0) <= t]
    # The whole etcd cluster and its members are one target group.
    if kind.startswith("etcd"):
        free = [x for x in free if busy.get("etcd", 0) <= t and all(busy.get(m, 0) <= t for m in ["e0", "e1", "e2"] if kind == "etcd_stop_all")]
        if kind != "etcd_stop_all" and any(busy.get(m, 0) > t for m in ["e0", "e1", "e2"]):
            free = []  # one member down at a time: a quorum stays
    # A mesh rollback's undo is refused once the rules changed: one change of rules at a time.
    rules = kind in ("mesh_rollback_and_undo", "gray_percent")
    if rules and busy.get("rules", 0) > t:
        continue
    if not free:
        continue
    target = rnd.choice(free)
    busy[target] = t + hold + after
    if rules:
        # 15 s more: an undo or a clear refused while etcd is down is tried again until it is back.
        busy["rules"] = t + hold + after + 15000
    print(t, kind, target, hold)
PY
echo "soak: schedule (seed $SEED; kind: at_ms target hold_ms):" >&2
sed 's/^/  /' "$TMP/schedule" >&2
# Delay and loss need the kernel's netem and a classful qdisc on the loopback device (the hosts
# are loopback addresses): where the kernel lacks them, the soak says so and goes on without.
if [ "$(id -u)" != 0 ] || ! command -v tc >/dev/null; then
  echo "soak: delay and loss on a host's address: skipped (needs root and tc)" >&2
elif ! tc qdisc add dev lo root handle 1: prio >/dev/null 2>&1; then
  echo "soak: delay and loss on a host's address: skipped (this kernel has no prio qdisc for lo)" >&2
else
  tc qdisc del dev lo root >/dev/null 2>&1 || true
  echo "soak: delay and loss on a host's address: skipped (not built: no netem fault kind yet)" >&2
fi

# pid_in FILE: the "pid" field of a JSON file the mesh wrote, read by bash itself. A fault's
# target is looked up at the fault's moment, and a python3 started then took a core from the
# mesh: the requests due in the 150 ms before each sidecar kill -9 were slowed by it
# (docs/availability.md).
pid_in() {
  local text re='"pid"[[:space:]]*:[[:space:]]*([0-9]+)'
  [ -r "$1" ] || return 0
  text=$(<"$1")
  if [[ $text =~ $re ]]; then echo "${BASH_REMATCH[1]}"; fi
  return 0
}
sidecar_of() { pid_in "$TMP/$1/sidecar.pid"; }
watchdog_of() { pid_in "$TMP/$1/watchdog.json"; }
etcd_of() { pgrep -f -- "--name e$1 --data-dir $TMP/etcd-e$1" || true; }
ip_of() { case "$1" in h1) echo 127.0.0.1 ;; hc) echo 127.0.0.30 ;; h*) echo "127.0.0.${1#h}" ;; esac; }
note() { echo "$(now_ms) $*" >>"$TMP/faults.log"; }

# fault KIND TARGET HOLD_MS: injects one fault and undoes it; logs start and end.
fault() {
  local kind=$1 t=$2 hold=$3 hold_s pid
  hold_s=$(awk -v m="$3" 'BEGIN { printf "%.3f", m / 1000 }')
  # A kill's logged start is the moment of the kill: its target is looked up before.
  [ "$kind" = sidecar_kill9 ] && pid=$(sidecar_of "$t")
  note start "$kind" "$t"
  case "$kind" in
    sidecar_kill9) [ -n "$pid" ] && kill -KILL "$pid" ;;
    sidecar_term) pid=$(sidecar_of "$t"); [ -n "$pid" ] && kill -TERM "$pid" ;;
    sidecar_stop_short|sidecar_stop_long)
      pid=$(sidecar_of "$t")
      if [ -n "$pid" ]; then kill -STOP "$pid"; sleep "$hold_s"; kill -CONT "$pid" 2>/dev/null || true; fi ;;
    watchdog_kill9)
      pid=$(watchdog_of "$t"); [ -n "$pid" ] && kill -KILL "$pid"
      sleep "$hold_s"
      start_watched "$t" "$(ip_of "$t")" >/dev/null 2>&1 || echo "soak: the watchdog of $t did not come back" >&2 ;;
    provider_kill9)
      pkill -KILL -f -- "--instance $t-hello --addr-file $TMP/" || true
      sleep "$hold_s"
      "$BIN/detourctl" provider --listen "${PROVIDER_ADDR[$t]}" --instance "$t-hello" \
        --addr-file "$TMP/$t.provider.addr2" "${PROVIDER_ARGS[@]}" >/dev/null 2>&1 & ;;
    etcd_member_kill)
      pid=$(etcd_of "${t#e}"); [ -n "$pid" ] && kill -KILL "$pid"
      sleep "$hold_s"; start_etcd_member "${t#e}" ;;
    etcd_member_freeze)
      pid=$(etcd_of "${t#e}")
      if [ -n "$pid" ]; then kill -STOP "$pid"; sleep "$hold_s"; kill -CONT "$pid" 2>/dev/null || true; fi ;;
    etcd_stop_all)
      for i in 0 1 2; do pid=$(etcd_of "$i"); [ -n "$pid" ] && kill -TERM "$pid"; done
      sleep "$hold_s"
      for i in 0 1 2; do start_etcd_member "$i"; done ;;
    upgrade_and_rollback)
      "$BIN/detourctl" upgrade --binary "$TMP/detour-sidecar-next" --watchdog "$TMP/$t/watchdog.sock" >/dev/null 2>&1 \
        || echo "soak: upgrade of $t refused" >&2
      sleep "$hold_s"
      "$BIN/detourctl" upgrade --rollback --watchdog "$TMP/$t/watchdog.sock" >/dev/null 2>&1 \
        || echo "soak: rollback of $t's upgrade refused" >&2 ;;
    mesh_rollback_and_undo)
      if ctl rollback --host "$t" --reason soak >/dev/null 2>&1; then
        sleep "$hold_s"
        ctl_retry "undo of the rollback of $t" rollback --undo --reason soak || true
      else
        echo "soak: rollback of $t refused (the registry is down): nothing to undo" >&2
      fi ;;
    gray_percent)
      if ctl gray set --id soak --mesh off --percent $(( (RANDOM % 5 + 1) * 10 )) --reason soak >/dev/null 2>&1; then
        sleep "$hold_s"
        ctl_retry "gray clear" gray clear --id soak --reason soak || true
      else
        echo "soak: gray set refused (the registry is down)" >&2
      fi ;;
    cert_rotation) "$BIN/detourctl" certs --dir "$TMP/pki" --host "$t" >/dev/null ;;
    sync_leader_kill9)
      local r leader=""
      for r in a b; do [ "$(sync_role "$r")" = leader ] && leader=$r; done
      if [ -n "$leader" ]; then
        pkill -KILL -f -- "--config $TMP/sync-$leader/sync.toml" || true
        sleep "$hold_s"
        start_sync "$leader" >/dev/null 2>&1 || echo "soak: sync replica $leader did not come back" >&2
      fi ;;
    zookeeper_restart)
      pkill -KILL -f -- "$TMP/zookeeper/zoo.cfg" || true
      sleep "$hold_s"
      restart_zookeeper >/dev/null 2>&1 || echo "soak: ZooKeeper did not come back" >&2 ;;
    legacy_provider_kill9)
      pkill -KILL -f -- "--instance $t --addr-file $TMP/" || true
      sleep "$hold_s"
      start_zk_provider "$t" "$(case "$t" in l1) echo 127.0.0.41 ;; *) echo 127.0.0.42 ;; esac)" >/dev/null 2>&1 \
        || echo "soak: legacy provider $t did not come back" >&2 ;;
  esac
  note end "$kind" "$t"
}

echo "soak: ${SOAK}s with faults" >&2
# Every request of the soak over the p99 target (twice the baseline's p99, of the slower
# caller) is listed, so the report can say which faults make the tail.
SLOW_MS=$(cat "$TMP"/baseline-*.out | python3 -c '
import sys
p99 = [float(kv[7:]) for l in sys.stdin if l.startswith("load:") for kv in l.split() if kv.startswith("p99_ms=")]
print(f"{2 * max(p99):.3f}" if p99 and max(p99) > 0 else "")')
: >"$TMP/faults.log"
SOAK_START=$(now_ms)
if [ -n "$SLOW_MS" ]; then
  echo "$SLOW_MS" >"$TMP/slow_ms"
  load soak "$SOAK" --list-slow-ms "$SLOW_MS"
else
  load soak "$SOAK"
fi
while read -r at kind target hold; do
  now=$(( $(now_ms) - SOAK_START ))
  [ "$at" -gt "$now" ] && sleep "$(awk -v d=$(( at - now )) 'BEGIN { printf "%.3f", d / 1000 }')"
  ( fault "$kind" "$target" "$hold" ) &
done <"$TMP/schedule"
for p in "${LOADS[@]}"; do wait "$p" || true; done
sleep 1

echo "$SOAK_START" >"$TMP/soak.start"
echo "$SEED" >"$TMP/seed"
python3 "$(dirname "$0")/soak_report.py" "$TMP"
exit
}
