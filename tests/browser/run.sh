#!/usr/bin/env bash
# Browser tests of the chat page: builds and starts the chat-server example (memory broker) on a
# free loopback port (a rate limit high enough for a scripted burst), then runs each test of
# chat.test.mjs (`node chat.test.mjs --list`: chat, direct, socketio, state) in its own headless
# Debian Chromium with playwright-core, each bounded by a timeout and saving a screenshot to
# target/browser/<test>.png (chat.png, direct.png, socketio.png, state.png); stops the server.
#
# Run with: bash tests/browser/run.sh
# Needs /usr/bin/chromium (apt-get install chromium; installed here when missing and root),
# node and npm (playwright-core and socket.io-client from package-lock.json; it never downloads a
# browser).
# Last line: "browser: N passed, M failed", counting tests (a setup failure fails them all);
# exit status non-zero on failure.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT="$ROOT/target/browser"
mkdir -p "$OUT"
SERVER_PID=""
TESTS=""
PASSED=0
FAILED=0
TEST_TIMEOUT=120

finish() {
  local status=$1
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null
  fi
  if [ "$status" -ne 0 ] && [ -f "$OUT/server.log" ]; then
    echo "--- server log (tail) ---"; tail -n 30 "$OUT/server.log"
  fi
  echo "browser: $PASSED passed, $FAILED failed"
  exit "$status"
}
# A failure before the tests ran: every test counts as failed (one when they are not known yet).
fail() {
  echo "browser: $*" >&2
  local n
  n=$(echo "$TESTS" | wc -w)
  FAILED=$(( n > 0 ? n : 1 ))
  finish 1
}

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "browser: installing Debian's chromium"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >"$OUT/apt.log" 2>&1 \
      || fail "apt-get install chromium failed (see $OUT/apt.log)"
  fi
  [ -x /usr/bin/chromium ] || fail "/usr/bin/chromium not found: apt-get install chromium"
fi
command -v node >/dev/null || fail "node not found: apt-get install nodejs npm"
command -v npm >/dev/null || fail "npm not found: apt-get install npm"
if [ ! -f "$HERE/node_modules/playwright-core/package.json" ] || [ ! -f "$HERE/node_modules/socket.io-client/package.json" ]; then
  (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error) || fail "npm ci failed"
fi
# (after npm ci: chat.test.mjs imports playwright-core, even for --list)
TESTS=$(node "$HERE/chat.test.mjs" --list) && [ -n "$TESTS" ] || fail "cannot list the tests of chat.test.mjs"

echo "browser: building the chat-server example"
(cd "$ROOT" && cargo build --quiet --example chat-server) || fail "cargo build --example chat-server failed"
BIN="$TARGET/debug/examples/chat-server"
[ -x "$BIN" ] || fail "$BIN not found after the build"

PORT=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})') \
  || fail "no free port"
URL="http://127.0.0.1:$PORT/"
RUST_LOG=${RUST_LOG:-info} "$BIN" --listen "127.0.0.1:$PORT" --broker memory \
  --rate-burst 200 --rate-per-sec 200 >"$OUT/server.log" 2>&1 &
SERVER_PID=$!

ready=""
for _ in $(seq 300); do
  kill -0 "$SERVER_PID" 2>/dev/null || fail "chat-server exited at start"
  if node -e 'fetch(process.argv[1]).then(r=>process.exit(r.ok?0:1),()=>process.exit(1))' "${URL}healthz"; then
    ready=1; break
  fi
  sleep 0.1
done
[ -n "$ready" ] || fail "chat-server not ready on $URL within 30 s"
echo "browser: chat-server on $URL"

for t in $TESTS; do
  echo "browser: test $t"
  rm -f "$OUT/$t.png"
  timeout -k 5 "$TEST_TIMEOUT" node "$HERE/chat.test.mjs" "$URL" "$OUT" "$t"
  status=$?
  [ "$status" -eq 124 ] && echo "browser: $t killed after $TEST_TIMEOUT s" >&2
  if [ "$status" -eq 0 ] && [ ! -s "$OUT/$t.png" ]; then
    echo "browser: $t wrote no screenshot" >&2
    status=1
  fi
  if [ "$status" -eq 0 ]; then
    PASSED=$((PASSED + 1)); echo "browser: $t passed"
  else
    FAILED=$((FAILED + 1)); echo "browser: $t FAILED"
  fi
done
kill -0 "$SERVER_PID" 2>/dev/null || { echo "browser: chat-server died during the tests" >&2; }
finish $(( FAILED > 0 ? 1 : 0 ))
