#!/usr/bin/env bash
# Scenario "durable": the fanout scenario (1,000 clients in one room, two instances, 10
# senders, rate ramp until p99 > 50 ms or any loss) through DualBus: every message is written
# to Kafka (Tansu, SQLite storage) first, acked, then fanned out through Redis; each instance
# also tails the Kafka topic and drops the second copy.
#
#   scripts/bench/durable.sh
#   RATES=10,50 scripts/bench/durable.sh
#
# The Kafka topic is created by the server (KafkaBroker) on start. CPU per delivery is
# reported for the servers alone and with redis-server + tansu.
# Report: target/loadgen/durable-chatbus.{json,svg}; table on stdout.
source "$(dirname "$0")/lib.sh"

RATES=${RATES:-10,30,100,200,400,700,1000,1500,2000}
build
start_redis
start_tansu
start_chatbus dual; start_chatbus dual
"$LOADGEN" run --url "$(urls chatbus "${CB_PORTS[@]}")" \
  --clients 1000 --rooms 1 --senders 10 \
  --ramp --rates "$RATES" --step-secs 3 --p99-limit-ms 50 --drain-secs 5 \
  --server-pid "$(join_by , "${CB_PIDS[@]}")" --broker-pid "$REDIS_PID,$TANSU_PID" \
  --name durable-chatbus --label "chatbus --broker dual (redis + kafka on tansu), 2 instances" \
  --max-secs 150
finish_line
