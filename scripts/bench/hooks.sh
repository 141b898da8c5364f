#!/usr/bin/env bash
# What the application hooks (#12) cost: the code before them against this code with no hooks
# configured (the default) and with a hook whose on_publish awaits a 1 ms timer, in ONE run,
# interleaved (before, after, hook; repeated ROUNDS times) so that the machine's noise falls on
# all three alike. Fixed rates, not ramps, so CPU per delivery compares like for like:
#   fanout: 1,000 clients in one room over two instances on one redis-server, 10 senders, at
#           each of FANOUT_RATES (default 30 and 100 msg/s = 30,000 and 100,000 deliveries/s);
#   rooms:  10,000 clients in 1,000 rooms of 10 over two instances, 1,000 senders, at each of
#           ROOMS_RATES (default 2,500 and 5,000 msg/s = 25,000 and 50,000 deliveries/s).
# Each step sends for STEP_SECS (default 10) s. Prints, per scenario and rate, the server CPU µs
# per delivery (user + system, and the system part) of every round and pooled over the rounds
# (server CPU / deliveries), the ratios after/before and hook/before (pooled, and of each round
# against the same round's before, which ran a minute earlier), p99 and loss; the same
# table goes to target/loadgen/hooks.md.
#
#   BEFORE_BIN=/path/to/old/chat-server scripts/bench/hooks.sh   # a release build of the old code
#   BEFORE_REV=26064a7 scripts/bench/hooks.sh   # builds that commit (release) in a git worktree
#                                               # at target/hooks-before/src, reused next time
#   ROUNDS=3 HOOK_MS=5 FANOUT_RATES=30 ROOMS_RATES=2500 STEP_SECS=5 scripts/bench/hooks.sh
#
# "after" is this checkout's target/release/examples/chat-server (built as the other scenarios
# do; SKIP_BUILD=1 reuses it); "hook" is the same binary with --bench-publish-hook-ms HOOK_MS
# (examples/chat-server/bench_hook.rs). The old binary must accept the flags start_chatbus
# passes (--listen, --broker, --rate-per-sec). ~5 minutes with the defaults.
# On a machine shared with builds, give the run precedence or the rounds differ by tens of %:
#   (echo -10 > /proc/self/autogroup; nice -n -10 scripts/bench/hooks.sh)
# (docs/BENCHMARKS.md, "Application hooks (#12)", has the figures and why).
source "$(dirname "$0")/lib.sh"

ROUNDS=${ROUNDS:-2}
HOOK_MS=${HOOK_MS:-1}
FANOUT_RATES=${FANOUT_RATES:-30,100}
ROOMS_RATES=${ROOMS_RATES:-2500,5000}
STEP_SECS=${STEP_SECS:-10}
# The "after" variant means no hooks: a value in the caller's shell must not configure one.
unset CHATBUS_BENCH_PUBLISH_HOOK_MS
command -v jq >/dev/null || die "jq not found: apt-get install jq"

# The old binary: given, or built from BEFORE_REV in a worktree under target/.
if [ -z "${BEFORE_BIN:-}" ]; then
  [ -n "${BEFORE_REV:-}" ] \
    || die "set BEFORE_BIN to the old chat-server binary (release), or BEFORE_REV to a git rev to build it from"
  rev=$(git -C "$ROOT" rev-parse --verify --quiet "$BEFORE_REV^{commit}") \
    || die "BEFORE_REV=$BEFORE_REV is not a commit"
  src=$TARGET/hooks-before/src
  if [ -d "$src" ]; then
    git -C "$src" checkout --quiet --detach "$rev"
  else
    mkdir -p "$TARGET/hooks-before"
    git -C "$ROOT" worktree add --quiet --detach "$src" "$rev"
  fi
  say "building chat-server at ${rev:0:10} (release) in $src"
  (cd "$src" && cargo build --release --quiet --example chat-server) || die "cargo build of $rev failed"
  BEFORE_BIN=$src/target/release/examples/chat-server
fi
[ -x "$BEFORE_BIN" ] || die "BEFORE_BIN=$BEFORE_BIN is not an executable"
build
if cmp -s "$BEFORE_BIN" "$BIN/chat-server"; then
  say "warning: BEFORE_BIN is the same file as this checkout's chat-server"
fi
say "before: $BEFORE_BIN"
say "after:  $BIN/chat-server (no hooks; hook: --bench-publish-hook-ms $HOOK_MS)"
start_redis

# servers VARIANT: two instances of VARIANT's binary and flags.
servers() {
  local bin=$BIN/chat-server args=""
  case $1 in
    before) bin=$BEFORE_BIN ;;
    after) ;;
    hook) args="--bench-publish-hook-ms $HOOK_MS" ;;
  esac
  CHATBUS_BIN=$bin CHATBUS_SERVER_ARGS=$args start_chatbus redis
  CHATBUS_BIN=$bin CHATBUS_SERVER_ARGS=$args start_chatbus redis
}

# hook_check VARIANT: prints each instance's on_publish hook calls and their mean time (from
# /metrics): the hook variant must show calls, "after" none. In rooms every sender is its
# room's first client, and client i connects to URL i % 2, so all sends reach the first
# instance (the same for every variant).
hook_check() {
  local p line
  for p in "${CB_PORTS[@]}"; do
    line=$(curl -fsS "http://127.0.0.1:$p/metrics" 2>/dev/null \
      | awk '/^chatbus_hook_calls_total\{hook="publish"\}/ {c=$2} /^chatbus_hook_micros_total\{hook="publish"\}/ {m=$2}
             END {if (c > 0) printf "%d calls, %.0f µs each", c, m / c; else print "none"}') || line="?"
    say "  $1 on :$p: on_publish hook calls: $line"
  done
}

# One loadgen run against the two servers; the reports are the input of the table below.
# The idle checkpoint at the full count waits 2 s after the last connect before the first step
# (what connecting sets off, e.g. the status announcements of the new code, settles first) and
# gives the RSS per connection as a by-product.
measure() { # NAME LABEL ARGS...
  local name=$1 label=$2
  shift 2
  "$LOADGEN" run --url "$(urls chatbus "${CB_PORTS[@]}")" \
    --server-pid "$(join_by , "${CB_PIDS[@]}")" --broker-pid "$REDIS_PID" \
    --p99-limit-ms 1000 --retries 0 --noise-pct 1000 --drain-secs 3 --settle-secs 2 \
    --name "$name" --label "$label" --max-secs 120 "$@" >"$LOGS/$name.txt" \
    || { cat "$LOGS/$name.txt" >&2; die "loadgen $name failed"; }
}

names=()
for round in $(seq "$ROUNDS"); do
  for variant in before after hook; do
    say "round $round/$ROUNDS, $variant: fanout at $FANOUT_RATES msg/s"
    servers "$variant"
    # A ramp over fixed steps: one connect, then each rate for STEP_SECS (the p99 limit is
    # out of the way: a slow step is reported, not retried).
    measure "hooks-fanout-$variant-$round" "$variant, fanout, round $round" \
      --clients 1000 --idle-at 1000 --rooms 1 --senders 10 --ramp --rates "$FANOUT_RATES" --step-secs "$STEP_SECS"
    [ "$variant" = before ] || hook_check "$variant"
    stop_servers
    names+=("hooks-fanout-$variant-$round")

    say "round $round/$ROUNDS, $variant: rooms at $ROOMS_RATES msg/s"
    servers "$variant"
    measure "hooks-rooms-$variant-$round" "$variant, rooms, round $round" \
      --clients 10000 --idle-at 10000 --rooms 1000 --senders 1000 --ramp --rates "$ROOMS_RATES" \
      --step-secs "$STEP_SECS"
    [ "$variant" = before ] || hook_check "$variant"
    stop_servers
    names+=("hooks-rooms-$variant-$round")
  done
done

# One TSV line per step: scenario rate variant round cpu_us sys_us delivered p99 lost+dups other%.
rows=$OUT/hooks-rows.tsv
for n in "${names[@]}"; do
  IFS=- read -r _ scenario variant round <<<"$n"
  jq -r --arg s "$scenario" --arg v "$variant" --arg r "$round" \
    '.steps[] | [$s, .rate_msgs, $v, $r, .server_cpu_us, .server_sys_us, .delivered,
                 .p99_ms, (.lost + .dups), .other_cpu_pct] | @tsv' "$OUT/$n.json"
done >"$rows"
rss=$OUT/hooks-rss.tsv
for n in "${names[@]}"; do
  IFS=- read -r _ scenario variant round <<<"$n"
  jq -r --arg s "$scenario" --arg v "$variant" \
    '.idle[] | [$s, $v, .connections, .rss_per_connection_bytes] | @tsv' "$OUT/$n.json"
done >"$rss"

# The table: per scenario and rate, each variant's rounds and pooled figures, ratios to before.
{
  echo "| scenario | msg/s | variant | µs/delivery by round (user+sys) | pooled µs/delivery | of which sys | ratio to before, pooled | by round | p99 ms by round | lost+dup | other CPU % by round |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  awk -F'\t' '
    { k = $1 SUBSEP $2; v = $3
      if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
      cpu[k, v] += $5; sys[k, v] += $6; dlv[k, v] += $7; loss[k, v] += $9
      per[k, v] = per[k, v] (per[k, v] == "" ? "" : ", ") sprintf("%.2f", $7 > 0 ? $5 / $7 : 0)
      ud[k, v, $4] = $7 > 0 ? $5 / $7 : 0; if ($4 > nr) nr = $4
      p99[k, v] = p99[k, v] (p99[k, v] == "" ? "" : ", ") sprintf("%.2f", $8)
      oth[k, v] = oth[k, v] (oth[k, v] == "" ? "" : ", ") sprintf("%.0f", $10) }
    END {
      split("before after hook", vs, " ")
      for (i = 1; i <= nk; i++) {
        k = order[i]; split(k, parts, SUBSEP)
        base = dlv[k, "before"] > 0 ? cpu[k, "before"] / dlv[k, "before"] : 0
        for (j = 1; j <= 3; j++) {
          v = vs[j]
          if (dlv[k, v] == 0) continue
          u = cpu[k, v] / dlv[k, v]
          ratio = (v == "before" || base == 0) ? "—" : sprintf("**%.3f**", u / base)
          rr = ""
          for (r = 1; r <= nr; r++)
            if (v != "before" && ud[k, "before", r] > 0 && ud[k, v, r] > 0)
              rr = rr (rr == "" ? "" : ", ") sprintf("%.3f", ud[k, v, r] / ud[k, "before", r])
          printf "| %s | %s | %s | %s | %.2f | %.2f | %s | %s | %s | %d | %s |\n",
            parts[1], parts[2], v, per[k, v], u, sys[k, v] / dlv[k, v], ratio,
            rr == "" ? "—" : rr, p99[k, v], loss[k, v], oth[k, v]
        }
      }
    }' "$rows"
  echo
  echo "| scenario | variant | server RSS per connection, 2 s after connecting (KiB, mean of rounds) |"
  echo "|---|---|---|"
  awk -F'\t' '{ k = $1 " | " $2; if (!(k in n)) o[++m] = k; n[k]++; s[k] += $4 }
    END { for (i = 1; i <= m; i++) printf "| %s | %.2f |\n", o[i], s[o[i]] / n[o[i]] / 1024 }' "$rss"
  echo
  echo "before = $BEFORE_BIN; after = $BIN/chat-server without hooks; hook = after with" \
    "--bench-publish-hook-ms $HOOK_MS. $ROUNDS rounds, ${STEP_SECS} s per step, $(date -u '+%Y-%m-%d %H:%M UTC')."
} | tee "$OUT/hooks.md"
finish_line
