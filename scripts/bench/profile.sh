#!/usr/bin/env bash
# Where a server's CPU goes in the fanout scenario (issue #16, items 6 and 7): `perf record
# -e cpu-clock --call-graph dwarf` (a software event: this VM has no hardware counters) of the
# server processes during a fixed-rate run, summed by component with perf_components.py (hub,
# session writer and reader, JSON, redis, the tokio runtime, and in each the user and kernel
# parts; malloc/free and memcpy leaves; kernel time by system call; threads).
#
#   scripts/bench/profile.sh                          # redis2, memory and floor at 30 and 400 msg/s
#   STACKS=redis2 RATES=100 scripts/bench/profile.sh
#
# Stacks as in latency.sh: floor (one event loop), memory (chatbus, one instance, memory
# broker), redis1, redis2 (two instances over one redis-server: the issue's scenario).
# The release build must keep symbols and line tables for the dwarf unwinder and the names:
# this script builds with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only unless SKIP_BUILD=1
# (debug info does not change the generated code).
# Report: target/loadgen/profile-STACK-RATE.md (the component tables; µs per delivery from the
# generator's server CPU per delivery of the same run) and profile-STACK-RATE.perf.data.
source "$(dirname "$0")/lib.sh"

STACKS=${STACKS:-redis2,memory,floor}
RATES=${RATES:-30,400}
SECS=${SECS:-8}
# Sampling: FREQ Hz per thread, PERF_SECS seconds inside the sending phase.
FREQ=${FREQ:-499}
PERF_SECS=${PERF_SECS:-4}
command -v perf >/dev/null || die "perf not found (apt-get install linux-perf)"
export CARGO_PROFILE_RELEASE_DEBUG=${CARGO_PROFILE_RELEASE_DEBUG:-line-tables-only}
build
start_redis

profile_one() { # STACK RATE
  local stack=$1 rate=$2 proto=chatbus ports pids broker="" name
  case $stack in
    floor) FLOOR_ARGS="--threads 1" start_floor; proto=floor ports=("$FLOOR_PORT") pids=("$FLOOR_PID") ;;
    memory) start_chatbus memory; ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") ;;
    redis1) start_chatbus redis; ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") broker=$REDIS_PID ;;
    redis2)
      start_chatbus redis; start_chatbus redis
      ports=("${CB_PORTS[@]}") pids=("${CB_PIDS[@]}") broker=$REDIS_PID ;;
    *) die "unknown stack $stack" ;;
  esac
  name=profile-$stack-$rate
  "$LOADGEN" run --protocol "$proto" --url "$(urls "$proto" "${ports[@]}")" \
    --clients 1000 --rooms 1 --senders 10 --rate "$rate" --duration "$SECS" --drain-secs 3 \
    --server-pid "$(join_by , "${pids[@]}")" ${broker:+--broker-pid "$broker"} \
    --name "$name" --label "$stack under perf record" --max-secs 120 >"$LOGS/$name.out" 2>&1 &
  local gen=$!
  sleep $((SECS / 2))
  perf record -q -e cpu-clock -F "$FREQ" --call-graph dwarf -p "$(join_by , "${pids[@]}")" \
    -o "$OUT/$name.perf.data" -- sleep "$PERF_SECS" >/dev/null 2>&1 || say "perf record failed"
  wait "$gen" || { tail -n 20 "$LOGS/$name.out" >&2; die "loadgen failed ($name)"; }
  stop_servers
  local us
  us=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["steps"][0]; print(s["server_cpu_us_per_delivery"], s["server_user_us_per_delivery"], s["server_sys_us_per_delivery"], s["p99_ms"])' "$OUT/$name.json")
  read -r total user sys p99 <<<"$us"
  {
    echo "## $stack at $rate msg/s ($((rate * 1000)) deliveries/s)"
    echo
    echo "server CPU per delivery over the run: $total µs (user $user, system $sys); p99 $p99 ms; load $(uptime | sed 's/.*load average: //')"
    echo
    perf script -i "$OUT/$name.perf.data" -F comm,tid,ip,sym,dso 2>/dev/null \
      | python3 "$ROOT/scripts/bench/perf_components.py" "$total"
  } >"$OUT/$name.md"
  cat "$OUT/$name.md"
}

say "machine: $(nproc) CPUs; load before: $(uptime | sed 's/.*load average: //')"
for rate in ${RATES//,/ }; do
  for stack in ${STACKS//,/ }; do profile_one "$stack" "$rate"; done
done
say "load after: $(uptime | sed 's/.*load average: //')"
finish_line
