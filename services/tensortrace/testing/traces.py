"""A request with realistic times, its SGLang spans and the bridge's spans, for the tests and the
benchmark of `tensortrace trace`: records and summary inserted as the loader inserts them (with a
chosen load time), spans written into `otel_traces` by the bridge's own row builder and writer.

    req = TimedRequest.make("req-1", layers=4, hidden=16, prompt=6, generated=5)
    insert_timed(client, db, req, otel_database=db)        # activations, requests, otel_traces
    req.expected["queue"]                                  # (start_ns, end_ns) the timeline must show

Timeline (ms after `t0_ns`), as SGLang 0.5 traces a request (sglang/srt/observability): the
tokenizer's and the scheduler's `Req <rid>` spans, `tokenize`, `request_process`,
`prefill_waiting`, `prefill_forward`, one `decode_loop` span per decode step; the agent's records
are captured during each forward and exported `export_lag_ms` later; the bridge receives the last
message `kafka_lag_ms` after the last export; the loader stamps `load_lag_ms` after it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind

from tensortrace.bridge.export import ClickHouseWriter, bridge_resource
from tensortrace.bridge.spans import RecordStats, SpanData, SpanSource, request_spans, trace_columns
from tensortrace.consume import CapturedRequest, Release
from tensortrace.loader.rows import ColumnBatch
from tensortrace.storage.otel import TRACES_COLUMNS, apply_otel_schema
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire.completeness import completeness

MS = 1_000_000


@dataclass
class TimedRequest:
    syn: SyntheticRequest
    t0_ns: int
    sglang_spans: list[SpanData]
    expected: dict[str, tuple[int, int]]          # stage -> (start_ns, end_ns)
    decode_steps_ns: list[int]                    # each decode_loop span's duration
    received_ns: int                              # the bridge's receive time (kafka span end)
    load_ns: int                                  # the loader's load_time for every row
    bridge_spans: list[SpanData] = field(default_factory=list)

    @property
    def trace_id(self) -> str:
        return self.syn.trace_id.hex()

    @property
    def request_id(self) -> str:
        return self.syn.request_id

    @classmethod
    def make(cls, request_id: str, *, layers: int = 4, hidden: int = 16, prompt: int = 6, generated: int = 5,
             t0_ns: int | None = None, tokenize_ms: float = 1.0, queue_ms: float = 10.0, prefill_ms: float = 20.0,
             step_ms: float = 5.0, slow_step_ms: float = 15.0, export_lag_ms: float = 2.0, kafka_lag_ms: float = 7.0,
             load_lag_ms: float = 40.0, sglang: bool = True, **syn_kwargs) -> "TimedRequest":
        syn = SyntheticRequest.make(request_id, layers=layers, hidden=hidden, prompt=prompt, generated=generated,
                                    **syn_kwargs)
        t0 = t0_ns if t0_ns is not None else time.time_ns() - 60_000 * MS
        at = lambda ms: t0 + int(round(ms * MS))   # noqa: E731
        tok = (at(0.2), at(0.2 + tokenize_ms))
        sched = tok[1] + int(0.3 * MS)
        queue = (sched + int(0.5 * MS), sched + int(0.5 * MS) + int(queue_ms * MS))
        prefill = (queue[1], queue[1] + int(prefill_ms * MS))
        n_decode = generated - 1                    # the last generated token is never fed back
        steps, t = [], prefill[1]
        for k in range(n_decode):
            d = int((slow_step_ms if k == n_decode // 2 and n_decode > 2 else step_ms) * MS)
            steps.append((t, t + d))
            t += d
        decode_end = steps[-1][1] if steps else prefill[1]
        req_end = decode_end + int(0.5 * MS)
        # records: the prefill's taps during the prefill forward, each decode step's during its step
        step_start = {0: prefill[0]}
        for k, (a, _) in enumerate(steps):
            step_start[k + 1] = a
        for r in syn.records:
            slot = r.layer + 1 if r.layer >= 0 else layers + 1
            r.capture_time_unix_nano = step_start[r.step] + slot * 10_000           # 10 µs per tap
            r.export_time_unix_nano = r.capture_time_unix_nano + int(export_lag_ms * MS)
        last_export = max(r.export_time_unix_nano for r in syn.records)
        s = syn.summary
        s.start_time_unix_nano = prefill[0]
        s.end_time_unix_nano = decode_end
        s.export_time_unix_nano = decode_end + int(export_lag_ms * MS)
        last_export = max(last_export, s.export_time_unix_nano)
        received = last_export + int(kafka_lag_ms * MS)
        load = last_export + int(load_lag_ms * MS)
        first_capture = min(r.capture_time_unix_nano for r in syn.records)

        spans: list[SpanData] = []
        if sglang:
            tid = syn.trace_id
            sid = iter(range(1, 10**6))
            mk = lambda: (0x5000_0000_0000_0000 + next(sid)).to_bytes(8, "big")   # noqa: E731
            rid8 = request_id[:8]
            tm_root, sc_root = mk(), mk()
            tm_thread, sc_thread = mk(), mk()
            parent = syn.summary.span_id          # the caller's span, from the traceparent
            spans += [SpanData(tid, tm_root, parent, f" Req {rid8}", SpanKind.INTERNAL, tok[0], req_end,
                               {"rid": request_id, "module": "sglang::tokenizer_manager"}),
                      SpanData(tid, tm_thread, tm_root, "TokenizerManager (host:abcdef01 | pid:11)", SpanKind.INTERNAL,
                               tok[0], req_end, {}),
                      SpanData(tid, mk(), tm_thread, "tokenize", SpanKind.INTERNAL, tok[0], tok[1], {}),
                      SpanData(tid, sc_root, parent, f" Req {rid8}", SpanKind.INTERNAL, sched, decode_end,
                               {"rid": request_id, "module": "sglang::scheduler"}),
                      SpanData(tid, sc_thread, sc_root, "Scheduler [TP 0] (host:abcdef01 | pid:12)", SpanKind.INTERNAL,
                               sched, decode_end, {"tp_rank": 0}),
                      SpanData(tid, mk(), sc_thread, "request_process", SpanKind.INTERNAL, sched, queue[0], {}),
                      SpanData(tid, mk(), sc_thread, "prefill_waiting", SpanKind.INTERNAL, queue[0], queue[1], {}),
                      SpanData(tid, mk(), sc_thread, "prefill_forward", SpanKind.INTERNAL, prefill[0], prefill[1], {})]
            for k, (a, b) in enumerate(steps):
                spans.append(SpanData(tid, mk(), sc_thread, "decode_loop", SpanKind.INTERNAL, a, b, {"decode_ct": k}))
        expected = {"tokenize": tok, "queue": queue, "prefill": prefill,
                    "decode": (steps[0][0], decode_end) if steps else (prefill[1], prefill[1]),
                    "request": (tok[0], req_end), "capture": (prefill[0], decode_end),
                    "export": (first_capture, last_export), "kafka": (last_export, received),
                    "load": (last_export, load)}
        return cls(syn, t0, spans, expected, [b - a for a, b in steps], received, load)

    def make_bridge_spans(self, topic: str = "tensortrace.activations", group: str = "tensortrace-bridge") -> list[SpanData]:
        """The bridge's capture/export/kafka spans for this request, as the bridge derives them."""
        syn = self.syn
        st = RecordStats()
        for r in syn.records:
            st.add(r)
        req = CapturedRequest(trace_id=syn.trace_id, request_id=syn.request_id, model=syn.summary.model_id,
                              summaries=[syn.summary], records_seen=len(syn.records),
                              completeness=completeness([syn.summary], len(syn.records)),
                              sources={0: (0, len(syn.records))}, release=Release.COMPLETE)
        self.bridge_spans = request_spans(req, st, SpanSource(topic=topic, group_id=group), received_ns=self.received_ns)
        return self.bridge_spans


def insert_timed(client, db: str, req: TimedRequest, *, otel_database: str | None = None, bridge: bool = True,
                 records: list[pb.TensorRecord] | None = None, summary: bool = True) -> None:
    """The request's rows (activations, requests; load_time = req.load_ns) and, when otel_database
    is given, its spans in otel_database.otel_traces (created if absent): SGLang's under service
    `sglang`, and the bridge's through the bridge's ClickHouseWriter."""
    b = ColumnBatch()
    for i, r in enumerate(req.syn.records if records is None else records):
        b.add_tensor(r, 0, i)
    if summary:
        b.add_summary(req.syn.summary, 0, 10**6)
    if b.tensor_rows:
        client.insert_arrow(f"{db}.activations", b.activations_table(req.load_ns))
    if b.summary_rows:
        client.insert_arrow(f"{db}.requests", b.requests_table(req.load_ns))
    if otel_database is None:
        return
    apply_otel_schema(client, otel_database)
    if req.sglang_spans:
        cols = trace_columns(req.sglang_spans, "sglang", {"service.name": "sglang"}, "sglang", "0.5.23")
        client.insert(f"{otel_database}.otel_traces", cols.columns, column_names=list(TRACES_COLUMNS),
                      column_oriented=True)
    if bridge:
        w = ClickHouseWriter(client, otel_database, "otel_traces", resource=bridge_resource("tensortrace-bridge"))
        assert w.write(req.bridge_spans or req.make_bridge_spans(), threading.Event())


class RecordingExporter(SpanExporter):
    """The SDK's exporter, with every export's result kept (the span processor discards it), so a
    test can tell an accepted export from a refused one."""

    def __init__(self, inner):
        self.inner, self.results = inner, []

    def export(self, spans):
        r = self.inner.export(spans)
        self.results.append(r)
        return r

    def shutdown(self):
        self.inner.shutdown()
