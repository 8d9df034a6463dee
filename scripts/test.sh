#!/usr/bin/env bash
# Runs every test of yibao-gateway: unit and property tests, the gRPC integration suites, and a
# build of the benchmarks. Works on a fresh Debian machine with Rust: protoc comes from the
# protoc-bin-vendored crate and SQLite is compiled in, so nothing else needs installing yet.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cc >/dev/null 2>&1; then
  echo "installing a C compiler (for the bundled SQLite)…"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq gcc; else sudo apt-get update -qq && sudo apt-get install -y -qq gcc; fi
fi

# The benchmarks first (built and smoke-run so they cannot rot), then every test target.
cargo test --locked --benches
cargo test --locked --lib --bins --tests
