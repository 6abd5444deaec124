#!/usr/bin/env bash
# The test command: install what is missing, build every binary (the integration tests start
# real detour-sidecar and detourctl processes), then run every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
cargo build --locked --workspace --bins
cargo test --locked --workspace
