#!/usr/bin/env bash
# Installs the system packages clusterd's build needs (RocksDB compiles from
# source and needs clang/libclang). Sourced by the other scripts; idempotent.
set -euo pipefail
need=()
command -v clang >/dev/null 2>&1 || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
# The accounts cluster tests change accounts with the real shadow-utils
# (useradd -P, usermod, groupadd, pwck, grpck).
[ -x /usr/sbin/useradd ] || command -v useradd >/dev/null 2>&1 || need+=(passwd)
# The replication benchmark's bar is rsync over ssh, as the seed scripts run
# it; it starts a throwaway sshd of its own. Installed where we can (root),
# otherwise the benchmark falls back to local rsync and says so.
if ! command -v ssh >/dev/null 2>&1 || ! [ -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" -eq 0 ]; then
    need+=(openssh-client openssh-server)
  else
    echo "note: ssh/sshd missing; the replication benchmark will compare with local rsync only" >&2
  fi
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "clusterd build needs: ${need[*]}; install them (e.g. sudo apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  echo "installing ${need[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed; install a Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi
# Keep build artifacts outside the clone so fresh clones (and CI) reuse them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/clusterd-target}"
