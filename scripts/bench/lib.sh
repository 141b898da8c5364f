# shellcheck shell=bash
# Shared by the scenario scripts in scripts/bench/: build, free ports, start and stop the
# servers and brokers a scenario needs, and stop everything it started on exit (trap).
# Everything binds 127.0.0.1 on free ports; nothing uses 6379.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release/examples
OUT=$TARGET/loadgen
LOGS=$OUT/logs
# The load generator is its own package (benches/loadgen), so a binary, not an example.
LOADGEN=$TARGET/release/loadgen
# The floor (benches/floor): the minimal fan-out server the others are measured against.
FLOOR=$TARGET/release/floor
mkdir -p "$LOGS"

STARTED_PIDS=()
TMP_DIRS=()

say() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Stops what this script started, newest first: SIGTERM, then SIGKILL after 5 s.
cleanup() {
  local status=$?
  local i pid
  for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${STARTED_PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || true
  done
  for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${STARTED_PIDS[i]}
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  for d in "${TMP_DIRS[@]}"; do rm -rf "$d"; done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Builds the chat server, the load generator and the floor (release). Quiet unless it fails.
# SKIP_BUILD=1 uses the binaries already in target/release (examples/chat-server, loadgen,
# floor).
build() {
  if [ -n "${SKIP_BUILD:-}" ] && [ -x "$BIN/chat-server" ] && [ -x "$LOADGEN" ] && [ -x "$FLOOR" ]; then
    say "using the binaries already built (SKIP_BUILD)"
    return
  fi
  say "building chat-server, loadgen and floor (release)"
  (cd "$ROOT" && cargo build --release --quiet --example chat-server \
    && cargo build --release --quiet -p chatbus-loadgen -p chatbus-floor) \
    || die "cargo build failed"
}

free_port() { "$LOADGEN" free-port; }

# wait_tcp PORT [SECS]: until something accepts on 127.0.0.1:PORT.
wait_tcp() {
  local port=$1 secs=${2:-30} i
  for ((i = 0; i < secs * 10; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "nothing listening on 127.0.0.1:$port after ${secs}s"
}

# start_redis: sets REDIS_PORT and REDIS_PID.
start_redis() {
  command -v redis-server >/dev/null || die "redis-server not found: apt-get install redis-server"
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --logfile "$LOGS/redis-$REDIS_PORT.log" &
  REDIS_PID=$!
  STARTED_PIDS+=("$REDIS_PID")
  wait_tcp "$REDIS_PORT"
  say "redis-server pid $REDIS_PID on 127.0.0.1:$REDIS_PORT"
}

# start_redis_cluster: three masters and three replicas of redis-server --cluster-enabled,
# joined with redis-cli --cluster create; sets REDIS_CLUSTER (host:port,...) and
# REDIS_CLUSTER_PIDS, and waits until every node says cluster_state:ok.
start_redis_cluster() {
  command -v redis-server >/dev/null || die "redis-server not found: apt-get install redis-server"
  command -v redis-cli >/dev/null || die "redis-cli not found: apt-get install redis-tools"
  local dir port i nodes=() ports=()
  dir=$(mktemp -d "${TMPDIR:-/tmp}/chatbus-bench-cluster.XXXXXX")
  TMP_DIRS+=("$dir")
  REDIS_CLUSTER_PIDS=()
  for i in 1 2 3 4 5 6; do
    port=$(free_port)
    (cd "$dir" && exec redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
      --cluster-enabled yes --cluster-config-file "nodes-$port.conf" \
      --cluster-node-timeout 1000 --logfile "$LOGS/redis-cluster-$port.log") &
    STARTED_PIDS+=("$!")
    REDIS_CLUSTER_PIDS+=("$!")
    ports+=("$port")
    nodes+=("127.0.0.1:$port")
  done
  for port in "${ports[@]}"; do wait_tcp "$port"; done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$LOGS/redis-cluster-create.log" 2>&1 \
    || { tail -n 20 "$LOGS/redis-cluster-create.log" >&2; die "redis-cli --cluster create failed"; }
  for port in "${ports[@]}"; do
    for i in $(seq 100); do
      redis-cli -p "$port" cluster info 2>/dev/null | grep -q "cluster_state:ok" && break
      [ "$i" -lt 100 ] || die "the Redis Cluster did not reach cluster_state:ok"
      sleep 0.1
    done
  done
  REDIS_CLUSTER=$(join_by , "${nodes[@]}")
  say "Redis Cluster of 3 masters + 3 replicas: $REDIS_CLUSTER"
}

# start_tansu: sets KAFKA_PORT and TANSU_PID (SQLite storage in a temp dir, absolute path).
start_tansu() {
  local tansu
  tansu=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
  [ -x "$tansu" ] || die "tansu not found: cargo install tansu --version 0.6.0 --locked --features libsql"
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/chatbus-bench-tansu.XXXXXX")
  TMP_DIRS+=("$dir")
  KAFKA_PORT=$(free_port)
  # An absolute path needs four slashes (sqlite:// + /abs/path).
  # Tansu reads these as flag defaults: a developer's shell must not redirect the bench broker.
  (cd "$dir" && exec env -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE \
    RUST_LOG="${TANSU_LOG:-warn}" "$tansu" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "sqlite:///$dir/tansu.db") >"$LOGS/tansu-$KAFKA_PORT.log" 2>&1 &
  TANSU_PID=$!
  STARTED_PIDS+=("$TANSU_PID")
  wait_tcp "$KAFKA_PORT"
  say "tansu pid $TANSU_PID on 127.0.0.1:$KAFKA_PORT (storage $dir/tansu.db)"
}

# start_chatbus BROKER: starts one chat-server; sets CB_PORT and CB_PID and appends to
# CB_PORTS / CB_PIDS. The per-connection rate limit is off: the load generator's senders
# send far more than a person would. CHATBUS_BIN runs another chat-server binary (hooks.sh
# runs the code of an older commit beside this one).
CB_PORTS=()
CB_PIDS=()
start_chatbus() {
  local broker=$1
  CB_PORT=$(free_port)
  # Redis pub/sub only, like the peer's adapter (no Redis Streams history window; `dual`
  # requires it off anyway: Kafka keeps the history).
  local envs=(RUST_LOG="${RUST_LOG:-warn}" CHATBUS_REDIS_HISTORY="${CHATBUS_REDIS_HISTORY:-0}")
  if [ -n "${REDIS_PORT:-}" ]; then envs+=(CHATBUS_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"); fi
  if [ -n "${REDIS_CLUSTER:-}" ]; then envs+=(CHATBUS_REDIS_CLUSTER="$REDIS_CLUSTER"); fi
  if [ -n "${KAFKA_PORT:-}" ]; then envs+=(CHATBUS_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"); fi
  # shellcheck disable=SC2086 # CHATBUS_SERVER_ARGS is a list of extra flags
  env "${envs[@]}" "${CHATBUS_BIN:-$BIN/chat-server}" --listen "127.0.0.1:$CB_PORT" --broker "$broker" \
    --rate-per-sec 0 ${CHATBUS_SERVER_ARGS:-} >"$LOGS/chat-server-$CB_PORT.log" 2>&1 &
  CB_PID=$!
  STARTED_PIDS+=("$CB_PID")
  CB_PORTS+=("$CB_PORT")
  CB_PIDS+=("$CB_PID")
  "$LOADGEN" wait-http "http://127.0.0.1:$CB_PORT/readyz" --timeout 60 \
    || { tail -n 20 "$LOGS/chat-server-$CB_PORT.log" >&2; die "chat-server ($broker) not ready"; }
  say "chat-server pid $CB_PID on 127.0.0.1:$CB_PORT (broker $broker)"
}

# The peer is the repository's own benches/peer (server.js, pinned package-lock.json); its npm
# dependencies are installed in place (node_modules is git-ignored), again whenever the lock
# file is newer than the installed tree.
PEER_DIR=$ROOT/benches/peer
prepare_peer() {
  [ -f "$PEER_DIR/server.js" ] || die "peer not found at $PEER_DIR"
  command -v node >/dev/null || die "node not found: apt-get install nodejs npm"
  if [ ! -d "$PEER_DIR/node_modules/socket.io" ] \
    || [ "$PEER_DIR/package-lock.json" -nt "$PEER_DIR/node_modules/.package-lock.json" ]; then
    say "installing the peer's npm dependencies (npm ci in benches/peer)"
    (cd "$PEER_DIR" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed"
  fi
}

# start_peer: one Socket.IO server on the running redis; sets PEER_PORT/PEER_PID and appends
# to PEER_PORTS / PEER_PIDS.
PEER_PORTS=()
PEER_PIDS=()
start_peer() {
  PEER_PORT=$(free_port)
  (cd "$PEER_DIR" && PORT=$PEER_PORT REDIS_PORT=$REDIS_PORT exec node server.js) \
    >"$LOGS/peer-$PEER_PORT.log" 2>&1 &
  PEER_PID=$!
  STARTED_PIDS+=("$PEER_PID")
  PEER_PORTS+=("$PEER_PORT")
  PEER_PIDS+=("$PEER_PID")
  "$LOADGEN" wait-http "http://127.0.0.1:$PEER_PORT/healthz" --timeout 30 \
    || { tail -n 20 "$LOGS/peer-$PEER_PORT.log" >&2; die "peer not ready"; }
  say "socket.io peer pid $PEER_PID on 127.0.0.1:$PEER_PORT"
}

# start_floor: one floor process (benches/floor; one event loop per core, no broker: a single
# process is the whole floor, with no hop between instances); sets FLOOR_PORT/FLOOR_PID and
# appends to FLOOR_PIDS.
FLOOR_PIDS=()
start_floor() {
  FLOOR_PORT=$(free_port)
  # shellcheck disable=SC2086 # FLOOR_ARGS is a list of extra flags (e.g. --threads 1)
  "$FLOOR" --port "$FLOOR_PORT" ${FLOOR_ARGS:-} >"$LOGS/floor-$FLOOR_PORT.log" 2>&1 &
  FLOOR_PID=$!
  STARTED_PIDS+=("$FLOOR_PID")
  FLOOR_PIDS+=("$FLOOR_PID")
  wait_tcp "$FLOOR_PORT"
  say "floor pid $FLOOR_PID on 127.0.0.1:$FLOOR_PORT"
}

# stop_servers: stops the chat servers, peers and floors started so far (not the brokers), so
# one script can measure every stack one after the other on the same brokers.
stop_servers() {
  local pid
  for pid in "${CB_PIDS[@]}" "${PEER_PIDS[@]}" "${FLOOR_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${CB_PIDS[@]}" "${PEER_PIDS[@]}" "${FLOOR_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  CB_PIDS=(); CB_PORTS=(); PEER_PIDS=(); PEER_PORTS=(); FLOOR_PIDS=()
}

# urls PROTO PORT...: comma-separated WebSocket URLs.
urls() {
  local proto=$1 out="" p
  shift
  for p in "$@"; do
    if [ "$proto" = chatbus ]; then out+="ws://127.0.0.1:$p/ws,"; else out+="ws://127.0.0.1:$p,"; fi
  done
  echo "${out%,}"
}

# join_by , a b c -> a,b,c
join_by() { local IFS=$1; shift; echo "$*"; }

# Seconds since this script started (for the time budget).
SECONDS=0
finish_line() { say "done in ${SECONDS}s; reports in $OUT"; }
