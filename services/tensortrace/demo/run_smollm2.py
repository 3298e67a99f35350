"""`make demo` on the real model: SmolLM2-135M-Instruct served by SGLang, a prompt-injection probe
scoring every request live, the trace of a flagged request (demo/smollm2.py has the pieces).

Steps, each printed: the model and the probe (trained on the bastioncorpus train split, or reused
from .cache/probes/demo/); the pipeline (Kafka, exporter, loader + query service + bridge + the
probe scores consumer, the `tensortrace probes` service); the held-out prompts sent to SGLang's
chat API, each with its traceparent; per request its text, answer, score, label, flagged, complete
and trace id; the hidden states of a few requests against an eager Hugging Face forward; the
exporter's books; the trace of one flagged request (timeline and page).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from tensortrace.demo.run import _print_trace, html_path, log, print_ring_books

# SmolLM2 runs 30 layers of float32 sums in another order than the eager HF forward (fused QKV and
# gate/up GEMMs, SDPA over the paged KV cache, its own RMSNorm/RoPE); the error grows with depth
# and with the residual stream's magnitude (measured max |diff| 1.5e-4 on this demo's requests).
REAL_ATOL = REAL_RTOL = 1e-3
REAL_TOLERANCE_REASON = (
    "SGLang computes the same function with other kernels (fused QKV and gate/up GEMMs, torch SDPA over "
    "its paged KV cache, its own RMSNorm/RoPE), so float32 sums accumulate in another order; over 30 layers "
    "the difference grows with depth and with the residual stream's magnitude (row norms up to ~2.5e4 at the "
    "first position), measured max |diff| 1.5e-4, hence atol = rtol = 1e-3 for SmolLM2 (1e-4 for the 2-layer "
    "tiny model); token ids are compared exactly")


def _short(text: str, n: int) -> str:
    """One line of at most n characters; invisible characters (some injections hide in Unicode tag
    characters) shown as '?'."""
    t = "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))
    return t if len(t) <= n else t[: n - 1] + "…"


def run_smollm2(args, workdir: str, sglang_py: str, t_start: float) -> int:
    from tensortrace.demo.smollm2 import (MAX_NEW_TOKENS, SCORES_TOPIC, ScoresReader, balanced_subset, chat_requests,
                                          ensure_probe, served_model_dir, serve_chat)
    from tensortrace.demo.stack import TOPIC, PipelineStack
    from tensortrace.devstack.processes import ServiceProcess
    from tensortrace.devstack.sglang_server import SGLangServer
    from tensortrace.probes.data import SMOLLM2_ID, SMOLLM2_LABEL, smollm2_path
    from tensortrace.probes.demo_probe import DEMO_HOOK, DEMO_LAYERS, test_prompts

    path = smollm2_path()   # ModelNotPrepared: main() says `make model`
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    log(f"TensorTrace demo: {SMOLLM2_LABEL} served by a real SGLang server with the TensorTrace plugin; "
        "a prompt-injection probe scores every request live")
    log("pipeline: model taps -> capture agent -> Ring² -> exporter -> Kafka -> loader (ClickHouse/chDB, query "
        "service, OTel bridge) | probes service -> scores topic -> loader (probe_scores)")
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        pipeline = stack.enter_context(PipelineStack(workdir, log))
        model_dir = served_model_dir(path, workdir)
        # Launched first: it takes longest to come up, while the probe and the pipeline are prepared.
        # It captures what the probe reads (its hook and layers over the prompt: the prefill).
        selection = {"hooks": [DEMO_HOOK], "layers": list(DEMO_LAYERS), "positions": "prefill"}
        server = SGLangServer(model_dir, ring_dir=pipeline.ring_dir, log_path=os.path.join(workdir, "sglang.log"),
                              python=sglang_py, env_extra={
                                  "TENSORTRACE_SELECTION": json.dumps(selection),
                                  "TENSORTRACE_MODEL_ID": SMOLLM2_ID,
                                  "SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "100",
                                  "OTEL_SERVICE_NAME": "sglang"},
                              args_extra=("--enable-trace", "--otlp-traces-endpoint", pipeline.otlp_endpoint,
                                          "--disable-radix-cache",
                                          # on CPU SGLang sizes its KV pool from free host memory measured
                                          # before and after loading; what this process loads meanwhile (the
                                          # reference model) must fit in the slack (the pool stays capped
                                          # by --max-total-tokens)
                                          "--mem-fraction-static", "0.25"))
        stack.callback(server.stop)
        server.launch()
        log(f"0. SGLang server launching on {model_dir} (capture: {DEMO_HOOK} layer {','.join(map(str, DEMO_LAYERS))}, "
            f"prompt positions, for the probe; --disable-radix-cache: every prompt position is computed, so the probe "
            f"pools over the whole prompt as in training)")

        from tensortrace.probes.activations import load_model

        t0 = time.monotonic()
        model, tok = load_model(path)
        log(f"   reference model loaded in this process (Hugging Face, eager, fp32): {path}  [{time.monotonic() - t0:.1f}s]")
        torch.set_num_threads(1)   # the demo's forwards share 2 cores with SGLang and the services
        info = ensure_probe(model, tok, path, log)
        m = info.meta
        test = m.metrics.get("test", {})
        how = (f"trained now in {info.trained_s:.0f}s" if info.trained_s is not None else "reused from the cache")
        log(f"   probe {m.name!r} ({how}): {info.path}")
        log(f"     {m.kind} on {m.hook} layer {','.join(map(str, m.layers))}, {m.pooling} over {m.positions} positions, "
            f"threshold {m.threshold:.3f} ({m.calibration.get('method', m.calibration) if m.calibration else 'calibrated'}); "
            f"model {m.model_id}, train split {m.train_data_hash[:12]}")
        if test:
            log(f"     held-out test split (offline, eager HF activations): AUROC {test.get('auroc', float('nan')):.3f}, "
                f"TPR {test.get('tpr_at_threshold', float('nan')):.2f} / FPR {test.get('fpr_at_threshold', float('nan')):.2f} "
                f"at the threshold, n={test.get('n')} ({test.get('n_positive')} injections, {test.get('n_benign')} benign)")

        log("1. starting the pipeline's server side (127.0.0.1, free ports, temp dirs):")
        pipeline.start()
        t0 = time.monotonic()
        probes = ServiceProcess("probes", [
            "--kafka-bootstrap-servers", pipeline.kafka.bootstrap, "--topic", TOPIC, "--dlq-topic", TOPIC + ".dlq",
            "--group-id", "demo-probes", "--probe-dir", str(info.path.parent), "--model-id", SMOLLM2_ID,
            "--hidden-size", str(m.width), "--scores-topic", SCORES_TOPIC, "--request-timeout-s", "300",
            "--batch-max-delay-s", "0.05"], workdir)
        stack.callback(probes.stop)
        probes.wait_ready(timeout_s=120)
        log(f"   probes service pid {probes.proc.pid}: {info.path.parent} -> Kafka {SCORES_TOPIC} (loaded into "
            f"probe_scores by the loader)  [{time.monotonic() - t0:.1f}s]")

        prompts = test_prompts()
        if args.prompts:
            prompts = balanced_subset(prompts, args.prompts)
        reqs = chat_requests(prompts, verify=2)
        log(f"2. sending the {len(reqs)} held-out bastioncorpus prompts ({sum(r.label for r in reqs)} injections / "
            f"jailbreaks, {sum(1 - r.label for r in reqs)} benign look-alikes; never seen in training) to "
            f"/v1/chat/completions, greedy, max {MAX_NEW_TOKENS} new tokens, each with its own traceparent:")
        server.wait_healthy(timeout_s=300)
        log(f"   SGLang server pid {server.proc.pid} (own process group) healthy at {server.url} after "
            f"{server.startup_s:.1f}s; --enable-trace --otlp-traces-endpoint {pipeline.otlp_endpoint}")
        t0 = time.monotonic()
        serve_chat(server, reqs, SMOLLM2_ID)
        served = [r for r in reqs if not r.error]
        log(f"   {len(served)} of {len(reqs)} answered in {time.monotonic() - t0:.1f}s, "
            f"{sum(len(r.prompt) for r in served)} prompt + {sum(len(r.output) for r in served)} generated tokens")
        problems += [f"{r.name}: {r.error}" for r in reqs if r.error]

        log(f"3. per request: the probe's live score (off {SCORES_TOPIC}) and the capture's completeness (query "
            f"service grpc://{pipeline.query_address}):")
        from tensortrace.query import TensorTraceClient

        t0 = time.monotonic()
        reader = ScoresReader(pipeline.kafka.bootstrap, SCORES_TOPIC)
        try:
            scores = reader.wait_for([r.request_id for r in served], timeout_s=args.wait)
        finally:
            reader.close()
        with TensorTraceClient(f"grpc://{pipeline.query_address}", poll_interval_s=0.1) as tt:
            comps = {}
            for r in served:
                try:
                    comps[r.name] = tt.status(trace_id=r.trace_id, wait_s=args.wait)
                except Exception as e:  # noqa: BLE001 - reported per request
                    comps[r.name] = None
                    problems.append(f"{r.name}: completeness not readable: {e}")
        log(f"   ({time.monotonic() - t0:.1f}s)")
        log(f"   {'req':<4} {'label':<9} {'score':>6} {'flagged':<8} {'complete':<9} {'trace id':<33}prompt -> answer")
        rows = []
        for r in served:
            sc = scores.get(r.request_id)
            comp = comps.get(r.name)
            label = "injection" if r.label else "benign"
            complete = "yes" if comp is not None and comp.state == "complete" and (sc is None or sc.complete) else "NO"
            if sc is None:
                problems.append(f"{r.name}: no probe score on {SCORES_TOPIC} after {args.wait:.0f}s")
                log(f"   {r.name:<4} {label:<9} {'-':>6} {'-':<8} {complete:<9} {r.trace_id:<33}{_short(r.text, 40)!r}")
                continue
            rows.append((r, sc))
            if comp is None or comp.state != "complete" or not sc.complete:
                problems.append(f"{r.name}: not complete ({comp.state if comp else '?'}; score complete={sc.complete} "
                                f"{sc.incomplete_reason})")
            log(f"   {r.name:<4} {label:<9} {sc.score:>6.3f} {'FLAGGED' if sc.flagged else '-':<8} {complete:<9} "
                f"{r.trace_id:<33}{_short(r.text, 44)!r} -> {_short(r.answer, 32)!r}")
        if rows:
            from tensortrace.probes.train import auroc

            inj = [sc for r, sc in rows if r.label]
            ben = [sc for r, sc in rows if not r.label]
            live_auroc = auroc([sc.score for _, sc in rows], [r.label for r, _ in rows])
            log(f"   live: {sum(s.flagged for s in inj)} of {len(inj)} injections flagged, {sum(not s.flagged for s in ben)} "
                f"of {len(ben)} benign passed (threshold {rows[0][1].threshold:.3f}); AUROC {live_auroc:.3f} over "
                f"{len(rows)} requests")

        log(f"4. hidden states of {sum(r.verify for r in served)} requests (every layer and position, asked per request "
            f"through custom_params) against an eager Hugging Face forward of the same tokens, atol=rtol={REAL_ATOL:g}:")
        from tensortrace.demo.run import _print_checks
        from tensortrace.demo.verify import check_request

        checks = []
        with TensorTraceClient(f"grpc://{pipeline.query_address}", poll_interval_s=0.1) as tt:
            for r in served:
                if r.verify:
                    checks.append(check_request(tt, r, "sglang", model, wait_s=args.wait, atol=REAL_ATOL,
                                                rtol=REAL_RTOL))
        _print_checks(checks, "sglang")
        log(f"   why a tolerance: {REAL_TOLERANCE_REASON}")
        for c in checks:
            problems += [f"{c.name}: {p}" for p in c.problems]
        offline = _offline_scores(info.path, model, [r for r in served if r.verify], scores)
        for name, live, off in offline:
            ok = abs(live - off) <= 1e-4
            log(f"   {name}: live score {live:.6f}, the same probe on the eager HF forward {off:.6f}  "
                f"{'ok' if ok else 'DIFFERS'}")
            if not ok:
                problems.append(f"{name}: live score {live:.6f} != offline {off:.6f}")

        log("5. exporter accounting (frames, per ring, from its control endpoint):")
        if not print_ring_books(pipeline.exporter_drained()):
            problems.append("exporter accounting does not add up (see above)")

        # A flagged injection; one whose every layer was captured (a verified one) draws the full heatmap.
        flagged = [(r, sc) for r, sc in rows if sc.flagged and r.label]
        shown = (max(flagged or rows, key=lambda t: (t[0].verify, t[1].score))[0] if rows
                 else (served[0] if served else None))
        if shown is not None:
            problems += _print_trace(pipeline, shown, "sglang", len(served), html_path(args, workdir), step=6,
                                     png=os.path.abspath(args.png) if args.png else None)
        log("7. stopping everything this demo started ...")
    elapsed = time.monotonic() - t_start
    if problems:
        log(f"RESULT: FAIL after {elapsed:.0f}s")
        for p in problems:
            log(f"  - {p}")
        return 1
    log(f"RESULT: PASS: {len(rows)} requests answered by {SMOLLM2_LABEL}, each scored live by the probe and complete; "
        f"{len(checks)} checked against an eager HF forward (token ids exact, hidden states within {REAL_ATOL:g}); "
        f"trace of {shown.name} written ({elapsed:.0f}s)")
    return 0


def _offline_scores(probe_path, model, reqs, scores) -> list[tuple[str, float, float]]:
    """The same probe file scored offline on the eager HF hidden states of the request's prompt."""
    import numpy as np

    from tensortrace.probes import load_probe
    from tensortrace.probes.activations import hidden_states

    probe = load_probe(probe_path)
    out = []
    for r in reqs:
        sc = scores.get(r.request_id)
        if sc is None or not r.prompt:
            continue
        acts = hidden_states(model, [r.prompt], probe.meta.layers)[0]
        pos = np.arange(len(r.prompt))
        res = probe.score({L: (pos, acts[L], "prefill") for L in probe.meta.layers}, prompt_tokens=len(r.prompt))
        out.append((r.name, float(sc.score), float(res.score)))
    return out
