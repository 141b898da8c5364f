#!/usr/bin/env bash
# Side by side, one run, same machine: chatbus, the Node.js Socket.IO + Redis adapter peer
# (benches/peer/server.js; its npm dependencies are installed there on first use) and the
# floor (benches/floor: a minimal fan-out server with no chat logic, the physical limit of
# this machine for this work).
#   1. fanout ramp (1,000 clients in one room, 10 senders), chatbus: two instances, one
#      redis-server
#   2. the same with the peer (two instances, the same redis-server)
#   3. the same with the floor: one process (FLOOR_THREADS event loops, default 1). There is
#      no second instance and so no hop between instances: that is what makes it a floor.
#      One loop, not one per core: the generator runs on the same two vCPUs, one loop never
#      needs more than half a core, and two loops suffer more from a busy machine (back to
#      back on 2026-12-01 under load: one loop held 1,978,858 deliveries/s, two loops
#      99,748/s; docs/BENCHMARKS.md). FLOOR_THREADS=2: one per core
#   4-6. 10,000 idle connections on one chatbus instance (memory broker), one peer instance,
#      one floor
# then prints the table: the highest delivery rate that held (p99 <= 50 ms, no loss), p99 and
# server CPU µs per delivery (whole, user, system) and TCP data segments per delivery at a
# fixed rate (FIXED msg/s = FIXED x 1,000 deliveries/s, default 30) and at each one's highest
# rate, RSS per idle connection; chatbus / peer and chatbus / floor. Under 4 minutes.
#
#   scripts/bench/compare.sh
#   FIXED=40 STEP_SECS=3 scripts/bench/compare.sh
#
# Reports: target/loadgen/compare-*.{json,svg}, the table target/loadgen/compare.md and the
# chart of the three ramps target/loadgen/compare-fanout.svg.
source "$(dirname "$0")/lib.sh"

FIXED=${FIXED:-30}
STEP_SECS=${STEP_SECS:-3}
CB_RATES=${CB_RATES:-$FIXED,100,200,400,700,1000,1500,2000,3000}
PEER_RATES=${PEER_RATES:-$FIXED,40,50,60,70,85,100,120,150,200}
FLOOR_RATES=${FLOOR_RATES:-$CB_RATES}
FLOOR_THREADS=${FLOOR_THREADS:-1}
FLOOR_ARGS="--threads $FLOOR_THREADS ${FLOOR_ARGS:-}"
build
prepare_peer
start_redis

fanout() { # NAME PROTO RATES LABEL PIDS BROKER_PID PORT...
  local name=$1 proto=$2 rates=$3 label=$4 pids=$5 broker=$6
  shift 6
  "$LOADGEN" run --protocol "$proto" --url "$(urls "$proto" "$@")" \
    --clients 1000 --rooms 1 --senders 10 --ramp --rates "$rates" --step-secs "$STEP_SECS" \
    --p99-limit-ms 50 --drain-secs 3 --server-pid "$pids" ${broker:+--broker-pid "$broker"} \
    --name "$name" --label "$label" --max-secs 70
}
idle() { # NAME PROTO ROOMS LABEL PORT PID
  sleep 1
  "$LOADGEN" run --protocol "$2" --url "$(urls "$2" "$5")" --clients 10000 --rooms "$3" \
    --senders 0 --idle-at 10000 --settle-secs 3 --procs 2 --sources 4 --server-pid "$6" \
    --name "$1" --label "$4" --max-secs 60
}

say "1/6 fanout, chatbus"
start_chatbus redis; start_chatbus redis
fanout compare-fanout-chatbus chatbus "$CB_RATES" "chatbus --broker redis, 2 instances" \
  "$(join_by , "${CB_PIDS[@]}")" "$REDIS_PID" "${CB_PORTS[@]}"
stop_servers

say "2/6 fanout, peer"
start_peer; start_peer
fanout compare-fanout-peer socketio "$PEER_RATES" "socket.io + redis adapter, 2 instances" \
  "$(join_by , "${PEER_PIDS[@]}")" "$REDIS_PID" "${PEER_PORTS[@]}"
stop_servers

say "3/6 fanout, floor"
start_floor
fanout compare-fanout-floor floor "$FLOOR_RATES" "floor, 1 process, $FLOOR_THREADS event loop(s)" \
  "$FLOOR_PID" "" "$FLOOR_PORT"
stop_servers

say "4/6 idle, chatbus"
start_chatbus memory
idle compare-idle-chatbus chatbus 100 "chatbus memory, 1 instance" "$CB_PORT" "$CB_PID"
stop_servers

say "5/6 idle, peer"
start_peer
idle compare-idle-peer socketio 1 "socket.io, 1 instance" "$PEER_PORT" "$PEER_PID"
stop_servers

say "6/6 idle, floor"
start_floor
idle compare-idle-floor floor 1 "floor, 1 process" "$FLOOR_PORT" "$FLOOR_PID"
stop_servers

echo
"$LOADGEN" compare --fixed-rate "$FIXED" \
  --chatbus-fanout "$OUT/compare-fanout-chatbus.json" --peer-fanout "$OUT/compare-fanout-peer.json" \
  --floor-fanout "$OUT/compare-fanout-floor.json" \
  --chatbus-idle "$OUT/compare-idle-chatbus.json" --peer-idle "$OUT/compare-idle-peer.json" \
  --floor-idle "$OUT/compare-idle-floor.json" \
  --out "$OUT/compare.md" --svg "$OUT/compare-fanout.svg"
finish_line
