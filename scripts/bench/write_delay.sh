#!/usr/bin/env bash
# Scenario "write delay" (issue #16, item 5): what `--write-delay-ms` buys in CPU and socket
# writes per delivery, and costs in latency. 1,000 clients in one room on one chat-server
# (memory broker: the hub and the transport alone), 10 senders, fixed-rate runs of every
# (delay, rate) pair, a fresh server each.
#
#   scripts/bench/write_delay.sh                        # delays 0,2,5 ms x rates 30,100,400 msg/s
#   DELAYS=0,5 RATES=30,1000 SECS=10 scripts/bench/write_delay.sh
#   REPEAT=2 scripts/bench/write_delay.sh               # every (rate, delay) twice, interleaved
#
# Per delivery, in a window that starts once all clients are connected and their presence has
# settled and ends after the generator's drain (so connecting is not counted):
#   user/sys µs   utime/stime of the server from /proc/PID/stat, over frames written
#   writes        the server's write(2), writev(2), sendto(2) and sendmsg(2) calls, counted by
#                 `perf stat -e syscalls:sys_enter_*` attached to the server for the window,
#                 over frames written (chatbus_frames_out_total from /metrics: the deliveries
#                 plus the senders' acks, ~1 % more frames than deliveries with 10 senders).
#                 Needs perf and access to the syscall tracepoints (root, or
#                 perf_event_paranoid <= 1 with tracefs readable).
#   syscw         /proc/PID/io syscw over frames, for comparison: it counts write/writev only;
#                 a socket write from Rust's std (`send`, i.e. sendto) is not in it
#   p50/p99 ms    the generator's send-to-receive latency (all deliveries of the run)
#   gen µs/dlv    the generator's own server CPU per delivery figure (whole sending phase), for
#                 comparison
# Report: a table on stdout and target/loadgen/write-delay.tsv.
source "$(dirname "$0")/lib.sh"

CLIENTS=${CLIENTS:-1000}
SENDERS=${SENDERS:-10}
DELAYS=${DELAYS:-0,2,5}
RATES=${RATES:-30,100,400}
SECS=${SECS:-8}
REPEAT=${REPEAT:-1}
TSV=$OUT/write-delay.tsv
HZ=$(getconf CLK_TCK)
build

# cpu PID: "utime stime" in clock ticks (fields 14 and 15 of /proc/PID/stat; the command name
# in field 2 has no spaces here).
cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }
syscw() { awk '/^syscw:/ {print $2}' "/proc/$1/io"; }
# metric PORT NAME: one sample from the server's /metrics (awk reads to the end: no SIGPIPE).
metric() { curl -fsS "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m && !v {v = $2} END {print v}'; }
command -v perf >/dev/null || die "perf not found (apt-get install linux-perf)"
SYSCALLS=syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg

printf 'round\tdelay_ms\trate\tframes\tuser_us\tsys_us\twrites\tsyscw\tp50_ms\tp99_ms\tgen_us\tlost\n' >"$TSV"
say "machine: $(nproc) CPUs; load before: $(uptime | sed 's/.*load average: //')"
for round in $(seq "$REPEAT"); do
for rate in ${RATES//,/ }; do
  for delay in ${DELAYS//,/ }; do
    CHATBUS_SERVER_ARGS="--write-delay-ms $delay" start_chatbus memory
    pid=$CB_PID port=$CB_PORT
    name=write-delay-$delay-$rate-$round
    "$LOADGEN" run --protocol chatbus --url "ws://127.0.0.1:$port/ws" \
      --clients "$CLIENTS" --rooms 1 --senders "$SENDERS" --rate "$rate" --duration "$SECS" \
      --drain-secs 3 --server-pid "$pid" --name "$name" \
      --label "chatbus --broker memory --write-delay-ms $delay" --max-secs 120 \
      >"$LOGS/$name.out" 2>&1 &
    gen=$!
    # The window opens once every client is connected and the joins' presence went out (the
    # room is large: presence is announced at most once a second).
    for _ in $(seq 600); do
      [ "$(metric "$port" chatbus_connections || echo 0)" = "$CLIENTS" ] && break
      sleep 0.1
    done
    sleep 1.5
    perf stat -x, -o "$LOGS/$name.perf" -e "$SYSCALLS" -p "$pid" &
    perf_pid=$!
    read -r u0 s0 < <(cpu "$pid"); w0=$(syscw "$pid"); f0=$(metric "$port" chatbus_frames_out_total)
    wait "$gen" || { tail -n 20 "$LOGS/$name.out" >&2; die "loadgen failed ($name)"; }
    read -r u1 s1 < <(cpu "$pid"); w1=$(syscw "$pid"); f1=$(metric "$port" chatbus_frames_out_total)
    kill -INT "$perf_pid"; wait "$perf_pid" || true
    stop_servers
    # perf -x, lines: count,unit,event,...
    calls=$(awk -F, '$3 ~ /^syscalls:/ {n += $1} END {print n + 0}' "$LOGS/$name.perf")
    frames=$((f1 - f0))
    json=$OUT/$name.json
    read -r p50 p99 gen_us lost < <(python3 - "$json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["steps"][0]
print(f'{s["p50_ms"]:.2f} {s["p99_ms"]:.2f} {s["server_cpu_us_per_delivery"]:.2f} {s["lost"]}')
EOF
    )
    awk -v n="$round" -v d="$delay" -v r="$rate" -v f="$frames" -v u=$((u1 - u0)) -v s=$((s1 - s0)) \
      -v c="$calls" -v w=$((w1 - w0)) -v hz="$HZ" -v p50="$p50" -v p99="$p99" -v g="$gen_us" \
      -v l="$lost" \
      'BEGIN { printf "%s\t%s\t%s\t%d\t%.2f\t%.2f\t%.3f\t%.3f\t%s\t%s\t%s\t%s\n", n, d, r, f,
               u * 1e6 / hz / f, s * 1e6 / hz / f, c / f, w / f, p50, p99, g, l }' >>"$TSV"
    say "delay $delay ms, $rate msg/s: $(tail -n 1 "$TSV")"
  done
done
done
say "load after: $(uptime | sed 's/.*load average: //')"
column -t -s $'\t' "$TSV"
finish_line
