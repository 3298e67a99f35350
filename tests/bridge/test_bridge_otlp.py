"""The pure part of receiving the serving engine's spans: validation, splitting for the spans topic,
otel_traces rows as the OTel Collector's ClickHouse exporter writes them, and the publisher's error
mapping (with a stand-in Kafka producer)."""

import threading

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1 import trace_pb2

from tensortrace.bridge.engine import EngineSpansSink
from tensortrace.bridge.otlp import (Rejected, any_value_string, check_request, decode_message, go_float,
                                     kafka_messages, otlp_trace_columns, parse_request, split_request)
from tensortrace.bridge.receiver import ReceiverStats, SpansIntake, SpansPublisher, Unavailable
from tensortrace.consume import InvalidRecord
from tensortrace.consume.sink import SealedBatch, Source
from tensortrace.service.kafka import KafkaConfig
from tensortrace.storage.otel import TRACES_COLUMNS

pytestmark = pytest.mark.unit

TID = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")


def kv(key, **value):
    return KeyValue(key=key, value=AnyValue(**value))


def span(name, sid, parent=b"", tid=TID, **kw):
    return trace_pb2.Span(trace_id=tid, span_id=sid, parent_span_id=parent, name=name, **kw)


def request(*spans, service="sglang", scope="sglang server", resource_extra=()):
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([kv("service.name", string_value=service), *resource_extra])
    ss = rs.scope_spans.add()
    ss.scope.name, ss.scope.version = scope, "0.5.23"
    ss.spans.extend(spans)
    return req


def test_attribute_values_are_stored_as_pdata_as_string_makes_them():
    assert any_value_string(AnyValue(string_value="x")) == "x"
    assert any_value_string(AnyValue(int_value=-42)) == "-42"
    assert any_value_string(AnyValue(bool_value=True)) == "true"
    assert any_value_string(AnyValue(bytes_value=b"\x00\xff")) == "AP8="
    assert any_value_string(AnyValue()) == ""
    # doubles as Go's encoding/json writes them: no ".0", plain up to 1e21, exponents cleaned
    assert [go_float(f) for f in (2.0, 0.1, 1e16, 1e20, 1e21, 1e-6, 1e-7, -2.5e-8, -0.0, 123456.789)] == \
        ["2", "0.1", "10000000000000000", "100000000000000000000", "1e+21", "0.000001", "1e-7", "-2.5e-8", "-0",
         "123456.789"]
    arr = AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue(double_value=1.5),
                                                  AnyValue(string_value='a<b>&"c"'), AnyValue(bool_value=False),
                                                  AnyValue()]))
    assert any_value_string(arr) == '[1,1.5,"a\\u003cb\\u003e\\u0026\\"c\\"",false,null]'
    m = AnyValue(kvlist_value=KeyValueList(values=[kv("z", int_value=1), kv("a", array_value=ArrayValue(
        values=[AnyValue(bytes_value=b"hi")])), kv("é", string_value="ü\n")]))
    assert any_value_string(m) == '{"a":["aGk="],"z":1,"é":"ü\\n"}'   # keys sorted, UTF-8 kept
    # Go's json.Marshal fails on NaN inside an array: the exporter stores ''
    assert any_value_string(AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=float("nan"))]))) == ""


def test_otlp_spans_become_otel_traces_rows_as_the_collector_exporter_writes_them():
    root = span("Req 1a2b3c4d", bytes.fromhex("b7ad6b7169203331"), parent=bytes.fromhex("00f067aa0ba902b7"),
                kind=trace_pb2.Span.SPAN_KIND_SERVER, start_time_unix_nano=1_000, end_time_unix_nano=9_000,
                trace_state="k=v", attributes=[kv("rid", string_value="1a2b3c4d"), kv("n", int_value=3)])
    loop = span("decode_loop", bytes.fromhex("00000000000000aa"), parent=root.span_id,
                start_time_unix_nano=5_000, end_time_unix_nano=4_000,   # ends before it starts: Duration 0
                attributes=[kv("decode_ct", int_value=0), kv("p", double_value=0.5)],
                status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="aborted"))
    loop.events.add(time_unix_nano=4_500, name="tok", attributes=[kv("i", int_value=7)])
    link = loop.links.add(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), trace_state="a=b")
    link.attributes.extend([kv("why", string_value="prev")])
    req = request(root, loop, resource_extra=[kv("host.name", string_value="h1"), kv("pid", int_value=12)])
    assert check_request(req) == 2
    cols = otlp_trace_columns([req])
    rows = [dict(zip(TRACES_COLUMNS, r)) for r in zip(*cols.columns)]
    assert len(rows) == 2 and len(cols.columns) == len(TRACES_COLUMNS)
    r, d = rows
    assert r["Timestamp"] == 1_000 and r["Duration"] == 8_000
    assert (r["TraceId"], r["SpanId"], r["ParentSpanId"]) == (TID.hex(), "b7ad6b7169203331", "00f067aa0ba902b7")
    assert (r["TraceState"], r["SpanName"], r["SpanKind"], r["ServiceName"]) == ("k=v", "Req 1a2b3c4d", "Server", "sglang")
    assert r["ResourceAttributes"] == {"service.name": "sglang", "host.name": "h1", "pid": "12"}
    assert (r["ScopeName"], r["ScopeVersion"]) == ("sglang server", "0.5.23")
    assert r["SpanAttributes"] == {"rid": "1a2b3c4d", "n": "3"}
    assert (r["StatusCode"], r["StatusMessage"]) == ("Unset", "")
    assert r["Events.Name"] == [] and r["Links.TraceId"] == []
    assert (d["SpanKind"], d["StatusCode"], d["StatusMessage"], d["Duration"]) == ("Unspecified", "Error", "aborted", 0)
    assert d["SpanAttributes"] == {"decode_ct": "0", "p": "0.5"} and d["ParentSpanId"] == "b7ad6b7169203331"
    assert (d["Events.Timestamp"], d["Events.Name"], d["Events.Attributes"]) == ([4_500], ["tok"], [{"i": "7"}])
    assert (d["Links.TraceId"], d["Links.SpanId"], d["Links.TraceState"], d["Links.Attributes"]) == \
        ([bytes(range(1, 17)).hex()], [bytes(range(1, 9)).hex()], ["a=b"], [{"why": "prev"}])
    # a root span (no parent) and a resource without service.name: '' as the exporter writes
    bare = ExportTraceServiceRequest()
    bare.resource_spans.add().scope_spans.add().spans.append(span("x", b"\x01" * 8))
    row = dict(zip(TRACES_COLUMNS, next(zip(*otlp_trace_columns([bare]).columns))))
    assert (row["ParentSpanId"], row["ServiceName"], row["ScopeName"]) == ("", "", "")


@pytest.mark.parametrize("bad, reason, text", [
    (dict(tid=b"abc"), "trace_id", "trace_id is 3 bytes, not 16"),
    (dict(tid=bytes(16)), "trace_id", "trace_id is all zero"),
    (dict(sid=b"\x01" * 7), "span_id", "span_id is 7 bytes, not 8"),
    (dict(parent=b"\x01" * 4), "parent_span_id", "parent_span_id is 4 bytes"),
])
def test_malformed_ids_are_refused_with_the_span_named(bad, reason, text):
    good = span("ok", b"\x02" * 8)
    args = dict(tid=TID, sid=b"\x01" * 8, parent=b"") | bad
    req = request(good, span("decode_loop", args["sid"], parent=args["parent"], tid=args["tid"]))
    with pytest.raises(Rejected) as e:
        check_request(req)
    assert e.value.reason == reason and text in str(e.value)
    assert "resource_spans[0].scope_spans[0].spans[1] 'decode_loop'" in str(e.value)
    s = span("l", b"\x01" * 8)
    s.links.add(trace_id=b"\x01" * 15, span_id=b"\x01" * 8)
    with pytest.raises(Rejected, match=r"links\[0\]\.trace_id is 15 bytes") as e:
        check_request(request(s))
    assert e.value.reason == "link"


def test_bad_protobuf_and_oversized_requests_are_refused():
    with pytest.raises(Rejected, match="not an OTLP ExportTraceServiceRequest") as e:
        parse_request(b"\xff\xff\xff not protobuf", 1 << 20)
    assert e.value.reason == "decode"
    with pytest.raises(Rejected, match="2000 bytes, more than this receiver accepts") as e:
        parse_request(b"\x00" * 2000, 1000)
    assert e.value.reason == "too_large"
    assert not parse_request(b"", 10).resource_spans   # an empty export is valid (and publishes nothing)


def test_a_large_request_is_split_by_span_under_the_message_limit_keeping_resource_and_scope():
    spans = [span(f"s{i}", (i + 1).to_bytes(8, "big"), tid=(i % 3 + 1).to_bytes(16, "big"),
                  attributes=[kv("pad", string_value="x" * 300)]) for i in range(40)]
    req = request(*spans[:25])
    rs = req.resource_spans.add()
    rs.resource.attributes.append(kv("service.name", string_value="other"))
    ss = rs.scope_spans.add()
    ss.scope.name = "second"
    ss.spans.extend(spans[25:])
    raw = req.SerializeToString()
    assert kafka_messages(raw, req, len(raw)) == [((1).to_bytes(16, "big").hex().encode(), raw, 40)]   # as it came
    parts = split_request(req, 2000)
    assert len(parts) > 5 and all(p.ByteSize() <= 2000 for p in parts)
    got = [(rs.resource.attributes[0].value.string_value, ss.scope.name, s.name)
           for p in parts for rs in p.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert got == [("sglang", "sglang server", f"s{i}") for i in range(25)] + [("other", "second", f"s{i}") for i in range(25, 40)]
    msgs = kafka_messages(raw, req, 2000)
    assert [k for k, _, _ in msgs] == [ExportTraceServiceRequest.FromString(v).resource_spans[0].scope_spans[0].spans[0]
                                       .trace_id.hex().encode() for _, v, _ in msgs]
    assert sum(n for _, _, n in msgs) == 40
    with pytest.raises(Rejected, match="more than a spans-topic message may be") as e:
        split_request(req, 300)
    assert e.value.reason == "span_too_large"
    assert kafka_messages(b"", ExportTraceServiceRequest(), 10) == []


class FakeFuture:
    def __init__(self, error=None):
        self.error = error

    def get(self, timeout):
        if self.error:
            raise self.error


class FakeProducer:
    def __init__(self, error=None):
        self.error, self.sent = error, []

    def send(self, topic, key, value):
        self.sent.append((topic, key, value))
        return FakeFuture(self.error)


def test_publish_outcomes_map_to_accepted_unavailable_and_too_large():
    from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

    pub = SpansPublisher(KafkaConfig(bootstrap_servers="127.0.0.1:1"), "spans", timeout_s=0.1)
    stats = ReceiverStats()
    intake = SpansIntake(pub, stats)
    raw = request(span("a", b"\x01" * 8)).SerializeToString()
    out = intake.accept(raw)                       # not connected yet
    assert out.status == "unavailable" and "Kafka is not connected" in out.message
    pub._producer = FakeProducer()
    assert intake.accept(raw).status == "accepted" and pub._producer.sent == [("spans", TID.hex().encode(), raw)]
    pub._producer = FakeProducer(KafkaTimeoutError("no ack"))
    out = intake.accept(raw)
    assert out.status == "unavailable" and "did not acknowledge the spans within 0.1s" in out.message
    pub._producer = FakeProducer(MessageSizeTooLargeError("big"))
    out = intake.accept(raw)
    assert (out.status, out.reason) == ("rejected", "too_large") and "max.message.bytes" in out.message
    assert intake.accept(b"junk\xff").reason == "decode"
    assert stats.requests == {"accepted": 1, "rejected": 2, "unavailable": 2}
    assert stats.rejected == {"too_large": 1, "decode": 1} and stats.spans == 1 and stats.messages == 1
    with pytest.raises(Unavailable):
        SpansPublisher(KafkaConfig(bootstrap_servers="127.0.0.1:1"), "t").publish([(None, b"", 0)])


def test_the_spans_topic_sink_batches_requests_and_writes_them_whole():
    written = []
    sink = EngineSpansSink(lambda reqs, stopping: written.append(reqs) or True, max_spans=3)
    a = request(span("a", b"\x01" * 8), span("b", b"\x02" * 8))
    sink.add_message(a, Source("spans", 0, 0))
    sink.add_message(ExportTraceServiceRequest(), Source("spans", 0, 1))   # no spans: nothing to write
    assert not sink.due()
    sink.add_message(a, Source("spans", 0, 2))
    assert sink.due()
    assert sink.flush(SealedBatch(sink.seal()), threading.Event()) and written == [[a, a]]
    assert sink.seal() is None and sink.stats.written_spans == 4 and sink.stats.requests == 3
    with pytest.raises(InvalidRecord, match="not an OTLP ExportTraceServiceRequest"):
        decode_message(b"\xff\xff\xff")
