#!/usr/bin/env bash
# Brings up a local 3-node clusterd cluster on loopback, with certificates
# made by `clusterctl certs init`, and prints its status.
#   scripts/local-cluster.sh [up|down|status]     (default: up)
# Environment: CLUSTERD_DEMO_DIR (default /tmp/clusterd-demo), NODES (default 3),
# BASE_PORT (default 7701), PROFILE (dev|release, default dev: the same build
# the test suite uses, so the two quick-start commands share one compile).
set -euo pipefail
cd "$(dirname "$0")/.."
action="${1:-up}"
dir="${CLUSTERD_DEMO_DIR:-/tmp/clusterd-demo}"
nodes="${NODES:-3}"
base="${BASE_PORT:-7701}"
profile="${PROFILE:-dev}"

source scripts/deps.sh
case "$profile" in
  release) bin="$CARGO_TARGET_DIR/release" ; build=(cargo build --release --bins) ;;
  *) bin="$CARGO_TARGET_DIR/debug" ; build=(cargo build --tests) ;;
esac

down() {
  for pidfile in "$dir"/n*/pid; do
    [ -f "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

case "$action" in
  down) down; echo "stopped the nodes in $dir"; exit 0 ;;
  status) exec "$bin/clusterctl" --socket "$dir/n1/admin.sock" status ;;
  up) ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 2 ;;
esac

"${build[@]}"
down
ids=$(seq -s, 1 "$nodes")
mkdir -p "$dir"
"$bin/clusterctl" certs init --out "$dir/certs" --nodes "$ids" >/dev/null
for i in $(seq 1 "$nodes"); do
  n="$dir/n$i"
  mkdir -p "$n"
  {
    echo "[node]"
    echo "id = $i"
    echo "listen = \"127.0.0.1:$((base + i - 1))\""
    echo "data_dir = \"$n/data\""
    echo "admin_socket = \"$n/admin.sock\""
    echo
    echo "[tls]"
    echo "ca = \"$dir/certs/ca.crt\""
    echo "cert = \"$dir/certs/node-$i.crt\""
    echo "key = \"$dir/certs/node-$i.key\""
    for j in $(seq 1 "$nodes"); do
      echo
      echo "[[peer]]"
      echo "id = $j"
      echo "addr = \"127.0.0.1:$((base + j - 1))\""
    done
  } > "$n/clusterd.toml"
  "$bin/clusterd" --config "$n/clusterd.toml" --check >/dev/null
  nohup "$bin/clusterd" --config "$n/clusterd.toml" >"$n/log" 2>&1 &
  echo $! > "$n/pid"
done

# Wait (with a deadline) until the cluster has a leader that commits.
deadline=$((SECONDS + 30))
until "$bin/clusterctl" --socket "$dir/n1/admin.sock" barrier --timeout-ms 2000 >/dev/null 2>&1; do
  if [ $SECONDS -ge $deadline ]; then
    echo "the cluster did not elect a leader within 30 s; logs are in $dir/n*/log" >&2
    tail -n 20 "$dir"/n*/log >&2
    exit 1
  fi
  sleep 0.2
done
"$bin/clusterctl" --socket "$dir/n1/admin.sock" status
echo
echo "configs and logs: $dir/n<id>/  |  status: $bin/clusterctl --socket $dir/n1/admin.sock status"
echo "promote node 2:   $bin/clusterctl --socket $dir/n1/admin.sock promote 2"
echo "stop:             scripts/local-cluster.sh down"
