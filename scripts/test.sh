#!/usr/bin/env bash
# Runs the whole test suite: unit tests of the pure cores, in-process
# multi-node simulations, and the real multi-process cluster tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
# Cluster tests start three clusterd processes each; two at a time keeps a
# 2-core machine responsive enough for Raft timers.
cargo test --all-targets -- --test-threads=2
