"""Capture overhead inside a real SGLang 0.5.23 server (CPU engine), plugin off vs on.

One server (random Llama, hidden 512, 4 layers, float32) with the plugin and a concurrent ring
consumer; rounds of `--concurrency` concurrent /generate requests (`--prompt` prompt tokens, `--new`
generated, ignore_eos) alternate between variants chosen per request through custom_params:
`off` (capture false: taps stay idle), `hidden-states` (the server's selection), `full` (preset
full). Interleaving makes the shared machine's noise hit every variant alike; we report the median
generated tokens/s per variant.

    .cache/sglang-venv/bin/python scripts/bench/sglang_overhead.py --out /tmp/sglang-overhead.json
(PYTHONPATH must hold scripts/sglang/sgl_kernel_stub; scripts/sglang/run-tests.sh shows how.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time

from tensortrace.devstack.sglang_server import SGLangServer
from tensortrace.devstack.tiny_model import make_tiny_model


class RingDrain(threading.Thread):
    """A consumer that releases every frame as it appears (what the exporter does on a node)."""

    def __init__(self, ring_dir):
        super().__init__(daemon=True)
        self.ring_dir, self.slabs, self.dropped, self.stop = ring_dir, 0, 0, False

    def run(self):
        import glob

        from tensortrace.ring.format import FrameKind, RingReader
        from tensortrace.v1 import records_pb2

        while not self.stop and not glob.glob(os.path.join(self.ring_dir, "*.ring")):
            time.sleep(0.1)
        reader = RingReader.open(glob.glob(os.path.join(self.ring_dir, "*.ring"))[0])
        while not self.stop:
            end = None
            for f in reader.frames():
                end = f.end
                if f.kind == FrameKind.SLAB:
                    self.slabs += 1
                elif f.kind == FrameKind.SUMMARY:
                    self.dropped += records_pb2.RequestSummary.FromString(bytes(f.meta)).records_dropped
            if end is None:
                time.sleep(0.005)
            else:
                reader.release(end)
        reader.close()


VARIANTS = {  # per-request options (custom_params) of each variant; the server selects hidden-states
    "off": {"capture": False},
    "hidden-states": {"capture": True},
    "full": {"capture": True, "preset": "full"},
}


def run(model_path, work, a):
    ring_dir = os.path.join(work, "rings")
    server = SGLangServer(model_path, ring_dir=ring_dir, log_path=os.path.join(work, "server.log"),
                          env_extra={"TENSORTRACE_SELECTION": "hidden-states", "TENSORTRACE_RING_CAPACITY": "256M"})
    server.start()
    drain = RingDrain(ring_dir)
    drain.start()
    try:
        import random

        rng = random.Random(1)
        prompts = [[rng.randrange(4, 250) for _ in range(a.prompt)] for _ in range(a.concurrency)]

        def one_round(options):
            threads = [threading.Thread(target=server.post, args=("/generate", {
                "input_ids": p, "sampling_params": {"max_new_tokens": a.new, "temperature": 0, "ignore_eos": True,
                                                    "custom_params": {"tensortrace": options}}})) for p in prompts]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0

        for options in VARIANTS.values():
            one_round(options)  # warm-up (the first also runs the taps' self-check)
        times = {v: [] for v in VARIANTS}
        for _ in range(a.rounds):  # interleaved, so machine noise hits every variant alike
            for v, options in VARIANTS.items():
                times[v].append(one_round(options))
        time.sleep(1.0)
        tokens = a.concurrency * a.new
        rows = []
        for v, ts in times.items():
            ts = sorted(ts)
            rows.append({"variant": v, "tokens_per_s_median": tokens / ts[len(ts) // 2],
                         "tokens_per_s_best": tokens / ts[0], "round_s": ts})
        return rows, {"slabs_drained": drain.slabs, "records_dropped": drain.dropped,
                      "startup_s": server.startup_s}
    finally:
        drain.stop = True
        server.stop()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="tt-sglang-bench-")
    model_path = make_tiny_model(os.path.join(work, "model"), arch="llama", layers=4, hidden=512)
    rows, ring = run(model_path, work, a)
    base = rows[0]["tokens_per_s_median"]
    print(f"SGLang 0.5.23 CPU engine, Llama hidden 512 x 4 layers fp32, {a.concurrency} concurrent requests, "
          f"{a.prompt} prompt + {a.new} new tokens; {a.rounds} interleaved rounds per variant; ring drained "
          f"concurrently ({ring['slabs_drained']} slabs, {ring['records_dropped']} records dropped)")
    print(f"{'variant':<14} {'tok/s median':>12} {'tok/s best':>10} {'median vs off':>14}")
    for r in rows:
        print(f"{r['variant']:<14} {r['tokens_per_s_median']:>12.1f} {r['tokens_per_s_best']:>10.1f} "
              f"{(r['tokens_per_s_median'] / base - 1) * 100:>+13.1f}%")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "rows": rows, "ring": ring}, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
