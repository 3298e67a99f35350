#!/usr/bin/env python3
"""Where the SGLang plugin's time per forward goes on a real SGLang server (CPU engine): each
section of the plugin and the agent timed inside the scheduler process, cache-cold as in serving.

One server (random Llama, hidden 512, 4 layers, float32 by default: `--layers`, `--hidden`; one
model thread) with the plugin, `hidden-states` selected, and a ring consumer (sglang_overhead.py's;
`--no-drain`: none); its scheduler process loads an instrumentation module (a generated `sitecustomize.py`, on the server's PYTHONPATH only, not
part of the product) that wraps each section below with a perf_counter_ns pair and writes the
totals to a file every second. Blocks of `--rounds` rounds (8 concurrent requests, 32 prompt + 48
new tokens) run `hidden-states`, then capture off, then `hidden-states` again; reported per
forward: each section's µs, its calls, and its µs per call.

Sections: `SGLangCapture.observe_batch` / `finish_requests` (SGLang's per-forward request hooks),
`forward, outside the model` (the plugin's AROUND hook minus the model's forward: everything the
plugin does before and after it), and inside that `advance_decode` (the steady step's layout, one
C call), `plan_step` (every other layout), the agent's `idle_step`, `begin_step` (the Core's C
method on the native path, which hands every case but a repeat step to the Python method, also
timed on its own; likewise `idle_step`, `capture` and `end_step`), `SGLangTaps.sync` (with
`step_hooks`), `capture` (the logits row), `end_step`;
`begin_request` / `end_request` (inside observe_batch / finish_requests). `agent thread` is the
agent's own counter (`stats().thread_seconds`: its timed blocks and the module taps inside the
model), `taps, by difference` that minus the plugin's sections. Every wrapped call pays the
wrapper's own frame (~1 µs cold), so a section is an upper bound; the sum of the wrapped ones
over-counts by about that per call. The repeat-step count (`stats().repeat_steps`) says whether
steady decode steps took the O(1) path.

`--paired N` (instead of the blocks): N pairs of rounds, capture on and off in a random order
within a pair, each round measured alone, and per pair on - off of the scheduler thread's CPU, the
model's forward, the agent's counter and the plugin's sections, with 90% intervals: how much of
capture's cost is the agent's own work, the model running slower, or SGLang's scheduling.
`--logits-only` adds a third round to each group: capture on with only the logits selected (the
plugin's per-step work, no module tap inside the model); `--pause-consumer` one more: hidden-states
with the ring consumer stopped for the round (SIGSTOP, then SIGCONT and a second to catch up);
`--synthetic` one more: capture off while a second agent of the instrument's own does a
logits-only step's work around every forward (its footprint on the model's caches, the plugin idle).
`--dlpack` one more: hidden-states with the taps reading tensor geometry through DLPack instead of
the TensorImpl (agent/_tensorgeom switched off in the scheduler for the round; a flag file), and a
table of hidden-states minus it: what the geometry module changes, paired within a group.
`--pool A.json,B.json` prints the tables of several such runs' rounds together (no server).

    PYTHONPATH=scripts/sglang/sgl_kernel_stub:services SGLANG_USE_CPU_ENGINE=1 \\
        .cache/sglang-venv/bin/python scripts/bench/sglang_sections.py --rounds 20 --json sections.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stats import ring_tmpdir  # noqa: E402
from sglang_overhead import RingDrain  # noqa: E402

from tensortrace.devstack.sglang_server import SGLangServer  # noqa: E402
from tensortrace.devstack.tiny_model import make_tiny_model  # noqa: E402

# Loaded by every process of the server (Python imports `sitecustomize` at start-up); it only acts
# where the plugin has a runtime (the scheduler). Writes {section: [ns, calls]} to OUT/<pid>.json.
INSTRUMENT = r'''
import json, os, sys, threading, time

STEP_CALLS = ("idle_step", "begin_step", "capture", "end_step")

def _install(out_dir):
    from tensortrace.agent.backends.sglang import plugin, taps
    from tensortrace.agent.core import CaptureAgent
    acc, pc = {}, time.perf_counter_ns

    def wrap(owner, name, key):
        real = getattr(owner, name)
        def timed(*a, **k):
            t0 = pc()
            try:
                return real(*a, **k)
            finally:
                e = acc.get(key)
                if e is None:
                    e = acc[key] = [0, 0]
                e[0] += pc() - t0
                e[1] += 1
        setattr(owner, name, timed)

    for name in ("observe_batch", "finish_requests"):
        wrap(plugin.SGLangCapture, name, name)
    for name in ("begin_request", "end_request", "step_hooks"):
        wrap(CaptureAgent, name, name)
    # The per-step calls: the Python methods (key *_py: every call on the Python path, the cases
    # the Core hands back on the native path), and the Core's C methods the native agent binds on
    # itself (key without _py: every call there, the Python cases included)
    for name in STEP_CALLS:
        wrap(CaptureAgent, name, name + "_py")
    real_setup = CaptureAgent._setup_native

    def setup(self):
        real_setup(self)
        for name in STEP_CALLS:
            if name in self.__dict__:
                wrap(self, name, name)
    CaptureAgent._setup_native = setup
    wrap(plugin, "plan_step", "plan_step")
    from tensortrace.agent.backends.sglang import batch_layout
    if getattr(batch_layout, "advance_decode", None) is not None:   # the steady step's layout, one C call (the plugin's first try)
        wrap(batch_layout, "advance_decode", "advance_decode")
    wrap(taps.SGLangTaps, "sync", "sync")
    real_forward = plugin.SGLangCapture.forward

    # --synthetic's rounds (capture off; a flag file the dump thread watches): a second agent of
    # its own, on a ring of its own, does what a logits-only capture step does around each forward
    # (the layout's torch reads, begin_step before; the logits row and end_step after), so its
    # footprint lands on the model's caches with the real agent idle
    synth = {"on": False, "agent": None, "layout": None}
    flag = os.path.join(out_dir, "synthetic")

    def synth_agent():
        from tensortrace.agent import AgentConfig, Phase, RequestRows, Selection, StepLayout
        agent = CaptureAgent(AgentConfig(ring_dir=os.environ["TT_SECTIONS_SYNTH_RING"], model_id="synthetic",
                                         pod="synthetic", ring_capacity=256 << 20),
                             Selection(hooks=frozenset({"logits"}), positions="all"))
        rids = [f"synthetic-{i}" for i in range(8)]
        for r in rids:
            agent.begin_request(r)
        synth["layout"] = StepLayout(tuple(RequestRows(r, i, 1, 40, Phase.DECODE, i) for i, r in enumerate(rids)),
                                     total_rows=8, num_sequences=8)
        synth["agent"] = agent
        return agent

    def forward(self, original, runner, fb, *a, **k):
        model = [0]
        def run_model(*aa, **kk):
            t0 = pc()
            try:
                return original(*aa, **kk)
            finally:
                model[0] = pc() - t0
        t0 = pc()
        extra = 0
        agent = None
        if synth["on"]:
            agent = synth["agent"] or synth_agent()
            fb.seq_lens_cpu.tolist(), fb.input_ids.shape
            synth["layout"] = layout = synth["layout"].advanced()
            agent.begin_step(layout)
            extra = pc() - t0
        out = None
        try:
            out = real_forward(self, run_model, runner, fb, *a, **k)
            return out
        finally:
            if agent is not None:
                t1 = pc()
                logits = getattr(getattr(out, "logits_output", None), "next_token_logits", None)
                if logits is not None:
                    agent.capture("logits", -1, logits)
                agent.end_step()
                extra += pc() - t1
            for key, ns in (("outside_model", pc() - t0 - model[0] - extra), ("model", model[0]),
                            ("synthetic", extra)):
                e = acc.setdefault(key, [0, 0])
                e[0] += ns
                e[1] += 1
    plugin.SGLangCapture.forward = forward

    # what the sections cannot see: the garbage collector's passes (gc.callbacks, per generation),
    # the scheduler thread's own CPU time (schedstat, ns), its page faults and context switches
    import gc
    gc_t0 = [0]
    def on_gc(phase, info):
        if phase == "start":
            gc_t0[0] = pc()
        else:
            e = acc.setdefault(f"gc{info['generation']}", [0, 0])
            e[0] += pc() - gc_t0[0]
            e[1] += 1
    gc.callbacks.append(on_gc)
    main_tid = threading.get_native_id()

    def thread_counters():
        out = {}
        try:
            with open(f"/proc/self/task/{main_tid}/schedstat") as f:
                out["main_thread_cpu"] = [int(f.read().split()[0]), 0]
            with open(f"/proc/self/task/{main_tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out["minflt"] = [0, int(fields[7])]   # minflt, majflt: fields 10 and 12 of stat
            out["majflt"] = [0, int(fields[9])]
            with open(f"/proc/self/task/{main_tid}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches"):
                        out["nvcsw"] = [0, int(line.split()[1])]
                    elif line.startswith("voluntary_ctxt_switches"):
                        out["vcsw"] = [0, int(line.split()[1])]
        except OSError:
            pass
        return out

    every = float(os.environ.get("TT_SECTIONS_EVERY", "1.0"))
    # --dlpack's rounds (a flag file): the native taps read geometry through DLPack, not the TensorImpl
    geo = {"dlpack": False}
    dlpack_flag = os.path.join(out_dir, "dlpack")

    def dump():
        while True:
            time.sleep(every)
            synth["on"] = os.path.exists(flag)
            want = os.path.exists(dlpack_flag)
            mod = sys.modules.get("tensortrace.agent._capture")
            if want != geo["dlpack"] and mod is not None:
                from tensortrace.agent import geometry
                mod.use_geometry(None if want else geometry.load()[0])
                geo["dlpack"] = want
            rt = plugin._RUNTIME
            if rt is None or rt.agent is None:
                continue
            st = rt.agent.stats()
            snap = dict(acc, agent_thread=[int(st.thread_seconds * 1e9), 0], steps=[st.steps, 0],
                        repeat_steps=[st.repeat_steps, 0], dropped=[st.dropped, 0], **thread_counters())
            snap["_t"] = [time.time(), 0]   # when this snapshot was taken (a reader waits for a fresh one)
            tmp = os.path.join(out_dir, f".{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(snap, f)
            os.replace(tmp, os.path.join(out_dir, f"{os.getpid()}.json"))
    threading.Thread(target=dump, daemon=True, name="tt-sections").start()

if os.environ.get("TT_SECTIONS_OUT"):
    try:
        _install(os.environ["TT_SECTIONS_OUT"])
    except Exception as e:  # noqa: BLE001
        print("sglang_sections: instrumentation not installed:", e, file=sys.stderr)
'''

ROWS = [("agent thread", "agent_thread"), ("  observe_batch", "observe_batch"),
        ("    begin_request", "begin_request"), ("  finish_requests", "finish_requests"),
        ("    end_request", "end_request"), ("  forward, outside the model", "outside_model"),
        ("    idle_step (C, native)", "idle_step"), ("    idle_step (Python)", "idle_step_py"),
        ("    advance_decode (C)", "advance_decode"), ("    plan_step", "plan_step"),
        ("    begin_step (C, native)", "begin_step"), ("    begin_step (Python)", "begin_step_py"),
        ("    sync (step_hooks inside)", "sync"), ("      step_hooks", "step_hooks"),
        ("    capture (logits; C, native)", "capture"), ("    capture (Python)", "capture_py"),
        ("    end_step (C, native)", "end_step"), ("    end_step (Python)", "end_step_py"),
        ("scheduler thread CPU", "main_thread_cpu"), ("gc generation 0", "gc0"), ("gc generation 1", "gc1"),
        ("gc generation 2", "gc2")]
COUNTS = [("minor page faults", "minflt"), ("major page faults", "majflt"),
          ("involuntary ctx switches", "nvcsw"), ("voluntary ctx switches", "vcsw")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="rounds per block (three blocks)")
    ap.add_argument("--json", default="")
    ap.add_argument("--logits-only", action="store_true",
                    help="--paired: a third round in each group, capture on with only the logits selected (the "
                         "plugin's per-step work and one capture, no module tap inside the model)")
    ap.add_argument("--pause-consumer", action="store_true",
                    help="--paired: a round more in each group, hidden-states with the ring consumer stopped "
                         "(SIGSTOP) for the round and caught up after it: the consumer's effect on the model")
    ap.add_argument("--dlpack", action="store_true",
                    help="--paired: one more round a group, hidden-states with tensor geometry through DLPack "
                         "(agent/_tensorgeom off), and a table of hidden-states minus it")
    ap.add_argument("--synthetic", action="store_true",
                    help="--paired: a round more in each group, capture off while a second agent of the "
                         "instrument's own (its own ring, not drained: about 100 groups fit) does a logits-only "
                         "step's work around every forward: that footprint's effect on the model, the real "
                         "agent idle")
    ap.add_argument("--no-drain", action="store_true",
                    help="no ring consumer: the ring (256 MiB) takes what the rounds write (about 40 pairs of "
                         "hidden-states rounds); the run fails if the agent dropped anything")
    ap.add_argument("--layers", type=int, default=4, help="the random Llama's layers (4: ~37 MB of float32 weights, "
                                                          "about this machine's 32 MiB L3)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--new", type=int, default=48, help="tokens generated per request (a round: 8 requests)")
    ap.add_argument("--batched", action="store_true",
                    help="a round's 8 prompts as one batched /generate instead of 8 concurrent requests")
    ap.add_argument("--paired", type=int, default=0,
                    help="instead of blocks: this many pairs of rounds, capture on and off in a random order "
                         "within each pair, every round measured alone; reports the per-pair difference "
                         "(on - off, µs per forward) of each section, of the model's forward and of the "
                         "scheduler thread's CPU, with 90%% intervals: where capture's cost goes")
    ap.add_argument("--pool", default="", metavar="JSON,...",
                    help="no server: the --paired tables of these runs' rounds together (their JSON `raw`)")
    a = ap.parse_args(argv)
    if a.pool:
        pairs = []
        for path in a.pool.split(","):
            with open(path) as f:
                pairs += json.load(f)["raw"]
        report_paired(a, pairs)
        return
    work = tempfile.mkdtemp(prefix="tt-sections-")
    rings = ring_tmpdir("tt-sections-rings-")
    out_dir = os.path.join(work, "sections")
    os.makedirs(out_dir)
    site = os.path.join(work, "site")
    os.makedirs(site)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(INSTRUMENT)
    srv = drain = None
    try:
        model = make_tiny_model(os.path.join(work, "model"), arch="llama", layers=a.layers, hidden=a.hidden)
        env = {"TENSORTRACE_SELECTION": "hidden-states", "TENSORTRACE_RING_CAPACITY": "256M", "OMP_NUM_THREADS": "1",
               "TT_SECTIONS_OUT": out_dir, "TT_SECTIONS_EVERY": "0.1" if a.paired else "1.0",
               "TT_SECTIONS_SYNTH_RING": os.path.join(rings, "synthetic"),
               "PYTHONPATH": os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p)}
        srv = SGLangServer(model, ring_dir=rings, log_path=os.path.join(work, "server.log"), env_extra=env).start()
        drain = None if a.no_drain else RingDrain(rings)
        rng = random.Random(1)
        prompts = [[rng.randrange(4, 250) for _ in range(32)] for _ in range(8)]

        def one_round(capture) -> None:
            # capture: True (the server's hidden-states), False (off), or the request's own options
            options = capture if isinstance(capture, dict) else {"capture": capture}
            body = lambda p: {"input_ids": p, "sampling_params": {  # noqa: E731
                "max_new_tokens": a.new, "temperature": 0, "ignore_eos": True,
                "custom_params": {"tensortrace": options}}}
            threads = ([threading.Thread(target=srv.post, args=("/generate", body(prompts)))] if a.batched else
                       [threading.Thread(target=srv.post, args=("/generate", body(p))) for p in prompts])
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        def snapshot() -> dict:
            # the scheduler writes its totals every second (--paired: every 0.1 s): wait for one
            # taken after now
            after = time.time()
            deadline = after + 30
            while True:
                time.sleep(0.15 if a.paired else 1.5)
                files = glob.glob(os.path.join(out_dir, "*.json"))
                if len(files) != 1:
                    raise SystemExit(f"expected one instrumented scheduler process, found {len(files)} "
                                     f"(server log: {srv.log_path})")
                with open(files[0]) as f:
                    snap = json.load(f)
                if snap.get("_t", [0])[0] > after or time.time() > deadline:
                    return snap

        def delta(s0, s1):
            return {k: [v[0] - s0.get(k, [0, 0])[0], v[1] - s0.get(k, [0, 0])[1]] for k, v in s1.items()}

        one_round(True)
        one_round(False)   # warm-up: the taps' self-check, both paths once
        blocks = {}
        if a.paired:
            pairs = []
            order = random.Random(2)
            for _ in range(a.paired):
                pair = {}
                kinds = (["on", "off"] + ["logits"] * a.logits_only + ["paused"] * a.pause_consumer
                         + ["synthetic"] * a.synthetic + ["dlpack"] * a.dlpack)
                for kind in order.sample(kinds, len(kinds)):
                    if kind in ("synthetic", "dlpack"):   # the instrumented scheduler sees the flag within 0.1 s
                        open(os.path.join(out_dir, kind), "w").close()
                        time.sleep(0.3)
                    s0 = snapshot()
                    if kind == "paused":   # the ring consumer stopped for this round, then caught up
                        os.kill(drain.proc.pid, signal.SIGSTOP)
                    try:
                        one_round(KINDS[kind])
                        pair[kind] = delta(s0, snapshot())
                    finally:
                        if kind == "paused":
                            os.kill(drain.proc.pid, signal.SIGCONT)
                            time.sleep(1.0)   # (it drains the round's frames before the next round)
                        if kind in ("synthetic", "dlpack"):
                            os.remove(os.path.join(out_dir, kind))
                            time.sleep(0.3)
                pairs.append(pair)
        else:
            for name, capture in (("hidden-states", True), ("off", False), ("hidden-states, again", True)):
                s0 = snapshot()
                for _ in range(a.rounds):
                    one_round(capture)
                blocks[name] = delta(s0, snapshot())
    finally:
        if drain is not None:
            drain.close()
        if srv is not None:
            srv.stop()
        shutil.rmtree(rings, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    if a.paired:
        report_paired(a, pairs)
        return
    print(f"SGLang plugin sections per forward (real server, CPU engine, one model thread; {a.rounds} rounds a block; "
          f"load average {os.getloadavg()[0]:.2f}); µs per forward (calls, µs per call)")
    names, raw = list(blocks), blocks
    print(f"{'section':<32}" + "".join(f"{n:>30}" for n in names))
    result = {}
    for name, b in blocks.items():
        forwards = b["model"][1] or 1
        plugin_ns = sum(b.get(k, [0, 0])[0] for k in ("observe_batch", "finish_requests", "outside_model"))
        r = {label.strip(): {"us_per_forward": b.get(k, [0, 0])[0] / forwards / 1e3, "calls": b.get(k, [0, 0])[1]}
             for label, k in ROWS}
        r["taps, by difference"] = {"us_per_forward": (b["agent_thread"][0] - plugin_ns) / forwards / 1e3, "calls": 0}
        r["model forward"] = {"us_per_forward": b["model"][0] / forwards / 1e3, "calls": forwards}
        r["steps"], r["repeat_steps"] = b["steps"][0], b["repeat_steps"][0]
        for label, k in COUNTS:
            r[label] = {"per_forward": b.get(k, [0, 0])[1] / forwards, "count": b.get(k, [0, 0])[1]}
        result[name] = r
    for label in [lbl for lbl, _ in ROWS] + ["taps, by difference", "model forward"]:
        cells = []
        for name in names:
            c = result[name][label.strip()]
            per_call = c["us_per_forward"] * (result[name]["model forward"]["calls"]) / c["calls"] if c["calls"] else 0
            cells.append(f"{c['us_per_forward']:>9.1f} ({c['calls']:>5}, {per_call:>6.1f})" if c["calls"]
                         else f"{c['us_per_forward']:>9.1f}{'':>16}")
        print(f"{label:<32}" + "".join(f"{x:>30}" for x in cells))
    for label, k in COUNTS:
        print(f"{label + ', per forward':<32}" + "".join(
            f"{raw[n].get(k, [0, 0])[1] / (raw[n]['model'][1] or 1):>30.3f}" for n in names))
    print(f"{'steps (repeat steps)':<32}" + "".join(f"{str(result[n]['steps']) + ' (' + str(result[n]['repeat_steps']) + ')':>30}"
                                                   for n in names))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "blocks": result, "raw": blocks}, f, indent=1)


# --paired's round kinds: the request options of each ("paused": hidden-states, the consumer stopped)
KINDS = {"on": True, "off": False, "logits": {"capture": True, "hooks": ["logits"]}, "paused": True,
         "synthetic": False, "dlpack": True}
PAIRED = [("scheduler thread CPU", "main_thread_cpu"), ("model forward (taps inside)", "model"),
          ("synthetic step (--synthetic)", "synthetic"),
          ("agent thread", "agent_thread"), ("forward, outside the model", "outside_model"),
          ("observe_batch", "observe_batch"), ("finish_requests", "finish_requests")]


def report_paired(a, pairs) -> None:
    """Per group of rounds: each round kind - off (hidden-states `on`; `logits`, `paused`,
    `synthetic` where run), µs per forward, of each measure; the median over groups and its 90%
    bootstrap interval. Derived rows: the taps (the agent's counter minus the plugin's timed
    sections), the model without the taps (model forward - taps: what capture does to the model's
    own kernels), and the rest of the scheduler thread (its CPU minus the model and the plugin's
    sections: SGLang's own scheduling work)."""
    from _stats import median_ci

    def per_forward(b, key):
        return b.get(key, [0, 0])[0] / (b["model"][1] or 1) / 1e3

    def derived(b):
        out = {label: per_forward(b, key) for label, key in PAIRED}
        plugin = out["forward, outside the model"] + out["observe_batch"] + out["finish_requests"]
        out["taps (agent thread - plugin sections)"] = out["agent thread"] - plugin
        out["model without the taps"] = out["model forward (taps inside)"] - out["taps (agent thread - plugin sections)"]
        out["scheduler thread, rest (SGLang)"] = (out["scheduler thread CPU"] - out["model forward (taps inside)"] - plugin
                                                  - out["synthetic step (--synthetic)"])
        return out

    tables = {}
    for kind, base, what in (("on", "off", "hidden-states"), ("logits", "off", "the logits alone"),
                             ("paused", "off", "hidden-states, the ring consumer stopped"),
                             ("synthetic", "off", "capture off, a second agent's logits-only step around each forward"),
                             ("dlpack", "off", "hidden-states, geometry through DLPack"),
                             ("on", "dlpack", "hidden-states, geometry from the TensorImpl")):
        groups = [p for p in pairs if kind in p and base in p]   # (--pool: files with different round kinds)
        if not groups:
            continue
        rows = tables[kind if base == "off" else f"{kind}-{base}"] = {}
        on = [derived(p[kind]) for p in groups]
        off = [derived(p[base]) for p in groups]
        print(f"SGLang capture cost by section: Llama {a.layers} layers x hidden {a.hidden}, {len(groups)} groups of "
              f"rounds ({what} / {base}, random order within a group), µs per forward; load average "
              f"{os.getloadavg()[0]:.2f}")
        print(f"{'measure':<40}{kind:>10}{base:>10}{'diff':>11}   90% interval")
        for label in on[0]:
            diffs = [x[label] - y[label] for x, y in zip(on, off)]
            m_on, m_off, m = median(x[label] for x in on), median(y[label] for y in off), median(diffs)
            lo, hi = median_ci(diffs)
            rows[label] = {"on": m_on, "off": m_off, "diff": m, "diff_ci90": [lo, hi]}
            print(f"{label:<40}{m_on:>10.1f}{m_off:>10.1f}{m:>+11.1f}   [{lo:+.1f}, {hi:+.1f}]")
    dropped = sum(b.get("dropped", [0, 0])[0] for p in pairs for b in p.values())
    consumer = "no ring consumer" if a.no_drain else "a ring consumer draining"
    print(f"({consumer}; records dropped: {dropped})")
    if dropped and a.no_drain:
        raise SystemExit("the ring filled without a consumer: fewer --paired pairs")
    forwards = median(p["on"]["model"][1] for p in pairs if "on" in p)
    print(f"(forwards a round: {forwards:.0f}; steps (repeat steps) in the capture rounds: "
          f"{sum(p['on']['steps'][0] for p in pairs if 'on' in p)} "
          f"({sum(p['on']['repeat_steps'][0] for p in pairs if 'on' in p)}))")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": vars(a), "paired": tables["on"], "paired_logits": tables.get("logits"),
                       "paired_paused": tables.get("paused"), "paired_synthetic": tables.get("synthetic"),
                       "paired_dlpack": tables.get("dlpack"), "paired_on_minus_dlpack": tables.get("on-dlpack"),
                       "raw": pairs}, f, indent=1)


if __name__ == "__main__":
    main()
