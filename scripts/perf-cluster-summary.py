#!/usr/bin/env python3
"""Summarises scripts/perf-cluster.sh output: per label and server, the
median (min..max) over the runs of each cluster figure the report has."""
import json
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        runs[(r["label"], r["server"])].append(r)


def ms(us):
    return None if us is None else us / 1000


figures = [
    ("ops/s", lambda r: r["throughput_per_s"]),
    ("p50 ms", lambda r: ms(r["latency"]["p50_us"])),
    ("p99 ms", lambda r: ms(r["latency"]["p99_us"])),
    ("push p99 ms", lambda r: ms((r["extra"].get("push_latency") or {}).get("p99_us"))),
    ("lag p50 ms <=", lambda r: r["extra"].get("replication_lag_p50_ms_at_most")),
    ("lag p99 ms <=", lambda r: r["extra"].get("replication_lag_p99_ms_at_most")),
    ("listed everywhere after ms", lambda r: r["extra"].get("listed_everywhere_after_ms")),
    ("ready after ms", lambda r: r["extra"].get("ready_after_ms")),
    ("new node peak RSS MiB", lambda r: (r["extra"].get("new_node_peak_rss_bytes") or 0) / 2**20 or None),
    ("receiving node CPU us/op", lambda r: r.get("server_cpu_us_per_op")),
    ("origin CPU us/op", lambda r: r["extra"].get("origin_cpu_us_per_op")),
    ("repl. bytes/instance sent", lambda r: r["extra"].get("replication_bytes_per_instance")),
    ("repl. bytes/op", lambda r: (r["extra"].get("origin_replication_bytes_sent") or 0) / max(r["operations"], 1) or None),
    ("lost", lambda r: r["extra"].get("lost")),
    ("errors", lambda r: r["errors"]),
]

for (label, server), rs in runs.items():
    print(f"## {label} / {server} ({len(rs)} runs)")
    for name, f in figures:
        xs = []
        for r in rs:
            try:
                x = f(r)
            except (KeyError, TypeError):
                x = None
            if x is not None:
                xs.append(float(x))
        if xs:
            m = statistics.median(xs)
            print(f"- {name}: {m:,.2f} ({min(xs):,.2f}..{max(xs):,.2f})")
    print()
