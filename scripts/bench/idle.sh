#!/usr/bin/env bash
# Scenario "idle": N idle WebSocket connections on one chat-server instance (memory broker);
# the server's RSS per connection at 10,000 and 19,000 connections.
#
#   scripts/bench/idle.sh                      # chatbus
#   PEER=1 scripts/bench/idle.sh               # the Socket.IO peer instead (one node process)
#   SOCKETIO=1 scripts/bench/idle.sh           # chatbus, the clients on its /socket.io/ endpoint
#   IDLE_AT=10000 scripts/bench/idle.sh        # other checkpoints (comma-separated)
#   CONNECT_RATE=20000 scripts/bench/idle.sh   # the generator's connect rate (default 5,000/s)
#
# The per-process open-file limit (20,000) cannot be raised, so the generator spreads its
# sockets over two processes and four source addresses (127.0.0.1-4). The server holds
# 19,000 sockets itself, within its own limit.
# Report: target/loadgen/idle-chatbus.{json,svg} (or idle-peer.*); table on stdout.
source "$(dirname "$0")/lib.sh"

IDLE_AT=${IDLE_AT:-10000,19000}
N=${IDLE_AT##*,}
# The server refuses connections past --max-connections (default 16,384, below the open-file
# limit): room for all N, plus the few handshakes a reconnecting client may have in flight.
export CHATBUS_MAX_CONNECTIONS=${CHATBUS_MAX_CONNECTIONS:-$((N + 100))}
build
if [ -n "${PEER:-}" ]; then
  prepare_peer
  start_redis
  start_peer
  name=idle-peer; proto=socketio; port=$PEER_PORT; pid=$PEER_PID; rooms=1
  label="socket.io peer, 1 instance"
elif [ -n "${SOCKETIO:-}" ]; then
  start_chatbus memory
  name=idle-chatbus-socketio; proto=socketio; port=$CB_PORT; pid=$CB_PID; rooms=1
  label="chatbus /socket.io/, memory, 1 instance"
else
  start_chatbus memory
  name=idle-chatbus; proto=chatbus; port=$CB_PORT; pid=$CB_PID; rooms=${ROOMS:-$((N / 100))}
  label="chatbus memory, 1 instance, rooms of 100"
fi
# Let the server finish starting (lazy allocations) before the baseline RSS reading.
sleep 1
"$LOADGEN" run --protocol "$proto" --url "$(urls "$proto" "$port")" \
  --clients "$N" --rooms "$rooms" --senders 0 --idle-at "$IDLE_AT" --settle-secs 4 \
  --procs 2 --sources 4 --connect-rate "${CONNECT_RATE:-5000}" --server-pid "$pid" \
  --name "$name" --label "$label" --max-secs 150
finish_line
