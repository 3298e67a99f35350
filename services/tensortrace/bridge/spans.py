"""From a released request to its spans: pure functions, no I/O, deterministic ids.

    stats = RecordStats(); [stats.add(rec) for rec in records]          # per-record metadata, no payloads
    spans = request_spans(req, stats, SpanSource(topic="tensortrace.activations", group_id="tensortrace-bridge"),
                          received_ns=time.time_ns())
    [s.name for s in spans]         # ['tensortrace.capture', 'tensortrace.export', 'tensortrace.kafka']

>>> span_id(bytes(16), "req-1", CAPTURE).hex()          # blake2b-64 of (trace id, request id, stage)
'7a70b9f22ace3a43'

Every span lives in the request's own trace (the W3C trace id of its `traceparent`, carried on
every TensorRecord and RequestSummary), so a trace backend shows the capture under the request:

  <request span from the serving engine>           span id = the records' / summary's span_id
    tensortrace.capture   INTERNAL  the request's lifetime in the agent (summary start..end, else the
                                    first..last record capture time); what was captured, whether all
                                    of it arrived, and where the tensors are (tensortrace.store/table)
      tensortrace.export  PRODUCER  first capture -> last export (ring + exporter -> Kafka)
      tensortrace.kafka   CONSUMER  last export -> the bridge received the request's last message
                                    (messaging.* attributes: topic, partition, offsets, group)

Opt-in (`--step-spans`): `step_span` makes one `tensortrace.step` span per (producer, forward step)
in a trace of its own, linked to the capture span of every request in that batch (StepStats) —
every link: none is dropped (a cap moves the rest to `tensortrace.step.links` child spans) — and
each capture span names its step spans (`step_refs`: the first 32 ids, the rest counted and
derivable).

Nothing here runs on the inference thread: the spans are derived afterwards from what the
records and summaries say (their capture / export times), by a consumer of the topic.

Ids. `span_id(trace_id, request_id, stage[, step])` = the first 8 bytes of blake2b over those
fields (never 0). A re-delivered or replayed request therefore yields spans with the same ids —
a backend, or a reader of otel_traces, sees duplicates of one span, never a second span. (The
kafka span's end is this bridge's receive time, so a replay may differ there; the ids do not.)

A request with no trace id (empty or all zero) gets no spans (`skip_reason` says "no_trace_id"),
nor does one whose summary says it was not sampled ("not_sampled": no tensors were captured).
An incomplete request (drops, missing records or summaries) gets status ERROR with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from hashlib import blake2b

from opentelemetry.trace import SpanKind, StatusCode

from tensortrace.consume import CapturedRequest
from tensortrace.v1 import records_pb2 as pb

CAPTURE = "tensortrace.capture"
EXPORT = "tensortrace.export"
KAFKA = "tensortrace.kafka"
STAGES = (CAPTURE, EXPORT, KAFKA)

STORE = "clickhouse"
STEP_IDS_MAX = 32      # step span ids recorded on a capture span; the rest are counted (and derivable)
DEFAULT_TENSORS_TABLE = "tensortrace.activations"

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


def span_id(trace_id: bytes, request_id: str, stage: str, step: int | None = None) -> bytes:
    """The span id of one stage of one request: blake2b-64 of (trace id, request id, stage[, step]).
    Never all zero (an invalid W3C span id)."""
    key = trace_id + request_id.encode() + b"\x00" + stage.encode()
    if step is not None:
        key += b"\x00" + str(step).encode()
    d = blake2b(key, digest_size=8).digest()
    return d if d != _ZERO_SPAN else b"\x00" * 7 + b"\x01"


def has_trace_id(trace_id: bytes) -> bool:
    return len(trace_id) == 16 and trace_id != _ZERO_TRACE


@dataclass(slots=True)
class SpanData:
    """One span, as both writers need it (OTLP ReadableSpan, otel_traces row)."""
    trace_id: bytes                 # 16 bytes
    span_id: bytes                  # 8 bytes
    parent_span_id: bytes           # 8 bytes, or b"" for a root span
    name: str
    kind: SpanKind
    start_ns: int
    end_ns: int
    attributes: dict
    status: StatusCode = StatusCode.UNSET
    status_message: str = ""
    events: tuple = ()              # (time_ns, name, attributes)
    links: tuple = ()               # (trace_id, span_id, attributes)


class RecordStats:
    """What the spans need from a request's tensor records, gathered as they arrive (payloads are
    never kept): capture/export time bounds, hooks, layers, steps, producers, the span id.
    Adding the same record twice changes nothing (bounds and sets), so duplicates are harmless."""

    __slots__ = ("span_id", "first_capture_ns", "last_capture_ns", "last_export_ns", "hooks", "layers", "steps",
                 "producer_steps", "partition", "last_seen_ns")

    def __init__(self) -> None:
        self.span_id = b""
        self.first_capture_ns = 0
        self.last_capture_ns = 0
        self.last_export_ns = 0
        self.hooks: set[str] = set()
        self.layers: set[int] = set()
        self.steps: set[int] = set()
        self.producer_steps: dict[tuple, set[int]] = {}   # (pod, pid, generation) -> its forward steps
        self.partition = -1
        self.last_seen_ns = 0           # bridge wall clock when the last record arrived

    def add(self, rec: pb.TensorRecord) -> None:
        t = rec.capture_time_unix_nano
        if t:
            if not self.first_capture_ns or t < self.first_capture_ns:
                self.first_capture_ns = t
            if t > self.last_capture_ns:
                self.last_capture_ns = t
        if rec.export_time_unix_nano > self.last_export_ns:
            self.last_export_ns = rec.export_time_unix_nano
        if not self.span_id and rec.span_id:
            self.span_id = rec.span_id
        self.hooks.add(rec.hook)
        if rec.layer >= 0:
            self.layers.add(rec.layer)
        self.steps.add(rec.step)
        p = rec.producer
        key = (p.pod, p.pid, p.generation)
        ps = self.producer_steps.get(key)
        if ps is None:
            ps = self.producer_steps[key] = set()
        ps.add(rec.step)

    @property
    def producers(self) -> set[tuple]:
        return set(self.producer_steps)


@dataclass(frozen=True)
class SpanSource:
    """Where the requests were read (the kafka span's messaging attributes) and where their
    tensors are stored (the capture span's reference)."""
    topic: str
    group_id: str
    tensors_table: str = DEFAULT_TENSORS_TABLE
    step_spans: bool = False        # step spans are emitted: record their ids on the capture span
    step_ids_max: int = STEP_IDS_MAX


def skip_reason(req: CapturedRequest) -> str | None:
    """Why a request gets no spans: "no_trace_id", "not_sampled"; None when it gets them."""
    if not has_trace_id(req.trace_id):
        return "no_trace_id"
    if req.summaries and not any(s.sampled for s in req.summaries):
        return "not_sampled"
    return None


def request_spans(req: CapturedRequest, stats: RecordStats | None, source: SpanSource,
                  received_ns: int) -> list[SpanData]:
    """The capture, export and kafka spans of one released request ([] when `skip_reason`).
    `stats`: its records' metadata (None when no record arrived); `received_ns`: when the bridge
    received the request's last message (the kafka span's end)."""
    if skip_reason(req) is not None:
        return []
    tid = req.trace_id
    rid = req.request_id
    sums = req.summaries
    c = req.completeness
    st = stats or _NO_RECORDS

    first_capture = st.first_capture_ns
    last_capture = st.last_capture_ns
    if len(sums) == 1:   # one producer (no TP): the common case, without the generators below
        s0 = sums[0]
        parent = s0.span_id or st.span_id
        start = s0.start_time_unix_nano or first_capture
        end = s0.end_time_unix_nano or last_capture
        last_export = max(st.last_export_ns, s0.export_time_unix_nano)
        hooks = set(s0.hooks)
        nbytes = s0.bytes_captured
        producers = len(st.producers | {(s0.producer.pod, s0.producer.pid, s0.producer.generation)})
    else:
        parent = next((s.span_id for s in sums if s.span_id), b"") or st.span_id
        start = min((s.start_time_unix_nano for s in sums if s.start_time_unix_nano), default=0) or first_capture
        end = max((s.end_time_unix_nano for s in sums), default=0) or last_capture
        last_export = max(st.last_export_ns, max((s.export_time_unix_nano for s in sums), default=0))
        hooks = {h for s in sums for h in s.hooks}
        nbytes = sum(s.bytes_captured for s in sums)
        producers = len(st.producers | {(s.producer.pod, s.producer.pid, s.producer.generation) for s in sums})
    if parent == _ZERO_SPAN:
        parent = b""
    if not start:
        start = end or last_export or received_ns
    end = max(end, start)
    if not last_export:
        last_export = end

    attrs: dict = {
        "gen_ai.request.model": req.model,
        "tensortrace.request_id": rid,
        "tensortrace.trace_id": tid.hex(),
        "tensortrace.store": STORE,
        "tensortrace.table": source.tensors_table,
        "tensortrace.hooks": sorted(hooks | st.hooks),
        "tensortrace.layers": sorted(st.layers),
        "tensortrace.steps": len(st.steps),
        "tensortrace.records.captured": c.records_captured,
        "tensortrace.records.dropped": c.records_dropped,
        "tensortrace.records.received": req.records_seen,
        "tensortrace.bytes": nbytes,
        "tensortrace.complete": c.complete,
        "tensortrace.completeness": c.state,
        "tensortrace.release": req.release.value,
        "tensortrace.producers": producers,
    }
    if sums:   # token counts come from the summary; without one they are unknown, not 0
        attrs["tensortrace.tokens.prompt"] = c.prompt_tokens
        attrs["tensortrace.tokens.generated"] = c.generated_tokens
        attrs["gen_ai.usage.input_tokens"] = c.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = c.generated_tokens
        if c.finish_reason:
            attrs["gen_ai.response.finish_reasons"] = [c.finish_reason]
    for reason, n in sorted(c.dropped_by_reason.items()):
        attrs[f"tensortrace.records.dropped.{reason}"] = n
    if c.incomplete_reason:
        attrs["tensortrace.incomplete_reason"] = c.incomplete_reason
    if source.step_spans and st.producer_steps:
        attrs.update(step_refs(st.producer_steps, source.step_ids_max))
    if c.complete:
        status, message = StatusCode.UNSET, ""
    else:
        status, message = StatusCode.ERROR, c.incomplete_reason or f"request {c.state}"

    capture_id = span_id(tid, rid, CAPTURE)
    export_start = first_capture or end
    spans = [
        SpanData(tid, capture_id, parent, CAPTURE, SpanKind.INTERNAL, start, end, attrs, status, message),
        SpanData(tid, span_id(tid, rid, EXPORT), capture_id, EXPORT, SpanKind.PRODUCER, export_start,
                 max(last_export, export_start),
                 {"tensortrace.request_id": rid, "messaging.system": "kafka",
                  "messaging.destination.name": source.topic, "messaging.operation.type": "send",
                  "tensortrace.records.captured": c.records_captured}),
    ]
    kafka = {"tensortrace.request_id": rid, "messaging.system": "kafka", "messaging.destination.name": source.topic,
             "messaging.operation.type": "receive", "messaging.consumer.group.name": source.group_id,
             "messaging.kafka.message.key": rid}
    if req.sources:
        partition = min(req.sources)
        lo, hi = req.sources[partition]
        kafka["messaging.destination.partition.id"] = str(partition)
        kafka["messaging.kafka.offset"] = lo
        kafka["tensortrace.kafka.offset.first"] = lo
        kafka["tensortrace.kafka.offset.last"] = hi
    spans.append(SpanData(tid, span_id(tid, rid, KAFKA), capture_id, KAFKA, SpanKind.CONSUMER, last_export,
                          max(received_ns, last_export), kafka))
    return spans


_NO_RECORDS = RecordStats()


# -- per forward step (opt-in: BridgeConfig.step_spans) ---------------------------------------------

STEP = "tensortrace.step"
_PHASES = {pb.PREFILL: "prefill", pb.DECODE: "decode"}


class StepStats:
    """One forward step of one producer (TP rank), gathered from the records of every request in
    that batch as they arrive: capture-time bounds, the requests with their phase and rows, and the
    Kafka offsets of the records (the sink holds commits behind them until the span is durable)."""

    __slots__ = ("pod", "node", "pid", "generation", "tp_rank", "step", "model", "first_capture_ns",
                 "last_capture_ns", "last_export_ns", "requests", "records", "last_seen", "offsets")

    def __init__(self, rec: pb.TensorRecord):
        p = rec.producer
        self.pod, self.node, self.pid, self.generation, self.tp_rank = p.pod, p.node, p.pid, p.generation, p.tp_rank
        self.step = rec.step
        self.model = rec.model_id
        self.first_capture_ns = 0
        self.last_capture_ns = 0
        self.last_export_ns = 0                             # the step's last record left the exporter
        self.requests: dict[tuple[bytes, str], list] = {}   # (trace id, request id) -> [phase, rows]
        self.records = 0
        self.last_seen = 0.0                                # monotonic seconds: the linger clock
        self.offsets: dict[int, list[int]] = {}             # partition -> [first, last] offset

    def add(self, rec: pb.TensorRecord, partition: int, offset: int, now: float) -> None:
        t = rec.capture_time_unix_nano
        if t:
            if not self.first_capture_ns or t < self.first_capture_ns:
                self.first_capture_ns = t
            if t > self.last_capture_ns:
                self.last_capture_ns = t
        if rec.export_time_unix_nano > self.last_export_ns:
            self.last_export_ns = rec.export_time_unix_nano
        rows = rec.shape[0] if rec.shape else 0
        r = self.requests.get((rec.trace_id, rec.request_id))
        if r is None:
            self.requests[(rec.trace_id, rec.request_id)] = [rec.phase, rows]
        elif rows > r[1]:
            r[1] = rows
        self.records += 1
        self.last_seen = now
        o = self.offsets.get(partition)
        if o is None:
            self.offsets[partition] = [offset, offset]
        elif offset < o[0]:
            o[0] = offset
        elif offset > o[1]:
            o[1] = offset


def step_ids(pod: str, pid: int, generation: int, step: int) -> tuple[bytes, bytes]:
    """(trace id, span id) of a step span: a trace of its own per (producer incarnation, step),
    both derived from it (never zero), so a replay re-derives the same ids."""
    key = f"{pod}\x00{pid}\x00{generation}"
    tid = blake2b(f"{STEP}\x00{key}\x00{step}".encode(), digest_size=16).digest()
    if tid == _ZERO_TRACE:
        tid = bytes(15) + b"\x01"
    return tid, span_id(tid, key, STEP, step)


STEP_LINKS = "tensortrace.step.links"


def step_refs(producer_steps: dict[tuple, set[int]], max_ids: int = STEP_IDS_MAX) -> dict:
    """The capture span's references to the step spans of the forwards its request was in (trace UIs
    show one trace at a time; the step spans live in traces of their own). Bounded: the (trace id,
    span id) of the first `max_ids` steps in (producer, step) order, the number omitted, and what
    derives the rest with `step_ids(pod, pid, generation, step)`: the producers and the step range
    (a request's steps are the forwards it had rows in; within [first, last] a step it sat out has
    a step span that does not link it)."""
    pairs = sorted((key, step) for key, steps in producer_steps.items() for step in steps)
    shown = pairs[:max_ids]
    tids, sids = [], []
    for (pod, pid, generation), step in shown:
        tid, sid = step_ids(pod, pid, generation, step)
        tids.append(tid.hex())
        sids.append(sid.hex())
    all_steps = [step for _, step in pairs]
    return {"tensortrace.step.trace_ids": tids, "tensortrace.step.span_ids": sids,
            "tensortrace.step.span_ids.omitted": len(pairs) - len(shown),
            "tensortrace.step.first": min(all_steps), "tensortrace.step.last": max(all_steps),
            "tensortrace.step.producers": [f"{pod}/{pid}/{generation}" for pod, pid, generation in
                                           sorted(producer_steps)]}


def step_span(ss: StepStats, max_links: int = 0) -> list[SpanData]:
    """The `tensortrace.step` span of one producer's forward step: start/end = first/last capture
    time of its records (the taps of that forward), a link to the capture span of every request in
    the batch that has a trace id, in request-id order. Never a link dropped: `max_links` 0 (the
    default) puts every link on the step span (the SDK's 128-link limit does not apply: the spans are
    built finished, docs/bridge.md); with a cap N (a backend that limits links per span), the step
    span holds the first N and `tensortrace.step.links` child spans (same trace, same times, derived
    ids) hold N more each. Returns the step span first, then its link spans."""
    tid, sid = step_ids(ss.pod, ss.pid, ss.generation, ss.step)
    tokens = prefill = decode = 0
    links = []
    for (trace_id, rid), (phase, rows) in sorted(ss.requests.items(), key=lambda kv: kv[0][1]):
        tokens += rows
        if phase == pb.PREFILL:
            prefill += 1
        elif phase == pb.DECODE:
            decode += 1
        if has_trace_id(trace_id):
            links.append((trace_id, span_id(trace_id, rid, CAPTURE),
                          {"tensortrace.request_id": rid, "tensortrace.phase": _PHASES.get(phase, "unspecified"),
                           "tensortrace.tokens": rows}))
    per_span = max_links if max_links > 0 else max(len(links), 1)
    chunks = [links[i:i + per_span] for i in range(0, len(links), per_span)] or [[]]
    attrs = {"gen_ai.request.model": ss.model, "tensortrace.step": ss.step, "tensortrace.producer.pod": ss.pod,
             "tensortrace.producer.node": ss.node, "tensortrace.producer.pid": ss.pid,
             "tensortrace.producer.generation": ss.generation, "tensortrace.tp_rank": ss.tp_rank,
             "tensortrace.batch.requests": len(ss.requests), "tensortrace.batch.prefill_requests": prefill,
             "tensortrace.batch.decode_requests": decode, "tensortrace.batch.tokens": tokens,
             "tensortrace.records.received": ss.records, "tensortrace.batch.links": len(links),
             "tensortrace.batch.link_spans": len(chunks)}
    start = ss.first_capture_ns
    end = max(ss.last_capture_ns, start)
    out = [SpanData(tid, sid, b"", STEP, SpanKind.INTERNAL, start, end, attrs, links=tuple(chunks[0]))]
    key = f"{ss.pod}\x00{ss.pid}\x00{ss.generation}"
    for part, chunk in enumerate(chunks[1:], 1):
        out.append(SpanData(tid, span_id(tid, f"{key}\x00{part}", STEP_LINKS, ss.step), sid, STEP_LINKS,
                            SpanKind.INTERNAL, start, end,
                            {"tensortrace.step": ss.step, "tensortrace.step.links.part": part,
                             "tensortrace.batch.links": len(links)}, links=tuple(chunk)))
    return out


# -- otel_traces rows ---------------------------------------------------------------------------

_KIND = {SpanKind.INTERNAL: "Internal", SpanKind.SERVER: "Server", SpanKind.CLIENT: "Client",
         SpanKind.PRODUCER: "Producer", SpanKind.CONSUMER: "Consumer"}
_EMPTY: list = []   # shared by rows without events / links (only read by the insert)
_STATUS = {StatusCode.UNSET: "Unset", StatusCode.OK: "Ok", StatusCode.ERROR: "Error"}


def attribute_string(v) -> str:
    """An attribute value as the Collector's ClickHouse exporter stores it (pcommon AsString):
    booleans true/false, numbers in decimal, arrays and maps as JSON."""
    conv = _TO_STRING.get(v.__class__)
    if conv is not None:
        return conv(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    return json.dumps(list(v) if isinstance(v, tuple) else v, separators=(",", ":"), ensure_ascii=False)


_JSON_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')


def _array_string(v) -> str:
    # Arrays here are hook names, layer numbers, finish reasons: the plain cases skip json.dumps,
    # which costs more than the rest of a span's row (measured: scripts/bench/bridge_throughput.py).
    if not v:
        return "[]"
    types = set(map(type, v))
    if types == _INT:
        return "[" + ",".join(map(str, v)) + "]"
    if types == _STR and _JSON_PLAIN.fullmatch("".join(v)):
        return '["' + '","'.join(v) + '"]'
    return json.dumps(list(v), separators=(",", ":"), ensure_ascii=False)


_INT, _STR = {int}, {str}


_TO_STRING = {str: str, int: int.__repr__, float: float.__repr__,
              bool: lambda v: "true" if v else "false", list: _array_string, tuple: _array_string}


def string_map(attrs: dict) -> dict[str, str]:
    """`attrs` with every value as attribute_string() makes it (the hot loop of row building)."""
    out = {}
    for k, v in attrs.items():
        c = v.__class__
        if c is str:
            out[k] = v
        elif c is int:
            out[k] = str(v)
        elif c is bool:
            out[k] = "true" if v else "false"
        elif c is list:
            out[k] = _array_string(v)
        else:
            out[k] = attribute_string(v)
    return out


@dataclass
class TraceColumns:
    """otel_traces rows, column by column (storage/otel.py TRACES_COLUMNS order): what the
    ClickHouse writer inserts (`column_oriented=True`)."""
    columns: list[list] = field(default_factory=lambda: [[] for _ in range(22)])

    def __len__(self) -> int:
        return len(self.columns[0])


def trace_columns(spans: list[SpanData], service_name: str, resource: dict[str, str], scope_name: str,
                  scope_version: str, out: TraceColumns | None = None) -> TraceColumns:
    """Append `spans` as otel_traces rows (column-oriented) to `out` (a new TraceColumns if None)."""
    out = out or TraceColumns()
    (ts, tid, sid, psid, tstate, name, kind, svc, res, sname, sver, sattr, dur, code, msg,
     ev_t, ev_n, ev_a, ln_t, ln_s, ln_st, ln_a) = out.columns
    n = len(spans)
    for col, value in ((tstate, ""), (svc, service_name), (res, resource), (sname, scope_name),
                       (sver, scope_version)):
        col.extend([value] * n)
    last_trace, last_hex = None, ""
    for s in spans:
        ts.append(s.start_ns)
        if s.trace_id is not last_trace:   # a request's spans share one trace id object
            last_trace, last_hex = s.trace_id, s.trace_id.hex()
        tid.append(last_hex)
        sid.append(s.span_id.hex())
        psid.append(s.parent_span_id.hex())
        name.append(s.name)
        kind.append(_KIND.get(s.kind, "Unspecified"))
        sattr.append(string_map(s.attributes))
        dur.append(s.end_ns - s.start_ns)
        code.append(_STATUS[s.status])
        msg.append(s.status_message)
        if s.events or s.links:
            _nested(s, ev_t, ev_n, ev_a, ln_t, ln_s, ln_st, ln_a)
        else:
            for col in (ev_t, ev_n, ev_a, ln_t, ln_s, ln_st, ln_a):
                col.append(_EMPTY)
    return out


def _nested(s: SpanData, ev_t, ev_n, ev_a, ln_t, ln_s, ln_st, ln_a) -> None:
    ev_t.append([e[0] for e in s.events])
    ev_n.append([e[1] for e in s.events])
    ev_a.append([string_map(e[2]) for e in s.events])
    ln_t.append([link[0].hex() for link in s.links])
    ln_s.append([link[1].hex() for link in s.links])
    ln_st.append(["" for _ in s.links])
    ln_a.append([string_map(link[2]) for link in s.links])
