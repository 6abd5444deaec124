#!/usr/bin/env bash
# A fleet on one machine (docs/scale.md): a real 3-member etcd on loopback and HOSTS real
# sidecars started together, each on its own loopback address (127.20.x.y) providing 3 of
# SERVICES services (the same demo provider behind each). Prints, per run: the registration
# storm, the time one provider change takes to reach every sidecar (from each sidecar's
# `/state` `registry.applied`), etcd's cost at rest and under 1 and 10 changes/s, each
# sidecar's CPU and RSS, the recovery from a whole-cluster etcd outage under steady load
# through four sidecars, and (--catalog N) what N services x 5 endpoints cost each sidecar.
# Needs only what tests/setup.sh installs (etcd); builds the release binaries.
#
#   bench/fleet.sh HOSTS [SERVICES] [--outage-secs S] [--catalog N] [--per-host K]
#                  [--watch-check-ms N] [--watched (each sidecar under its own detour-watchdog)]
#   bench/fleet.sh curve            (HOSTS = 50, 100, 200, 400 in turn)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || { echo "fleet: etcd is required (tests/setup.sh installs it)" >&2; exit 1; }
cargo build --release -q --bin detour-sidecar --bin detourctl
cargo build --release -q -p detour-tests --example fleet
run() {
  echo "== $(date -u +%FT%TZ) fleet $*"
  local start=$SECONDS
  target/release/examples/fleet "$@" --bin target/release
  echo "driver: wall_s=$((SECONDS - start))"
}
if [ "${1:-}" = curve ]; then
  shift
  for hosts in 50 100 200 400; do
    # Memory first: each sidecar holds about 11 MB; stop where this machine could not.
    free_mb=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
    if [ $((hosts * 20)) -gt "$free_mb" ]; then
      echo "== fleet $hosts: skipped, ${free_mb} MB available (about 20 MB a host needed)"
      continue
    fi
    run "$hosts" "$@"
  done
else
  run "$@"
fi
