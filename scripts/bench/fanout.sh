#!/usr/bin/env bash
# Scenario "fanout": 1,000 clients in one room over two instances that share a redis-server;
# 10 senders; an open-loop ramp of the send rate (3 s steps) until p99 > 50 ms or any loss.
# Reports the highest rate that held, server CPU µs per delivery at every step.
#
#   scripts/bench/fanout.sh                 # chatbus (--broker redis)
#   PEER=1 scripts/bench/fanout.sh          # the Socket.IO + Redis adapter peer
#   SOCKETIO=1 scripts/bench/fanout.sh      # chatbus's Socket.IO endpoint: the peer's wire protocol
#   RATES=30,100,200 scripts/bench/fanout.sh   # other steps (messages/s over all senders)
#   BROKER=memory scripts/bench/fanout.sh   # chatbus, one instance, no Redis (the hub alone)
#
# Each message reaches 1,000 clients, so 100 msg/s is 100,000 deliveries/s. The 100 msg/s
# step is the "p99 at 100,000 deliveries/s" figure.
# Report: target/loadgen/fanout-chatbus.{json,svg} (or fanout-peer.*); table on stdout.
source "$(dirname "$0")/lib.sh"

CLIENTS=${CLIENTS:-1000}
# More clients than the server's default --max-connections (16,384) would be refused with 503.
if [ "$CLIENTS" -gt 16000 ]; then
  export CHATBUS_MAX_CONNECTIONS=${CHATBUS_MAX_CONNECTIONS:-$((CLIENTS + 100))}
fi
SENDERS=${SENDERS:-10}
if [ -n "${PEER:-}" ] || [ -n "${SOCKETIO:-}" ]; then
  RATES=${RATES:-30,40,50,60,70,85,100,120,150,200}
else
  RATES=${RATES:-30,100,200,400,700,1000,1500,2000,3000}
fi
BROKER=${BROKER:-redis}
build
broker_pids=()
if [ "$BROKER" != memory ] || [ -n "${PEER:-}" ]; then
  start_redis
  broker_pids=("$REDIS_PID")
fi
if [ -n "${PEER:-}" ]; then
  prepare_peer
  start_peer; start_peer
  proto=socketio; name=fanout-peer; ports=("${PEER_PORTS[@]}"); pids=("${PEER_PIDS[@]}")
  label="socket.io + redis adapter, 2 instances"
elif [ -n "${SOCKETIO:-}" ]; then
  # The same clients as the peer's (Engine.IO over WebSocket, `event:message` / `message`),
  # to chatbus's /socket.io/, whose default room `general` every socket joins at connect.
  start_chatbus "$BROKER"; start_chatbus "$BROKER"
  proto=socketio; name=fanout-chatbus-socketio; ports=("${CB_PORTS[@]}"); pids=("${CB_PIDS[@]}")
  label="chatbus /socket.io/ --broker $BROKER, 2 instances"
elif [ "$BROKER" = memory ]; then
  start_chatbus memory
  proto=chatbus; name=fanout-chatbus-memory; ports=("${CB_PORTS[@]}"); pids=("${CB_PIDS[@]}")
  label="chatbus --broker memory, 1 instance"
else
  start_chatbus "$BROKER"; start_chatbus "$BROKER"
  proto=chatbus; name=fanout-chatbus; ports=("${CB_PORTS[@]}"); pids=("${CB_PIDS[@]}")
  label="chatbus --broker $BROKER, 2 instances"
fi
"$LOADGEN" run --protocol "$proto" --url "$(urls "$proto" "${ports[@]}")" \
  --clients "$CLIENTS" --rooms 1 --senders "$SENDERS" \
  --ramp --rates "$RATES" --step-secs 3 --p99-limit-ms 50 --drain-secs 3 \
  --server-pid "$(join_by , "${pids[@]}")" ${broker_pids[@]:+--broker-pid "$(join_by , "${broker_pids[@]}")"} \
  --name "$name" --label "$label" --max-secs 150
finish_line
