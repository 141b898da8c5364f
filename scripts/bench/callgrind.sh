#!/usr/bin/env bash
# Instructions per delivery (issue #16) under `valgrind --tool=callgrind`: a count that is the
# same on a busy machine, so a regression shows as a number, not as noise.
#
#   scripts/bench/callgrind.sh                  # both paths
#   PATHS=hub scripts/bench/callgrind.sh        # one of them (hub, write)
#   TOP=20 scripts/bench/callgrind.sh           # more functions in the per-delivery listing
#
# The workload is benches/delivery_cost.rs (release build; Rust keeps the symbol table, so
# callgrind names every function that was not inlined):
#   hub   K=1000 sessions: Hub::publish (memory broker) -> pump -> one frame queued for every
#         member -> Session::recv. The hub alone, no socket.
#   write K=100 WebSocket clients over loopback TCP: the ChatHub's hub publishes a 100-byte chat
#         message, encoded once (JSON), and every session's writer writes it into its socket
#         (axum, tungstenite), one flush (one write syscall) each: the low-rate case.
#
# Method: each path runs at two sizes, N1 and N2 rounds of one message to K sessions, and
#   Ir per delivery = (Ir(N2) - Ir(N1)) / (K x (N2 - N1))
# which cancels what does not depend on the number of deliveries (runtime start, connections,
# joins, shutdown). Callgrind counts instructions executed in user space only: the kernel's
# part of a write (see the write-delay table in docs/BENCHMARKS.md for it) is not in it.
# `write` runs with --separate-threads=yes and counts the server's threads only: thread 2 is
# the clients' (reading the frames), which is left out.
# The per-function listing is callgrind_annotate --inclusive=yes of both runs, diffed the same
# way, leaving out the frames that contain (nearly) all of it: main, block_on, the runtime's
# entry (any function at >= 95 % of the total). No debug info is needed for it: the names come
# from the symbol table, and a function the compiler inlined counts in its caller.
source "$(dirname "$0")/lib.sh"
export LC_ALL=C

command -v valgrind >/dev/null || die "valgrind not found: apt-get install valgrind"
PATHS=${PATHS:-hub,write}
TOP=${TOP:-12}
HUB_K=${HUB_K:-1000}; HUB_N1=${HUB_N1:-20}; HUB_N2=${HUB_N2:-200}
WRITE_K=${WRITE_K:-100}; WRITE_N1=${WRITE_N1:-50}; WRITE_N2=${WRITE_N2:-500}
CG=$OUT/callgrind
mkdir -p "$CG"

if [ -z "${SKIP_BUILD:-}" ]; then
  say "building benches/delivery_cost.rs (release)"
  (cd "$ROOT" && cargo bench --quiet --bench delivery_cost --no-run) || die "cargo build failed"
fi
# The bench binary: the newest target/release/deps/delivery_cost-<hash> that is executable.
WORKLOAD=$(ls -t "$TARGET"/release/deps/delivery_cost-* 2>/dev/null | grep -v '\.d$' | head -n 1)
[ -x "$WORKLOAD" ] || die "no delivery_cost binary in $TARGET/release/deps"

# run MODE K ROUNDS: one callgrind run; prints the Ir of the counted threads.
run() {
  local mode=$1 k=$2 n=$3 base=$CG/$1.$3
  rm -f "$base" "$base"-*
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$base" \
    "$WORKLOAD" "$mode" "$k" "$n" >"$base.log" 2>&1 || { tail -n 20 "$base.log" >&2; die "$mode $n failed"; }
  local total=0 f ir
  for f in "$base"-*; do
    # The clients' thread (write) is not the server's work.
    if [ "$mode" = write ] && [[ $f == *-02 ]]; then continue; fi
    ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
    total=$((total + ir))
  done
  echo "$total"
}

# files MODE ROUNDS: the callgrind files of the counted threads of one run.
files() {
  local f
  for f in "$CG/$1.$2"-*; do
    if [ "$1" = write ] && [[ $f == *-02 ]]; then continue; fi
    echo "$f"
  done
}

# listing D PER N1-FILES -- N2-FILES: inclusive Ir per delivery of the TOP largest functions
# (N2 - N1, over D deliveries), without the frames at >= 95 % of PER.
listing() {
  python3 - "$@" <<'EOF'
import re, subprocess, sys
d, per, top = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rest = sys.argv[4:]
sep = rest.index("--")
line = re.compile(r"^\s*([0-9,]+)\s+\(\s*[0-9.]+%\)\s+(.*?)(\s+\[[^]]*\])?$")
def inclusive(files):
    out = {}
    for f in files:
        text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", f],
                              capture_output=True, text=True, check=True).stdout
        for l in text.splitlines():
            m = line.match(l)
            if m and m.group(2) != "PROGRAM TOTALS":
                name = m.group(2).removeprefix("???:")
                out[name] = out.get(name, 0) + int(m.group(1).replace(",", ""))
    return out
a, b = inclusive(rest[:sep]), inclusive(rest[sep + 1:])
rows = sorted(((b.get(k, 0) - a.get(k, 0)) / d, k) for k in set(a) | set(b))
rows = [(v, k) for v, k in reversed(rows) if v < 0.95 * per]
for v, k in rows[:top]:
    print(f"{v:10.1f}  {k}")
EOF
}

for mode in ${PATHS//,/ }; do
  case $mode in
    hub) k=$HUB_K; n1=$HUB_N1; n2=$HUB_N2 ;;
    write) k=$WRITE_K; n1=$WRITE_N1; n2=$WRITE_N2 ;;
    *) die "unknown path $mode (hub, write)" ;;
  esac
  say "$mode: K=$k, $n1 and $n2 rounds under callgrind"
  ir1=$(run "$mode" "$k" "$n1")
  ir2=$(run "$mode" "$k" "$n2")
  d=$((k * (n2 - n1)))
  per=$(((ir2 - ir1) / d))
  printf '%s: Ir(%d rounds) = %d, Ir(%d rounds) = %d, deliveries %d -> %d Ir per delivery\n' \
    "$mode" "$n1" "$ir1" "$n2" "$ir2" "$d" "$per"
  printf '  top %d functions by inclusive Ir per delivery (%s):\n' "$TOP" "$mode"
  # shellcheck disable=SC2046 # one file name per line, no spaces
  listing "$d" "$per" "$TOP" $(files "$mode" "$n1") -- $(files "$mode" "$n2")
done
finish_line
