#!/usr/bin/env python3
"""What single calls on the scheduler thread cost cache-cold, as they run between a model's kernels:
torch's own entry points that capture needs, and the agent's per-step calls on both paths.

Before every timed call the script reads `--cold` MiB (48: more than this machine's 32 MiB L3), as
a model's forward reads its weights, so the call finds its code and data evicted; `--cold 0` times
the same calls warm. Each row is the median over `--calls` calls, in µs, of one call (a
perf_counter_ns pair around it; the pair's own cost is the `python call (a no-op lambda)` row's
floor). Rows:

- torch's entries a step of capture makes: `input_ids.shape`, `seq_lens.tolist()` (the steady
  decode check reads both), `torch._C._to_dlpack(t)` (a native tap's view of a tensor's geometry,
  every tap), `t.data_ptr()` (one of the four accessors it replaces);
- the SGLang steady decode layout: `advance_decode` (one C call), reading input_ids' rows and
  `seq_lens_cpu` in place (with the TensorImpl reader) or through torch, vs `plan_step`'s Python
  (the same answer, the oracle), the three chains stepped in turn;
- the agent's steady step on a batch of 8 decode rows (`hidden-states`-like: one 8 x 512 float32
  capture): `begin_step` of a repeat step, `capture`, `end_step`, each the Core's C method vs the
  Python method (`python`: CaptureAgent's methods on the same native agent); `C` reads the
  tensor's geometry from its TensorImpl (agent/_tensorgeom, where built for this torch), `C,
  geometry via DLPack` from a DLPack export (TENSORTRACE_GEOMETRY=0).

    .venv/bin/python scripts/bench/cold_calls.py --calls 300 --json .cache/bench/cold_calls.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "sglang"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _stats import ring_tmpdir  # noqa: E402
from forward_batches import forward_batch  # noqa: E402

from tensortrace.agent import AgentConfig, CaptureAgent, Phase, RequestRows, Selection, StepLayout  # noqa: E402
from tensortrace.agent import geometry as tensor_geometry  # noqa: E402
from tensortrace.agent.backends.sglang import batch_layout  # noqa: E402
from tensortrace.agent.backends.sglang.batch_layout import plan_step  # noqa: E402

B = 8
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e47{:02x}-00f067aa0ba902b7-01"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--cold", type=int, default=48, metavar="MIB", help="MiB read before every timed call (0: warm)")
    ap.add_argument("--json", default=".cache/bench/cold_calls.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sweep = np.ones((a.cold << 20) // 8) if a.cold else None
    pc = time.perf_counter_ns
    rows: dict[str, float] = {}

    def timed(name, fn, *args):
        ts = []
        for _ in range(a.calls):
            if sweep is not None:
                sweep.sum()
            t = pc()
            fn(*args)
            ts.append(pc() - t)
        rows[name] = median(ts) / 1e3

    # torch's entries
    rids = [f"req-{i:04d}" for i in range(B)]
    fb = forward_batch("DECODE", rids, seq_lens=[40] * B)
    x = torch.randn(B, 512)
    timed("python call (a no-op lambda)", lambda: None)
    timed("input_ids.shape", lambda: fb.input_ids.shape)
    timed("seq_lens.tolist()", lambda: fb.seq_lens_cpu.tolist())
    timed("torch._C._to_dlpack(t)", lambda: torch._C._to_dlpack(x))
    timed("t.data_ptr()", lambda: x.data_ptr())

    # the steady decode layout, each way over its own chain of steps, the chains stepped in turn:
    # C reading input_ids' rows and seq_lens_cpu in place (the TensorImpl reader set, as every agent
    # start-up sets it), C reading them through torch (.shape, .tolist()), plan_step's Python
    from tensortrace.agent import native

    mod, why = native.load()
    if mod is None:
        raise SystemExit(f"the native path is not built: {why}")
    geometry_cap, why = tensor_geometry.load()
    if geometry_cap is None:
        print(f"note: C taps and next_decode read through torch here: {why}")
    prompt = {r: 4 for r in rids}.get
    advance = batch_layout.advance_decode
    ways = ("advance_decode (C, seq_lens in place)" if geometry_cap is not None else
            "advance_decode (C, through torch: no tensor-geometry module)",
            "advance_decode (C, seq_lens through torch)", "plan_step, steady case (Python)")
    chains = {w: [forward_batch("DECODE", rids, seq_lens=[5 + k] * B) for k in range(a.calls + 1)] for w in ways}
    prev = {w: plan_step(chains[w][0], prompt).layout for w in ways}
    lts = {w: [] for w in ways}
    saved = batch_layout.advance_decode
    try:
        for k in range(1, a.calls + 1):
            for w in ways:
                d = chains[w][k]
                mod.use_geometry(geometry_cap if w == ways[0] else None)
                batch_layout.advance_decode = None if w == ways[2] else advance
                if sweep is not None:
                    sweep.sum()
                t = pc()
                nxt = advance(d, prev[w]) if w != ways[2] else plan_step(d, prompt, previous=prev[w]).layout
                lts[w].append(pc() - t)
                if nxt is None:
                    raise SystemExit(f"{w}: not the steady case at step {k}")
                prev[w] = nxt
    finally:
        batch_layout.advance_decode = saved
        mod.use_geometry(geometry_cap)
    for w in ways:
        rows[w] = median(lts[w]) / 1e3

    # the agent's steady step, the Core's methods and the Python ones on one native agent
    # the agent's steady step: three agents stepped in turn, step for step, so the host's drift
    # falls on all three alike (C with geometry from the TensorImpl, C with it from DLPack, the
    # Python methods); the taps' geometry source is the capture module's, set before each step
    ring_dir = ring_tmpdir("tt-cold-calls-")
    paths = ("C", "C, geometry via DLPack", "python")
    agents, layouts, ts = {}, {}, {}
    try:
        for path in paths:
            agent = CaptureAgent(AgentConfig(ring_dir=os.path.join(ring_dir, path), model_id="m", pod=path,
                                             ring_capacity=256 << 20, capture_path="native"),
                                 Selection(hooks=frozenset({"resid_pre"}), positions="all"))
            if agent.capture_path != "native":
                raise SystemExit(f"the native path is not built: {agent.native_reason}")
            if path == "python":
                for name in ("begin_step", "idle_step", "end_step", "capture"):
                    agent.__dict__.pop(name, None)
            for r in rids:
                agent.begin_request(r, traceparent=TRACE.format(1))
            agents[path] = agent
            layouts[path] = StepLayout(tuple(RequestRows(r, i, 1, 4, Phase.DECODE, i) for i, r in enumerate(rids)),
                                       total_rows=B, num_sequences=B)
            ts[path] = {"begin_step": [], "capture": [], "end_step": []}
        mod = agents["C"]._native_mod
        for k in range(a.calls + 2):
            for path in paths:
                agent = agents[path]
                mod.use_geometry(None if path == "C, geometry via DLPack" else geometry_cap)
                for call, args in (("begin_step", (layouts[path],)), ("capture", ("resid_pre", 0, x)), ("end_step", ())):
                    fn = getattr(agent, call)
                    if sweep is not None:
                        sweep.sum()
                    t = pc()
                    fn(*args)
                    if k >= 2:   # (the first steps plan)
                        ts[path][call].append(pc() - t)
                layouts[path] = layouts[path].advanced()
        for path in paths:
            if agents[path].stats().repeat_steps < a.calls:
                raise SystemExit(f"{path}: only {agents[path].stats().repeat_steps} repeat steps")
            for call, v in ts[path].items():
                rows[f"agent.{call}, repeat step ({path})"] = median(v) / 1e3
    finally:
        for agent in agents.values():
            agent.close()
        shutil.rmtree(ring_dir, ignore_errors=True)

    load = os.getloadavg()
    print(f"Single calls on the inference thread, {'cache-cold (' + str(a.cold) + ' MiB read before each)' if a.cold else 'warm'}"
          f"; median of {a.calls} calls, µs ({platform.node()}, load {load[0]:.2f})")
    for name, us in rows.items():
        print(f"  {name:<58} {us:8.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"benchmark": "cold_calls", "cold_mib": a.cold, "calls": a.calls, "host": platform.node(),
                   "load_average": load, "us": rows,
                   "command": "scripts/bench/cold_calls.py " + " ".join(argv if argv is not None else sys.argv[1:])},
                  f, indent=1)


if __name__ == "__main__":
    main()
