#!/usr/bin/env bash
# The durable publish path beside the raw clients (#16, item 8): publish→ack latency and
# throughput of raw rdkafka, raw Redis PUBLISH, KafkaBroker, RedisBroker (history off) and
# DualBus (Redis + Kafka, as `chat-server --broker dual` builds it) on one Tansu (SQLite
# storage) and one redis-server, 100-byte payloads over 16 rooms, 1 and 16 publishes in
# flight, 2,000 publishes per case per round, 8 rounds with the cases interleaved
# (benches/durable_raw.rs says what each case times).
#
#   scripts/bench/durable_raw.sh
#   ROUNDS=3 COUNT=4000 INFLIGHT=1,16,64 scripts/bench/durable_raw.sh
#
# Report: target/loadgen/durable-raw.md (the tables); also on stdout. About 75 s once
# built (the first run builds the bench: `cargo bench --bench durable_raw --no-run`).
source "$(dirname "$0")/lib.sh"

# free_port needs the load generator; the bench binary is built by `cargo bench` below.
if [ ! -x "$LOADGEN" ] || [ -z "${SKIP_BUILD:-}" ]; then
  say "building loadgen (release) and the durable_raw bench"
  (cd "$ROOT" && nice -n 10 cargo build --release --quiet -p chatbus-loadgen \
    && nice -n 10 cargo bench --quiet --bench durable_raw --no-run) || die "cargo build failed"
fi
start_redis
start_tansu
say "load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
(cd "$ROOT" && cargo bench --quiet --bench durable_raw -- \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" \
  --kafka-brokers "127.0.0.1:$KAFKA_PORT" \
  --tansu-pid "$TANSU_PID" --redis-pid "$REDIS_PID" \
  --count "${COUNT:-2000}" --rounds "${ROUNDS:-8}" --inflight "${INFLIGHT:-1,16}" \
  --out "$OUT/durable-raw.md")
say "load after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
# Where Tansu's CPU went (whole run, connect and warm-up included): its busiest threads, in
# clock ticks (1/100 s) of user + system time. One thread near the total would mean the
# produce path is serial.
tansu_threads() {
  local t name stat
  for t in /proc/"$TANSU_PID"/task/*; do
    stat=$(cat "$t/stat" 2>/dev/null) || continue
    name=$(cat "$t/comm" 2>/dev/null)
    # Fields after "(comm) ": utime and stime are the 12th and 13th.
    echo "${stat##*) }" | awk -v n="$name" -v id="${t##*/}" '{ print $12 + $13, id, n }'
  done | sort -rn
}
{
  echo
  echo "Tansu (pid $TANSU_PID) CPU ticks by thread, busiest first (total $(tansu_threads | awk '{ s += $1 } END { print s }')):"
  tansu_threads | head -n 6 | sed 's/^/    /'
} | tee -a "$OUT/durable-raw.md"
finish_line
