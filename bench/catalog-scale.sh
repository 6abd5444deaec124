#!/usr/bin/env bash
# The catalog at scale against a real etcd on loopback: N services x M instances (default
# 10,000 x 10). Prints write time, full load from etcd, memory, write-to-catalog delay, and the
# start from the disk cache alone. Needs etcd (tests/setup.sh installs it).
#   bench/catalog-scale.sh [N] [M]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}; M=${2:-10}
TMP=$(mktemp -d /tmp/detour-bench-XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PEER=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
etcd --data-dir "$TMP/etcd" --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER" --initial-advertise-peer-urls "http://127.0.0.1:$PEER" \
  --initial-cluster "default=http://127.0.0.1:$PEER" --quota-backend-bytes 4294967296 >"$TMP/etcd.log" 2>&1 &
ETCD=$!
trap 'kill $ETCD 2>/dev/null; wait $ETCD 2>/dev/null; rm -rf "$TMP"' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 0.1; done
cargo build --release -q -p detour-registry --example catalog_scale
BIN=target/release/examples/catalog_scale
"$BIN" "http://127.0.0.1:$PORT" "$N" "$M" "$TMP"
kill $ETCD; wait $ETCD 2>/dev/null || true
# Fresh processes, as a restarted sidecar: etcd unreachable, the disk cache alone. The first
# start after the writer also runs redb's integrity check after its unclean close; the next ones
# show a warm start.
for run in 1 2 3; do
  RUST_LOG=error "$BIN" --from-cache "$TMP" "$N" "$M"
done

# The whole sidecar process: spawned with etcd unreachable and this disk cache, timed until
# /ready answers 200 and /state lists every service.
cargo build --release -q --bin detour-sidecar --bin detourctl
mkdir -p "$TMP/run"
# one sidecar, no traffic between sidecars: no certificate needed
target/release/detourctl sidecar-config --host bench --run-dir "$TMP/run" \
  --registry "etcd:http://127.0.0.1:9" --catalog-cache "$TMP/catalog.redb" --unix "" \
  --plaintext >"$TMP/sidecar.toml"
python3 - "$TMP" "$N" <<'PY'
import json, os, subprocess, sys, time, urllib.request
tmp, n = sys.argv[1], int(sys.argv[2])
for run in (1, 2, 3):
    addr_file = os.path.join(tmp, "run", "sidecar.json")
    if os.path.exists(addr_file):
        os.remove(addr_file)
    t0 = time.monotonic()
    p = subprocess.Popen(["target/release/detour-sidecar", "--config", os.path.join(tmp, "sidecar.toml")],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "sidecar.log"), "w"),
                         env=dict(os.environ, RUST_LOG="warn"))
    try:
        while True:
            assert p.poll() is None, "sidecar exited"
            assert time.monotonic() - t0 < 30, "sidecar not ready in 30 s"
            try:
                admin = json.load(open(addr_file))["admin"]
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (OSError, ValueError, KeyError):
                time.sleep(0.002)
        ready = time.monotonic() - t0
        rss_ready = next(int(l.split()[1]) for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS:"))
        with urllib.request.urlopen(f"http://{admin}/state", timeout=10) as r:
            services = json.load(r)["services"]
        eps = sum(len(s["endpoints"]) for s in services.values())
        cached = sum(1 for s in services.values() if s["source"] == "disk-cache")
        rss = next(int(l.split()[1]) for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS:"))
        print(f"bench: sidecar process (etcd down): ready in {ready*1000:.0f} ms from spawn; "
              f"{len(services)} services ({cached} from disk cache), {eps} endpoints; "
              f"rss {rss_ready//1024} MiB when ready, {rss//1024} MiB after rendering /state")
        assert len(services) == n
    finally:
        p.terminate()
        p.wait()
PY
