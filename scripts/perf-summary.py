#!/usr/bin/env python3
"""Summarises scripts/perf-compare.sh output: per label and server, the
median (min..max) of throughput, server CPU per operation, p50/p99 latency,
bytes per instance, Roster's ratio to rnacos (CPU per op, p99) and, where
the transport floor ran (FLOOR=1), the floor's CPU per op against rnacos'."""
import json
import statistics
import sys
from collections import defaultdict

runs = defaultdict(list)
for line in open(sys.argv[1]):
    line = line.strip()
    if line:
        r = json.loads(line)
        runs[(r["label"], r["server"])].append(r)


def fig(rs, f):
    xs = [f(r) for r in rs if f(r) is not None]
    if not xs:
        return None, "n/a"
    m = statistics.median(xs)
    return m, f"{m:,.1f} ({min(xs):,.1f}..{max(xs):,.1f})"


cols = [
    ("ops/s", lambda r: r["throughput_per_s"]),
    ("CPU us/op", lambda r: r.get("server_cpu_us_per_op")),
    ("p50 ms", lambda r: r["latency"]["p50_us"] / 1000),
    ("p99 ms", lambda r: r["latency"]["p99_us"] / 1000),
    ("B/instance", lambda r: r.get("bytes_per_instance")),
    ("errors", lambda r: r["errors"]),
]
print("| shape | server | runs | " + " | ".join(c for c, _ in cols) + " |")
print("|---|---|---|" + "---|" * len(cols))
medians = {}
for (label, server), rs in runs.items():
    cells = []
    for name, f in cols:
        m, text = fig(rs, f)
        medians[(label, server, name)] = m
        cells.append(text)
    print(f"| {label} | {server} | {len(rs)} | " + " | ".join(cells) + " |")
print()
print("| shape | Roster/rnacos CPU per op | Roster/rnacos p99 |")
print("|---|---|---|")
for label in sorted({l for l, _ in runs}):
    a = medians.get((label, "roster", "CPU us/op"))
    b = medians.get((label, "rnacos", "CPU us/op"))
    c = medians.get((label, "roster", "p99 ms"))
    d = medians.get((label, "rnacos", "p99 ms"))
    if a and b:
        print(f"| {label} | {a / b:.2f} | {c / d:.3f} |" if c and d else f"| {label} | {a / b:.2f} | n/a |")

floors = sorted({(l, s) for l, s in runs if s.startswith("floor-")})
if floors:
    print()
    print("| shape | floor | floor CPU per op / rnacos' |")
    print("|---|---|---|")
    for label, server in floors:
        a = medians.get((label, server, "CPU us/op"))
        b = medians.get((label, "rnacos", "CPU us/op"))
        if a and b:
            print(f"| {label} | {server} | {a / b:.2f} |")
