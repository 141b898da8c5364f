#!/usr/bin/env bash
# Side by side, one run, same machine: chatbus against the Node.js Socket.IO + Redis adapter
# peer (benches/peer/server.js; its npm dependencies are installed there on first use).
#   1. fanout ramp (1,000 clients in one room, two instances, one redis-server), chatbus
#   2. the same with the peer
#   3. 10,000 idle connections on one chatbus instance (memory broker)
#   4. the same on one peer instance
# then prints the ratios chatbus / peer: server CPU µs per delivery and p99 at a fixed rate
# (FIXED msg/s = FIXED x 1,000 deliveries/s, default 30), the highest delivery rate that held
# (p99 <= 50 ms, no loss), and RSS per idle connection.
#
#   scripts/bench/compare.sh
#   FIXED=40 scripts/bench/compare.sh
#
# Reports: target/loadgen/compare-*.{json,svg} and target/loadgen/compare.md.
source "$(dirname "$0")/lib.sh"

FIXED=${FIXED:-30}
CB_RATES=${CB_RATES:-$FIXED,100,200,400,700,1000,1500,2000,3000}
PEER_RATES=${PEER_RATES:-$FIXED,40,50,60,70,85,100,120,150,200}
build
prepare_peer
start_redis

fanout() { # NAME PROTO RATES LABEL PORT...
  local name=$1 proto=$2 rates=$3 label=$4 pids
  shift 4
  if [ "$proto" = chatbus ]; then pids=$(join_by , "${CB_PIDS[@]}"); else pids=$(join_by , "${PEER_PIDS[@]}"); fi
  "$LOADGEN" run --protocol "$proto" --url "$(urls "$proto" "$@")" \
    --clients 1000 --rooms 1 --senders 10 --ramp --rates "$rates" --step-secs 3 \
    --p99-limit-ms 50 --drain-secs 3 --server-pid "$pids" --broker-pid "$REDIS_PID" \
    --name "$name" --label "$label" --max-secs 100
}
idle() { # NAME PROTO ROOMS LABEL PORT PID
  sleep 1
  "$LOADGEN" run --protocol "$2" --url "$(urls "$2" "$5")" --clients 10000 --rooms "$3" \
    --senders 0 --idle-at 10000 --settle-secs 4 --procs 2 --sources 4 --server-pid "$6" \
    --name "$1" --label "$4" --max-secs 60
}

say "1/4 fanout, chatbus"
start_chatbus redis; start_chatbus redis
fanout compare-fanout-chatbus chatbus "$CB_RATES" "chatbus --broker redis, 2 instances" "${CB_PORTS[@]}"
stop_servers

say "2/4 fanout, peer"
start_peer; start_peer
fanout compare-fanout-peer socketio "$PEER_RATES" "socket.io + redis adapter, 2 instances" "${PEER_PORTS[@]}"
stop_servers

say "3/4 idle, chatbus"
start_chatbus memory
idle compare-idle-chatbus chatbus 100 "chatbus memory, 1 instance" "$CB_PORT" "$CB_PID"
stop_servers

say "4/4 idle, peer"
start_peer
idle compare-idle-peer socketio 1 "socket.io, 1 instance" "$PEER_PORT" "$PEER_PID"
stop_servers

echo
"$LOADGEN" compare --fixed-rate "$FIXED" \
  --chatbus-fanout "$OUT/compare-fanout-chatbus.json" --peer-fanout "$OUT/compare-fanout-peer.json" \
  --chatbus-idle "$OUT/compare-idle-chatbus.json" --peer-idle "$OUT/compare-idle-peer.json" \
  --out "$OUT/compare.md"
finish_line
