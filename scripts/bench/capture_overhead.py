#!/usr/bin/env python
"""Capture overhead: tokens/s for prefill and decode with and without capture (issue 3).

Modes (all capture the `hidden-states` tensors: residual stream entering every layer, final norm
output, logits), on a random Llama from a config:
  none             no capture
  tt-hidden        TensorTrace, preset hidden-states; a consumer process (ring_consumer.py) drains
                   the ring concurrently, as the exporter does (minus Kafka)
  tt-full          TensorTrace, preset full (every hook), same consumer
  tt-hidden-nc     diagnostic: tt-hidden with no consumer (a ring big enough for the run), to
                   separate the agent's own cost from the consumer's competition for the CPUs
  tt-full-nc       diagnostic: the same for tt-full
  noop-hidden      diagnostic: a no-op torch hook on every module the HF backend hooks for the
  noop-full        preset (hidden-states / full): what PyTorch's hook dispatch alone costs
  wrap-full        diagnostic: a no-op Python wrapper of those modules' forward instead (what a
                   wrapped forward costs; agent/forward_wrap.py's is a C wrapper)
  hooks-clone      forward hooks + .detach().cpu().clone() kept in a list (in-process floor)
  hooks-save       the same hooks, each step's tensors written with torch.save (vLLM-Hook style)
  hidden-states    generate(output_hidden_states=True)
  tt-*@python      with --path native,python: the same TensorTrace mode on the agent's pure-Python tap
                   path (AgentConfig.capture_path="python"), side by side with the native fast path
                   (plain tt-* names are the native path then; docs/agent.md "Native fast path")
  tt-*@dlpack      with --path native,dlpack: the native path with the taps reading tensor geometry
                   through a DLPack export instead of the TensorImpl (agent/_tensorgeom switched off)
  tt-*@hooks       with --module-taps forward,hooks: the same mode with its taps as PyTorch hooks
                   (AgentConfig.module_taps="hooks") instead of wrapped forwards (docs/agent.md "Module taps")
  nnsight          nnsight LanguageModel + .save() of the same tensors
GPU variant (--device cuda): bf16 model of realistic width; none / tt-hidden / sync-copy (hooks
with a blocking .cpu() copy), eager mode (see docs/BENCHMARKS.md for why not CUDA graphs).

Timing: one generate per measurement; a logits processor stamps the time after every forward, so
prefill = first forward, each decode step = the time between two stamps. Modes are interleaved per
repeat; reported: the median prefill and the median decode step over all steps of all repeats,
`step, paired` (per repeat, the mode's median step over `none`'s of the same repeat; the median over
repeats) and, with `hooks-clone` among the modes, each mode's paired overhead minus the floor's in
the same repeat, in points, with a bootstrap 90% interval over the repeats (the `hidden-states`
target "within 1 point of the floor" is a statement about that interval).

    .venv/bin/python scripts/bench/capture_overhead.py --quick
    .venv/bin/python scripts/bench/capture_overhead.py --json out.json
    .venv/bin/python scripts/bench/capture_overhead.py --threads 1 --repeats 3 --batches 1,8 --prompt-len 32 \
        --new-tokens 13 --modes none,tt-hidden,tt-full,hooks-clone --path native,python
    python3 scripts/bench/capture_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "services"))

import torch  # noqa: E402
from _stats import median_ci  # noqa: E402

from tensortrace.agent import AgentConfig, CaptureAgent, Selection  # noqa: E402
from tensortrace.agent.backends.hf import HFBackend  # noqa: E402


CONSUMER = os.path.join(HERE, "ring_consumer.py")
FLOOR = "hooks-clone"   # the in-process floor the hidden-states target is measured against
CAPTURE_PATH = "auto"   # --path: the first path (plain tt-* modes)


def start_consumer(ring_path: str):
    """The exporter stand-in, a separate process; returns once it has mapped the ring."""
    proc = subprocess.Popen([sys.executable, CONSUMER, ring_path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"ring consumer did not start: {line!r}")
    return proc


def stop_consumer(proc) -> dict:
    out, _ = proc.communicate(input="", timeout=120)
    return json.loads(out.strip().splitlines()[-1])


class Stamp:
    """A logits processor that records the time after every forward."""

    def __init__(self, device):
        self.times: list[float] = []
        self.agent_ns: list[int] = []   # the agent's inference-thread time so far, at each stamp
        self.agent = None
        self.device = device

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            # The compute stream only, as generate's own per-step sync: a device-wide sync would
            # also wait for TensorTrace's side-stream copies, which the model never waits for.
            torch.cuda.current_stream().synchronize()
        self.times.append(time.perf_counter())
        if self.agent is not None:
            self.agent_ns.append(self.agent.thread_ns)
        return scores


def hidden_state_modules(model):
    n = model.config.num_hidden_layers
    pre = [model.model.layers[i] for i in range(n)]
    post = [model.model.norm, model.lm_head]
    return pre, post


class HookCapture:
    """Forward hooks that copy the hidden-states tensors to host memory."""

    def __init__(self, model, mode, out_dir=None):
        self.kept = []
        self.step = []
        self.mode = mode
        self.out_dir = out_dir
        self.handles = []
        self.n_saved = 0
        pre, post = hidden_state_modules(model)
        for m in pre:
            self.handles.append(m.register_forward_pre_hook(
                lambda mod, args, kw: self._take(args[0] if args else kw["hidden_states"]), with_kwargs=True))
        for m in post:
            self.handles.append(m.register_forward_hook(lambda mod, args, out: self._take(out)))
        if mode == "hooks-save":
            self.handles.append(model.register_forward_hook(lambda mod, args, out: self._save()))

    def _take(self, t):
        if self.mode == "sync-copy":
            self.kept.append(t.detach().to("cpu"))   # blocking D2H on the inference thread
        else:
            self.kept.append(t.detach().cpu().clone())

    def _save(self):
        torch.save(self.kept, os.path.join(self.out_dir, f"step-{self.n_saved}.pt"))
        self.n_saved += 1
        self.kept = []

    def remove(self):
        for h in self.handles:
            h.remove()


class _Unwrap:
    def __init__(self, module):
        self.module = module

    def remove(self):
        del self.module.forward


def noop_hooks(model, preset: str, ring_dir: str, wrap: bool = False) -> list:
    """A no-op torch hook on exactly the modules the HF backend hooks for `preset` (the same pre/post
    kinds): the cost of PyTorch's hook dispatch with nothing captured."""
    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="bench", ring_capacity=1 << 20,
                                     pod="bench-noop"), Selection.preset(preset))
    backend = HFBackend(model, agent)
    try:
        wanted = Selection.preset(preset).hooks
        taps = [t for t in backend._taps if any(h in wanted for h in t.hooks)]
        handles = []
        for t in taps:
            if wrap:
                if "forward" not in t.module.__dict__:
                    orig = t.module.forward

                    def fwd(*args, _orig=orig, **kwargs):
                        return _orig(*args, **kwargs)
                    t.module.forward = fwd
                    handles.append(_Unwrap(t.module))
                continue
            if t.pre:
                handles.append(t.module.register_forward_pre_hook(lambda mod, args, kw: None, with_kwargs=True))
            else:
                handles.append(t.module.register_forward_hook(lambda mod, args, kw, out: None, with_kwargs=True))
        return handles
    finally:
        backend.detach()
        agent.close()
        os.unlink(agent.ring_path)


def _word_tokenizer(vocab: int):
    """An in-memory tokenizer (nnsight requires one; nothing is downloaded): token i is the word "i"."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="0", unk_token="0")


def make_model(device, hidden, layers, inter, vocab, heads, kv_heads, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def run_one(model, mode, batch, prompt_len, new_tokens, device, ring_dir, nnsight_model=None):
    """(prefill seconds, decode seconds) of one generate under `mode`."""
    from transformers import LogitsProcessorList

    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    stamp = Stamp(device)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
               pad_token_id=0, logits_processor=LogitsProcessorList([stamp]))
    extra = {}
    if device == "cuda":
        torch.cuda.synchronize()
    if mode == "none":
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, **gen)
    elif mode.startswith("tt-"):
        base, _, path = mode.partition("@")
        preset = {"tt-hidden": "hidden-states", "tt-full": "full", "tt-hidden-nc": "hidden-states",
                  "tt-full-nc": "full"}[base]
        taps = "hooks" if path == "hooks" else "forward"
        path = "" if path == "hooks" else path
        # dlpack: the native path with the taps reading tensor geometry through a DLPack export instead
        # of the TensorImpl (agent/_tensorgeom switched off for this agent; each agent sets it at start)
        if path == "dlpack":
            os.environ["TENSORTRACE_GEOMETRY"] = "0"
        else:
            os.environ.pop("TENSORTRACE_GEOMETRY", None)
        agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="bench", ring_capacity=(1 << 30) if device == "cuda" else (512 << 20),
                                         device_staging_bytes=1 << 30,
                                         capture_path="native" if path == "dlpack" else (path or CAPTURE_PATH),
                                         module_taps=taps,
                                         pod=f"bench{batch}{mode.replace('@', '-')}", device=device),
                             Selection.preset(preset))
        os.environ.pop("TENSORTRACE_GEOMETRY", None)
        extra["capture_path"] = agent.capture_path
        extra["geometry"] = "tensorimpl" if agent.capture_path == "native" and not agent.geometry_reason else "dlpack/accessors"
        consumer = None if base.endswith("-nc") else start_consumer(agent.ring_path)
        backend = HFBackend(model, agent)
        stamp.agent = agent
        counts = {}
        try:
            t0 = time.perf_counter()
            backend.generate(ids, attention_mask=mask, **gen)
        finally:
            backend.detach()
            agent.flush()
            counts = stop_consumer(consumer) if consumer else {}
            st = agent.stats()
            extra = {**extra, "records_written": st.written, "records_dropped": st.dropped,
                     "bytes_written": st.bytes_written, "consumer_records": counts.get("records", 0)}
            agent.close()
            os.unlink(agent.ring_path)
    elif mode in ("noop-hidden", "noop-full", "wrap-full"):
        handles = noop_hooks(model, {"noop-hidden": "hidden-states", "noop-full": "full", "wrap-full": "full"}[mode],
                             ring_dir, wrap=mode.startswith("wrap"))
        try:
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, **gen)
        finally:
            for h in handles:
                h.remove()
    elif mode in ("hooks-clone", "hooks-save", "sync-copy"):
        out_dir = tempfile.mkdtemp(dir=ring_dir) if mode == "hooks-save" else None
        cap = HookCapture(model, mode, out_dir)
        try:
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, **gen)
        finally:
            cap.remove()
            if out_dir:
                extra = {"files": cap.n_saved}
                shutil.rmtree(out_dir)
    elif mode == "hidden-states":
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                       return_dict_in_generate=True, **gen)
    elif mode == "nnsight":
        n = model.config.num_hidden_layers
        t0 = time.perf_counter()
        with nnsight_model.generate({"input_ids": ids, "attention_mask": mask}, **gen) as tracer:
            with tracer.all():
                for i in range(n):
                    nnsight_model.model.layers[i].input.save()
                nnsight_model.model.norm.output.save()
                nnsight_model.lm_head.output.save()
    else:
        raise ValueError(mode)
    times = stamp.times
    prefill = times[0] - t0
    steps = [b - a for a, b in zip(times, times[1:])]   # one entry per decode forward
    if stamp.agent_ns:
        # The agent's own share of each decode step: its inference-thread time in that step
        # (stats.thread_seconds) over the step's wall time. Unlike throughput, this does not
        # drown in the machine's run-to-run noise; it leaves out indirect costs (caches, the
        # consumer process competing for CPUs), which the paired throughput numbers include.
        ns = stamp.agent_ns
        extra["agent_share"] = [(b - a) / 1e9 / st for a, b, st in zip(ns, ns[1:], steps)]
        extra["agent_ms_per_step"] = [(b - a) / 1e6 for a, b in zip(ns, ns[1:])]
    return prefill, steps, extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="batches 1 and 8, fewer tokens, one repeat")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--modes", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); 1 is steadier on a shared machine")
    p.add_argument("--json", default=".cache/bench/capture_overhead.json")
    p.add_argument("--path", default="auto",
                   help="the agent's tap path(s): auto | native | python | native,python (every tt-* mode on "
                        "both, interleaved in one run: tt-x = native, tt-x@python = the Python path); dlpack: "
                        "the native path with tensor geometry through DLPack, not the TensorImpl (tt-x@dlpack)")
    p.add_argument("--module-taps", default="forward",
                   help="forward | forward,hooks: with hooks, every tt-* mode also as tt-x@hooks (the first "
                        "path, taps as PyTorch hooks instead of wrapped forwards; agent/forward_wrap.py)")
    args = p.parse_args(argv)
    global CAPTURE_PATH
    paths = args.path.split(",")
    for x in paths:
        if x not in ("auto", "native", "python", "dlpack"):
            p.error(f"--path {x!r}: choose from auto, native, python, dlpack")
    CAPTURE_PATH = paths[0]
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = args.device == "cuda"
    if cuda:
        model = make_model("cuda", hidden=2560, layers=36, inter=9728, vocab=32000, heads=32, kv_heads=8,
                           dtype=torch.bfloat16)
        modes = ["none", "tt-hidden", "sync-copy"]
    else:
        model = make_model("cpu", hidden=1024, layers=8, inter=2816, vocab=32000, heads=16, kv_heads=8,
                           dtype=torch.float32)
        modes = ["none", "tt-hidden", "tt-full", "tt-hidden-nc", "hooks-clone", "hooks-save", "hidden-states",
                 "nnsight"]
    if args.modes:
        modes = args.modes.split(",")
    extra_variants = paths[1:] + (["hooks"] if "hooks" in args.module_taps.split(",") else [])
    if extra_variants:   # each tt-* mode in every further variant too, right after it (same repeat)
        modes = [x for m in modes for x in ([m] + [f"{m}@{q}" for q in extra_variants] if m.startswith("tt-") else [m])]
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    prompt_len = args.prompt_len or (32 if args.quick else 64)
    new_tokens = args.new_tokens or (9 if args.quick else 17)

    nnsight_model, nnsight_error = None, ""
    if "nnsight" in modes:
        try:
            from nnsight import LanguageModel

            nnsight_model = LanguageModel(model, tokenizer=_word_tokenizer(model.config.vocab_size))
            run_one(model, "nnsight", 1, 4, 2, args.device, tempfile.gettempdir(), nnsight_model)
        except Exception as e:  # noqa: BLE001 - recorded, not hidden
            nnsight_error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            modes = [m for m in modes if m != "nnsight"]
            print(f"nnsight unavailable: {nnsight_error}", file=sys.stderr)

    load_before = os.getloadavg()
    ring_dir = tempfile.mkdtemp(prefix="tt-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    results: dict = {}
    try:
        run_one(model, "none", 1, 8, 3, args.device, ring_dir)  # warm-up
        for b in batches:
            run_one(model, "none", b, prompt_len, new_tokens, args.device, ring_dir)  # warm-up at this batch size
            samples = {m: [] for m in modes}
            for _ in range(repeats):
                for m in modes:
                    pf, dc, extra = run_one(model, m, b, prompt_len, new_tokens, args.device, ring_dir, nnsight_model)
                    samples[m].append((pf, dc, extra))
            for m in modes:
                # Medians: of the prefill times, and of every decode step of every repeat (robust
                # to the hiccups of a shared machine, unlike a mean over a whole generate).
                pf = statistics.median(s[0] for s in samples[m])
                step = statistics.median(x for s in samples[m] for x in s[1])
                # Paired: this mode's median step over the "none" run of the same repeat (the runs
                # of one repeat are seconds apart; the load of a shared machine drifts slower).
                paired = None
                if "none" in samples:
                    paired = statistics.median(
                        statistics.median(s[1]) / statistics.median(n[1]) - 1
                        for s, n in zip(samples[m], samples["none"]))
                # vs floor: this mode's paired overhead minus the in-process floor's (hooks-clone:
                # every tap hooked and cloned, nothing exported) in the same repeat, in points,
                # with a bootstrap 90% interval of the median over repeats
                vs_floor = vs_floor_ci = None
                if "none" in samples and FLOOR in samples:
                    diffs = [(statistics.median(s[1]) - statistics.median(f[1])) / statistics.median(n[1])
                             for s, n, f in zip(samples[m], samples["none"], samples[FLOOR])]
                    vs_floor, vs_floor_ci = statistics.median(diffs), median_ci(diffs)
                shares = [x for smp in samples[m] for x in smp[2].get("agent_share", [])]
                agent_ms = [x for smp in samples[m] for x in smp[2].get("agent_ms_per_step", [])]
                results.setdefault(str(b), {})[m] = {
                    "decode_overhead_paired": paired,
                    "paired_vs_floor_points": vs_floor, "paired_vs_floor_ci90": vs_floor_ci,
                    "agent_share_of_decode_step_median": statistics.median(shares) if shares else None,
                    "agent_ms_per_decode_step_median": statistics.median(agent_ms) if agent_ms else None,
                    "prefill_tokens_per_s": b * prompt_len / pf,
                    "decode_tokens_per_s": b / step,
                    "decode_step_ms_median": step * 1000,
                    "prefill_s": [s[0] for s in samples[m]],
                    "decode_step_ms": [[round(x * 1000, 3) for x in s[1]] for s in samples[m]],
                    **{k: v for k, v in samples[m][-1][2].items() if k not in ("agent_share", "agent_ms_per_step")},
                }
    finally:
        shutil.rmtree(ring_dir, ignore_errors=True)

    print(f"\ncapture overhead on {args.device} ({platform.node()}, {os.cpu_count()} cpus, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}); "
          f"prompt {prompt_len} tokens, {new_tokens - 1} decode steps x {repeats} repeats; "
          f"median prefill, median decode step; load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"tap path(s) {','.join(paths)}")
    print(f"{'batch':>5} {'mode':<19} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs none':>15} "
          f"{'step, paired':>13} {'agent/step':>11} {'agent ms':>9} {'dropped':>8}")
    for b in batches:
        base = results[str(b)]["none"]["decode_tokens_per_s"] if "none" in results[str(b)] else None
        for m in modes:
            r = results[str(b)][m]
            rel = f"{(r['decode_tokens_per_s'] / base - 1) * 100:+.1f}%" if base else ""
            paired = f"{r['decode_overhead_paired'] * 100:+.1f}%" if r.get("decode_overhead_paired") is not None else ""
            share = r.get("agent_share_of_decode_step_median")
            share = f"{share * 100:.2f}%" if share is not None else ""
            ams = r.get("agent_ms_per_decode_step_median")
            ams = f"{ams:.3f}" if ams is not None else ""
            print(f"{b:>5} {m:<19} {r['prefill_tokens_per_s']:>14.1f} {r['decode_tokens_per_s']:>13.1f} "
                  f"{rel:>15} {paired:>13} {share:>11} {ams:>9} {r.get('records_dropped', ''):>8}")
    if any(r.get("paired_vs_floor_points") is not None for rb in results.values() for r in rb.values()):
        print(f"\npaired decode-step overhead minus the floor's ({FLOOR}) in the same repeat, points "
              f"(median over repeats, bootstrap 90% interval)")
        for b in batches:
            for m in modes:
                r = results[str(b)][m]
                if m != FLOOR and r.get("paired_vs_floor_points") is not None:
                    lo, hi = r["paired_vs_floor_ci90"]
                    print(f"{b:>5} {m:<19} {r['paired_vs_floor_points'] * 100:>+7.2f}  [{lo * 100:+.2f}, {hi * 100:+.2f}]")
    if nnsight_error:
        print(f"nnsight: not measured ({nnsight_error})")
    doc = {"benchmark": "capture_overhead", "device": args.device, "host": platform.node(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "load_average": [load_before, os.getloadavg()], "capture_paths": paths, "prompt_len": prompt_len,
           "command": "scripts/bench/capture_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "decode_steps": new_tokens - 1, "repeats": repeats, "results": results,
           "nnsight_error": nnsight_error,
           "model": {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                     "intermediate": model.config.intermediate_size, "vocab": model.config.vocab_size,
                     "dtype": str(next(model.parameters()).dtype)}}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
