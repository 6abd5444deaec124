#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: etcd (Debian's etcd-server) for
# the etcd-registry tests, ZooKeeper (Debian's zookeeper, with the Java it depends on) for the
# registry-sync tests, curl and procps for the soak CI runs, promtool (Debian's prometheus) for
# the alert rules. Idempotent; quiet when everything
# is present. protoc is not needed: the builds use the vendored one (see .cargo/config.toml).
set -euo pipefail
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is required (install the Rust toolchain first)" >&2
  exit 1
fi
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
{ command -v java >/dev/null 2>&1 && [ -f /usr/share/java/zookeeper.jar ]; } || missing+=(zookeeper)
# The chaos scenarios and the soak CI runs: curl for admin APIs, procps for pgrep and pkill.
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v pkill >/dev/null 2>&1 || missing+=(procps)
# promtool checks and unit-tests the shipped alert rules (deploy/observability/).
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing ${missing[*]}; install Debian's packages (as root: apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
fi
