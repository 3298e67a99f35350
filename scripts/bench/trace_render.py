"""`tensortrace trace` benchmark: one 512-token, 32-layer request with its spans -> terminal timeline,
HTML page, PNG; each as a fresh `tensortrace trace` process (imports included: what a user waits
for) and in one warm process.

    .venv/bin/python scripts/bench/trace_render.py [--repeat 5] [--json trace_render.json]

The request: `resid_pre` x 32 layers + `resid_final`, hidden 2048 bf16, a 257-token prompt and 256
generated tokens (positions 0-511; one prefill record + 255 decode records per (hook, layer):
8,448 records, 69 MB, RAW, as the loader stores them), its SGLang spans (2 request spans,
tokenize, queue, prefill, 255 decode_loop steps) and the bridge's capture/export/kafka spans, in an
embedded chDB path (tensortrace.testing.traces). chDB allows one process per path, so a child
process writes the data and exits before the timed processes open it one after another.
Targets: terminal <= 1 s, HTML <= 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

_BUILD = r"""
import json, sys, clickhouse_connect
from tensortrace.storage.schema import apply_migrations
from tensortrace.testing.traces import TimedRequest, insert_timed
c = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
apply_migrations(c, "tensortrace")
req = TimedRequest.make("bench-512x32", layers=32, hidden=2048, prompt=257, generated=256, step_ms=12.0,
                        slow_step_ms=40.0, queue_ms=35.0, prefill_ms=90.0)
insert_timed(c, "tensortrace", req, otel_database="otel")
print(json.dumps({"trace_id": req.trace_id, "records": len(req.syn.records),
                  "bytes": sum(r.raw_size for r in req.syn.records), "spans": len(req.sglang_spans) + 3}))
"""

_WARM = r"""
import json, sys, time, io, contextlib
from tensortrace.query.trace import main
dsn, tid, out, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
res = {}
for name, extra in (("terminal", []), ("html", ["--html", out + ".html"]), ("png", ["--png", out + ".png"])):
    times = []
    for _ in range(repeat):
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            rc = main([tid, "--clickhouse", dsn] + extra)
        times.append(time.perf_counter() - t0)
        assert rc == 0, name
    res[name] = times
print(json.dumps(res))
"""


def run_cli(dsn: str, tid: str, extra: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([PY, "-m", "tensortrace.cli", "trace", tid, "--clickhouse", dsn, *extra],
                       capture_output=True, text=True, timeout=120)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"tensortrace trace failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=".cache/bench/trace_render.json")
    ap.add_argument("--workdir", help="keep the chDB path and the outputs here")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tt-trace-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return measure(args, work)
    finally:
        if not args.workdir:   # the chDB path and the outputs (~70 MB) go; --workdir keeps them
            shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> int:
    path = work / "chdb"
    dsn = f"chdb://{path}"
    t0 = time.perf_counter()
    r = subprocess.run([PY, "-c", _BUILD, str(path)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"building the data failed: {r.stderr[-3000:]}")
    data = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"data: {data['records']} records, {data['bytes'] / 1e6:.1f} MB, {data['spans']} spans "
          f"(built in {time.perf_counter() - t0:.1f} s); trace {data['trace_id']}", flush=True)
    tid = data["trace_id"]

    cold: dict[str, list[float]] = {"terminal": [], "html": [], "png": []}
    for _ in range(args.repeat):
        cold["terminal"].append(run_cli(dsn, tid, []))
        cold["html"].append(run_cli(dsn, tid, ["--html", str(work / "trace.html")]))
        cold["png"].append(run_cli(dsn, tid, ["--png", str(work / "trace.png")]))
    r = subprocess.run([PY, "-c", _WARM, dsn, tid, str(work / "warm"), str(args.repeat)], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"warm run failed: {r.stderr[-3000:]}")
    warm = json.loads(r.stdout.strip().splitlines()[-1])

    targets = {"terminal": 1.0, "html": 3.0, "png": None}
    result = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "data": data, "repeat": args.repeat,
              "cold_process_s": cold, "warm_in_process_s": warm, "targets_s": targets,
              "html_bytes": (work / "trace.html").stat().st_size, "png_bytes": (work / "trace.png").stat().st_size}
    print(f"\n{'output':<10}{'new process, median (min)':>28}{'warm, median (min)':>22}{'target':>10}{'met':>6}")
    for name in ("terminal", "html", "png"):
        c, w = cold[name], warm[name]
        target = targets[name]
        met = "" if target is None else ("yes" if statistics.median(c) <= target else "no")
        print(f"{name:<10}{statistics.median(c):>18.2f} s ({min(c):.2f}){statistics.median(w):>14.2f} s ({min(w):.2f})"
              f"{(f'<= {target:g} s' if target else '-'):>10}{met:>6}")
    print(f"load average {os.getloadavg()[0]:.2f}; html {result['html_bytes'] / 1e3:.0f} kB, png {result['png_bytes'] / 1e3:.0f} kB")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}" + (f" (outputs in {work})" if args.workdir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
