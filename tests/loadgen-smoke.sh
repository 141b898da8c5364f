#!/usr/bin/env bash
# Smoke run of the load generator: builds the chat-server example and the loadgen binary
# (package chatbus-loadgen, benches/loadgen; debug builds), starts one chat-server (memory
# broker, no rate limit) on a free loopback port, runs 60 clients in 3 rooms with 6 senders for
# 2 seconds, and fails unless every client connected and every message reached every member
# exactly once. Then the same through two processes (--procs 2) to cover the multi-process
# path, and checks that a run against a server that refuses sends (rate limit) is reported as
# not clean. Last, the floor (benches/floor, package chatbus-floor) with `--protocol floor`:
# clean, and with the server's user/system CPU and write calls per delivery in the report.
# Stops the servers.
#
# Run with: bash tests/loadgen-smoke.sh
# Last line: "loadgen-smoke: N passed, M failed"; exit status non-zero on failure.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT="$TARGET/loadgen/smoke"
mkdir -p "$OUT"
SERVER_PID=""
PASSED=0
FAILED=0

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null
  fi
  SERVER_PID=""
}
finish() {
  stop_server
  if [ "$FAILED" -gt 0 ] && [ -f "$OUT/server.log" ]; then
    echo "--- server log (tail) ---"
    tail -n 30 "$OUT/server.log"
  fi
  echo "loadgen-smoke: $PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
  exit $?
}
trap finish EXIT
trap 'FAILED=$((FAILED + 1)); exit 130' INT TERM
fail_now() { echo "loadgen-smoke: $*" >&2; FAILED=$((FAILED + 1)); exit 1; }

echo "loadgen-smoke: building the chat-server example, the loadgen and the floor"
(cd "$ROOT" && cargo build --quiet --example chat-server \
  && cargo build --quiet -p chatbus-loadgen -p chatbus-floor) \
  || fail_now "cargo build --example chat-server / -p chatbus-loadgen -p chatbus-floor failed"
BIN="$TARGET/debug/examples"
LOADGEN="$TARGET/debug/loadgen"
FLOOR="$TARGET/debug/floor"
[ -x "$FLOOR" ] || fail_now "floor not found at $FLOOR"
[ -x "$BIN/chat-server" ] || fail_now "chat-server not found in $BIN"
[ -x "$LOADGEN" ] || fail_now "loadgen not found at $LOADGEN"

PORT=$("$LOADGEN" free-port) || fail_now "no free port"
RUST_LOG=${RUST_LOG:-warn} "$BIN/chat-server" --listen "127.0.0.1:$PORT" --broker memory \
  --rate-per-sec 0 >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
"$LOADGEN" wait-http "http://127.0.0.1:$PORT/readyz" --timeout 30 \
  || fail_now "chat-server not ready on 127.0.0.1:$PORT"
echo "loadgen-smoke: chat-server pid $SERVER_PID on 127.0.0.1:$PORT"

# check NAME ARGS...: one loadgen run that must be clean (exit 0 with --assert-clean) and
# must report deliveries.
check() {
  local name=$1
  shift
  if timeout 60 "$LOADGEN" run --url "ws://127.0.0.1:$PORT/ws" --server-pid "$SERVER_PID" \
    --clients 60 --rooms 3 --senders 6 --rate 60 --duration 2 --drain-secs 5 \
    --assert-clean --out "$OUT" --name "$name" --label smoke "$@" >"$OUT/$name.out" 2>&1 \
    && grep -q '"delivered": [1-9]' "$OUT/$name.json"; then
    echo "loadgen-smoke: ok   $name ($(grep -o 'lost [0-9]* dup [0-9]* total' "$OUT/$name.out"))"
    PASSED=$((PASSED + 1))
  else
    echo "loadgen-smoke: FAIL $name"
    tail -n 20 "$OUT/$name.out"
    FAILED=$((FAILED + 1))
  fi
}

check smoke-1proc
check smoke-2procs --procs 2 --sources 2

# The check must be able to fail: against a server that refuses most sends (rate limit 1/s),
# --assert-clean has to exit non-zero and say why.
stop_server
PORT=$("$LOADGEN" free-port) || fail_now "no free port"
RUST_LOG=${RUST_LOG:-warn} "$BIN/chat-server" --listen "127.0.0.1:$PORT" --broker memory \
  --rate-burst 3 --rate-per-sec 1 >"$OUT/server-limited.log" 2>&1 &
SERVER_PID=$!
"$LOADGEN" wait-http "http://127.0.0.1:$PORT/readyz" --timeout 30 \
  || fail_now "rate-limited chat-server not ready on 127.0.0.1:$PORT"
if timeout 60 "$LOADGEN" run --url "ws://127.0.0.1:$PORT/ws" --clients 10 --rooms 1 --senders 2 \
  --rate 40 --duration 1 --drain-secs 2 --assert-clean --out "$OUT" --name smoke-detects \
  >"$OUT/smoke-detects.out" 2>&1; then
  echo "loadgen-smoke: FAIL smoke-detects (refused sends were not reported)"
  tail -n 20 "$OUT/smoke-detects.out"
  FAILED=$((FAILED + 1))
elif grep -q "NOT CLEAN" "$OUT/smoke-detects.out" && grep -q '"rejected": [1-9]' "$OUT/smoke-detects.json"; then
  echo "loadgen-smoke: ok   smoke-detects (refused sends reported, exit status non-zero)"
  PASSED=$((PASSED + 1))
else
  echo "loadgen-smoke: FAIL smoke-detects"
  tail -n 20 "$OUT/smoke-detects.out"
  FAILED=$((FAILED + 1))
fi

# The floor: every frame to every connection, the load generator's frames as they are.
stop_server
PORT=$("$LOADGEN" free-port) || fail_now "no free port"
"$FLOOR" --port "$PORT" --threads 2 >"$OUT/floor.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done
if timeout 60 "$LOADGEN" run --protocol floor --url "ws://127.0.0.1:$PORT" \
  --server-pid "$SERVER_PID" --clients 60 --rooms 1 --senders 6 --rate 60 --duration 2 \
  --drain-secs 5 --assert-clean --out "$OUT" --name smoke-floor --label smoke \
  >"$OUT/smoke-floor.out" 2>&1 \
  && grep -q '"delivered": [1-9]' "$OUT/smoke-floor.json" \
  && grep -q '"server_writes_per_delivery": [0-9]' "$OUT/smoke-floor.json" \
  && grep -q '"server_sys_us_per_delivery": [0-9]' "$OUT/smoke-floor.json"; then
  echo "loadgen-smoke: ok   smoke-floor ($(grep -o 'lost [0-9]* dup [0-9]* total' "$OUT/smoke-floor.out"))"
  PASSED=$((PASSED + 1))
else
  echo "loadgen-smoke: FAIL smoke-floor"
  tail -n 20 "$OUT/smoke-floor.out"
  FAILED=$((FAILED + 1))
fi
