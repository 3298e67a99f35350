"""SGLang's own spans and TensorTrace's capture spans of one request in one trace, in one table.

A real SGLang server (CPU, tiny random Llama, the TensorTrace plugin) started with
`--enable-trace --otlp-traces-endpoint 127.0.0.1:<the bridge's OTLP receiver>`; one request with a
W3C `traceparent`. On the other side, under the project venv (Kafka, chDB): a local Kafka broker,
`tensortrace exporter` draining the plugin's ring and `tensortrace bridge` with its receiver
(tensortrace.devstack.tracestack). SGLang exports its spans (OTLP/gRPC) to the bridge, which
publishes them to the spans topic and writes them to otel_traces; the capture records go through
the ring, the exporter and the activation topic and become tensortrace.capture/export/kafka spans.
Both end up under the request's trace id in otel_traces.

Needs SGLang's `tracing` extra in the SGLang venv (opentelemetry-sdk and the OTLP exporters;
scripts/sglang/setup-venv.sh installs it): without it the test skips and says so.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import uuid

import pytest

from sglang_harness import ROOT, SGLangServer, require_sglang

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROJECT_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
CALLER_SPAN = "abababababababab"


def _tracing_missing() -> str:
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as e:
        return str(e)
    return ""


class Stack:
    """tensortrace.devstack.tracestack under the project venv, driven line by line."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.err = open(os.path.join(workdir, "tracestack.err"), "w")
        self.proc = subprocess.Popen([PROJECT_PYTHON, "-m", "tensortrace.devstack.tracestack", "--workdir", workdir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     cwd=ROOT)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()

    def read(self, timeout_s: float) -> dict:
        try:
            doc = json.loads(self.lines.get(timeout=timeout_s))
        except queue.Empty:
            raise AssertionError(f"tracestack said nothing for {timeout_s:.0f}s:\n{self.stderr_tail()}") from None
        assert "error" not in doc, f"tracestack: {doc['error']}\n{self.stderr_tail()}"
        return doc

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stderr_tail(self) -> str:
        self.err.flush()
        with open(self.err.name) as f:
            return f.read()[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.err.close()


def test_sglang_spans_and_capture_spans_share_one_trace_in_otel_traces(tmp_path):
    require_sglang()
    missing = _tracing_missing()
    if missing:
        pytest.skip(f"SGLang's tracing extra is not installed in this venv ({missing}); "
                    "`bash scripts/sglang/setup-venv.sh` installs sglang[tracing]")
    if not os.access(PROJECT_PYTHON, os.X_OK):
        pytest.skip(f"Kafka, the exporter and the bridge run under the project venv and {PROJECT_PYTHON} is "
                    "missing: run `make setup`")
    from tensortrace.devstack.tiny_model import make_tiny_model

    stack = Stack(str(tmp_path / "stack"))
    server = None
    try:
        ready = stack.read(timeout_s=180)
        model = make_tiny_model(str(tmp_path / "model"), arch="llama", layers=2, hidden=64)
        server = SGLangServer(model, ring_dir=ready["ring_dir"], log_path=str(tmp_path / "sglang.log"),
                              env_extra={"TENSORTRACE_SELECTION": "logits",
                                         "SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "100",
                                         "OTEL_SERVICE_NAME": "sglang"},
                              args_extra=("--enable-trace", "--otlp-traces-endpoint", ready["otlp"]))
        server.start()
        trace_id = uuid.uuid4().hex
        status, out = server.post("/generate", {"input_ids": [5, 17, 42, 99, 7], "sampling_params": {
            "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}},
            headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"})
        assert status == 200, out
        rid = out["meta_info"]["id"]
        # at least: request span, request_process, prefill_forward, decode_loop; and the captured request
        stack.send(f"collect {trace_id} 4 1 180")
        result = stack.read(timeout_s=240)
    finally:
        if server is not None:
            server.stop()
        stack.close()

    rows = result["rows"]
    names = [r["SpanName"] for r in rows]
    print(f"\notel_traces rows of trace {trace_id}:")
    for r in rows:
        print(f"  {r['ServiceName']:20s} {r['SpanName']!r:50s} parent {r['ParentSpanId'] or '-':16s} "
              f"{r['Duration'] / 1e6:9.3f} ms  {dict(list(r['SpanAttributes'].items())[:3])}")
    assert rows and all(r["TraceId"] == trace_id for r in rows)
    engine = [r for r in rows if r["ServiceName"] == "sglang"]
    ours = {r["SpanName"]: r for r in rows if r["ServiceName"] == "tensortrace-bridge"}
    assert engine, f"no SGLang spans in the trace: {names}\n{result['bridge_log_tail']}"
    engine_names = {r["SpanName"].strip() for r in engine}
    root = [r for r in engine if r["SpanName"].strip() == f"Req {rid[:8]}"]
    assert len(root) == 1, f"no SGLang request span 'Req {rid[:8]}' among {sorted(engine_names)}"
    assert {"request_process", "prefill_forward", "decode_loop"} <= engine_names, sorted(engine_names)
    # one decode_loop per decode step: 4 new tokens = the prefill's + 3 decode steps
    loops = [r for r in engine if r["SpanName"] == "decode_loop"]
    assert sorted(r["SpanAttributes"]["decode_ct"] for r in loops) == ["0", "1", "2"]
    assert root[0]["SpanAttributes"]["rid"] == rid and root[0]["ScopeName"] == "sglang server"
    # TensorTrace's spans of the same request
    assert set(ours) == {"tensortrace.capture", "tensortrace.export", "tensortrace.kafka"}, sorted(names)
    cap = ours["tensortrace.capture"]
    assert cap["SpanAttributes"]["tensortrace.request_id"] == rid
    assert cap["SpanAttributes"]["tensortrace.complete"] == "true", cap["SpanAttributes"]
    # the engine's request span and the capture span both hang under the caller's span
    assert root[0]["ParentSpanId"] == CALLER_SPAN == cap["ParentSpanId"]
    # what TensorTrace captured matches what SGLang says it ran: the prefill and each decode step
    assert int(cap["SpanAttributes"]["tensortrace.steps"]) == 1 + len(loops)
    # the capture happened inside the request (same host clock; 5 ms for the scheduler/tokenizer hop)
    r0 = root[0]
    assert r0["Timestamp"] <= cap["Timestamp"]
    assert cap["Timestamp"] + cap["Duration"] <= r0["Timestamp"] + r0["Duration"] + 5_000_000
    ids = {r["SpanId"] for r in rows}
    assert all(r["ParentSpanId"] in ids for r in engine if r is not root[0]), "an SGLang span's parent is missing"
    m = result["metrics"]
    assert m.get('tensortrace_bridge_otlp_rejected_total{reason="decode"}', 0) == 0
    print(f"SGLang spans: {sorted(engine_names)}; TensorTrace spans: {sorted(ours)}")
