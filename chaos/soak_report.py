#!/usr/bin/env python3
"""The soak's report (chaos/soak.sh, docs/availability.md): reads a soak's run directory and
prints the tables, every failure, and the RESULT line; exits 1 when an idempotent request
failed or a long stream was lost.

    python3 chaos/soak_report.py RUN_DIR

RUN_DIR is the soak's temporary directory (kept with KEEP_TMP=1): its load outputs, faults.log,
the watchdogs' logs, and soak.start and seed, which chaos/soak.sh writes.
"""
import datetime, glob, math, os, sys

if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(2)
tmp = sys.argv[1]
try:
    start = int(open(f"{tmp}/soak.start").read().strip())
    seed = open(f"{tmp}/seed").read().strip()
except (OSError, ValueError) as e:
    sys.exit(f"soak_report: {tmp} is not a soak's run directory ({e})")
def fields(line):
    return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
def read(phase):
    out = {"sent": 0, "ok": 0, "failed": 0, "failed_idem": 0, "unknown": 0, "replayed": 0, "p50": 0.0, "p99": 0.0,
           "p999": 0.0, "max": 0.0, "max_idem": 0.0, "gap": 0, "failed_list": [], "seconds": [], "mesh": 0, "off": 0,
           "grpc": 0, "grpc_failed": 0, "streams": 0, "streams_failed": 0, "stream_max": 0.0,
           "late": 0, "callers": {}, "slow_list": []}
    for h in ["h1", "hc"]:
        try:
            lines = open(f"{tmp}/{phase}-{h}.out").read().splitlines()
        except OSError:
            continue
        t0 = None
        for l in lines:
            if l.startswith("load:"):
                f = fields(l)
                for k in ["sent", "ok", "failed"]:
                    out[k] += int(f[k])
                for k, n in [("p50", "p50_ms"), ("p99", "p99_ms"), ("p999", "p999_ms"), ("max", "max_ms")]:
                    out[k] = max(out[k], float(f[n]))
                out["late"] += int(f.get("late_starts", 0))
                c = out["callers"].setdefault(h, {})
                c.update(p50=float(f["p50_ms"]), p99=float(f["p99_ms"]), late=f.get("late_starts", "-"),
                         sent=int(f["sent"]))
            elif l.startswith("paths:"):
                f = fields(l)
                out["failed_idem"] += int(f.get("failed_idempotent", 0))
                out["unknown"] += int(f.get("unknown_outcome", 0))
                out["replayed"] += int(f.get("replayed", 0))
                out["mesh"] += int(f.get("mesh", 0))
                out["off"] += int(f.get("ca_direct", 0)) + int(f.get("direct", 0))
            elif l.startswith("kinds:"):
                f = fields(l)
                for k in ["grpc", "grpc_failed", "streams", "streams_failed"]:
                    out[k] += int(f[k])
                out["stream_max"] = max(out["stream_max"], float(f["stream_max_ms"]))
                out["callers"].setdefault(h, {})["streams"] = int(f["streams"])
            elif l.startswith("latency:"):
                f = fields(l)
                out["max_idem"] = max(out["max_idem"], float(f["max_idem_ms"]))
                out["callers"].setdefault(h, {})["lag"] = f.get("p99_start_lag_ms", "-")
            elif l.startswith("mesh_gap:"):
                f = fields(l)
                if f["from_unix_ms"] != "-":
                    out["gap"] = max(out["gap"], int(f["to_unix_ms"]) - int(f["from_unix_ms"]))
            elif l.startswith("failed:"):
                f = fields(l); f["caller"] = h
                out["failed_list"].append(f)
            elif l.startswith("slow:"):
                f = fields(l); f["caller"] = h
                out["slow_list"].append(f)
            elif l.startswith("t="):
                s = int(l.split("s:", 1)[0][2:])
                out["seconds"].append((s, float(fields("x " + l.split(":", 1)[1])["max_ms"])))
    return out
base, soak = read("baseline"), read("soak")
faults, open_ = [], {}
for l in open(f"{tmp}/faults.log"):
    ms, what, kind, target = l.split()
    if what == "start":
        open_[(kind, target)] = int(ms)
    else:
        faults.append((kind, target, open_.pop((kind, target), int(ms)), int(ms)))
for (kind, target), s in open_.items():
    faults.append((kind, target, s, s))
scheduled = len(faults)
# The watchdogs' own kills of a sidecar, from their logs: one found hung (a SIGSTOP past the
# probes' detection), one that did not exit after handing off. Each is a kill -9 of a process
# carrying streams, like the schedule's, and is listed as a fault kind of its own.
WATCHDOG_KILLS = {
    "the sidecar is hung: killing it": "watchdog_kill9_hung",
    "the old sidecar did not exit after the hand-off: killing it": "watchdog_kill9_handoff",
}
for path in sorted(glob.glob(f"{tmp}/*/watchdog.log")):
    host = os.path.basename(os.path.dirname(path))
    with open(path, errors="replace") as log:
        for l in log:
            kind = next((k for m, k in WATCHDOG_KILLS.items() if m in l), None)
            if kind is None:
                continue
            try:
                at = datetime.datetime.fromisoformat(l.split()[0].replace("Z", "+00:00"))
            except (IndexError, ValueError):
                continue
            ms = int(at.timestamp() * 1000)
            if ms >= start:
                faults.append((kind, host, ms, ms))
TAIL = 5000  # a fault's effects are counted until 5 s after it ended
def active(due, end=None):
    # The faults of a request's life: begun before it ended, not over 5 s before it was due.
    end = due if end is None else end
    return [f"{k}:{t}" for k, t, s, e in faults if s <= end and due <= e + TAIL]
kinds = {}
for k, t, s, e in faults:
    d = kinds.setdefault(k, {"count": 0, "failed": 0, "slow": 0, "tail": 0.0})
    d["count"] += 1
    for sec, mx in soak["seconds"]:
        at = start + sec * 1000
        if s <= at <= e + TAIL + 1000:
            d["tail"] = max(d["tail"], mx)
for f in soak["failed_list"]:
    due = int(f["due_unix_ms"])
    for k, t, s, e in faults:
        if s <= due <= e + TAIL:
            kinds[k]["failed"] += 1
# The requests over the p99 target (chaos/soak.sh lists them: slow_ms, twice the baseline's
# p99), by the faults of their life; one with none is slow on a quiet mesh.
SLOW_LISTED_MAX = 100_000
try:
    slow_ms = float(open(f"{tmp}/slow_ms").read().strip())
except (OSError, ValueError):
    slow_ms = None
slow_quiet, slow_paths = 0, {}
for f in soak["slow_list"]:
    due = int(f["due_unix_ms"])
    end = due + int(f["latency_us"]) // 1000
    act = {k for k, t, s, e in faults if s <= end and due <= e + TAIL}
    for k in act:
        kinds[k]["slow"] += 1
    slow_quiet += not act
    slow_paths[f["path"]] = slow_paths.get(f["path"], 0) + 1
# A long stream is cut when a process carrying it dies: a kill -9 (by the schedule or by a
# watchdog) of its caller's own sidecar, of a provider host's sidecar or of a provider, that
# began while it was in flight. Any other stream failure is a loss.
CUTTERS = {"sidecar_kill9", "provider_kill9", "legacy_provider_kill9", "watchdog_kill9_hung", "watchdog_kill9_handoff"}
CALLERS = {"h1", "hc"}
def explained(f):
    due, end = int(f["due_unix_ms"]), int(f["ended_unix_ms"])
    # 300 ms: from the logged start to the signal (a pkill scans the processes first).
    return any(k in CUTTERS and (t == f["caller"] or t not in CALLERS) and due - 300 <= s <= end
               for k, t, s, e in faults)
def stream_losses(r):
    return sum(1 for f in r["failed_list"] if f["method"] == "Stream" and not explained(f))
streams_lost = stream_losses(soak) + stream_losses(base)
sent, failed = soak["sent"], soak["failed"]
lpm = failed / sent * 1e6 if sent else 0.0
nines = f"{-math.log10(failed / sent):.2f}" if failed and sent else (f">={math.log10(sent):.2f}" if sent else "-")
ratio = soak["p99"] / base["p99"] if base["p99"] else 0.0
print(f"{'phase':<10}{'sent':>9}{'ok':>9}{'failed':>8}{'idem':>6}{'unknown':>8}{'p50_ms':>9}{'p99_ms':>9}{'p999_ms':>9}{'max_ms':>9}{'max_idem_ms':>12}")
for name, r in [("baseline", base), ("soak", soak)]:
    print(f"{name:<10}{r['sent']:>9}{r['ok']:>9}{r['failed']:>8}{r['failed_idem']:>6}{r['unknown']:>8}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['p999']:>9.2f}{r['max']:>9.2f}{r['max_idem']:>12.2f}")
# Each caller's own figures: the table above takes the slower caller's quantiles; late_starts
# are requests its load generator started over 5 ms after they were due (timed from when due).
print(f"\n{'phase':<10}{'caller':<8}{'p50_ms':>9}{'p99_ms':>9}{'late_starts':>13}{'p99_start_lag_ms':>18}")
for name, r in [("baseline", base), ("soak", soak)]:
    for h, c in sorted(r["callers"].items()):
        print(f"{name:<10}{h:<8}{c.get('p50', 0):>9.2f}{c.get('p99', 0):>9.2f}{c.get('late', '-'):>13}{c.get('lag', '-'):>18}")
# slow: requests over the p99 target while the fault was on or had ended under 5 s before (a
# request under overlapping faults counts for each).
print(f"\n{'fault':<24}{'count':>6}{'failed':>8}{'slow':>8}{'longest_tail_ms':>17}")
for k in sorted(kinds):
    d = kinds[k]
    print(f"{k:<24}{d['count']:>6}{d['failed']:>8}{d['slow']:>8}{d['tail']:>17.1f}")
if slow_ms is not None:
    # The target holds while fewer than 1% of each caller's requests (long streams apart) are
    # over it.
    print(f"\nrequests over the p99 target ({slow_ms:.2f} ms, twice the baseline's p99), long streams apart:")
    for h, c in sorted(soak["callers"].items()):
        n = sum(1 for f in soak["slow_list"] if f["caller"] == h)
        timed = c.get("sent", 0) - c.get("streams", 0)
        pct = 100 * n / timed if timed else 0.0
        # A generator lists 100,000 at most (detourctl load --list-slow-ms): a full list is a
        # lower bound.
        least = "at least " if n >= SLOW_LISTED_MAX else ""
        print(f"  {h}: {least}{n} of {timed} ({least}{pct:.2f}%; the target needs under 1%)")
    paths = " ".join(f"{p}={n}" for p, n in sorted(slow_paths.items())) or "-"
    print(f"  by the path that answered: {paths}; with no fault on nor ended under 5 s before: {slow_quiet}")
if soak["failed_list"]:
    print("\nfailed requests (due, caller, method, kind, faults active):")
    # The first 200, and after them every stream failure no kill -9 explains (the losses).
    for i, f in enumerate(soak["failed_list"]):
        unexplained = f["method"] == "Stream" and not explained(f)
        if i >= 200 and not unexplained:
            continue
        lost = " (a stream no kill -9 explains)" if unexplained else ""
        print(f"  {int(f['due_unix_ms']) - start:>8} ms  {f['caller']}  {f['method']:<6} {f['kind']:<24} {' '.join(active(int(f['due_unix_ms']), int(f['ended_unix_ms']))) or '-'}{lost}")
print(f"\ngRPC calls: {soak['grpc']} ({soak['grpc_failed']} failed); long streams: {soak['streams']} ({soak['streams_failed']} failed, "
      f"{soak['streams_failed'] - stream_losses(soak)} of them cut by a kill -9 of a process carrying them; longest {soak['stream_max']:.0f} ms)")
print(f"\nRESULT soak: seed={seed} sent={sent} ok={soak['ok']} failed={failed} failed_idempotent={soak['failed_idem']} "
      f"unknown_outcome={soak['unknown']} replayed={soak['replayed']} lost_per_million={lpm:.2f} nines={nines} p50_ms={soak['p50']:.2f} "
      f"p99_ms={soak['p99']:.2f} p999_ms={soak['p999']:.2f} max_ms={soak['max']:.2f} max_idem_ms={soak['max_idem']:.2f} baseline_p99_ms={base['p99']:.2f} "
      f"p99_ratio={ratio:.2f} worst_off_mesh_ms={soak['gap']} faults={scheduled} off_mesh={soak['off']} "
      f"grpc={soak['grpc']} grpc_failed={soak['grpc_failed']} streams={soak['streams']} streams_failed={soak['streams_failed']} "
      f"streams_lost={streams_lost} stream_max_ms={soak['stream_max']:.0f} late_starts={soak['late']} "
      f"over_p99_target={len(soak['slow_list']) if slow_ms is not None else '-'}")
sys.exit(1 if soak["failed_idem"] or base["failed_idem"] or streams_lost or sent == 0 else 0)
