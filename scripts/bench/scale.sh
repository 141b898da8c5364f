#!/usr/bin/env bash
# Scenario "scale": what each instance pays for the rooms of the others.
#
# Four chat-server instances over DualBus (Redis + Kafka on Tansu), 2,000 rooms of 10 members,
# each room's members on 2 of the 4 instances (`--room-spread 2`: a deployment that routes by
# room), one sender per room, steady traffic (RATE msg/s over all rooms, default 200, which
# is 2,000 deliveries/s). For each instance, over the sending window, it reports:
#
#   - what it received from the brokers per second: Redis pub/sub messages
#     (`chatbus_redis_received_total`) and Kafka tail records (`chatbus_kafka_tail_records_total`);
#   - the chat traffic of its own rooms (the rooms it has members in: half of them here), from
#     the plan: RATE x local rooms / rooms;
#   - the ratio of the two (the issue's target: at most 1.1x), and its CPU (user + sys, from
#     /proc/PID/stat) per second;
#
# and the cluster's deliveries from the load generator. A fifth instance, which no client
# uses, shows what the ingest alone costs (CPU per message read from the brokers). Presence heartbeats are set to once a
# minute (--presence-interval-ms 60000) so that they do not blur the chat ingest; the joins'
# announcements are over before the measuring window (the middle of the sending phase).
#
#   scripts/bench/scale.sh
#   RATE=400 DURATION=30 scripts/bench/scale.sh
#   CLUSTER=1 scripts/bench/scale.sh      # on a Redis Cluster (3 masters, 3 replicas)
#   CHATBUS_DUAL_INTEREST=true scripts/bench/scale.sh   # the interest-based DualBus
#
# Report: target/loadgen/scale.md (the table) and target/loadgen/scale.json (the load
# generator's report). Takes about 2 minutes once built.
source "$(dirname "$0")/lib.sh"

RATE=${RATE:-200}
DURATION=${DURATION:-30}
INSTANCES=4
ROOMS=2000
MEMBERS=10
SPREAD=2
CLIENTS=$((ROOMS * MEMBERS))

build
if [ -n "${CLUSTER:-}" ]; then
  start_redis_cluster
  BROKER_PIDS=$(join_by , "${REDIS_CLUSTER_PIDS[@]}")
else
  start_redis
  BROKER_PIDS=$REDIS_PID
fi
start_tansu
for _ in $(seq "$((INSTANCES + 1))"); do
  CHATBUS_SERVER_ARGS="--presence-interval-ms 60000 --max-connections 20000" start_chatbus dual
done
# The last one is an observer: no client connects to it, so what it spends is the price of
# the durable path's ingest alone (the Redis pattern subscription, the Kafka tail, the merger).
OBSERVER_PORT=${CB_PORTS[INSTANCES]}
OBSERVER_PID=${CB_PIDS[INSTANCES]}
CB_PORTS=("${CB_PORTS[@]:0:INSTANCES}")
CB_PIDS=("${CB_PIDS[@]:0:INSTANCES}")
# One idle client in a room of its own: a DualBus subscribes to the brokers (and reads
# everything) from its first subscription on, which an instance without sessions never makes.
"$LOADGEN" run --url "ws://127.0.0.1:$OBSERVER_PORT/ws" --clients 1 --rooms 1 --senders 0 \
  --idle-at 1 --settle-secs 120 --name scale-observer --max-secs 130 \
  >"$LOGS/scale-observer.log" 2>&1 &
STARTED_PIDS+=("$!")

# metric PORT NAME: the value of a counter (0 when absent).
metric() {
  curl -fsS "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { v = $2 } END { print v + 0 }'
}
# cpu_ticks PID: utime + stime, in clock ticks (fields 14 and 15, after the ")" of comm).
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# sample FILE: one line per instance: port redis_received kafka_tail hub_in cpu_ticks, and the
# time (ms) on the first line.
sample() {
  local i
  date +%s%3N >"$1"
  local ports=("${CB_PORTS[@]}" "$OBSERVER_PORT") pids=("${CB_PIDS[@]}" "$OBSERVER_PID")
  for i in $(seq 0 "$INSTANCES"); do
    echo "${ports[i]} $(metric "${ports[i]}" chatbus_redis_received_total)" \
      "$(metric "${ports[i]}" chatbus_kafka_tail_records_total)" \
      "$(metric "${ports[i]}" chatbus_broker_messages_total)" \
      "$(cpu_ticks "${pids[i]}")" >>"$1"
  done
}

say "4 instances, $ROOMS rooms of $MEMBERS on $SPREAD instances each, $RATE msg/s for ${DURATION}s"
BEFORE=$OUT/scale-before.txt
AFTER=$OUT/scale-after.txt
rm -f "$BEFORE" "$AFTER"
# The load generator connects and joins first, then sends for DURATION s. The window is the
# middle of the sending phase: from 5 s after every client is ready (the joins' presence
# announcements are over) to 5 s before the end, so every rate below is a steady rate.
WINDOW=$((DURATION - 10))
[ "$WINDOW" -ge 10 ] || die "DURATION must be at least 20 s"
"$LOADGEN" run --url "$(urls chatbus "${CB_PORTS[@]}")" \
  --clients "$CLIENTS" --rooms "$ROOMS" --room-spread "$SPREAD" --senders "$ROOMS" \
  --rate "$RATE" --duration "$DURATION" --drain-secs 5 --procs 2 --sources 4 \
  --connect-rate 4000 \
  --server-pid "$(join_by , "${CB_PIDS[@]}")" --broker-pid "$BROKER_PIDS,$TANSU_PID" \
  --name scale --label "chatbus --broker dual${CLUSTER:+ on a Redis Cluster}, 4 instances, $ROOMS rooms of $MEMBERS on $SPREAD instances" \
  --max-secs 150 2>&1 | tee "$OUT/scale-loadgen.log" | {
  while IFS= read -r line; do
    printf '%s\n' "$line" >&2
    # "[connect] N ready, F failed in S s": every client joined, sending starts.
    case $line in
      "[connect] "*" ready, "*) (sleep 5; sample "$BEFORE"; sleep "$WINDOW"; sample "$AFTER") & ;;
    esac
  done
  wait
}
[ -s "$BEFORE" ] && [ -s "$AFTER" ] || die "the load generator's output did not mark the sending window"

TICKS=$(getconf CLK_TCK)
LOCAL_ROOMS=$((ROOMS * SPREAD / INSTANCES))
python3 - "$BEFORE" "$AFTER" "$RATE" "$DURATION" "$LOCAL_ROOMS" "$ROOMS" "$TICKS" "$OUT/scale.json" "$OBSERVER_PORT" >"$OUT/scale.md" <<'EOF'
import json, sys
before, after, rate, duration, local_rooms, rooms, ticks, report, observer = sys.argv[1:]
rate, duration = float(rate), float(duration)
local_rooms, rooms, ticks = int(local_rooms), int(rooms), int(ticks)
def load(path):
    with open(path) as f:
        lines = f.read().split("\n")
    t = int(lines[0])
    rows = {}
    for l in lines[1:]:
        if l.strip():
            port, *vals = l.split()
            rows[port] = [float(v) for v in vals]
    return t, rows
t0, b = load(before)
t1, a = load(after)
dt = (t1 - t0) / 1000
own = rate * local_rooms / rooms
print(f"{rate:.0f} msg/s over {rooms} rooms for {duration:.0f} s, measured over {dt:.1f} s in the middle; "
      f"each instance has members in {local_rooms} rooms: {own:,.0f} msg/s of its own")
print()
print("| instance | Redis msgs/s | Kafka records/s | from brokers/s | own rooms' msgs/s | ratio | hub envelopes/s | CPU % |")
print("|---|---|---|---|---|---|---|---|")
for port in b:
    redis, kafka, hub, cpu = [(x1 - x0) / dt for x0, x1 in zip(b[port], a[port])]
    cpu = cpu / ticks * 100
    total = redis + kafka
    if port == observer:
        # Under one read a second (the interest-based DualBus), a cost per read means nothing.
        per = f"{cpu / 100 * 1e6 / total:.1f} µs per message read" if total >= 1 else "no reads"
        print(f"| :{port} observer, no members | {redis:,.0f} | {kafka:,.0f} | {total:,.0f} | 0 | "
              f"- | {hub:,.0f} | {cpu:.1f} ({per}) |")
        continue
    print(f"| :{port} | {redis:,.0f} | {kafka:,.0f} | {total:,.0f} | {own:,.0f} | "
          f"{total / own:.2f}x | {hub:,.0f} | {cpu:.0f} |")
try:
    with open(report) as f:
        r = json.load(f)
    steps = r.get("steps") or []
    if steps:
        s = steps[-1]
        print()
        print(f"cluster: {s['deliveries_per_s']:,.0f} deliveries/s, p50 {s['p50_ms']:.2f} ms, "
              f"p99 {s['p99_ms']:.2f} ms, sent {s['sent']:,}, delivered {s['delivered']:,}, "
              f"lost {s['lost']}, duplicates {s['dups']}, reordered {s['reordered']}")
except (OSError, ValueError) as e:
    print(f"(no load generator report: {e})")
EOF
cat "$OUT/scale.md"
finish_line
