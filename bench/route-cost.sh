#!/usr/bin/env bash
# The routing decision's cost per request (docs/performance.md, "The cost of routes"): the
# CA's `Routes::route` for a service without routes and with 20 match rules, and the pure
# `ServiceRoutes::select` alone; release build, one core, 1,000,000 requests a case.
#
#   bench/route-cost.sh [ROUNDS]     (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p detour-sidecar --example route_cost
for r in $(seq 1 "${1:-3}"); do
  echo "== round $r"
  taskset -c 0 target/release/examples/route_cost
done
