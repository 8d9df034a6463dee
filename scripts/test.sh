#!/usr/bin/env bash
# Runs every test of yibao-gateway: unit and property tests, the gRPC integration suites on both
# backend pairs (SQLite + in-process, PostgreSQL + Redis), the fault tests, and a smoke run of the
# benchmarks. On a fresh Debian machine with Rust it installs what the tests need from Debian's
# packages (a C compiler, redis-server, PostgreSQL); protoc comes from the protoc-bin-vendored crate.
#
# The tests start their own redis-server and PostgreSQL (temporary directories, free ports, run as
# the postgres user when run as root) unless REDIS_URL / DATABASE_URL name running ones.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ -z "${DATABASE_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing from Debian's packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

# The benchmarks first (built and smoke-run so they cannot rot), then every test target.
cargo test --locked --benches
cargo test --locked --lib --bins --tests
