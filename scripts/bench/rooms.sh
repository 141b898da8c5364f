#!/usr/bin/env bash
# Scenario "rooms": 10,000 clients in 1,000 rooms of 10 over two instances sharing a
# redis-server, one sender per room (1,000 senders); a ramp of the total send rate (3 s steps)
# until p99 > 50 ms or any loss. Each message reaches the 10 members of its room.
#
#   scripts/bench/rooms.sh
#   BROKER=memory scripts/bench/rooms.sh      # one instance, no Redis
#   RATES=2000,5000 scripts/bench/rooms.sh    # other steps (messages/s over all senders)
#
# Report: target/loadgen/rooms-chatbus.{json,svg}; table on stdout.
source "$(dirname "$0")/lib.sh"

BROKER=${BROKER:-redis}
RATES=${RATES:-1000,2500,5000,7500,10000,12500,15000,20000,30000}
build
if [ "$BROKER" = memory ]; then
  start_chatbus memory
  broker_pids=()
else
  start_redis
  start_chatbus "$BROKER"; start_chatbus "$BROKER"
  broker_pids=("$REDIS_PID")
fi
"$LOADGEN" run --url "$(urls chatbus "${CB_PORTS[@]}")" \
  --clients 10000 --rooms 1000 --senders 1000 \
  --ramp --rates "$RATES" --step-secs 3 --p99-limit-ms 50 --drain-secs 3 \
  --server-pid "$(join_by , "${CB_PIDS[@]}")" ${broker_pids[@]:+--broker-pid "$(join_by , "${broker_pids[@]}")"} \
  --name "rooms-chatbus" --label "chatbus --broker $BROKER, ${#CB_PIDS[@]} instance(s), 1,000 rooms of 10" \
  --max-secs 150
finish_line
