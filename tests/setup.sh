#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain. Idempotent and quiet when
# everything is present. protoc is not needed: the build uses the one `protoc-bin-vendored` ships.
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is required (install the Rust toolchain first)" >&2
  exit 1
fi
