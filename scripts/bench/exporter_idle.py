"""The exporter's own CPU when idle and under light traffic, and its delivery latency after an idle
spell: a fixed 5 ms poll (`--idle-poll-max-s 0.005`, the exporter before session 15) and the
adaptive wait (the default, ExporterConfig.next_wait: a wait that brought frames halves the next,
one that brought none doubles it, within [5 ms, 50 ms]), side by side in one run.

Two real exporter processes (`tensortrace exporter`), one ring each, one real local Kafka broker
(tensortrace.devkafka.LocalKafka unless --bootstrap), both running at once, so every phase measures
both under the same load:

  idle     no frames: each process's CPU time (every thread's, ns from schedstat) over wall time, and
           its main-loop passes a second (tensortrace_exporter_main_loop_passes_total)
  traffic  a step every --step-ms (one STEP + 4 SLAB frames of 8 requests, 2 KiB rows) into both
           rings from one writer thread, the rate of a CPU decode step: CPU and passes per step, and
           each step's delivery latency (written -> its first record at a Kafka consumer)
  latency  after `--idle-s` of silence, one step (+ its requests' summaries) into one ring, and the
           time until a Kafka consumer of that exporter's topic holds the first record of the step's
           requests (keyed by request id: a late message of an earlier trial does not count):
           ring write -> exporter pass -> Kafka -> consumer (both exporters, alternating)

    .venv/bin/python scripts/bench/exporter_idle.py [--windows 6] [--window-s 5] [--trials 12] \
        [--json .cache/bench/exporter_idle.json]

Prints a table; JSON (default .cache/bench/exporter_idle.json). Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from statistics import median

from _stats import median_ci, task_cpu_ns

VARIANTS = {"fixed 5 ms": ["--idle-poll-max-s", "0.005"], "adaptive": []}


def _passes(exp) -> dict:
    m = exp.metrics("tensortrace_exporter_main_loop_passes_total")
    return {r: m.get(f'tensortrace_exporter_main_loop_passes_total{{result="{r}"}}', 0.0) for r in ("work", "empty")}


def _window(exporters, seconds: float, steps=lambda: 0) -> dict:
    """CPU share (every thread's, in ns from schedstat: /proc/<pid>/stat counts 10 ms ticks, 0.2% of
    a 5 s window), passes/s and steps/s of each exporter over `seconds`, all over the same window."""
    c0 = {n: task_cpu_ns(e.proc.pid) for n, e in exporters.items()}
    p0 = {n: _passes(e) for n, e in exporters.items()}
    s0, t0 = steps(), time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    done = steps() - s0
    out = {}
    for n, e in exporters.items():
        p1 = _passes(e)
        out[n] = {"cpu_share": (task_cpu_ns(e.proc.pid) - c0[n]) / 1e9 / wall,
                  "passes_per_s": sum(p1[k] - p0[n][k] for k in p1) / wall,
                  "empty_passes_per_s": (p1["empty"] - p0[n]["empty"]) / wall,
                  "steps_per_s": done / wall}
    return out


def _consumer(bootstrap: str, topic: str):
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=1,
                      max_partition_fetch_bytes=4 << 20)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_end(tp)
    c.position(tp)
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap", help="Kafka bootstrap servers (default: start a local broker)")
    ap.add_argument("--windows", type=int, default=6, help="idle and traffic windows per phase")
    ap.add_argument("--window-s", type=float, default=5.0)
    ap.add_argument("--step-ms", type=float, default=15.0, help="traffic: one step this often (a CPU decode step)")
    ap.add_argument("--trials", type=int, default=12, help="latency trials per exporter")
    ap.add_argument("--idle-s", type=float, default=1.0, help="silence before each latency trial")
    ap.add_argument("--json", default=".cache/bench/exporter_idle.json")
    a = ap.parse_args(argv)

    from tensortrace.devstack.processes import ExporterProcess
    from tensortrace.ring.format import RingIdentity, RingWriter
    from tensortrace.testing.ringgen import TrafficGen
    from tensortrace.v1 import records_pb2 as pb
    from tensortrace.wire import codec

    broker = None
    if not a.bootstrap:
        from tensortrace.devkafka import LocalKafka
        broker = LocalKafka().start()
        a.bootstrap = broker.bootstrap
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = tempfile.mkdtemp(prefix="tt-exporter-idle-", dir=base)
    exporters, writers, gens, consumers = {}, {}, {}, {}
    stop = threading.Event()
    threads, errors = [], []
    try:
        for i, (name, extra) in enumerate(VARIANTS.items()):
            d = os.path.join(work, f"rings{i}")
            os.makedirs(d, mode=0o700)
            wd = os.path.join(work, f"exp{i}")
            os.makedirs(wd)
            topic = f"tt-idle-bench-{os.getpid()}-{i}"
            writers[name] = RingWriter.create(os.path.join(d, "pod-b-r0.ring"), 64 << 20, RingIdentity(pod="pod-b"))
            gens[name] = TrafficGen(writers[name], n_requests=8, prefix=f"b{i}", hooks=("resid_pre",) * 4,
                                    row_shape=(512,), dtype=pb.FLOAT32)
            # the production scan interval (ExporterProcess lists the directory every 0.1 s for tests)
            exporters[name] = ExporterProcess(d, a.bootstrap, topic, wd, ["--partitions", "1", "--scan-interval-s", "0.5",
                                                                         *extra])
            exporters[name].start()   # (registered first: stopped in `finally` even if its start fails)
        for name, e in exporters.items():
            e.wait_for(lambda e=e: e.ring("pod-b-r0.ring") and e.http("/readyz")[0] == 200, what=f"{name} ready")
        # topics exist once the exporters are ready: open the latency consumers now
        for name, e in exporters.items():
            consumers[name] = _consumer(a.bootstrap, e.topic)
        time.sleep(1.0)

        res = {"config": vars(a), "load_average_at_start": os.getloadavg(), "idle": [], "traffic": [], "latency_s": {}}
        for _ in range(a.windows):
            res["idle"].append(_window(exporters, a.window_s))

        steps = [0]
        written = {name: {} for name in gens}   # step number -> when it was written
        seen = {name: {} for name in gens}      # step number -> when its first record reached the consumer

        def write_steps():
            nxt = time.monotonic()
            while not stop.is_set():
                for name, g in gens.items():
                    written[name][g._step] = time.monotonic()
                    g.step()
                steps[0] += 1
                if steps[0] % 64 == 0:   # requests finish (summaries) and new ones start
                    for g in gens.values():
                        g.finish()
                        g.prefix += "x"
                        g._pos.clear()
                nxt += a.step_ms / 1000
                time.sleep(max(0.0, nxt - time.monotonic()))
        def watch(name):   # the traffic's delivery latency: step written -> its first record consumed
            c = consumers[name]
            while not stop.is_set():
                for batch in c.poll(timeout_ms=5).values():
                    now = time.monotonic()
                    for m in batch:
                        for r in codec.decode_envelope(m.value):
                            if not r.HasField("summary"):
                                seen[name].setdefault(r.tensor.step, now)

        def guarded(fn, *args):   # a thread's failure is reported, not lost
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{fn.__name__}{args}: {type(e).__name__}: {e}")
                stop.set()
        threads.extend(threading.Thread(target=guarded, args=(watch, n), daemon=True) for n in gens)
        threads.append(threading.Thread(target=guarded, args=(write_steps,), daemon=True))
        for t in threads:
            t.start()
        time.sleep(1.0)
        for _ in range(a.windows):
            res["traffic"].append(_window(exporters, a.window_s, steps=lambda: steps[0]))
        time.sleep(0.5)   # the last steps' records
        stop.set()
        for t in threads:
            t.join(timeout=10)
        if errors:
            raise RuntimeError("traffic phase: " + "; ".join(errors))
        res["traffic_latency_s"] = {n: sorted(seen[n][k] - written[n][k] for k in seen[n] if k in written[n])
                                    for n in gens}
        for g in gens.values():
            g.finish()

        for c in consumers.values():   # drain what the traffic phase left
            c.poll(timeout_ms=2000)
        for trial in range(-1, a.trials):   # trial -1 warms each consumer's fetch path up (~0.3 s), not counted
            for name in (list(VARIANTS) if trial % 2 == 0 else list(VARIANTS)[::-1]):
                c = consumers[name]
                time.sleep(a.idle_s)
                g = gens[name]
                g.prefix = f"lat{trial + 1}-{name[:1]}"
                g._pos.clear()
                t0 = time.monotonic()
                g.step()
                g.finish()
                got, mine = False, g.prefix.encode()
                while not got and time.monotonic() - t0 < 10:   # this trial's records (keys: its request ids)
                    got = any(m.key and m.key.startswith(mine) for batch in c.poll(timeout_ms=1).values() for m in batch)
                if trial >= 0:
                    res["latency_s"].setdefault(name, []).append(time.monotonic() - t0 if got else float("inf"))
        _report(res)
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        res["command"] = " ".join([os.path.relpath(sys.executable), *sys.argv])
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"JSON: {a.json}")
    finally:
        stop.set()   # the traffic threads first: they use the consumers and rings closed below
        for t in threads:
            t.join(timeout=10)
        for what in (*consumers.values(), *exporters.values(), *writers.values()):
            try:   # each on its own: one failure must not leave the rest running or in /dev/shm
                what.close() if hasattr(what, "close") else what.stop()
            except Exception as e:  # noqa: BLE001
                print(f"cleanup: {what!r}: {type(e).__name__}: {e}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        if broker is not None:
            broker.stop()
    return 0


def _report(res) -> None:
    def col(phase, name, key):
        vals = [w[name][key] for w in res[phase]]
        return (median(vals), *median_ci(vals))

    print(f"{'exporter':<12} {'idle cpu':>18} {'idle passes/s':>14} {'traffic cpu':>18} {'passes/step':>12} "
          f"{'traffic latency p50, p99':>25} {'latency after idle (median, max)':>34}")
    res["summary"] = {}
    for name in VARIANTS:
        ic = col("idle", name, "cpu_share")
        ip = col("idle", name, "passes_per_s")
        tc = col("traffic", name, "cpu_share")
        pps = median(w[name]["passes_per_s"] / max(1e-9, w[name]["steps_per_s"]) for w in res["traffic"])
        lat = res["latency_s"][name]
        tl = res["traffic_latency_s"][name] or [float("nan")]
        p50, p99 = tl[len(tl) // 2], tl[min(len(tl) - 1, int(0.99 * len(tl)))]
        res["summary"][name] = {"idle_cpu_share": ic, "idle_passes_per_s": ip, "traffic_cpu_share": tc,
                                "traffic_passes_per_step": pps, "traffic_latency_p50_s": p50,
                                "traffic_latency_p99_s": p99, "traffic_steps_seen": len(tl),
                                "latency_median_s": median(lat), "latency_max_s": max(lat)}
        print(f"{name:<12} {ic[0]:>7.2%} [{ic[1]:.2%},{ic[2]:.2%}] {ip[0]:>14.0f} {tc[0]:>7.2%} [{tc[1]:.2%},{tc[2]:.2%}] "
              f"{pps:>12.2f} {1e3 * p50:>12.1f} ms, {1e3 * p99:.1f} ms {1e3 * median(lat):>22.1f} ms, {1e3 * max(lat):.1f} ms")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
