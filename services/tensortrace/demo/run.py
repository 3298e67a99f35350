"""The demo's steps and its printed account (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time


def log(msg: str = "") -> None:
    print(msg, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tensortrace demo",
                                description="the whole pipeline on this machine, checked end to end")
    p.add_argument("--backend", choices=("sglang", "hf"), default="sglang",
                   help="sglang: a real SGLang server with the plugin (default); hf: Hugging Face generate "
                        "in this process with the capture agent (the fallback)")
    p.add_argument("--model", choices=("smollm2", "tiny"), default=None,
                   help="smollm2: SmolLM2-135M-Instruct (dequantized from Q4_1; `make model`) with a live "
                        "prompt-injection probe (the default with SGLang); tiny: a 2-layer random Llama, "
                        "nothing to prepare (the default with --backend hf)")
    p.add_argument("--prompts", type=int, default=0,
                   help="smollm2: send N of the held-out prompts, injections and benign ones in turn "
                        "(default: all 72 of the test split)")
    p.add_argument("--sglang-venv", default=None,
                   help="the SGLang virtualenv (default $SGLANG_VENV or .cache/sglang-venv; `make sglang-env`)")
    p.add_argument("--workdir", default=None, help="keep rings, chDB, logs and the model here (default: a temp dir, removed)")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for each request to be loaded")
    p.add_argument("--html", default=None,
                   help="write the traced request's page here (default: WORKDIR/trace.html with --workdir, "
                        "else .cache/demo/trace.html)")
    p.add_argument("--png", default=None, help="also write the traced request's picture as a PNG here "
                                               "(`tensortrace trace --png`)")
    return p.parse_args(argv)


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from tensortrace.devkafka import LocalKafkaError

    sglang_py = None
    if args.backend == "sglang":
        from tensortrace.devstack.sglang_server import sglang_python

        sglang_py = sglang_python(args.sglang_venv)
        if not os.access(sglang_py, os.X_OK):
            print(f"error: SGLang venv not found ({sglang_py} missing): run `make sglang-env`, "
                  "or `make demo BACKEND=hf` for the Hugging Face fallback", file=sys.stderr)
            return 1
    model = args.model or ("smollm2" if args.backend == "sglang" else "tiny")
    if model == "smollm2" and args.backend != "sglang":
        print("error: --model smollm2 runs on the SGLang backend (the HF fallback uses the tiny model)", file=sys.stderr)
        return 2
    if model == "smollm2":
        from tensortrace.probes.data import ModelNotPrepared, smollm2_path

        try:
            smollm2_path()
        except ModelNotPrepared as e:
            print(f"error: {e} (or `--model tiny` for the random tiny model)", file=sys.stderr)
            return 1
    workdir = args.workdir or tempfile.mkdtemp(prefix="tensortrace-demo-")
    os.makedirs(workdir, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # SIGTERM unwinds like Ctrl-C: everything is stopped
    t_start = time.monotonic()
    try:
        if model == "smollm2":
            from tensortrace.demo.run_smollm2 import run_smollm2

            return run_smollm2(args, workdir, sglang_py, t_start)
        return _run(args, workdir, sglang_py, t_start)
    except LocalKafkaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated):
        print("interrupted: everything this demo started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args, workdir: str, sglang_py: str | None, t_start: float) -> int:
    from tensortrace.demo.stack import PipelineStack
    from tensortrace.devstack.tiny_model import make_tiny_model

    backend = args.backend
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # weight loading/writing bars would clutter the account
    log(f"TensorTrace demo, backend {backend}: "
        + ("a real SGLang server with the TensorTrace plugin" if backend == "sglang"
           else "Hugging Face generate with the capture agent (the fallback)"))
    log("pipeline: model taps -> capture agent -> Ring² (shared-memory ring file) -> exporter process -> "
        "Kafka -> loader process -> ClickHouse (chDB) -> query service (gRPC) -> SDK")
    t0 = time.monotonic()
    model_path = make_tiny_model(os.path.join(workdir, "model"), arch="llama", layers=2, hidden=64)
    log(f"0. tiny random Llama written locally (2 layers, hidden 64, word-level tokenizer; nothing downloaded): "
        f"{model_path}  [{time.monotonic() - t0:.1f}s]")

    with contextlib.ExitStack() as stack:
        pipeline = stack.enter_context(PipelineStack(workdir, log))
        server = None
        if backend == "sglang":
            from tensortrace.devstack.sglang_server import SGLangServer

            # Launched first: it takes longest to come up, while the broker and services start.
            server = SGLangServer(model_path, ring_dir=pipeline.ring_dir, log_path=os.path.join(workdir, "sglang.log"),
                                  python=sglang_py, env_extra={
                                      "TENSORTRACE_SELECTION": json.dumps({"preset": "hidden-states", "hooks": ["token_ids"]}),
                                      "TENSORTRACE_MODEL_ID": "tiny-llama",
                                      # SGLang's own spans: batched every 100 ms (default 5 s) to the bridge
                                      "SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "100",
                                      "OTEL_SERVICE_NAME": "sglang"},
                                  args_extra=("--enable-trace", "--otlp-traces-endpoint", pipeline.otlp_endpoint))
            stack.callback(server.stop)
            server.launch()
        log("1. starting the pipeline's server side (127.0.0.1, free ports, temp dirs):")
        pipeline.start()

        log("2. serving requests, each with its own W3C traceparent:")
        t0 = time.monotonic()
        agent_stats = None
        if backend == "sglang":
            server.wait_healthy(timeout_s=240)
            log(f"   SGLang server pid {server.proc.pid} (own process group) healthy at {server.url} after "
                f"{server.startup_s:.1f}s; plugin loaded via SGLANG_PLUGINS=tensortrace, rings in {pipeline.ring_dir}; "
                f"--enable-trace --otlp-traces-endpoint {pipeline.otlp_endpoint} (the bridge's receiver)")
            from tensortrace.demo.serve import serve_sglang

            t0 = time.monotonic()
            requests = serve_sglang(server)
            log(f"   {len(requests)} concurrent requests of different lengths served in {time.monotonic() - t0:.1f}s "
                f"(greedy, {', '.join(sorted({r.api for r in requests}))})")
        else:
            from tensortrace.demo.serve import serve_hf

            requests, agent_stats = serve_hf(model_path, pipeline.ring_dir)
            log(f"   one batched HFBackend.generate of {len(requests)} left-padded requests in "
                f"{time.monotonic() - t0:.1f}s (greedy; an uninstrumented generate of the same batch is the reference)")
        for r in requests:
            log(f"   {r.name:<6} {r.api:<19} prompt {len(r.prompt):>2} tokens -> generated {len(r.output)}  "
                f"traceparent {r.traceparent}")

        log(f"3. reading every request back through the query service (grpc://{pipeline.query_address}), "
            f"waiting up to {args.wait:.0f}s each for its summary and records to be loaded:")
        from tensortrace.demo.verify import SGLANG_ATOL, TOLERANCE_REASON, check_request
        from tensortrace.query import TensorTraceClient

        model = None
        if backend == "sglang":
            from tensortrace.demo.serve import load_hf_model

            model = load_hf_model(model_path)
        t0 = time.monotonic()
        with TensorTraceClient(f"grpc://{pipeline.query_address}", poll_interval_s=0.1) as tt:
            checks = [check_request(tt, r, backend, model, wait_s=args.wait) for r in requests]
        log(f"   read back in {time.monotonic() - t0:.1f}s")

        log("4. per request (reference: " + ("the uninstrumented model's own hidden states, bit for bit)"
                                             if backend == "hf" else
                                             f"an eager Hugging Face forward of the same tokens, atol=rtol={SGLANG_ATOL:g})"))
        _print_checks(checks, backend)
        if backend == "sglang":
            log(f"   why a tolerance for SGLang: {TOLERANCE_REASON}")

        shown = next((c for c in checks if c.ok), checks[0])
        log(f"5. $ tensortrace show {shown.trace_id} --server {pipeline.query_address}")
        from tensortrace.query import show

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            show_rc = show.main([shown.trace_id, "--server", pipeline.query_address])
        for line in out.getvalue().rstrip().splitlines():
            log(f"   {line}")

        log("6. exporter accounting (frames, per ring, from its control endpoint):")
        accounting_ok = _print_accounting(pipeline, agent_stats, checks, backend)
        if pipeline.loader.stats:
            s = pipeline.loader.stats
            log(f"   loader: {s.get('tensor_rows', 0)} tensor rows and {s.get('summary_rows', 0)} summaries inserted, "
                f"{s.get('dlq_messages', 0)} dead-lettered")

        traced = _pick_traced(checks, requests)
        trace_problems = _print_trace(pipeline, traced, backend, len(requests), html_path(args, workdir),
                                  png=os.path.abspath(args.png) if args.png else None)

        failed = [c for c in checks if not c.ok]
        problems = [f"{c.name}: {p}" for c in failed for p in c.problems]
        if show_rc != 0:
            problems.append(f"tensortrace show exited {show_rc}")
        if not accounting_ok:
            problems.append("exporter accounting does not add up (see above)")
        problems += trace_problems
        log("8. stopping everything this demo started ...")
    elapsed = time.monotonic() - t_start
    if problems:
        log(f"RESULT: FAIL after {elapsed:.0f}s")
        for p in problems:
            log(f"  - {p}")
        return 1
    verdict = ("hidden states bit-identical to the model's own" if backend == "hf"
               else f"token ids exact, hidden states within {SGLANG_ATOL:g} of an eager HF forward")
    log(f"RESULT: PASS: {len(checks)} requests complete, trace ids match their traceparent headers, {verdict} "
        f"({elapsed:.0f}s)")
    return 0


def html_path(args, workdir: str) -> str:
    """Where the trace page goes: --html, else the work directory when kept, else .cache/demo/ (it
    outlives the demo's temp directory)."""
    if args.html:
        return os.path.abspath(args.html)
    return os.path.abspath(os.path.join(args.workdir or os.path.join(".cache", "demo"), "trace.html"))


def _pick_traced(checks, requests):
    """The request whose trace is shown: the one with the most generated tokens (most decode steps)."""
    ok = [c for c in checks if c.ok] or list(checks)
    return max(ok, key=lambda c: (c.generated_tokens, c.prompt_tokens))


def _print_trace(pipeline, shown, backend: str, n_requests: int, html: str, step: int = 7,
                 png: str | None = None) -> list[str]:
    """Wait for the bridge's spans, then `tensortrace trace` on the request: its timeline here, its
    picture as an HTML page. Read through the loader's query service while everything runs (the
    chDB engine has one owner: the loader process); where that service does not serve traces, the
    loader is stopped and the chDB path read directly."""
    problems: list[str] = []
    engine = backend == "sglang"
    log(f"{step}. the trace of {shown.name}: SGLang's spans (received over OTLP by the bridge in the loader process) and "
        f"TensorTrace's capture/export/kafka spans, in otel_traces of the same chDB engine"
        if engine else f"{step}. the trace of {shown.name}: TensorTrace's capture/export/kafka spans (the bridge in the "
                       "loader process), in otel_traces of the same chDB engine; no engine spans with the HF backend")
    t0 = time.monotonic()
    m = pipeline.wait_for_spans(n_requests, engine_spans=10 if engine else 0)
    spans = m.get('tensortrace_bridge_spans_total{destination="clickhouse"}', 0)
    engine_spans = m.get('tensortrace_bridge_engine_spans_total{destination="clickhouse"}', 0)
    received = m.get("tensortrace_bridge_otlp_spans_received_total", 0)
    log(f"   bridge: {spans:.0f} TensorTrace spans for {sum(v for k, v in m.items() if k.startswith('tensortrace_bridge_requests_total')):.0f} "
        f"requests, {engine_spans:.0f} engine spans written ({received:.0f} received over OTLP)  "
        f"[{time.monotonic() - t0:.1f}s]")
    os.makedirs(os.path.dirname(html), exist_ok=True)
    outputs = ["--html", html] + (["--png", png] if png else [])
    t0 = time.monotonic()
    cmd = ["tensortrace", "trace", shown.trace_id, "--server", pipeline.query_address, *outputs]
    r = _trace(cmd)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        rc = pipeline.stop_loader()
        log(f"   the query service did not serve the trace ({why[:200]}); loader stopped (exit {rc}; SIGTERM "
            "drains) so that its chDB path can be read directly")
        t0 = time.monotonic()
        cmd = ["tensortrace", "trace", shown.trace_id, "--clickhouse", f"chdb://{pipeline.ch_path}", *outputs]
        r = _trace(cmd)
    log(f"   $ {' '.join(cmd)}")
    for line in r.stdout.rstrip().splitlines():
        log(f"   {line}")
    for line in r.stderr.rstrip().splitlines()[-5:]:
        log(f"   {line}")
    if r.returncode != 0:
        return [f"tensortrace trace exited {r.returncode}"]
    size = os.path.getsize(html) if os.path.exists(html) else 0
    log(f"   the picture (timeline, per-layer residual norms over tokens): {html} ({size:,} bytes, "
        f"{time.monotonic() - t0:.1f}s); open file://{html} in a browser, or from another machine: "
        f"`python3 -m http.server -b 127.0.0.1 -d {os.path.dirname(html)} 8000` + `ssh -L 8000:127.0.0.1:8000 <host>`, "
        f"then http://127.0.0.1:8000/{os.path.basename(html)}")
    if size == 0:
        problems.append(f"tensortrace trace wrote no page at {html}")
    if spans < 3 * n_requests:
        problems.append(f"the bridge wrote {spans:.0f} spans, expected 3 per request ({3 * n_requests}); "
                        "see loader.log in the work directory (--workdir keeps it)")
    if engine and engine_spans == 0:
        problems.append("no SGLang spans reached otel_traces (see sglang.log in the work directory)")
    if "tensortrace.capture" not in r.stdout:
        problems.append("the trace shows no tensortrace.capture span")
    return problems


def _trace(cmd: list[str]):
    """`tensortrace trace ...` as a subprocess of this interpreter (what a user would type)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "tensortrace.cli", *cmd[1:]], capture_output=True, text=True,
                          timeout=180)


def _print_checks(checks, backend: str) -> None:
    log(f"   {'request':<8}{'trace id':<34}{'tokens':>9}{'captured':>10}{'dropped':>9}{'loaded':>8}  "
        f"{'state':<10}{'stored':>10}{'positions':>11}  {'hidden states vs reference':<28}{'cap->load':>10}")
    for c in checks:
        if c.max_abs_diff is None:
            cmp_ = "-"
        elif c.bit_exact:
            cmp_ = "bit-exact"
        else:
            cmp_ = f"max |diff| {c.max_abs_diff:.1e}"
        if c.token_ids_exact is not None:
            cmp_ += ", ids exact" if c.token_ids_exact else ", ids DIFFER"
        log(f"   {c.name:<8}{c.trace_id:<34}{f'{c.prompt_tokens}+{c.generated_tokens}':>9}{c.records_captured:>10}"
            f"{c.records_dropped:>9}{c.records_loaded:>8}  {c.state:<10}{c.stored_bytes:>8} B{c.positions:>11}  "
            f"{cmp_:<28}{c.capture_to_load_ms:>7.0f} ms  {'ok' if c.ok else 'FAIL'}")
        for p in c.problems:
            log(f"      ! {p}")


def print_ring_books(st) -> bool:
    """The exporter's books per ring (ExporterStatus): produced = published + dropped, nothing pending."""
    ok = bool(st.rings)
    for r in st.rings:
        produced = r.frames_committed + r.frames_dropped_by_producer
        exporter_dropped = sum(r.frames_dropped_by_reason.values())
        published = r.frames_released - exporter_dropped
        balanced = r.frames_pending == 0 and produced == published + r.frames_dropped_by_producer + exporter_dropped
        ok = ok and balanced
        log(f"   {r.ring}: produced {produced} = published {published} + dropped by the agent "
            f"{r.frames_dropped_by_producer} + dropped by the exporter {exporter_dropped}; pending {r.frames_pending}  "
            f"{'ok' if balanced else 'MISMATCH'}")
        log(f"   {'':<{len(r.ring)}}  {r.records_published} records ({r.messages_published} Kafka messages, "
            f"{r.bytes_published} payload bytes) acknowledged by Kafka")
    if not st.rings:
        log("   no ring attached: nothing was captured")
    return ok


def _print_accounting(pipeline, agent_stats, checks, backend: str) -> bool:
    st = pipeline.exporter_drained()
    ok = print_ring_books(st)
    if agent_stats is not None:
        log(f"   agent (this process): {agent_stats.written} records written to the ring, "
            f"{agent_stats.dropped} dropped")
    # Records: every tensor record the requests' summaries count, plus one summary record each.
    published = sum(r.records_published for r in st.rings)
    ours = sum(c.records_captured for c in checks) + len(checks)
    if backend == "hf":
        # Nothing else ran through this agent: the exporter published exactly these.
        balanced = published == ours
        log(f"   records: published {published} = {ours - len(checks)} captured for the {len(checks)} requests "
            f"+ {len(checks)} summaries  {'ok' if balanced else 'MISMATCH'}")
    else:
        # SGLang's own /health check runs a 1-token generation, which the plugin captures too.
        balanced = published >= ours
        log(f"   records: published {published} = {ours - len(checks)} captured for the {len(checks)} requests "
            f"+ {len(checks)} summaries + {published - ours} records of SGLang's own /health probes (1-token generations)"
            f"  {'ok' if balanced else 'MISMATCH'}")
    return ok and balanced
