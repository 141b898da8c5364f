#!/usr/bin/env bash
# Where the latency at 100,000 deliveries/s goes (issue #16, item 6): the fanout scenario
# (1,000 clients in one room, 10 senders, 100-byte bodies) at one fixed rate, on a set of
# stacks that each leave one thing out, interleaved round by round (a fresh server each run):
#
#   floor       benches/floor, one process, one event loop: the generator + kernel floor
#   floor-g2    the same, the generator split over 2 processes (is the generator a limit?)
#   memory      chatbus, one instance, --broker memory: the hub and the transport, no Redis
#   redis1      chatbus, one instance, --broker redis: + the Redis hop, no second instance
#   redis2      chatbus, two instances, --broker redis: the issue's scenario
#   memory-wd2  chatbus, one instance, memory broker, --write-delay-ms 2
#   memory-w1, redis2-w1   as memory and redis2 with one tokio worker thread per instance
#               (TOKIO_WORKER_THREADS=1; the default is one per core): fewer runnable threads
#
#   scripts/bench/latency.sh                            # all of the above, 3 rounds, 100 msg/s
#   CONFIGS=floor,redis2 ROUNDS=5 RATE=100 SECS=8 scripts/bench/latency.sh
#   SCHED=1 scripts/bench/latency.sh   # + one run per stack under `perf sched record -a`:
#                                      # how long each thread waited runnable for a CPU
#
# Per run (the generator's report of the sending phase): p50/p99/p99.9 ms, server CPU % of one
# core (all server processes), broker (redis-server), generator and other processes' CPU %,
# how late the generator fell behind its schedule at worst, server µs per delivery (user,
# system) and segments per delivery. Then the medians and min–max per stack over the rounds.
# Report: target/loadgen/latency.tsv (every run), target/loadgen/latency-summary.tsv and,
# with SCHED=1, target/loadgen/latency-sched-STACK.txt (`perf sched latency`).
source "$(dirname "$0")/lib.sh"

CONFIGS=${CONFIGS:-floor,floor-g2,memory,redis1,redis2,memory-wd2}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-100}
SECS=${SECS:-8}
CLIENTS=${CLIENTS:-1000}
SENDERS=${SENDERS:-10}
TSV=$OUT/latency.tsv
SUMMARY=$OUT/latency-summary.tsv
build
start_redis

# run_one STACK ROUND [SCHED]: starts STACK, runs the generator at RATE for SECS, appends a row.
run_one() {
  local stack=$1 round=$2 sched=${3:-} procs=1 proto=chatbus ports pids broker="" name
  case $stack in
    floor | floor-g2)
      FLOOR_ARGS="--threads 1" start_floor
      proto=floor ports=("$FLOOR_PORT") pids=("$FLOOR_PID")
      [ "$stack" = floor-g2 ] && procs=2 ;;
    memory) start_chatbus memory; ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") ;;
    memory-w1)
      export TOKIO_WORKER_THREADS=1; start_chatbus memory; unset TOKIO_WORKER_THREADS
      ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") ;;
    redis2-w1)
      export TOKIO_WORKER_THREADS=1; start_chatbus redis; start_chatbus redis; unset TOKIO_WORKER_THREADS
      ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") broker=$REDIS_PID ;;
    memory-wd2)
      CHATBUS_SERVER_ARGS="--write-delay-ms 2" start_chatbus memory
      ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") ;;
    redis1) start_chatbus redis; ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") broker=$REDIS_PID ;;
    redis2)
      start_chatbus redis; start_chatbus redis
      ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") broker=$REDIS_PID ;;
    *) die "unknown stack $stack" ;;
  esac
  name=latency-$stack-$round${sched:+-sched}
  "$LOADGEN" run --protocol "$proto" --url "$(urls "$proto" "${ports[@]}")" \
    --clients "$CLIENTS" --rooms 1 --senders "$SENDERS" --rate "$RATE" --duration "$SECS" \
    --drain-secs 3 --procs "$procs" --server-pid "$(join_by , "${pids[@]}")" \
    ${broker:+--broker-pid "$broker"} --name "$name" --label "$stack" --max-secs 120 \
    >"$LOGS/$name.out" 2>&1 &
  local gen=$!
  if [ -n "$sched" ]; then
    # Inside the sending phase: connecting takes ~1-2 s, presence settles within a second.
    sleep $((SECS / 2))
    perf sched record -a -o "$LOGS/$name.sched.data" -- sleep 2 >/dev/null 2>&1 || say "perf sched record failed"
  fi
  wait "$gen" || { tail -n 20 "$LOGS/$name.out" >&2; die "loadgen failed ($name)"; }
  stop_servers
  if [ -n "$sched" ]; then
    perf sched latency -i "$LOGS/$name.sched.data" --sort max 2>/dev/null \
      | head -n 30 >"$OUT/latency-sched-$stack.txt" || true
    rm -f "$LOGS/$name.sched.data"
  fi
  python3 - "$OUT/$name.json" "$stack" "$round${sched:+-sched}" "$(uptime | sed 's/.*load average: //; s/,.*//')" >>"$TSV" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["steps"][0]
seg = s.get("server_segments_per_delivery")
print("\t".join(str(x) for x in [
    sys.argv[3], sys.argv[2], sys.argv[4], f'{s["deliveries_per_s"]:.0f}', s["lost"] + s["dups"],
    f'{s["p50_ms"]:.2f}', f'{s["p99_ms"]:.2f}', f'{s["p999_ms"]:.2f}',
    f'{s["server_cpu_pct"]:.0f}', f'{s["broker_cpu_pct"]:.0f}', f'{s["loadgen_cpu_pct"]:.0f}',
    f'{s["other_cpu_pct"]:.0f}', f'{s["max_send_late_ms"]:.1f}',
    f'{s["server_user_us_per_delivery"]:.2f}', f'{s["server_sys_us_per_delivery"]:.2f}',
    f'{seg:.3f}' if seg is not None else "-"]))
EOF
  say "$(tail -n 1 "$TSV")"
}

printf 'round\tstack\tload1\tdlv/s\tlost+dup\tp50\tp99\tp999\tsrv%%\tbrk%%\tgen%%\toth%%\tlate_ms\tuser_us\tsys_us\tseg/d\n' >"$TSV"
say "machine: $(nproc) CPUs; load before: $(uptime | sed 's/.*load average: //'); $RATE msg/s x $CLIENTS clients, ${SECS}s per run"
for round in $(seq "$ROUNDS"); do
  for stack in ${CONFIGS//,/ }; do run_one "$stack" "$round"; done
done
if [ -n "${SCHED:-}" ]; then
  command -v perf >/dev/null || die "perf not found (apt-get install linux-perf)"
  for stack in ${CONFIGS//,/ }; do run_one "$stack" 1 sched; done
fi
say "load after: $(uptime | sed 's/.*load average: //')"
column -t -s $'\t' "$TSV"
# Medians and min-max per stack over the plain rounds (not the perf sched runs), and the p99
# over the floor's p99 of the same round (when floor is among the stacks).
python3 - "$TSV" >"$SUMMARY" <<'EOF'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(sys.argv[1]), delimiter="\t") if not r["round"].endswith("sched")]
cols = ["p50", "p99", "p999", "srv%", "brk%", "gen%", "oth%", "late_ms", "user_us", "sys_us", "seg/d"]
floor = {r["round"]: float(r["p99"]) for r in rows if r["stack"] == "floor"}
print("\t".join(["stack", "runs", "p99/floor med [min-max]"] + [f"{c} med [min-max]" for c in cols]))
for stack in dict.fromkeys(r["stack"] for r in rows):
    rs = [r for r in rows if r["stack"] == stack]
    out = [stack, str(len(rs))]
    q = [float(r["p99"]) / floor[r["round"]] for r in rs if r["round"] in floor]
    out.append(f"{statistics.median(q):.2f} [{min(q):.2f}-{max(q):.2f}]" if q else "-")
    for c in cols:
        v = [float(r[c]) for r in rs if r[c] != "-"]
        out.append(f"{statistics.median(v):g} [{min(v):g}-{max(v):g}]" if v else "-")
    print("\t".join(out))
EOF
echo
column -t -s $'\t' "$SUMMARY"
finish_line
