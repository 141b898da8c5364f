#!/usr/bin/env bash
# The Socket.IO endpoint's tests with the official socket.io-client from npm (issue #15):
# installs socket.io-client from package-lock.json when missing (`npm ci`), then runs
# tests/socketio.rs, which starts redis-server, Tansu and two chat-server instances through
# chatbus-testkit and runs each scenario of scenarios.mjs in Node.js against them.
#
# Run with: bash tests/socketio/run.sh            (install, build, test)
#           bash tests/socketio/run.sh --install  (install only: scripts/test does this before
#                                                  its `cargo test`, which runs the tests)
# Needs node and npm (apt-get install nodejs npm), redis-server and tansu.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

command -v node >/dev/null || { echo "socketio: node not found: apt-get install nodejs npm" >&2; exit 1; }
command -v npm >/dev/null || { echo "socketio: npm not found: apt-get install npm" >&2; exit 1; }
if [ ! -f "$HERE/node_modules/socket.io-client/package.json" ]; then
  (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error)
fi
[ "${1:-}" = "--install" ] && exit 0

cd "$ROOT"
# `cargo test --test socketio` alone does not rebuild the server the tests run.
cargo build --quiet --all-features --example chat-server
cargo test --quiet --all-features --test socketio
