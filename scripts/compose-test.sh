#!/usr/bin/env bash
# End-to-end test of docker/: builds the image from the release binaries
# (docker/Dockerfile with CLUSTERD_PREBUILT) on a local Debian bookworm
# minbase image (debootstrap, cached under /var/tmp/clusterd-compose), then
# for both topologies, three nodes (docker/compose.yaml) and two data nodes
# plus a witness (+ docker/compose.witness.yaml): up, wait for a leader,
# write a file on the leader and see it on every data node, SIGKILL the
# leader's container, wait for a new leader, write another file and see it,
# start the old node and wait until it follows and holds both files; finally
# times `docker stop` of a follower and of the leader.
#
# Uses the Docker engine `docker info` reaches; without one (and as root) it
# starts its own dockerd on a private socket and data root (no docker0, no
# iptables or IP forwarding changes), and stops exactly that dockerd, by PID,
# at exit. It removes what it made: its compose projects' containers,
# networks and volumes, its images (the base image stays in an engine that
# was already running, as a cache) and its dockerd's files. Where no engine
# can be reached or started, or a tool is missing, it prints one
# "compose-test: SKIPPED: <why>" line and exits 0 (1 with
# COMPOSE_TEST_REQUIRED set). On a failure it prints what failed and every
# container's log, and exits 1.
#
# Needs: docker.io (docker, dockerd), `docker compose` or docker-compose, and
# for the first run debootstrap and a Debian mirror; the release binaries
# must run on Debian bookworm (glibc 2.36).
#
# Environment:
#   CARGO_TARGET_DIR         where the release binaries are (default
#                            /var/tmp/clusterd-target); built only if missing
#   COMPOSE_TEST_REQUIRED    set: fail where it would otherwise skip (no
#                            Docker engine can be reached or started, tools
#                            missing)
#   COMPOSE_TEST_BASE_IMAGE  use this image as the run image instead of the
#                            debootstrapped one (e.g. debian:bookworm-slim)
#   COMPOSE_TEST_CACHE       cache directory (default /var/tmp/clusterd-compose)
#   COMPOSE_TEST_TIMEOUT     seconds each wait may take (default 60)
#   DEBIAN_MIRROR            for debootstrap (default http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/clusterd-target}"
CACHE="${COMPOSE_TEST_CACHE:-/var/tmp/clusterd-compose}"
TIMEOUT="${COMPOSE_TEST_TIMEOUT:-60}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEMO=/srv/clusterd-demo   # the demo set of docker/compose.yaml (SYNC_SETS)
RUN_ID="clusterd-ct-$$-$(date +%s)"
IMAGE="clusterd-compose-test:$RUN_ID"
BIN_IMAGE="clusterd-compose-test-bin:$RUN_ID"
START=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-compose-test.XXXXXX")   # this run's logs
OWN_DOCKERD_PID=""   # set once this script started a dockerd
RUN_DIR=""           # its data root, exec root, pidfile, socket and log
STAGE=""             # prebuilt binaries in the build context
PROJECTS=()          # compose projects brought up
BUILT=""             # images built, removed at exit
PROJECT=""           # the current compose project and its files
FILES=()
declare -A CID=()    # node id -> container id
TIMINGS=()

log() { printf '[compose-test %4ds] %s\n' $((SECONDS - START)) "$*"; }
now_ms() { date +%s%3N; }
since() { echo "$(( $(now_ms) - $1 )) ms"; }
timing() { TIMINGS+=("$1: $2"); log "$1: $2"; }

skip() {
  if [ -n "${COMPOSE_TEST_REQUIRED:-}" ]; then
    echo "compose-test: FAILED: $* (COMPOSE_TEST_REQUIRED is set, so this is not a skip)" >&2
    exit 1
  fi
  echo "compose-test: SKIPPED: $*"
  exit 0
}

dump_logs() {
  [ -n "$PROJECT" ] || return 0
  echo "---- $PROJECT: containers ----" >&2
  compose ps >&2 2>&1 || true
  local id
  for id in "${!CID[@]}"; do
    echo "---- $PROJECT: node$id (${CID[$id]:0:12}) log ----" >&2
    docker logs "${CID[$id]}" >&2 2>&1 || true
  done
}

fail() {
  echo "compose-test: FAILED: $*" >&2
  dump_logs
  exit 1
}

cleanup() {
  local rc=$? p
  set +e
  for p in "${PROJECTS[@]}"; do
    "${COMPOSE[@]}" -p "$p" -f docker/compose.yaml -f docker/compose.witness.yaml \
      down -v --remove-orphans -t 2 >/dev/null 2>&1
  done
  if [ -n "$BUILT" ] && [ -z "$OWN_DOCKERD_PID" ]; then
    # shellcheck disable=SC2086
    docker rmi -f $BUILT >/dev/null 2>&1
  fi
  [ -n "$STAGE" ] && rm -rf "$STAGE"
  rmdir docker/prebuilt 2>/dev/null   # only if nothing else is staged there
  if [ -n "$OWN_DOCKERD_PID" ]; then
    kill -TERM "$OWN_DOCKERD_PID" 2>/dev/null
    local i
    for i in $(seq 1 150); do kill -0 "$OWN_DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$OWN_DOCKERD_PID" 2>/dev/null; then
      echo "compose-test: dockerd $OWN_DOCKERD_PID did not stop within 30 s; killing it" >&2
      kill -KILL "$OWN_DOCKERD_PID" 2>/dev/null
      wait "$OWN_DOCKERD_PID" 2>/dev/null
      # The containerd it started would outlive it.
      [ -f "$RUN_DIR/exec/containerd/containerd.pid" ] \
        && kill -KILL "$(cat "$RUN_DIR/exec/containerd/containerd.pid")" 2>/dev/null
    fi
  fi
  if [ -n "$RUN_DIR" ]; then
    unmount_under "$RUN_DIR"
    rm -rf --one-file-system "$RUN_DIR"
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Unmounts whatever is still mounted below $1 (deepest first), so that
# rm -rf --one-file-system only ever removes our own files.
unmount_under() {
  local m
  awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

# ---- tools and the Docker engine -------------------------------------------

command -v docker >/dev/null 2>&1 || skip "no docker command (apt-get install docker.io)"
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  skip "neither \`docker compose\` nor docker-compose is installed (apt-get install docker-compose)"
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" "$@"; }

engine=""
if docker info >/dev/null 2>&1; then
  engine="the running Docker engine (${DOCKER_HOST:-default socket})"
else
  command -v dockerd >/dev/null 2>&1 || skip "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"
  [ "$(id -u)" -eq 0 ] || skip "no Docker engine answers and only root can start one"
  mkdir -p "$CACHE"
  RUN_DIR=$(mktemp -d "$CACHE/dockerd.XXXXXX")
  # Our own engine: private data root, exec root, pidfile and socket; no
  # docker0 bridge (compose makes its own network) and no changes to the
  # host's iptables rules or IP forwarding (the nodes only talk to each other).
  dockerd --data-root "$RUN_DIR/data" --exec-root "$RUN_DIR/exec" \
    --pidfile "$RUN_DIR/dockerd.pid" -H "unix://$RUN_DIR/docker.sock" \
    --bridge=none --iptables=false --ip-forward=false </dev/null >"$RUN_DIR/dockerd.log" 2>&1 &
  OWN_DOCKERD_PID=$!
  export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
  deadline=$((SECONDS + 30))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$OWN_DOCKERD_PID" 2>/dev/null; then
      wait "$OWN_DOCKERD_PID" 2>/dev/null || true
      OWN_DOCKERD_PID=""
      reason=$(grep -v '^\s*$' "$RUN_DIR/dockerd.log" | tail -n 1 | cut -c1-300)
      skip "no Docker engine answers and dockerd could not start here: $reason"
    fi
    [ $SECONDS -lt $deadline ] || skip "no Docker engine answers and the dockerd started here did not answer within 30 s (log: $(tail -n 1 "$RUN_DIR/dockerd.log" | cut -c1-300))"
    sleep 0.2
  done
  engine="its own dockerd (pid $OWN_DOCKERD_PID, $(docker info -f '{{.Driver}}' 2>/dev/null) storage, $RUN_DIR)"
fi
log "engine: $engine; compose: ${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null || true)"
# Without buildx the CLI would only warn before using the legacy builder.
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0

# ---- binaries, base image, clusterd image ----------------------------------

BIN="$CARGO_TARGET_DIR/release"
if [ ! -x "$BIN/clusterd" ] || [ ! -x "$BIN/clusterctl" ]; then
  log "no release binaries in $BIN; building them"
  # shellcheck source=scripts/deps.sh
  source scripts/deps.sh
  cargo build --release --bins
fi

if [ -n "${COMPOSE_TEST_BASE_IMAGE:-}" ]; then
  BASE="$COMPOSE_TEST_BASE_IMAGE"
  docker image inspect "$BASE" >/dev/null 2>&1 || docker pull -q "$BASE" >/dev/null \
    || fail "COMPOSE_TEST_BASE_IMAGE=$BASE is not in the engine and cannot be pulled"
else
  BASE="clusterd-compose-base:bookworm-minbase"
  tarball="$CACHE/bookworm-minbase.tar"
  if docker image inspect "$BASE" >/dev/null 2>&1; then
    log "base image $BASE already in the engine"
  else
    if [ ! -s "$tarball" ]; then
      command -v debootstrap >/dev/null 2>&1 || skip "no cached base image and debootstrap is not installed (apt-get install debootstrap)"
      [ "$(id -u)" -eq 0 ] || skip "no cached base image in $tarball and only root can debootstrap one"
      mkdir -p "$CACHE"
      rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
      t=$(now_ms)
      log "debootstrap --variant=minbase bookworm from $MIRROR (log: $CACHE/debootstrap.log)"
      if ! debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        unmount_under "$rootfs"; rm -rf --one-file-system "$rootfs"
        tail -n 20 "$CACHE/debootstrap.log" >&2
        fail "debootstrap failed (log above and in $CACHE/debootstrap.log)"
      fi
      unmount_under "$rootfs"
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
      rm -rf --one-file-system "$rootfs"
      timing "debootstrap (cached as $tarball)" "$(since "$t")"
    else
      log "using the cached base $tarball"
    fi
    t=$(now_ms)
    docker import - "$BASE" <"$tarball" >/dev/null || fail "docker import of $tarball failed"
    timing "base image import" "$(since "$t")"
  fi
fi

mkdir -p docker/prebuilt
STAGE=$(mktemp -d "$ROOT/docker/prebuilt/compose-test.XXXXXX")
cp "$BIN/clusterd" "$BIN/clusterctl" "$STAGE/"
prebuilt="docker/prebuilt/$(basename "$STAGE")"
t=$(now_ms)
build_args=(-f docker/Dockerfile --build-arg "RUN_IMAGE=$BASE" --build-arg "CLUSTERD_PREBUILT=$prebuilt")
# The bin stage is tagged too, so that removing both tags leaves nothing.
BUILT="$BIN_IMAGE"
docker build -q "${build_args[@]}" --target bin -t "$BIN_IMAGE" . >"$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log" >&2; fail "docker build (bin stage) failed"; }
BUILT="$BIN_IMAGE $IMAGE"
docker build -q "${build_args[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log" >&2; fail "docker build failed"; }
timing "image build ($IMAGE on $BASE)" "$(since "$t")"
rm -rf "$STAGE"; STAGE=""
docker run --rm --entrypoint clusterd "$IMAGE" --version >/dev/null 2>&1 \
  || fail "the binaries from $BIN do not run on $BASE: $(docker run --rm --entrypoint clusterd "$IMAGE" --version 2>&1 | tail -n 1) (built on a newer glibc than bookworm's?)"
export CLUSTERD_IMAGE="$IMAGE"

# ---- helpers on a running project ------------------------------------------

# The leader node $1 sees (its own `clusterctl status --json`, top-level
# "leader"), or nothing if it does not answer or knows none. Only the node's
# own view is used, so peers get a short deadline.
leader_seen_by() {
  local json
  json=$(docker exec "${CID[$1]}" clusterctl status --json --peer-timeout-ms 200 2>/dev/null) || return 0
  # Drop the per-node array; what is left are the top-level keys.
  printf '%s' "$json" | sed -e 's/"nodes":\[.*\]//' | grep -o '"leader":[0-9]*' | head -n 1 | cut -d: -f2 || true
}

# Waits until one of the nodes $2.. reports a leader other than $1 ("" for
# any) that is itself one of them and sees itself as leader; prints its id.
wait_leader() {
  local not=$1; shift
  local deadline=$((SECONDS + TIMEOUT)) n l
  while [ $SECONDS -lt $deadline ]; do
    for n in "$@"; do
      l=$(leader_seen_by "$n")
      [ -n "$l" ] && [ "$l" != "$not" ] || continue
      case " $* " in *" $l "*) ;; *) continue ;; esac
      if [ "$(leader_seen_by "$l")" = "$l" ]; then echo "$l"; return 0; fi
    done
    sleep 0.1
  done
  return 1
}

# Writes $2 (a fresh 64 KiB random file) on node $1; prints its sha256.
write_file() {
  docker exec "${CID[$1]}" sh -c 'head -c 65536 /dev/urandom >"$1.tmp" && mv "$1.tmp" "$1" && sha256sum "$1" | cut -d" " -f1' sh "$DEMO/$2"
}
sum_on() { docker exec "${CID[$1]}" sha256sum "$DEMO/$2" 2>/dev/null | cut -d' ' -f1 || true; }

# Waits until every node in $3.. holds $DEMO/$1 with sha256 $2.
wait_file() {
  local name=$1 sum=$2; shift 2
  local deadline=$((SECONDS + TIMEOUT)) n ok
  while [ $SECONDS -lt $deadline ]; do
    ok=1
    for n in "$@"; do [ "$(sum_on "$n" "$name")" = "$sum" ] || { ok=0; break; }; done
    [ $ok = 1 ] && return 0
    sleep 0.1
  done
  for n in "$@"; do echo "node$n: $DEMO/$name sha256 '$(sum_on "$n" "$name")', want $sum" >&2; done
  return 1
}

# Waits until leader $1 still leads and reaches every node.
wait_settled() {
  local deadline=$((SECONDS + TIMEOUT)) json
  while [ $SECONDS -lt $deadline ]; do
    json=$(docker exec "${CID[$1]}" clusterctl status --json 2>/dev/null) || json=""
    if [ "$(leader_seen_by "$1")" = "$1" ] && [ -n "$json" ] \
      && ! printf '%s' "$json" | grep -q '"reachable":false'; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

# docker stop of node $1 (a $2): fails unless it exits 0 well before
# docker's 10 s grace time runs out (SIGTERM handled, no SIGKILL needed).
stop_node() {
  local t took code
  t=$(now_ms)
  docker stop "${CID[$1]}" >/dev/null || fail "$name: docker stop of node$1 failed"
  took=$(( $(now_ms) - t ))
  code=$(docker inspect -f '{{.State.ExitCode}}' "${CID[$1]}")
  [ "$took" -lt 8000 ] || fail "$name: docker stop of node$1 ($2) took $took ms: SIGTERM did not stop it"
  [ "$code" = 0 ] || fail "$name: node$1 ($2) exited with status $code on SIGTERM"
  timing "$name: docker stop of node$1 ($2)" "$took ms"
}

without() { local x=$1 n out=""; shift; for n in "$@"; do [ "$n" = "$x" ] || out="$out${out:+ }$n"; done; echo "$out"; }

# ---- one topology ----------------------------------------------------------

run_topology() {
  local name=$1 data=$2 witness=$3; shift 3
  PROJECT="$RUN_ID-$name"
  FILES=(-f docker/compose.yaml "$@")
  CID=()
  local all="$data $witness" t t0 n leader leader2 rest sum1 sum2
  log "== $name: data nodes $data${witness:+, witness $witness} (project $PROJECT)"
  PROJECTS+=("$PROJECT")
  t0=$(now_ms)
  compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; fail "$name: compose up failed"; }
  for n in $all; do
    CID[$n]=$(compose ps -q "node$n") || fail "$name: compose ps failed"
    [ -n "${CID[$n]}" ] || fail "$name: no container for node$n"
    [ "$(docker inspect -f '{{.HostConfig.Init}}' "${CID[$n]}")" = true ] || fail "$name: node$n runs without init"
  done
  # shellcheck disable=SC2086
  leader=$(wait_leader "" $all) || fail "$name: no leader within ${TIMEOUT}s of up"
  case " $data " in *" $leader "*) ;; *) fail "$name: node$leader leads but is not a data node" ;; esac
  timing "$name: up to leader (node$leader)" "$(since "$t0")"

  t=$(now_ms)
  sum1=$(write_file "$leader" first) || fail "$name: cannot write on node$leader"
  # shellcheck disable=SC2086
  wait_file first "$sum1" $data || fail "$name: $DEMO/first did not reach every data node within ${TIMEOUT}s"
  timing "$name: file written on node$leader seen on nodes $data" "$(since "$t")"

  t=$(now_ms)
  docker kill "${CID[$leader]}" >/dev/null || fail "$name: docker kill of node$leader failed"
  # shellcheck disable=SC2046
  leader2=$(wait_leader "$leader" $(without "$leader" $all)) || fail "$name: no new leader within ${TIMEOUT}s of killing node$leader"
  timing "$name: SIGKILL of node$leader to new leader node$leader2" "$(since "$t")"

  t=$(now_ms)
  rest=$(without "$leader" $data)
  sum2=$(write_file "$leader2" second) || fail "$name: cannot write on node$leader2"
  # shellcheck disable=SC2086
  wait_file second "$sum2" $rest || fail "$name: $DEMO/second did not reach nodes $rest within ${TIMEOUT}s"
  timing "$name: file written on node$leader2 seen on nodes $rest" "$(since "$t")"

  t=$(now_ms)
  docker start "${CID[$leader]}" >/dev/null || fail "$name: docker start of node$leader failed"
  local deadline=$((SECONDS + TIMEOUT)) l=""
  while [ $SECONDS -lt $deadline ]; do
    l=$(leader_seen_by "$leader")
    if [ -n "$l" ] && [ "$l" != "$leader" ] && [ "$(sum_on "$leader" first)" = "$sum1" ] \
      && [ "$(sum_on "$leader" second)" = "$sum2" ]; then
      break
    fi
    l=""
    sleep 0.1
  done
  [ -n "$l" ] || fail "$name: node$leader did not rejoin as a follower holding both files within ${TIMEOUT}s (it sees leader '$(leader_seen_by "$leader")')"
  timing "$name: start of node$leader to follower of node$l with both files" "$(since "$t")"

  # SIGTERM: docker stop of a follower, and of the leader (which hands over
  # to a caught-up data node first), each in a cluster with every node up.
  local f
  f=$(without "$l" $data); f=${f%% *}
  wait_settled "$l" || fail "$name: node$l does not see every node reachable within ${TIMEOUT}s"
  stop_node "$f" follower
  docker start "${CID[$f]}" >/dev/null || fail "$name: docker start of node$f failed"
  wait_settled "$l" || fail "$name: node$f did not come back within ${TIMEOUT}s of its start"
  t=$(now_ms)
  stop_node "$l" leader
  # shellcheck disable=SC2046
  leader2=$(wait_leader "$l" $(without "$l" $all)) || fail "$name: no leader within ${TIMEOUT}s of stopping node$l"
  case " $data " in *" $leader2 "*) ;; *) fail "$name: node$leader2 leads but is not a data node" ;; esac
  timing "$name: docker stop of leader node$l to node$leader2 leading" "$(since "$t")"

  compose down -v --remove-orphans -t 2 >/dev/null 2>&1 || fail "$name: compose down failed"
  timing "$name: total" "$(since "$t0")"
  PROJECT=""
}

run_topology three "1 2 3" ""
run_topology witness "1 2" 3 -f docker/compose.witness.yaml

log "passed in $((SECONDS - START)) s"
printf '  %s\n' "${TIMINGS[@]}"
