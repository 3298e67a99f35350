"""Capture overhead inside a real SGLang 0.5.23 server (CPU engine), plugin off vs on.

For each variant a fresh server (tiny-but-not-trivial random Llama: hidden 512, 4 layers, float32)
serves the same workload — `--concurrency` concurrent /generate requests, `--prompt` prompt tokens,
`--new` generated tokens (ignore_eos), repeated `--rounds` times — and we report generated tokens/s.
Variants: `off` (TENSORTRACE_DISABLE=1: plugin loaded, nothing installed), `hidden-states`, `full`.
The ring is not drained during the run (it is sized to hold everything; drops are reported).

    .cache/sglang-venv/bin/python scripts/bench/sglang_overhead.py --out /tmp/sglang-overhead.json
(PYTHONPATH must hold scripts/sglang/sgl_kernel_stub; scripts/sglang/run-tests.sh shows how.)
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "sglang"))
sys.path.insert(0, os.path.join(ROOT, "scripts", "sglang"))

from sglang_harness import SGLangServer, read_rings  # noqa: E402
from tiny_model import make_tiny_model  # noqa: E402


def run_variant(model_path, work, variant, a):
    env = {"TENSORTRACE_RING_CAPACITY": "1G"}
    if variant == "off":
        env["TENSORTRACE_DISABLE"] = "1"
    else:
        env["TENSORTRACE_SELECTION"] = variant
    ring_dir = os.path.join(work, f"rings-{variant}")
    server = SGLangServer(model_path, ring_dir=ring_dir, log_path=os.path.join(work, f"{variant}.log"),
                          env_extra=env)
    server.start()
    try:
        import random

        rng = random.Random(1)
        prompts = [[rng.randrange(4, 250) for _ in range(a.prompt)] for _ in range(a.concurrency)]

        def one_round():
            threads = [threading.Thread(target=server.post, args=("/generate", {
                "input_ids": p, "sampling_params": {"max_new_tokens": a.new, "temperature": 0,
                                                    "ignore_eos": True}})) for p in prompts]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - t0

        one_round()  # warm-up (also the taps' self-check)
        times = [one_round() for _ in range(a.rounds)]
        tokens = a.concurrency * a.new
        best = min(times)
        ring = read_rings(ring_dir) if variant != "off" else None
        dropped = sum(s.records_dropped for s in ring.summaries.values()) if ring else 0
        written = len(ring.records) if ring else 0
        return {"variant": variant, "tokens_per_s_best": tokens / best,
                "tokens_per_s_mean": tokens * len(times) / sum(times), "round_s": times,
                "records_written": written, "records_dropped": dropped, "startup_s": server.startup_s}
    finally:
        server.stop()
        shutil.rmtree(ring_dir, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["off", "hidden-states", "full"])
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="tt-sglang-bench-")
    model_path = make_tiny_model(os.path.join(work, "model"), arch="llama", layers=4, hidden=512)
    rows = [run_variant(model_path, work, v, a) for v in a.variants]
    base = rows[0]["tokens_per_s_best"]
    print(f"SGLang 0.5.23 CPU engine, Llama hidden 512 x 4 layers fp32, {a.concurrency} concurrent requests, "
          f"{a.prompt} prompt + {a.new} new tokens, best of {a.rounds} rounds")
    print(f"{'variant':<14} {'tok/s best':>10} {'tok/s mean':>10} {'vs off':>8} {'records':>8} {'dropped':>8}")
    for r in rows:
        print(f"{r['variant']:<14} {r['tokens_per_s_best']:>10.1f} {r['tokens_per_s_mean']:>10.1f} "
              f"{(r['tokens_per_s_best'] / base - 1) * 100:>+7.1f}% {r['records_written']:>8} {r['records_dropped']:>8}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "rows": rows}, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
