#!/usr/bin/env python3
"""Summarises the raw results of bench/run.sh: medians per path and load, with Detour's ratios
against the floor (a bare hyper hop, bench/floor) and the HAProxy and nginx chains, as one Markdown table; then the checks (keep-alive, errors,
runs that started on a busy machine).

    bench/table.py RAW.tsv
"""
import csv
import statistics
import sys


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def median(rows, key):
    vals = [num(r.get(key)) for r in rows]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def main(path):
    with open(path) as f:
        every = list(csv.DictReader(f, delimiter="\t"))
    # "rest" lines are resident sets read once after all the runs, not runs.
    rows = [r for r in every if r["load"] != "rest"]
    rest = [r for r in every if r["load"] == "rest"]
    paths = []
    for r in rows:
        if r["path"] not in paths:
            paths.append(r["path"])
    loads = []
    for r in rows:
        if r["load"] not in loads:
            loads.append(r["load"])

    def runs(p, load):
        return [r for r in rows if r["path"] == p and r["load"] == load]

    def cpu_total(r):
        parts = [num(r[k]) for k in ("cpu_hop1_us", "cpu_hop2_us", "cpu_backend_us")]
        return sum(v for v in parts if v is not None) if parts[2] is not None else None

    def cpu_hop(r):
        parts = [num(r[k]) for k in ("cpu_hop1_us", "cpu_hop2_us")]
        return sum(parts) / 2 if None not in parts else None

    for r in rows:
        r["cpu_total"] = cpu_total(r)
        r["cpu_hop"] = cpu_hop(r)

    # (label, load, key, lower is better, format)
    figures = [("max throughput, closed loop, req/s (wrk)", "max", "req_per_s", False, "{:.0f}")]
    figures += [
        ("CPU µs/request, both hops + backend, at max", "max", "cpu_total", True, "{:.1f}"),
        ("CPU µs/request per hop, at max", "max", "cpu_hop", True, "{:.1f}"),
        ("machine CPU idle during the max run, %", "max", "idle_pct", True, "{:.0f}"),
    ]
    for load in loads:
        if load == "max":
            continue
        figures += [
            (f"CPU µs/request, both hops + backend, @{load}/s", load, "cpu_total", True, "{:.1f}"),
            (f"CPU µs/request per hop, @{load}/s", load, "cpu_hop", True, "{:.1f}"),
            (f"@{load}/s open loop (oha, corrected): p50 µs", load, "p50_us", True, "{:.0f}"),
            (f"@{load}/s: p99 µs", load, "p99_us", True, "{:.0f}"),
        ]
    figures += [
        ("RSS per hop after the load, KiB (hop 1 / hop 2)", None, "rss", True, None),
    ]
    if rest:
        figures += [("RSS per hop at rest, 11 s after the last run, KiB", None, "rest", True, None)]

    ratio_to = [p for p in ("floor", "haproxy", "nginx") if p in paths]
    subjects = [p for p in paths if p.startswith("detour")]
    head = ["figure (median)"] + paths + [f"{d} / {p}" for d in subjects for p in ratio_to]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, load, key, _lower, fmt in figures:
        cells = [label]
        meds = {}
        for p in paths:
            if key in ("rss", "rest"):
                pool = rows if key == "rss" else rest
                last = [r for r in pool if r["path"] == p and num(r["rss_hop1_kib"]) is not None]
                if not last:
                    cells.append("–")
                    continue
                a = median(last, "rss_hop1_kib")
                b = median(last, "rss_hop2_kib")
                meds[p] = (a + b) / 2
                cells.append(f"{a:.0f} / {b:.0f}")
                continue
            m = median(runs(p, load), key)
            meds[p] = m
            cells.append("–" if m is None else fmt.format(m))
        for d in subjects:
            for q in ratio_to:
                a, b = meds.get(d), meds.get(q)
                cells.append(f"{a / b:.2f}" if a and b else "–")
        print("| " + " | ".join(cells) + " |")

    print()
    total_runs = len(rows)
    busy = [r for r in rows if r["quiet"] != "yes"]
    errors = [r for r in rows if (num(r["errors"]) or 0) > 0]
    print(f"runs: {total_runs}; started on a busy machine: {len(busy)}; with errors: {len(errors)}")
    for r in errors:
        print(f"  errors: round {r['round']} {r['path']} {r['load']}: {r['errors']}")
    bad = False
    for r in rows:
        n = (num(r["req_per_s"]) or 0)
        acc = num(r["conns_backend"]) or 0
        # A keep-alive chain opens a handful of connections per run, not one per request.
        if r["path"] != "direct" and n > 0 and acc > max(100, n * 0.01):
            bad = True
            print(f"  keep-alive: round {r['round']} {r['path']} {r['load']}: backend accepted {acc:.0f} connections")
        c2 = num(r["conns_hop2"])
        if c2 is not None and c2 > max(200, n * 0.05):
            bad = True
            print(f"  keep-alive: round {r['round']} {r['path']} {r['load']}: {c2:.0f} sockets to hop 2")
    print("keep-alive: " + ("FAILED" if bad else "every hop reused its connections"))


if __name__ == "__main__":
    main(sys.argv[1])
