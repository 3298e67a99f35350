#!/usr/bin/env python3
"""The SGLang plugin's host work per steady decode step, by batch size: what the scheduler thread
pays for capture outside the taps themselves (request bookkeeping, the layout, begin/end step, the
STEP frame, the logits row), with the model replaced by a no-op forward so nothing else is timed.

Per batch size B: B requests (hidden-states; or capture off) are prefilled, then `--steps` decode
steps of the same batch are timed (the prefill runs the tests' tiny shape-alike model, so the
taps' self-check passes and the hidden-states taps stay registered) — each one `observe_batch` (SGLang's ForwardBatch.init_new AFTER
hook), `forward` around the no-op model, `finish_requests` (stream_output AFTER), as SGLang calls
them. Reported: the median over `--repeats` of the mean µs per step. The module taps are not in it
(the no-op forward fires none): their cost per call is in capture_overhead.py; this is the part
that grows with the batch, which a GPU decode step of 10-30 ms must absorb at batch 64-256.

`--before DIR`: the same measurement with the plugin and agent imported from DIR (a copy of
`services/` at an earlier commit), in a subprocess per batch size, interleaved with the current
code's: the change and its baseline side by side in one run.

    .venv/bin/python scripts/bench/sglang_plugin_step.py --batches 8,64,256 --json sglang_plugin_step.json
    git worktree add /tmp/tt-before <commit> && .venv/bin/python scripts/bench/sglang_plugin_step.py \\
        --before /tmp/tt-before/services

The ForwardBatch is SGLang's own class when SGLang is importable (its venv), else the tests'
shape-alike of it (tests/sglang/forward_batches.py); the requests are shape-alikes of Req.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(batch: int, steps: int, capture: bool, cold_mb: int = 0) -> float:
    """Mean µs per steady decode step of the plugin's host work at `batch` (one repeat). cold_mb: the
    no-op forward reads that many MiB first (its time not counted), so the plugin's work runs with
    the caches as a real model's forward leaves them."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "sglang"))
    from types import SimpleNamespace

    import torch
    from forward_batches import forward_batch
    from shape_alike import finish, make_runner, model_forward, req

    from tensortrace.agent.backends.sglang.config import SGLangBackendConfig
    from tensortrace.agent.backends.sglang.plugin import SGLangCapture

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _stats import ring_tmpdir

    torch.set_num_threads(1)
    ring_dir = ring_tmpdir("tt-plugin-step-")   # tmpfs, as deployed
    try:
        runner = make_runner()
        rt = SGLangCapture(SGLangBackendConfig(ring_dir=ring_dir, ring_capacity=256 << 20, selection="hidden-states"))
        rt.attach(runner)
        rids = [f"req-{i:04d}" for i in range(batch)]
        options = None if capture else {"tensortrace": {"capture": False}}
        reqs = [req(r, 4, options) for r in rids]
        batch_obj = SimpleNamespace(reqs=reqs)
        logits = torch.randn(batch, 64)
        out = SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=logits), can_run_graph=False)

        import numpy as np
        sweep = np.ones((cold_mb << 20) // 8) if cold_mb else None
        model_ns = [0]

        def no_model(runner, fb):
            if sweep is not None:   # what a model's forward does to the caches: its weights read through
                t = time.perf_counter_ns()
                sweep.sum()
                model_ns[0] += time.perf_counter_ns() - t
            return out

        fb = forward_batch("EXTEND", rids, seq_lens=[4] * batch, extend_lens=[4] * batch, prefix_lens=[0] * batch)
        fb.input_ids = torch.arange(4 * batch) % 8
        rt.observe_batch(fb, batch_obj)
        with torch.no_grad():
            rt.forward(model_forward, runner, fb)   # the real (tiny) model: the taps' self-check passes
        decodes = []
        for k in range(steps + 50):
            dec = forward_batch("DECODE", rids, seq_lens=[5 + k] * batch)
            decodes.append(dec)
        for dec in decodes[:50]:   # warm-up (the self-check, the first plans)
            rt.observe_batch(dec, batch_obj)
            rt.forward(no_model, runner, dec)
            rt.finish_requests(reqs)
        model_ns[0] = 0
        t0 = time.perf_counter_ns()
        for dec in decodes[50:]:
            rt.observe_batch(dec, batch_obj)
            rt.forward(no_model, runner, dec)
            rt.finish_requests(reqs)
        per_step = (time.perf_counter_ns() - t0 - model_ns[0]) / steps / 1e3
        for r in reqs:
            finish(r, steps + 51)
        rt.finish_requests(reqs)
        rt.agent.close()
        return per_step
    finally:
        shutil.rmtree(ring_dir, ignore_errors=True)


def _child(a) -> None:
    print(json.dumps([measure(a.child_batch, a.steps, a.child_capture == "1", a.cold) for _ in range(a.repeats)]))


def _run(services: str, batch: int, capture: bool, a) -> list[float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (services, env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-batch", str(batch),
                          "--child-capture", "1" if capture else "0", "--steps", str(a.steps),
                          "--repeats", str(a.repeats), "--cold", str(a.cold)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="8,64,256")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cold", type=int, default=0, metavar="MIB",
                    help="the no-op forward first reads MIB MiB (not timed): the plugin's work cache-cold, as "
                         "between a real model's kernels (48: more than this machine's 32 MiB L3)")
    ap.add_argument("--before", default="", help="a services/ directory with an earlier tensortrace package")
    ap.add_argument("--json", default=".cache/bench/sglang_plugin_step.json")
    ap.add_argument("--child-batch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-capture", default="1", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_batch:
        return _child(a)
    codes = [("current", os.path.join(ROOT, "services"))] + ([("before", os.path.abspath(a.before))] if a.before else [])
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        for capture in (True, False):
            for name, services in codes:   # interleaved: the machine's drift hits both alike
                runs = sorted(_run(services, batch, capture, a))
                rows.append({"code": name, "batch": batch, "variant": "hidden-states" if capture else "off",
                             "us_per_step_median": runs[len(runs) // 2], "us_per_step_best": runs[0], "runs": runs})
    load = os.getloadavg()
    print(f"SGLang plugin host work per steady decode step (no-op model{f', {a.cold} MiB read per forward' if a.cold else ''}; {platform.node()}, {os.cpu_count()} cpus, "
          f"load {load[0]:.2f}; {a.steps} steps x {a.repeats} repeats, median of the repeats' means)")
    print(f"{'code':<8} {'variant':<14} " + " ".join(f"{'B=' + b:>10}" for b in a.batches.split(",")))
    for name, _ in codes:
        for variant in ("hidden-states", "off"):
            cells = [r for r in rows if r["code"] == name and r["variant"] == variant]
            print(f"{name:<8} {variant:<14} " + " ".join(f"{r['us_per_step_median']:>8.1f}µs" for r in cells))
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"benchmark": "sglang_plugin_step", "host": platform.node(), "cpus": os.cpu_count(),
                   "load_average": load, "rows": rows,
                   "command": "scripts/bench/sglang_plugin_step.py " + " ".join(argv if argv is not None else sys.argv[1:])},
                  f, indent=1)


if __name__ == "__main__":
    main()
