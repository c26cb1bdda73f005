#!/usr/bin/env bash
# The benchmarks behind BENCHMARKS.md, as one script: a reusable 1,000-user
# base (so Argon2 registration is never measured), then each run on a
# fresh copy of it, and one summary line per run.
#
#   loadgen/bench.sh base                  make the embedded and Postgres bases
#   loadgen/bench.sh embedded RATE [pinned|unpinned] [chat-server flags...]
#   loadgen/bench.sh postgres RATE [chat-server flags...]   (server pinned)
#   loadgen/bench.sh idle                  RSS per idle connection, 10,000 users
#   loadgen/bench.sh calls CALLS SIZE [pinned|unpinned] [chat-server flags...]
#                                          call media: CALLS calls of SIZE
#                                          participants (LOADGEN_ARGS for
#                                          --call-packets, --call-packet-bytes)
#   loadgen/bench.sh compare PAIRS RATE BIN_B [chat-server flags...]
#                                          interleaved pinned embedded runs of
#                                          $BIN and BIN_B, then each one's medians
#   loadgen/bench.sh targets               issue 7's targets: RUNS (3) rounds of
#                                          pinned 10k, the unpinned LADDER and
#                                          Postgres 10k, idle memory, the relay
#                                          from RELAY_DIR if built; one table
#   loadgen/bench.sh callgrind RATE [chat-server flags...]
#                                          instructions per send: the server
#                                          under valgrind's callgrind for
#                                          CG_SECONDS (30) once every user is
#                                          online; user-space instructions,
#                                          not time, which the host's noise
#                                          barely reaches (blind to the kernel)
#
# Pinned: the server on CPU 0, the load generator on CPU 1 (taskset).
# Environment: BIN (default target/release), BENCH_DIR (default
# /tmp/chat-bench), PG (default postgres://postgres@127.0.0.1:5432),
# REDIS (default redis://127.0.0.1:6379), DURATION (10s), DRAIN (30s),
# LOADGEN_ARGS (more chat-loadgen flags, e.g. "--delivery-ack-linger 0s");
# for targets: RUNS (3), LADDER (the unpinned rates, "10000 14000 18000
# 20000"), RELAY_DIR (../shared/anchor-bench); for callgrind: CG_SECONDS
# (30, the counted window).
# Every process it starts it stops by PID; every run ends by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
# The summaries import loadgen/targets.py; keep the tree free of caches.
export PYTHONDONTWRITEBYTECODE=1

BIN=${BIN:-target/release}
DIR=${BENCH_DIR:-/tmp/chat-bench}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
REDIS=${REDIS:-redis://127.0.0.1:6379}
DURATION=${DURATION:-10s}
DRAIN=${DRAIN:-30s}
PORT=15433
METRICS_PORT=19433
SERVER_PID=

# A load generator run in the background (idle, callgrind), stopped on
# every way out like the server.
LOADGEN_PID=

# stop_pid NAME: stops the process whose PID the variable NAME holds, if
# any, and empties it.
stop_pid() {
    local pid=${!1}
    if [[ -n $pid ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        printf -v "$1" '%s' ''
    fi
}
stop_server() { stop_pid SERVER_PID; }
stop_loadgen() { stop_pid LOADGEN_PID; }
trap 'stop_loadgen; stop_server' EXIT

# A metric's value from the server's scrape, empty if it did not answer.
metric() {
    { curl -s -m 5 "127.0.0.1:$METRICS_PORT/metrics" || true; } | awk -v k="$1" '$1 == k { print $2 }'
}

need_binaries() {
    [[ -x $BIN/chat-server && -x $BIN/chat-loadgen ]] || {
        echo "build first: cargo build --release -p chat-server -p chat-loadgen" >&2
        exit 1
    }
}

# The server's flags and the taskset prefix come in as arrays.
launch() {
    local data=$1
    shift
    local -a prefix=()
    while [[ $# -gt 0 && $1 != -- ]]; do prefix+=("$1"); shift; done
    shift
    # The typing bucket (a setting since session 48) through the
    # environment, which a server from before it ignores: compare can run
    # older builds.
    CHAT_TYPING_RATE=0 CHAT_TYPING_BURST=0 \
        "${prefix[@]}" "$BIN/chat-server" --data-dir "$data" --listen "127.0.0.1:$PORT" \
        --metrics-listen "127.0.0.1:$METRICS_PORT" --send-rate 0 --send-burst 0 --control-rate 0 --control-burst 0 \
        --password-checks-per-address 0 --registrations-per-address 0 \
        --socket-receive-buffer 4194304 "$@" >"$data.log" 2>&1 &
    SERVER_PID=$!
    wait_ready
}

wait_ready() {
    for _ in $(seq 1 300); do
        curl -sf "127.0.0.1:$METRICS_PORT/readyz" >/dev/null 2>&1 && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server exited: see its log" >&2; exit 1; }
        sleep 0.1
    done
    echo "the server did not get ready in 30 s" >&2
    exit 1
}

# The server's own view of the tail, scraped before it stops: the share of
# sends whose SendAck took over 10 ms in the server (less noisy than the
# load generator's p99, which adds both processes' scheduling).
scrape_metrics() { curl -s -m 5 "127.0.0.1:$METRICS_PORT/metrics" >"$1" 2>/dev/null || true; }

# Python the summaries share: the server's SendAck tail from a scrape, as
# percentages of the sends it counted (None without a scrape).
ACK_TAIL_PY='import sys; sys.path.insert(0, "loadgen"); from targets import ack_tail'

summary() {
    python3 -c "$ACK_TAIL_PY"$'\n'"$(cat <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
L = j["latency_ms"]
threads = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(j.get("server_cpu_by_thread", {}).items()) if v >= 0.5)
print(f'offered {j["offered_rate"]:.0f}/s achieved {j["acked_per_s"]:.0f}/s lost {j["lost"]} dup {j["duplicates"]} '
      f'ack p50 {L["ack"]["p50"]:.1f} p99 {L["ack"]["p99"]:.1f} deliver p99 {L["deliver"]["p99"]:.1f} ms '
      f'(load generator late p99 {L.get("dispatch", {}).get("p99", 0):.1f}) '
      f'server {j.get("server_cpu_pct") or 0:.0f}% = {j.get("server_cpu_us_per_send") or 0:.1f} us/send ({threads}) '
      f'loadgen {j.get("loadgen_cpu_pct") or 0:.0f}% datagrams/send {j.get("udp_datagrams_per_send") or 0:.2f} drops {j.get("udp_rcvbuf_drops")} errors {j["errors"]}')
if j.get("notifications"):
    print(f'  notifications at the push gateway (to the end of the drain): {j["notifications"]}')
for name, b in sorted(j.get("backend_cpu", {}).items()):
    print(f'  {name}: {b["cpu_pct"]:.0f}% = {b.get("cpu_us_per_send") or 0:.1f} us/send')
t = ack_tail(sys.argv[2])
if t:
    print(f'  server: SendAck over 10 ms {t["over10"]:.2f}%, over 25 ms {t["over25"]:.2f}% of {t["sends"]} sends')
PY
)" "$1" "${2:-}"
}

# loadgen USERS_FILE CA RATE JSON [taskset prefix...] -- [extra flags...]
loadgen() {
    local users=$1 ca=$2 rate=$3 json=$4
    shift 4
    local -a prefix=()
    while [[ $# -gt 0 && $1 != -- ]]; do prefix+=("$1"); shift; done
    shift
    "${prefix[@]}" "$BIN/chat-loadgen" --server "127.0.0.1:$PORT" --ca "$ca" \
        --server-pid "$SERVER_PID" --reuse "$users" --users "$(users_in "$users")" \
        --rate "$rate" --duration "$DURATION" --drain "$DRAIN" --group-fraction 0 --churn 0 \
        --json "$json" ${LOADGEN_ARGS:-} "$@" >"$json.out" 2>&1
}

users_in() { python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["users"]))' "$1"; }

make_base() { # make_base NAME USERS [server flags...]
    local name=$1 n=$2
    shift 2
    rm -rf "${DIR:?}/$name" "$DIR/$name.users.json"
    launch "$DIR/$name" -- "$@"
    "$BIN/chat-loadgen" --server "127.0.0.1:$PORT" --ca "$DIR/$name/certs/ca.pem" \
        --reuse "$DIR/$name.users.json" --users "$n" --rate 100 --duration 2s --drain 5s \
        --group-fraction 0 --churn 0 --quiet >"$DIR/$name.setup.out" 2>&1
    stop_server
    echo "base $name: $n users in $DIR/$name.users.json"
}

psql_do() { psql "$PG/postgres" -qAt -c "$1"; }

# run_embedded RATE pinned|unpinned [server flags...]: one run on a fresh
# copy of the embedded base; leaves its report's path in LAST_REPORT.
run_embedded() {
    local rate=$1 mode=$2
    shift 2
    local run="$DIR/run-$$-$RANDOM"
    rm -rf "$run"
    cp -a "$DIR/embedded" "$run"
    if [[ $mode == pinned ]]; then
        launch "$run" taskset -c 0 -- "$@"
        loadgen "$DIR/embedded.users.json" "$run/certs/ca.pem" "$rate" "$run.json" taskset -c 1 -- || true
    else
        launch "$run" -- "$@"
        loadgen "$DIR/embedded.users.json" "$run/certs/ca.pem" "$rate" "$run.json" -- --threads 2 || true
    fi
    scrape_metrics "$run.json.metrics"
    stop_server
    # Clean up before printing: a reader that stops early (| head) must not
    # leave the copy behind.
    rm -rf "$run"
    LAST_REPORT=$run.json
    summary "$run.json" "$run.json.metrics"
    echo "  report $run.json, output $run.json.out, server log $run.log"
}

# run_postgres RATE [server flags...]: one pinned run on Redis + Postgres,
# on a database made from the base's template and a Redis prefix of its
# own; leaves its report's path in LAST_REPORT.
run_postgres() {
    local rate=$1
    shift
    local db="chatbench_$$_$RANDOM"
    local run="$DIR/run-$$-$RANDOM"
    psql_do "CREATE DATABASE $db TEMPLATE chatbench_base" >/dev/null
    rm -rf "$run"
    cp -a "$DIR/postgres" "$run"
    launch "$run" taskset -c 0 -- --postgres-url "$PG/$db" --redis-url "$REDIS" \
        --redis-prefix "$db:" "$@"
    loadgen "$DIR/postgres.users.json" "$run/certs/ca.pem" "$rate" "$run.json" taskset -c 1 -- \
        --backend postgres=postgres --backend redis=redis-server || true
    scrape_metrics "$run.json.metrics"
    stop_server
    # Clean up before printing (see run_embedded).
    redis-cli -u "$REDIS" --scan --pattern "$db:*" | xargs -r redis-cli -u "$REDIS" del >/dev/null
    psql_do "DROP DATABASE $db" >/dev/null
    rm -rf "$run"
    LAST_REPORT=$run.json
    summary "$run.json" "$run.json.metrics"
    echo "  report $run.json, output $run.json.out, server log $run.log"
}

# run_idle: RSS growth per authenticated idle connection at 10,000
# connections; leaves the bytes per connection in LAST_IDLE.
run_idle() {
    [[ -f $DIR/idle.users.json ]] || make_base idle 10000
    local run="$DIR/run-$$-$RANDOM"
    rm -rf "$run"
    cp -a "$DIR/idle" "$run"
    launch "$run" --
    rss() { awk '/VmRSS/{print $2}' "/proc/$SERVER_PID/status"; }
    local before after n
    before=$(rss)
    "$BIN/chat-loadgen" --server "127.0.0.1:$PORT" --ca "$run/certs/ca.pem" \
        --reuse "$DIR/idle.users.json" --users 10000 --rate 1 --duration 60s --drain 2s \
        --group-fraction 0 --churn 0 --quiet >/dev/null 2>&1 &
    LOADGEN_PID=$!
    # Authenticated, not just connected (since session 35): then a moment
    # for what follows the login (streams opened, catch-up, presence).
    for _ in $(seq 1 1200); do
        n=$(metric chat_sessions_active)
        [[ ${n:-0} == 10000 ]] && break
        sleep 0.1
    done
    sleep 2
    after=$(rss)
    stop_loadgen
    stop_server
    rm -rf "$run"
    local per_conn=$(((after - before) * 1024 / 10000))
    echo "connections ${n:-0}: RSS ${before} kB -> ${after} kB = $per_conn bytes per connection"
    # Only a full set of connections measures what the target asks.
    LAST_IDLE=
    if [[ ${n:-0} == 10000 ]]; then LAST_IDLE=$per_conn; fi
}

# run_callgrind RATE [server flags...]: the server under callgrind on a
# fresh copy of the embedded base, instrumented for CG_SECONDS (30) once
# every user is online and 15 s more (the server's caches and the load
# generator's schedule settle; valgrind translates code again when
# instrumentation starts, which costs time, not counted instructions),
# then the server's user-space instructions divided by the sends the
# store appended in that window, both read from the profile itself (the
# calls of `append_one`): nothing scrapes the server inside the window,
# since a scrape of `/metrics` costs as much as ~20 sends. Valgrind runs
# the server 50-100x slower, one thread at a time: use a rate it keeps up
# with (100/s here; the summary says when it did not). The count is
# blind to the kernel, and the per-second work (timers, heartbeats) is
# divided by the rate: compare builds at one rate.
run_callgrind() {
    local rate=$1
    shift
    command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
    local seconds=${CG_SECONDS:-30}
    [[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "CG_SECONDS is whole seconds, e.g. 30" >&2; exit 2; }
    local run="$DIR/run-$$-$RANDOM"
    local out="$run.callgrind"
    local users n
    users=$(users_in "$DIR/embedded.users.json")
    rm -rf "$run"
    cp -a "$DIR/embedded" "$run"
    launch "$run" valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" -- "$@"
    # Bounded: set-up, warm-up and the window, with room for valgrind.
    "$BIN/chat-loadgen" --server "127.0.0.1:$PORT" --ca "$run/certs/ca.pem" \
        --reuse "$DIR/embedded.users.json" --users "$users" \
        --rate "$rate" --duration "$((seconds + 180))s" --drain 5s --group-fraction 0 --churn 0 \
        --json "$run.json" ${LOADGEN_ARGS:-} >"$run.json.out" 2>&1 &
    LOADGEN_PID=$!
    for _ in $(seq 1 1200); do
        n=$(metric chat_sessions_active)
        [[ ${n:-0} == "$users" ]] && break
        sleep 0.1
    done
    [[ ${n:-0} == "$users" ]] || echo "only ${n:-0} of $users users came online in 2 minutes: counting anyway" >&2
    sleep 15
    control() {
        callgrind_control "$@" "$SERVER_PID" >"$run.control" 2>&1 ||
            { cat "$run.control" >&2; echo "callgrind_control $* failed" >&2; exit 1; }
    }
    control -i on
    sleep "$seconds"
    control -i off
    # Dumps asked for are numbered from 1; the one at exit, unnumbered,
    # holds only what ran after the last.
    control -d
    rm -f "$run.control"
    stop_loadgen
    stop_server
    rm -rf "$run"
    local dump="$out.1"
    [[ -s $dump ]] || { echo "callgrind wrote no profile: see $run.log" >&2; exit 1; }
    callgrind_annotate --inclusive=yes "$dump" >"$dump.inclusive.txt" 2>/dev/null
    callgrind_annotate "$dump" >"$dump.self.txt" 2>/dev/null
    python3 - "$dump" "$users" "$rate" "$seconds" <<'PY'
import re, sys
dump, users, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])

# The sends: calls of the store's append in the raw profile (a name is
# written once, with its id, then the id alone), and the total.
names, sends, total, callee = {}, 0, None, None
for line in open(dump, errors="replace"):
    m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?", line)
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3).strip()
        callee = m.group(2) if m.group(1) else None
    elif callee is not None and line.startswith("calls="):
        if names.get(callee) == "chat_server::store::sqlite::append_one":
            sends += int(line[6:].split()[0])
        callee = None
    elif line.startswith("totals:"):
        total = int(line.split()[1])
if not sends or total is None:
    sys.exit(f"no append counted in {dump}: see the load generator's output")

text = open(dump + ".inclusive.txt").read()
def part(pattern):
    """Inclusive instructions per send of the first function matching pattern."""
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(", line)
        if m and "=>" not in line and re.search(pattern, line):
            return f"{int(m.group(1).replace(',', '')) / sends:,.0f}"
    return "n/a"
parts = [
    ("store thread", r"store::sqlite::run_thread "),
    ("quinn connections", r"quinn::connection::ConnectionDriver as .*::poll "),
    ("quinn endpoint", r"quinn::endpoint::EndpointDriver as .*::poll "),
]
kept = sends / (rate * seconds)
print(f"{users} users, {rate:.0f}/s: {sends} sends stored in the window ({kept:.0%} of the rate"
      f"{'' if kept > 0.95 else ': the server fell behind, lower the rate'}), "
      f"{total / sends:,.0f} instructions per send ("
      + ", ".join(f"{name} {part(p)}" for name, p in parts) + ")")
PY
    echo "  profile $dump (annotated: $dump.self.txt, $dump.inclusive.txt), loadgen output $run.json.out, server log $run.log"
}

cmd=${1:-}
shift || true
need_binaries
mkdir -p "$DIR"
case $cmd in
base)
    make_base embedded 1000
    psql_do "DROP DATABASE IF EXISTS chatbench_base" >/dev/null
    psql_do "CREATE DATABASE chatbench_base" >/dev/null
    # A base made before (and not cleaned up) claimed the prefix for its
    # history: this one is a new history.
    redis-cli -u "$REDIS" --scan --pattern "chatbench-base:*" | xargs -r redis-cli -u "$REDIS" del >/dev/null
    make_base postgres 1000 --postgres-url "$PG/chatbench_base" --redis-url "$REDIS" \
        --redis-prefix chatbench-base:
    redis-cli -u "$REDIS" --scan --pattern "chatbench-base:*" | xargs -r redis-cli -u "$REDIS" del >/dev/null
    ;;
embedded)
    rate=${1:?rate}
    mode=${2:-pinned}
    shift 2 || shift $#
    run_embedded "$rate" "$mode" "$@"
    ;;
compare)
    pairs=${1:?pairs}
    rate=${2:?rate}
    bin_b=${3:?BIN_B}
    shift 3
    bin_a=$BIN
    reports=()
    for i in $(seq 1 "$pairs"); do
        for bin in "$bin_a" "$bin_b"; do
            BIN=$bin
            need_binaries
            echo "pair $i, $bin:"
            run_embedded "$rate" pinned "$@"
            reports+=("$bin" "$LAST_REPORT")
        done
    done
    python3 -c "$ACK_TAIL_PY"$'\n'"$(cat <<'PY'
import json, statistics, sys
runs = {}
args = sys.argv[1:]
for bin, report in zip(args[::2], args[1::2]):
    j = json.load(open(report))
    t = ack_tail(report + ".metrics")
    over10 = t["over10"] if t else float("nan")
    runs.setdefault(bin, []).append((j.get("server_cpu_us_per_send") or 0, j["latency_ms"]["deliver"]["p99"], over10))
for bin, rs in runs.items():
    cpu, p99, over10 = (statistics.median(x[i] for x in rs) for i in range(3))
    print(f'{bin}: medians of {len(rs)}: {cpu:.1f} us/send, deliver p99 {p99:.1f} ms, server SendAck over 10 ms {over10:.2f}%')
PY
)" "${reports[@]}"
    ;;
postgres)
    rate=${1:?rate}
    shift
    run_postgres "$rate" "$@"
    ;;
idle)
    run_idle
    ;;
callgrind)
    rate=${1:?rate}
    shift
    run_callgrind "$rate" "$@"
    ;;
calls)
    # Users of their own, registered by the run (not measured): no base.
    calls=${1:?calls}
    size=${2:?size}
    mode=${3:-pinned}
    shift 3 || shift $#
    run="$DIR/run-$$-$RANDOM"
    rm -rf "$run"
    mkdir -p "$run"
    if [[ $mode == pinned ]]; then
        launch "$run" taskset -c 0 -- "$@"
        lg=(taskset -c 1 "$BIN/chat-loadgen")
    else
        launch "$run" -- "$@"
        lg=("$BIN/chat-loadgen" --threads 2)
    fi
    "${lg[@]}" --server "127.0.0.1:$PORT" --ca "$run/certs/ca.pem" --server-pid "$SERVER_PID" \
        --calls "$calls" --call-size "$size" --duration "$DURATION" --json "$run.json" \
        ${LOADGEN_ARGS:-} >"$run.json.out" 2>&1 || true
    stop_server
    rm -rf "$run"
    python3 - "$run.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
c = j["calls"]
L = c["latency_ms"]
print(f'{c["calls"]} calls x {c["call_size"]}, {c["packets_per_s"]}/s of {c["packet_bytes"]} B: '
      f'forwarded {c["forwarded_per_s"]:.0f}/s, lost {c["loss_pct"]:.3f}%, '
      f'latency p50 {L["p50"]:.2f} p99 {L["p99"]:.2f} p99.9 {L["p999"]:.2f} ms, '
      f'server {j.get("server_cpu_pct") or 0:.0f}% = {c.get("server_cpu_us_per_forward") or 0:.2f} us/forward, '
      f'loadgen {j.get("loadgen_cpu_pct") or 0:.0f}% errors {j["errors"]}')
PY
    echo "  report $run.json, output $run.json.out, server log $run.log"
    ;;
targets)
    # Issue 7's targets, each from RUNS runs (default 3) and medians:
    # the bare quinn relay (when RELAY_DIR holds the anchor bench), run
    # just before each round's pinned 10,000/s so that each pair sees the
    # same hour of a drifting host, the unpinned ladder, Redis + Postgres
    # pinned at 10,000/s, and idle memory; then one table.
    runs=${RUNS:-3}
    ladder=${LADDER:-10000 14000 18000 20000}
    relay_dir=${RELAY_DIR:-../shared/anchor-bench}
    rows=()
    relay_out=
    if [[ -x $relay_dir/bench.sh && -x $relay_dir/target/release/anchor-bench ]]; then
        relay_out="$(cd "$DIR" && pwd)/relay-$$.jsonl"
        rm -f "$relay_out"
        rows+=(relay 10000 "$relay_out")
    else
        echo "relay: not measured (build the anchor bench in RELAY_DIR=$relay_dir to include it)"
    fi
    for i in $(seq 1 "$runs"); do
        if [[ -n $relay_out ]]; then
            echo "relay 10000, run $i: $relay_dir"
            (cd "$relay_dir" && REPS=1 CONNS=1000 MODES=open:10000 ./bench.sh quinn "$relay_out" >/dev/null 2>&1) || true
        fi
        echo "pinned 10000, run $i:"
        run_embedded 10000 pinned
        rows+=(pinned 10000 "$LAST_REPORT")
        for rate in $ladder; do
            echo "unpinned $rate, run $i:"
            run_embedded "$rate" unpinned
            rows+=(unpinned "$rate" "$LAST_REPORT")
        done
        echo "postgres 10000, run $i:"
        run_postgres 10000
        rows+=(postgres 10000 "$LAST_REPORT")
    done
    echo "idle:"
    run_idle
    rows+=(idle 10000 "${LAST_IDLE:-}")
    echo "table: python3 loadgen/targets.py ${rows[*]}"
    python3 loadgen/targets.py "${rows[@]}"
    ;;
*)
    sed -n '2,37p' "$0" >&2
    exit 2
    ;;
esac
