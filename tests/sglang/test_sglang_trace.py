"""SGLang's own spans and TensorTrace's capture spans of one request in one trace, in one table.

A real SGLang server (CPU, tiny random Llama, the TensorTrace plugin) started with
`--enable-trace --otlp-traces-endpoint 127.0.0.1:<the bridge's OTLP receiver>`; one request with a
W3C `traceparent`. On the other side, under the project venv (Kafka, chDB): a local Kafka broker,
`tensortrace exporter` draining the plugin's ring and `tensortrace bridge` with its receiver
(tensortrace.devstack.tracestack). SGLang exports its spans (OTLP/gRPC) to the bridge, which
publishes them to the spans topic and writes them to otel_traces; the capture records go through
the ring, the exporter and the activation topic and become tensortrace.capture/export/kafka spans.
Both end up under the request's trace id in otel_traces.

A second request comes without a traceparent: SGLang starts a trace of its own (a 64-bit trace id,
the upper half zero) and the plugin adopts it (v0_5.engine_root_span), so its capture span is a
child of SGLang's root request span. A loader (project venv, its own chDB) consumes the same
activation topic, so the request's timeline ends with the load.

Needs SGLang's `tracing` extra in the SGLang venv (opentelemetry-sdk and the OTLP exporters;
scripts/sglang/setup-venv.sh installs it): without it the test skips and says so.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import signal
import threading
import time
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

# Reads both chDB paths once their owners have exited (chDB: one owner process per path), under the
# project venv (the SGLang venv has no chDB): every otel_traces row (each SpanId once) and, per
# request, the loader's capture / export / load times.
_READ = r"""
import json, sys, clickhouse_connect
spans_path, loader_path = sys.argv[1:3]
c = clickhouse_connect.get_client(dsn="chdb://" + spans_path)
cols = ["SpanName", "TraceId", "SpanId", "ParentSpanId", "ServiceName", "SpanAttributes", "Duration", "Timestamp"]
rows = [dict(zip(cols, r)) for r in c.query(
    "SELECT SpanName, TraceId, SpanId, ParentSpanId, ServiceName, SpanAttributes, Duration, "
    "toUnixTimestamp64Nano(Timestamp) FROM otel.otel_traces ORDER BY Timestamp LIMIT 1 BY SpanId").result_rows]
c.close()
c = clickhouse_connect.get_client(dsn="chdb://" + loader_path)
times = {r[0]: {"first_capture": int(r[1]), "last_capture": int(r[2]), "last_export": int(r[3]), "last_load": int(r[4]),
                "trace_id": r[5]}
         for r in c.query("SELECT request_id, toUnixTimestamp64Nano(min(capture_time)), "
                          "toUnixTimestamp64Nano(max(capture_time)), toUnixTimestamp64Nano(max(export_time)), "
                          "toUnixTimestamp64Nano(max(load_time)), lower(hex(any(trace_id))) "
                          "FROM tensortrace.activations GROUP BY request_id").result_rows}
print(json.dumps({"rows": rows, "times": times}))
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """One SGLang server with tracing; request A with a traceparent, request B without; the stack's
    result for A's trace, and afterwards every span and the loader's times."""
    require_sglang()
    missing = _tracing_missing()
    if missing:
        pytest.skip(f"SGLang's tracing extra is not installed in this venv ({missing}); "
                    "`bash scripts/sglang/setup-venv.sh` installs sglang[tracing]")
    if not os.access(PROJECT_PYTHON, os.X_OK):
        pytest.skip(f"Kafka, the exporter and the bridge run under the project venv and {PROJECT_PYTHON} is "
                    "missing: run `make setup`")
    from tensortrace.devstack.processes import LoaderProcess
    from tensortrace.devstack.tiny_model import make_tiny_model
    from tensortrace.devstack.tracestack import TOPIC

    tmp_path = tmp_path_factory.mktemp("sglang-trace")
    stack = Stack(str(tmp_path / "stack"))
    server = loader = None
    loader_db = str(tmp_path / "loader-chdb")
    try:
        ready = stack.read(timeout_s=180)
        loader = LoaderProcess(["--kafka-bootstrap-servers", ready["kafka"], "--topic", TOPIC, "--dlq-topic",
                                TOPIC + ".dlq", "--group-id", "sglang-trace-loader", "--clickhouse-dsn",
                                f"chdb://{loader_db}", "--batch-max-delay-s", "0.1", "--stats-interval-s", "0.5",
                                "--http-host", "127.0.0.1"], python=PROJECT_PYTHON)
        model = make_tiny_model(str(tmp_path / "model"), arch="llama", layers=2, hidden=64)
        server = SGLangServer(model, ring_dir=ready["ring_dir"], log_path=str(tmp_path / "sglang.log"),
                              env_extra={"TENSORTRACE_SELECTION": "logits",
                                         "SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS": "100",
                                         "OTEL_SERVICE_NAME": "sglang"},
                              args_extra=("--enable-trace", "--otlp-traces-endpoint", ready["otlp"]))
        server.start()
        trace_id = uuid.uuid4().hex
        body = {"input_ids": [5, 17, 42, 99, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                                     "ignore_eos": True}}
        status, out = server.post("/generate", body, headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"})
        assert status == 200, out
        status, out_b = server.post("/generate", body)          # no traceparent
        assert status == 200, out_b
        deadline = time.monotonic() + 120
        while loader.stats.get("summary_rows", 0) < 2 and time.monotonic() < deadline:
            assert loader.proc.poll() is None, "".join(loader.lines[-20:])
            time.sleep(0.2)
        assert loader.stats.get("summary_rows", 0) >= 2, f"the loader stored {loader.stats}"
        # at least: request span, request_process, prefill_forward, decode_loop; and both captured requests
        stack.send(f"collect {trace_id} 8 2 180")
        result = stack.read(timeout_s=240)
    finally:
        if server is not None:
            server.stop()
        if loader is not None:
            loader.kill(signal.SIGTERM)
        stack.close()
    read = subprocess.run([PROJECT_PYTHON, "-c", _READ, str(tmp_path / "stack" / "chdb"), loader_db],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert read.returncode == 0, read.stderr[-3000:]
    return {"result": result, "trace_id": trace_id, "rid": out["meta_info"]["id"], "rid_b": out_b["meta_info"]["id"],
            **json.loads(read.stdout.strip().splitlines()[-1])}


def test_sglang_spans_and_capture_spans_share_one_trace_in_otel_traces(traced):
    trace_id, rid, result = traced["trace_id"], traced["rid"], traced["result"]
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


def _engine_spans_of(rows: list[dict], rid: str) -> tuple[dict, list[dict]]:
    """SGLang's root request span of `rid` and every SGLang span of its trace."""
    roots = [r for r in rows if r["ServiceName"] == "sglang" and r["SpanAttributes"].get("rid") == rid
             and r["SpanName"].strip().startswith("Req ")]
    assert len(roots) == 1, f"SGLang root spans of {rid}: {[(r['SpanName'], r['TraceId']) for r in roots]}"
    return roots[0], [r for r in rows if r["ServiceName"] == "sglang" and r["TraceId"] == roots[0]["TraceId"]]


def _capture_of(rows: list[dict], rid: str) -> dict:
    caps = [r for r in rows if r["SpanName"] == "tensortrace.capture"
            and r["SpanAttributes"].get("tensortrace.request_id") == rid]
    assert len(caps) == 1, f"capture spans of {rid}: {caps}"
    return caps[0]


def test_a_request_without_traceparent_joins_sglangs_own_64_bit_trace(traced):
    rows, rid = traced["rows"], traced["rid_b"]
    root, engine = _engine_spans_of(rows, rid)
    tid = root["TraceId"]
    # SGLang started this trace itself: a 64-bit id (upper half zero), a root span without a parent
    assert tid[:16] == "0" * 16 and int(tid, 16) != 0 and root["ParentSpanId"] == "", root
    assert {"request_process", "prefill_forward", "decode_loop"} <= {r["SpanName"].strip() for r in engine}
    # the plugin adopted it: TensorTrace's spans of the request are in SGLang's trace, the capture span
    # a child of SGLang's root request span; the stored records carry the same trace id
    cap = _capture_of(rows, rid)
    assert cap["TraceId"] == tid and cap["ParentSpanId"] == root["SpanId"], (cap, root)
    ours = {r["SpanName"] for r in rows if r["TraceId"] == tid and r["ServiceName"] == "tensortrace-bridge"}
    assert ours == {"tensortrace.capture", "tensortrace.export", "tensortrace.kafka"}, ours
    assert cap["SpanAttributes"]["tensortrace.complete"] == "true"
    assert traced["times"][rid]["trace_id"] == tid
    # request A (with a traceparent) kept the caller's trace: the traceparent wins
    assert _capture_of(rows, traced["rid"])["TraceId"] == traced["trace_id"]
    print(f"\nrequest {rid} without traceparent: SGLang's trace {tid}, capture span {cap['SpanId']} under "
          f"SGLang's root span {root['SpanId']}")


# Clocks: every process runs on this host. SGLang stamps its spans with perf_counter converted to the
# wall clock by an offset it calibrates at start (observability/req_time_stats.py); the agent
# (capture_time), the exporter (export_time) and the loader (load_time) stamp time.time_ns(). So the
# engine's and TensorTrace's times are one host's wall clock, up to SGLang's calibration error:
# comparisons across the two allow CLOCK_SLACK_NS; within one side they are exact.
CLOCK_SLACK_NS = 2_000_000


@pytest.mark.parametrize("which", ["rid", "rid_b"], ids=["with-traceparent", "without-traceparent"])
def test_the_timeline_is_ordered_arrival_queue_prefill_decode_capture_export_load(traced, which):
    rows, rid = traced["rows"], traced[which]
    root, engine = _engine_spans_of(rows, rid)
    first = {}
    for r in sorted(engine, key=lambda r: r["Timestamp"]):
        first.setdefault(r["SpanName"].strip(), r)
    loops = sorted((r for r in engine if r["SpanName"] == "decode_loop"), key=lambda r: r["Timestamp"])
    t = traced["times"][rid]
    cap = _capture_of(rows, rid)
    events = [  # (stage, wall-clock ns, clock)
        ("arrival", root["Timestamp"], "sglang"),                             # the root request span opens
        ("queue", first["prefill_waiting"]["Timestamp"], "sglang"),          # waiting for a prefill batch
        ("prefill", first["prefill_forward"]["Timestamp"], "sglang"),        # the prefill forward
        ("decode", loops[-1]["Timestamp"], "sglang"),                        # the last decode step starts
        ("capture", t["last_capture"], "agent"),                             # its taps: the last capture
        ("export", t["last_export"], "exporter"),                            # the last record in Kafka
        ("load", t["last_load"], "loader"),                                  # the last row in ClickHouse
    ]
    t0 = events[0][1]
    print(f"\n{which} {rid}: " + ", ".join(f"{n} +{(v - t0) / 1e6:.2f} ms ({c})" for n, v, c in events))
    for (n1, v1, c1), (n2, v2, c2) in zip(events, events[1:]):
        slack = CLOCK_SLACK_NS if (c1 == "sglang") != (c2 == "sglang") else 0
        assert v1 <= v2 + slack, f"{n1} at +{(v1 - t0) / 1e6:.3f} ms after {n2} at +{(v2 - t0) / 1e6:.3f} ms"
    # the capture span covers the request's taps and lies within SGLang's request span
    assert cap["Timestamp"] <= t["first_capture"] and t["last_capture"] <= cap["Timestamp"] + cap["Duration"]
    assert root["Timestamp"] <= cap["Timestamp"] + CLOCK_SLACK_NS
    assert first["prefill_forward"]["Timestamp"] <= t["first_capture"] + CLOCK_SLACK_NS


def test_sglangs_trace_context_is_where_the_plugin_reads_it():
    """The version contract of v0_5.engine_root_span on the installed SGLang: a TraceNullContext
    (tracing off) yields nothing, a TraceReqContext rebuilt in the scheduler from the tokenizer's
    carrier yields its root span's ids."""
    require_sglang()
    if _tracing_missing():
        pytest.skip("SGLang's tracing extra is not installed in this venv")
    from opentelemetry import propagate, trace

    from sglang.srt.observability import trace as sg_trace
    from tensortrace.agent.backends.sglang import v0_5

    class Req:   # the fields of schedule_batch.Req the function reads
        def __init__(self, ctx):
            self.time_stats = type("TS", (), {v0_5.TIME_STATS_TRACE_CTX: ctx})()

    assert v0_5.engine_root_span(Req(sg_trace.TraceNullContext())) is None
    ctx = object.__new__(sg_trace.TraceReqContext)
    ctx.tracing_enable, ctx.thread_context, ctx.root_span = True, None, None   # as __setstate__ leaves a copy
    tid, sid = 0x1234_5678_9ABC_DEF0, 0x0FED_CBA9_8765_4321   # a 64-bit trace id, as SGLang makes them
    carrier = {}
    propagate.inject(carrier, trace.set_span_in_context(trace.NonRecordingSpan(
        trace.SpanContext(tid, sid, is_remote=False, trace_flags=trace.TraceFlags(1)))))
    ctx.root_span_context = propagate.extract(carrier)       # what __setstate__ does in the scheduler
    assert v0_5.engine_root_span(Req(ctx)) == (tid, sid)
    from sglang.srt.observability.req_time_stats import ReqTimeStatsBase

    assert v0_5.TIME_STATS_TRACE_CTX in ReqTimeStatsBase.__dataclass_fields__
    assert v0_5.REQ_TIME_STATS in open(sg_trace.__file__.replace("observability/trace.py",
                                                                 "managers/schedule_batch.py")).read()
    assert sg_trace.TraceCustomIdGenerator().generate_trace_id() < 1 << 64
