#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: etcd (Debian's etcd-server) for
# the etcd-registry tests. Idempotent; quiet when everything is present. protoc is not needed:
# the builds use the vendored one (see .cargo/config.toml).
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is required (install the Rust toolchain first)" >&2
  exit 1
fi
if ! command -v etcd >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing etcd-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
  else
    echo "setup: etcd is missing; install Debian's etcd-server (as root: apt-get install -y etcd-server)" >&2
    exit 1
  fi
fi
