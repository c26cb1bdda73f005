"""Issue 7's targets from a `bench.sh targets` session: one table, medians.

Arguments come in triples, KIND RATE PATH:
  relay    10000 JSONL   the anchor bench's quinn relay (one line per run)
  pinned   10000 REPORT  chat-loadgen --json, embedded store, pinned
  unpinned RATE  REPORT  the same, both processes sharing the cores
  postgres 10000 REPORT  Redis + Postgres, server pinned
  idle     10000 BYTES   server RSS growth per idle connection ("" if failed)
Each REPORT may have REPORT.metrics beside it (the server's scrape).
"""

import json
import re
import statistics
import sys


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ack_tail(path):
    """The server's own SendAck tail from a scrape of its metrics: the
    sends it counted and the shares over 10 and 25 ms (None without one).
    bench.sh's run summaries use it too."""
    try:
        text = open(path).read()
    except OSError:
        return None
    buckets = dict(re.findall(
        r'^chat_send_ack_duration_seconds_bucket\{le="([^"]+)"\} (\d+)', text, re.M))
    total = int(buckets.get("+Inf", 0))
    if not total or "0.01" not in buckets or "0.025" not in buckets:
        return None
    return {"sends": total,
            "over10": 100 * (total - int(buckets["0.01"])) / total,
            "over25": 100 * (total - int(buckets["0.025"])) / total}


def ack_over_10ms(report):
    """Share of SendAcks over 10 ms in the scrape beside a report."""
    tail = ack_tail(report + ".metrics")
    return tail and tail["over10"]


def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def fmt(x, spec=".1f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def main(args):
    groups = {}
    for kind, rate, path in zip(args[::3], args[1::3], args[2::3]):
        groups.setdefault((kind, int(rate)), []).append(path)

    relay = None
    relay_runs = []
    for path in groups.get(("relay", 10000), []):
        try:
            lines = [json.loads(line) for line in open(path) if line.strip()]
        except (OSError, ValueError):
            continue
        relay_runs = [1e4 * r["server_cpu_pct"] / r["msgs_per_s"] for r in lines if r.get("msgs_per_s")]
        relay = median(relay_runs)

    rows = []

    def runs(kind, rate):
        reports = [load(p) for p in groups.get((kind, rate), [])]
        paths = groups.get((kind, rate), [])
        return [(r, p) for r, p in zip(reports, paths) if r is not None]

    pinned = runs("pinned", 10000)
    if pinned:
        n = len(pinned)
        lost = sum(r["lost"] for r, _ in pinned)
        dup = sum(r["duplicates"] for r, _ in pinned)
        ack = median(r["latency_ms"]["ack"]["p99"] for r, _ in pinned)
        deliver = median(r["latency_ms"]["deliver"]["p99"] for r, _ in pinned)
        cpu = median(r.get("server_cpu_us_per_send") for r, _ in pinned)
        tail = median(ack_over_10ms(p) for _, p in pinned)
        rows.append(("pinned 10,000/s: lost, duplicates", "0, 0", f"{lost}, {dup} ({n} run{'' if n == 1 else 's'})",
                     lost == 0 and dup == 0))
        rows.append(("pinned 10,000/s: p99 ack, deliver", "<= 10 ms",
                     f"{fmt(ack)} / {fmt(deliver)} ms (server: {fmt(tail, '.1f', '%')} of acks over 10 ms)",
                     ack is not None and deliver is not None and ack <= 10 and deliver <= 10))
        if relay is not None and cpu is not None:
            # bench.sh runs the relay just before each pinned run: each
            # pair's ratio is from one hour of the host.
            paired = ""
            ours = [r.get("server_cpu_us_per_send") for r, _ in pinned]
            if len(relay_runs) == len(ours) and None not in ours:
                ratios = ", ".join(f"{o / r:.2f}" for o, r in zip(ours, relay_runs))
                paired = f"; run by run {ratios}"
            rows.append(("pinned 10,000/s: server CPU per send", f"<= 2x relay ({2 * relay:.1f} us)",
                         f"{cpu:.1f} us ({cpu / relay:.2f}x the relay's {relay:.1f}{paired})", cpu <= 2 * relay))
        else:
            rows.append(("pinned 10,000/s: server CPU per send", "<= 2x relay",
                         f"{fmt(cpu)} us (relay not measured)", None))

    ladder = sorted(rate for kind, rate in groups if kind == "unpinned")
    best = None
    cells = []
    for rate in ladder:
        rs = runs("unpinned", rate)
        if not rs:
            continue
        # Against what the schedule actually drew in the window (a Poisson
        # draw off the nominal rate by a few tenths of a percent).
        shares = [100 * r["acked_per_s"] * r["duration_s"] / r["sent"] for r, _ in rs]
        p99s = [r["latency_ms"]["deliver"]["p99"] for r, _ in rs]
        # Both terms in one run: medians taken apart could pass a rate
        # that no run carried. A rate holds when most of its runs did.
        within = sum(1 for a, d in zip(shares, p99s) if a >= 99 and d <= 100)
        ok = 2 * within > len(rs)
        if ok:
            best = rate
        cells.append(f"{rate}: {median(shares):.1f}% at p99 {median(p99s):.0f} ms, "
                     f"{within} of {len(rs)} runs within")
    if cells:
        rows.append(("unpinned: highest rate with achieved >= 99 % and p99 deliver <= 100 ms",
                     ">= 20,000/s", f"{best or 'none'} ({'; '.join(cells)})",
                     best is not None and best >= 20000))

    pg = runs("postgres", 10000)
    if pg:
        lost = sum(r["lost"] for r, _ in pg)
        deliver = median(r["latency_ms"]["deliver"]["p99"] for r, _ in pg)
        server = median(r.get("server_cpu_us_per_send") for r, _ in pg)
        backends = {}
        for r, _ in pg:
            for name, b in r.get("backend_cpu", {}).items():
                backends.setdefault(name, []).append(b.get("cpu_us_per_send"))
        cpu = ", ".join(f"{name} {fmt(median(v))} us" for name, v in sorted(backends.items()))
        rows.append(("Redis + Postgres 10,000/s: lost, p99 deliver", "0, <= 25 ms",
                     f"{lost}, {fmt(deliver)} ms (server {fmt(server)} us/send; {cpu})",
                     lost == 0 and deliver is not None and deliver <= 25))

    for path in groups.get(("idle", 10000), []):
        per_conn = int(path) if path.strip() else None
        rows.append(("idle memory per connection at 10,000", "<= 40 KB (40,960 B)",
                     f"{fmt(per_conn, ',d')} B", per_conn is not None and per_conn <= 40960))

    print()
    print("| target | wanted | measured (medians) | met |")
    print("| --- | --- | --- | --- |")
    for name, wanted, measured, met in rows:
        verdict = "n/a" if met is None else ("yes" if met else "no")
        print(f"| {name} | {wanted} | {measured} | {verdict} |")


if __name__ == "__main__":
    main(sys.argv[1:])
