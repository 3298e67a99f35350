"""The serving engine's own spans (OTLP), as the bridge receives, publishes and stores them. Pure:
no I/O.

    req = parse_request(raw, max_bytes=4 << 20)     # Rejected("decode" | "too_large", ...) if not
    n = check_request(req)                          # Rejected("trace_id" | "span_id" | ..., ...) if not
    msgs = kafka_messages(raw, req, max_message_bytes=1_000_000)   # [(key, value, spans)] for the spans topic
    cols = otlp_trace_columns([req])                # otel_traces rows, column-oriented (TraceColumns)

>>> any_value_string(AnyValue(double_value=1e21)), any_value_string(AnyValue(double_value=2.0))
('1e+21', '2')
>>> any_value_string(AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue(string_value="a<b")])))
'[1,"a\\\\u003cb"]'

**Validation** (`check_request`): every span's trace id is 16 bytes and span id 8 bytes, neither all
zero (OTLP: invalid); a parent span id is empty or 8 bytes; a link's ids likewise. A request that
fails is refused whole, with the first problem named by its place in the request
(`resource_spans[0].scope_spans[1].spans[3] 'decode_loop': trace_id is 3 bytes, not 16`).

**The spans topic** (`kafka_messages`): a request is published as it came (its serialized bytes),
keyed by the hex trace id of its first span. One larger than `max_message_bytes` (Kafka's message
limit, 1 MB by default) is split into several requests by span, each with its resource and scope,
keyed by its own first span; a single span larger than that limit is refused (`span_too_large`).

**otel_traces rows** (`otlp_trace_columns`): what the OpenTelemetry Collector contrib ClickHouse
exporter writes for the same spans (`exporter/clickhouseexporter/exporter_traces.go`,
`pushTraceData`, and `internal/util.go`): Timestamp = start time; TraceId / SpanId / ParentSpanId
in lower-case hex, '' for an all-zero (absent) id; TraceState as sent; SpanKind and StatusCode as
pdata names them (`Unspecified` `Internal` `Server` `Client` `Producer` `Consumer`; `Unset` `Ok`
`Error`); ServiceName = the resource's `service.name` (as a string; '' without one);
ResourceAttributes / SpanAttributes / event and link attributes as `map[string]string` of pdata's
`Value.AsString()` (`any_value_string`: strings as they are, booleans `true`/`false`, integers in
decimal, doubles as Go's encoding/json writes them, bytes in base64, arrays and maps as Go's
`json.Marshal` of the raw value: keys sorted, `<` `>` `&` escaped); ScopeName / ScopeVersion; Events
and Links nested column by column. One difference: the exporter computes Duration as an unsigned
`end - start`, which wraps to ~1.8e19 when a span ends before it starts; here it is 0 then.
"""

from __future__ import annotations

import base64
import json
import math
from decimal import Decimal

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue  # noqa: F401 (doctest)

from tensortrace.bridge.spans import TraceColumns

REASONS = ("decode", "too_large", "trace_id", "span_id", "parent_span_id", "link", "span_too_large")

KIND_NAMES = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
STATUS_NAMES = ("Unset", "Ok", "Error")

_ZERO16 = bytes(16)
_ZERO8 = bytes(8)
_EMPTY: list = []


class Rejected(ValueError):
    """An OTLP request the bridge refuses: `reason` (one of REASONS, the metrics label) and a
    message that names the problem (the gRPC INVALID_ARGUMENT details)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# -- receiving ------------------------------------------------------------------------------------

def parse_request(raw: bytes, max_bytes: int) -> ExportTraceServiceRequest:
    if len(raw) > max_bytes:
        raise Rejected("too_large", f"the request is {len(raw)} bytes, more than this receiver accepts "
                                    f"({max_bytes} bytes, --otlp-receiver-max-bytes); send smaller batches")
    try:
        return ExportTraceServiceRequest.FromString(raw)
    except DecodeError as e:
        raise Rejected("decode", f"the request body is not an OTLP ExportTraceServiceRequest "
                                 f"(protobuf decoding failed: {e})") from None


def _where(i: int, j: int, k: int, name: str) -> str:
    return f"resource_spans[{i}].scope_spans[{j}].spans[{k}] {name[:80]!r}"


def _check_id(value: bytes, size: int, what: str, where: str, reason: str, optional: bool = False) -> None:
    if optional and not value:
        return
    if len(value) != size:
        raise Rejected(reason, f"{where}: {what} is {len(value)} bytes, not {size}")
    if value == (_ZERO16 if size == 16 else _ZERO8):
        raise Rejected(reason, f"{where}: {what} is all zero (an invalid id)")


def check_request(req: ExportTraceServiceRequest) -> int:
    """The number of spans in `req`; Rejected naming the first malformed span."""
    n = 0
    for i, rs in enumerate(req.resource_spans):
        for j, ss in enumerate(rs.scope_spans):
            for k, s in enumerate(ss.spans):
                tid, sid, pid = s.trace_id, s.span_id, s.parent_span_id
                if len(tid) != 16 or len(sid) != 8 or (pid and len(pid) != 8) or tid == _ZERO16 or sid == _ZERO8 \
                        or s.links:
                    where = _where(i, j, k, s.name)
                    _check_id(tid, 16, "trace_id", where, "trace_id")
                    _check_id(sid, 8, "span_id", where, "span_id")
                    if pid and len(pid) != 8:
                        raise Rejected("parent_span_id", f"{where}: parent_span_id is {len(pid)} bytes, not 8 (or empty)")
                    for x, link in enumerate(s.links):
                        _check_id(link.trace_id, 16, f"links[{x}].trace_id", where, "link")
                        _check_id(link.span_id, 8, f"links[{x}].span_id", where, "link")
                n += 1
    return n


def first_trace_id(req: ExportTraceServiceRequest) -> bytes:
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                return s.trace_id
    return b""


def message_key(req: ExportTraceServiceRequest) -> bytes | None:
    """The spans topic key of a request: its first span's trace id in hex (None without spans)."""
    tid = first_trace_id(req)
    return tid.hex().encode() if tid else None


# protobuf framing of a nested message: one tag byte and a length varint (at most 5 bytes)
_FRAME = 6


def split_request(req: ExportTraceServiceRequest, max_bytes: int) -> list[ExportTraceServiceRequest]:
    """`req` as requests of at most `max_bytes` serialized bytes each, split by span; each part
    keeps its spans' resource and scope (and their schema URLs). Rejected(span_too_large) when one
    span with its resource and scope does not fit."""
    out: list[ExportTraceServiceRequest] = []
    cur = ExportTraceServiceRequest()
    size = 0
    cur_rs = cur_ss = None
    cur_keys = (-1, -1)
    for i, rs in enumerate(req.resource_spans):
        rs_head = rs.resource.ByteSize() + len(rs.schema_url.encode()) + 3 * _FRAME
        for j, ss in enumerate(rs.scope_spans):
            ss_head = ss.scope.ByteSize() + len(ss.schema_url.encode()) + 3 * _FRAME
            for k, s in enumerate(ss.spans):
                n = s.ByteSize() + _FRAME
                if rs_head + ss_head + n > max_bytes:
                    raise Rejected("span_too_large", f"{_where(i, j, k, s.name)} is {n} bytes with its resource and "
                                                     f"scope, more than a spans-topic message may be "
                                                     f"({max_bytes} bytes, --spans-message-max-bytes)")
                extra = n + (ss_head if cur_keys != (i, j) else 0) + (rs_head if cur_keys[0] != i else 0)
                if size and size + extra > max_bytes:
                    out.append(cur)
                    cur, size, cur_keys = ExportTraceServiceRequest(), 0, (-1, -1)
                    extra = n + ss_head + rs_head
                if cur_keys[0] != i:
                    cur_rs = cur.resource_spans.add()
                    cur_rs.resource.CopyFrom(rs.resource)
                    cur_rs.schema_url = rs.schema_url
                    cur_keys = (i, -1)
                if cur_keys[1] != j:
                    cur_ss = cur_rs.scope_spans.add()
                    cur_ss.scope.CopyFrom(ss.scope)
                    cur_ss.schema_url = ss.schema_url
                    cur_keys = (i, j)
                cur_ss.spans.add().CopyFrom(s)
                size += extra
    if size:
        out.append(cur)
    return out


def kafka_messages(raw: bytes, req: ExportTraceServiceRequest, max_message_bytes: int) -> list[tuple[bytes | None, bytes, int]]:
    """(key, value, spans) of the spans-topic messages for one received request: the request's own
    bytes when they fit in `max_message_bytes`, else its parts (split_request). No message for a
    request without spans."""
    if not any(ss.spans for rs in req.resource_spans for ss in rs.scope_spans):
        return []
    if len(raw) <= max_message_bytes:
        return [(message_key(req), raw, sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans))]
    return [(message_key(p), p.SerializeToString(), sum(len(ss.spans) for rs in p.resource_spans for ss in rs.scope_spans))
            for p in split_request(req, max_message_bytes)]


# -- otel_traces rows ------------------------------------------------------------------------------

class _Unsupported(ValueError):
    """A NaN or infinite double inside an array or map: Go's json.Marshal fails, AsString is ''."""


def go_float(f: float) -> str:
    """A double as pdata's float64AsString writes it (Go's encoding/json number format): shortest
    round-trip digits, plain notation for 1e-6 <= |f| < 1e21 (and 0), else an exponent (`1e+21`,
    `1e-7`)."""
    if math.isnan(f) or math.isinf(f):
        return "json: unsupported value: " + ("NaN" if math.isnan(f) else ("+Inf" if f > 0 else "-Inf"))
    a = abs(f)
    r = repr(f)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        mant, _, exp = r.partition("e")   # repr uses an exponent at these magnitudes
        e = int(exp)
        return f"{mant}e{'-' if e < 0 else '+'}{abs(e) if -10 < e < 0 else format(abs(e), '02d')}"
    if "e" not in r and r.endswith(".0"):
        return r[:-2]
    return format(Decimal(r).normalize(), "f")


_JSON_HTML = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).translate(_JSON_HTML)


def _json(v: AnyValue) -> str:
    """Go's json.Marshal(v.AsRaw()): maps with sorted keys, no spaces, HTML characters escaped."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return _json_str(v.string_value)
    if kind == "int_value":
        return str(v.int_value)
    if kind == "bool_value":
        return "true" if v.bool_value else "false"
    if kind == "double_value":
        f = v.double_value
        if math.isnan(f) or math.isinf(f):
            raise _Unsupported()
        return go_float(f)
    if kind == "array_value":
        return "[" + ",".join(_json(x) for x in v.array_value.values) + "]"
    if kind == "kvlist_value":
        m = {kv.key: kv.value for kv in v.kvlist_value.values}
        return "{" + ",".join(f"{_json_str(k)}:{_json(m[k])}" for k in sorted(m)) + "}"
    if kind == "bytes_value":
        return '"' + base64.b64encode(v.bytes_value).decode() + '"'
    return "null"


def any_value_string(v: AnyValue) -> str:
    """pdata's Value.AsString() of an OTLP AnyValue: what the Collector's ClickHouse exporter stores."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return str(v.int_value)
    if kind == "bool_value":
        return "true" if v.bool_value else "false"
    if kind == "double_value":
        return go_float(v.double_value)
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if kind in ("array_value", "kvlist_value"):
        try:
            return _json(v)
        except _Unsupported:
            return ""   # json.Marshal failed: the exporter stores the empty string
    return ""


def attributes_map(kvs) -> dict[str, str]:
    out = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = v.string_value if kind == "string_value" else any_value_string(v)
    return out


def _hex_or_empty(b: bytes, zero: bytes) -> str:
    return "" if not b or b == zero else b.hex()


def otlp_trace_columns(requests, out: TraceColumns | None = None) -> TraceColumns:
    """Append every span of `requests` (ExportTraceServiceRequests) to `out` as otel_traces rows
    (storage/otel.py TRACES_COLUMNS order, column-oriented), mapped as the module docstring says."""
    out = out or TraceColumns()
    (ts, tid, sid, psid, tstate, name, kind, svc, res, sname, sver, sattr, dur, code, msg,
     ev_t, ev_n, ev_a, ln_t, ln_s, ln_st, ln_a) = out.columns
    for req in requests:
        for rs in req.resource_spans:
            res_attrs = attributes_map(rs.resource.attributes)
            service = ""
            for kv in rs.resource.attributes:
                if kv.key == "service.name":
                    service = any_value_string(kv.value)
                    break
            for ss in rs.scope_spans:
                scope_name, scope_version = ss.scope.name, ss.scope.version
                for s in ss.spans:
                    start, end = s.start_time_unix_nano, s.end_time_unix_nano
                    ts.append(start)
                    tid.append(_hex_or_empty(s.trace_id, _ZERO16))
                    sid.append(_hex_or_empty(s.span_id, _ZERO8))
                    psid.append(_hex_or_empty(s.parent_span_id, _ZERO8))
                    tstate.append(s.trace_state)
                    name.append(s.name)
                    kind.append(KIND_NAMES[s.kind] if 0 <= s.kind < len(KIND_NAMES) else "")
                    svc.append(service)
                    res.append(res_attrs)
                    sname.append(scope_name)
                    sver.append(scope_version)
                    sattr.append(attributes_map(s.attributes))
                    dur.append(end - start if end > start else 0)
                    c = s.status.code
                    code.append(STATUS_NAMES[c] if 0 <= c < len(STATUS_NAMES) else "")
                    msg.append(s.status.message)
                    if s.events:
                        ev_t.append([e.time_unix_nano for e in s.events])
                        ev_n.append([e.name for e in s.events])
                        ev_a.append([attributes_map(e.attributes) for e in s.events])
                    else:
                        ev_t.append(_EMPTY)
                        ev_n.append(_EMPTY)
                        ev_a.append(_EMPTY)
                    if s.links:
                        ln_t.append([_hex_or_empty(x.trace_id, _ZERO16) for x in s.links])
                        ln_s.append([_hex_or_empty(x.span_id, _ZERO8) for x in s.links])
                        ln_st.append([x.trace_state for x in s.links])
                        ln_a.append([attributes_map(x.attributes) for x in s.links])
                    else:
                        ln_t.append(_EMPTY)
                        ln_s.append(_EMPTY)
                        ln_st.append(_EMPTY)
                        ln_a.append(_EMPTY)
    return out


def decode_message(value: bytes) -> ExportTraceServiceRequest:
    """The spans topic's payload -> the request (the ConsumerCore `decode` hook); InvalidRecord
    (dead letter, reason `envelope`) for a message that is not one."""
    from tensortrace.consume import DeadLetterReason, InvalidRecord

    try:
        return ExportTraceServiceRequest.FromString(value)
    except DecodeError as e:
        raise InvalidRecord(DeadLetterReason.ENVELOPE,
                            f"spans topic message is not an OTLP ExportTraceServiceRequest: {e}") from None
