#!/usr/bin/env bash
# User-space instructions per delivery of a whole server process, the floor beside chatbus,
# counted by `valgrind --tool=callgrind` while the load generator drives the fanout scenario
# (1,000 clients in one room, 10 senders) at a low rate, where every delivery is its own
# write: the case of callgrind.sh's write path, but the real servers (benches/floor;
# examples/chat-server with --broker memory, one instance), not the delivery_cost workload.
#
#   scripts/bench/callgrind_server.sh                 # floor and chatbus, 5 msg/s, 2 s and 6 s
#   SERVERS=floor RATE=5 D1=2 D2=6 scripts/bench/callgrind_server.sh
#
# Method as in callgrind.sh: one run per duration, each a fresh server under callgrind with the
# same connect and join; Ir per delivery = (Ir(D2) - Ir(D1)) / (deliveries(D2) - deliveries(D1))
# (deliveries as the generator counted them), which cancels the start, the 1,000 handshakes and
# joins and the shutdown. The count is dumped with callgrind_control -d after the generator's
# drain, before the server is stopped. All the server's threads are counted (the generator is
# another process). The totals' difference is only as good as the set-up's repeatability (under
# valgrind the connect phase's polling varies by ~100,000 Ir between runs, which is more than
# the floor's 20,000 deliveries cost), so the script also diffs the inclusive counts of the
# functions that hold the delivery path: the floor's fan-out task (`floor::hub::fan_out`:
# Hub::deliver -> Conn::send -> writev), chatbus's `hub::pump::fan_out` (the hub) and the
# session writer's `Writer::write` (the socket write; its wake-up and `recv` are outside it).
# The rate is low because the server runs ~50x slower under valgrind; at it,
# every delivery is one write system call in both servers.
# Report: a table on stdout and target/loadgen/callgrind-server.tsv; the dumps in
# target/loadgen/callgrind/server-*.
source "$(dirname "$0")/lib.sh"
export LC_ALL=C

command -v valgrind >/dev/null || die "valgrind not found: apt-get install valgrind"
SERVERS=${SERVERS:-floor,chatbus}
RATE=${RATE:-5}
D1=${D1:-2}
D2=${D2:-6}
CG=$OUT/callgrind
TSV=$OUT/callgrind-server.tsv
mkdir -p "$CG"
build

# incl FILE PATTERN: the inclusive Ir of the first function matching PATTERN (0 if none).
incl() {
  callgrind_annotate --inclusive=yes "$1" 2>/dev/null \
    | awk -v p="$2" '$0 ~ p && $1 ~ /^[0-9,]+$/ {gsub(",", "", $1); print $1; found = 1; exit} END {if (!found) print 0}'
}

# count SERVER SECS: prints "Ir deliveries fanout_Ir write_Ir".
count() {
  local server=$1 secs=$2 port pid proto base url
  port=$(free_port)
  base=$CG/server-$server-$secs
  rm -f "$base"*
  if [ "$server" = floor ]; then
    valgrind --tool=callgrind --callgrind-out-file="$base.out" "$FLOOR" --port "$port" --threads 1 \
      >"$LOGS/callgrind-$server-$secs.log" 2>&1 &
    proto=floor url=ws://127.0.0.1:$port
  else
    env RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$base.out" "$BIN/chat-server" \
      --listen "127.0.0.1:$port" --broker memory --rate-per-sec 0 \
      >"$LOGS/callgrind-$server-$secs.log" 2>&1 &
    proto=chatbus url=ws://127.0.0.1:$port/ws
  fi
  pid=$!
  STARTED_PIDS+=("$pid")
  wait_tcp "$port" 120
  "$LOADGEN" run --protocol "$proto" --url "$url" --clients 1000 --rooms 1 --senders 10 \
    --rate "$RATE" --duration "$secs" --drain-secs 5 --connect-rate 500 --connect-timeout 60 \
    --name "callgrind-server-$server-$secs" --max-secs 300 >"$LOGS/callgrind-gen-$server-$secs.out" 2>&1 \
    || { tail -n 20 "$LOGS/callgrind-gen-$server-$secs.out" >&2; die "loadgen failed"; }
  callgrind_control -d "$pid" >/dev/null 2>&1 || die "callgrind_control -d failed"
  sleep 1
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local ir dlv
  # The -d dump: base.out.1 (the final dump at exit is left out).
  ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$base.out.1")
  dlv=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["steps"][0]["delivered"])' \
    "$OUT/callgrind-server-$server-$secs.json")
  if [ "$server" = floor ]; then
    echo "$ir $dlv $(incl "$base.out.1" 'floor::hub::fan_out::[{][{]closure[}][}] [[]') 0"
  else
    echo "$ir $dlv $(incl "$base.out.1" 'chatbus_core::hub::pump::fan_out [[]') $(incl "$base.out.1" 'Writer<Si>::write::[{][{]closure[}][}] [[]')"
  fi
}

printf 'server\trate\tIr(%ss)\tdlv(%ss)\tIr(%ss)\tdlv(%ss)\tIr/delivery (totals)\tfan-out Ir/delivery\twriter Ir/delivery\n' "$D1" "$D1" "$D2" "$D2" >"$TSV"
for server in ${SERVERS//,/ }; do
  read -r ir1 d1 f1 w1 < <(count "$server" "$D1")
  read -r ir2 d2 f2 w2 < <(count "$server" "$D2")
  awk -v s="$server" -v r="$RATE" -v a="$ir1" -v b="$d1" -v c="$ir2" -v d="$d2" \
    -v f1="$f1" -v f2="$f2" -v w1="$w1" -v w2="$w2" \
    'BEGIN { printf "%s\t%s\t%d\t%d\t%d\t%d\t%.0f\t%.0f\t%s\n", s, r, a, b, c, d, (c - a) / (d - b),
             (f2 - f1) / (d - b), (w2 == 0 ? "-" : sprintf("%.0f", (w2 - w1) / (d - b))) }' >>"$TSV"
  say "$(tail -n 1 "$TSV")"
done
column -t -s $'\t' "$TSV"
finish_line
