#!/usr/bin/env bash
# Brings up a local 3-node clusterd cluster on loopback, with certificates
# made by `clusterctl certs init`, and shows its main job: every node has a
# demo sync set (a small config directory), a file written on the leader
# arrives on the followers (with the time it took), then the leader is
# killed, another node takes over and the direction reverses. The cluster is
# left running for you to try by hand.
#   scripts/local-cluster.sh [up|down|status]     (default: up)
# Environment: CLUSTERD_DEMO_DIR (default /tmp/clusterd-demo), NODES (default 3, at least 3 for the failover demo),
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

# Stops every node and waits until each has exited (a leader first hands
# leadership over), so that ports and data directories are free again.
down() {
  local pidfile pid pids=()
  for pidfile in "$dir"/n*/pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$pidfile"
  done
  local deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then kill -9 "$pid" 2>/dev/null || true; break; fi
      sleep 0.05
    done
  done
}

case "$action" in
  down) down; echo "stopped the nodes in $dir"; exit 0 ;;
  status) exec "$bin/clusterctl" --socket "$dir/n1/admin.sock" status ;;
  up) ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 2 ;;
esac

start_node() {
  local n="$dir/n$1"
  nohup "$bin/clusterd" --config "$n/clusterd.toml" >>"$n/log" 2>&1 &
  echo $! > "$n/pid"
  # Not this shell's job any more: killing it for the demo prints nothing.
  disown
}

# The id of the leader as node $1 sees it, or nothing.
leader_seen_by() {
  "$bin/clusterctl" --socket "$dir/n$1/admin.sock" status --json --peer-timeout-ms 300 2>/dev/null \
    | sed -n 's/^{"leader":\([0-9][0-9]*\),.*/\1/p'
}

now_ms() { date +%s%3N; }

# Waits until file $2 exists with the content of file $1 on every node in
# $3..., printing how long each took; fails after 10 s.
wait_arrival() {
  local src="$1" rel="$2" started="$3"; shift 3
  local deadline=$((SECONDS + 10)) i pending
  for i in "$@"; do
    until cmp -s "$src" "$dir/n$i/demo/$rel"; do
      if [ $SECONDS -ge $deadline ]; then
        echo "$rel did not reach node $i within 10 s; its log: $dir/n$i/log" >&2
        tail -n 20 "$dir/n$i/log" >&2
        exit 1
      fi
      sleep 0.005
    done
    echo "  node $i has it after $(( $(now_ms) - started )) ms"
  done
}

"${build[@]}"
down
rm -rf "$dir"/n*/data "$dir"/n*/demo "$dir"/n*/on_change.log "$dir"/n*/log
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
    echo
    echo "[[sync]]"
    echo "name = \"demo\""
    echo "path = \"$n/demo\""
    echo "exclude = [\"*.swp\", \"*~\"]"
    echo "on_change = \"date '+%T.%N applied by node $i' >> $n/on_change.log\""
    for j in $(seq 1 "$nodes"); do
      echo
      echo "[[peer]]"
      echo "id = $j"
      echo "addr = \"127.0.0.1:$((base + j - 1))\""
    done
  } > "$n/clusterd.toml"
  "$bin/clusterd" --config "$n/clusterd.toml" --check >/dev/null
  start_node "$i"
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
leader=$(leader_seen_by 1)
others=$(seq 1 "$nodes" | grep -vx "$leader" | tr '\n' ' ')

echo
echo "== replication: node $leader leads, so its $dir/n$leader/demo/ is the source"
conf="$dir/n$leader/demo/tac_plus.conf"
started=$(now_ms)
printf 'key = "demo-%s"\nuser = alice { login = PAM }\n' "$started" > "$conf.tmp"
mv "$conf.tmp" "$conf"
echo "wrote tac_plus.conf on node $leader"
# shellcheck disable=SC2086
wait_arrival "$conf" tac_plus.conf "$started" $others

if [ "$nodes" -ge 3 ]; then
  echo
  echo "== failover: SIGKILL the leader, node $leader"
  kill -9 "$(cat "$dir/n$leader/pid")"
  rm -f "$dir/n$leader/pid"
  killed_at=$(now_ms)
  survivor=$(echo $others | cut -d' ' -f1)
  deadline=$((SECONDS + 15))
  new=""
  until [ -n "$new" ] && [ "$new" != "$leader" ]; do
    if [ $SECONDS -ge $deadline ]; then
      echo "no new leader within 15 s; logs are in $dir/n*/log" >&2; exit 1
    fi
    sleep 0.05
    new=$(leader_seen_by "$survivor")
  done
  echo "node $new leads after $(( $(now_ms) - killed_at )) ms; the sync direction is now from node $new"
  conf="$dir/n$new/demo/aliases"
  started=$(now_ms)
  printf 'postmaster: root\nroot: ops@example.org\n' > "$conf.tmp"
  mv "$conf.tmp" "$conf"
  echo "wrote aliases on node $new"
  rest=$(echo $others | tr ' ' '\n' | grep -vx "$new" | tr '\n' ' ')
  # shellcheck disable=SC2086
  [ -z "$rest" ] || wait_arrival "$conf" aliases "$started" $rest
  echo "restarting node $leader: it rejoins as a follower and catches up"
  started=$(now_ms)
  start_node "$leader"
  wait_arrival "$conf" aliases "$started" "$leader"
  leader=$new
fi

echo
"$bin/clusterctl" --socket "$dir/n$leader/admin.sock" status
echo
echo "Try it by hand: edit files in $dir/n$leader/demo/ (the leader's copy) and watch"
echo "them appear in $dir/n<id>/demo/ on the others; each follower appends to"
echo "$dir/n<id>/on_change.log after applying (its on_change hook). A file edited by hand"
echo "on a follower is put back to the leader's version with the set's next change (or the"
echo "next rescan), and the edit is kept: clusterctl conflicts lists it."
echo
echo "configs and logs: $dir/n<id>/clusterd.toml, $dir/n<id>/log"
echo "status:           $bin/clusterctl --socket $dir/n$leader/admin.sock status"
echo "promote node N:   $bin/clusterctl --socket $dir/n$leader/admin.sock promote N"
echo "conflicts:        $bin/clusterctl --socket $dir/n$leader/admin.sock conflicts"
echo "stop:             scripts/local-cluster.sh down"
