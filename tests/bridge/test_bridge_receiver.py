"""The bridge receives the serving engine's own spans: the real OpenTelemetry SDK (TracerProvider,
SimpleSpanProcessor, OTLPSpanExporter over gRPC and HTTP) -> the bridge's OTLP receiver on
127.0.0.1 -> a real Kafka broker (the spans topic, acks=all before the export returns) -> the
spans-topic consumer -> otel_traces in a real ClickHouse engine (chDB) or the OTLP destination;
next to the bridge's own capture spans of the same trace."""

import json
import socket
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from google.rpc import status_pb2
from kafka import KafkaConsumer
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from test_bridge import Running, config, new_topic, wait_until
from tensortrace.bridge.config import BridgeConfig
from tensortrace.bridge.service import BridgeService
from tensortrace.bridge.spans import CAPTURE, EXPORT, KAFKA
from tensortrace.service.security import EndpointSecurity
from tensortrace.service.kafka import KafkaConfig
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.testing.traces import RecordingExporter

pytestmark = pytest.mark.integration

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
TRACEPARENT = "00-{}-00f067aa0ba902b7-01"


def receiver_config(bs, topic, spans_topic, **kw):
    kw.setdefault("spans_consumer", True)
    return config(bs, topic, otlp_receiver_port=0, otlp_receiver_host="127.0.0.1",
                  otlp_receiver_security=EndpointSecurity.loopback_plaintext(), spans_topic=spans_topic,
                  spans_group_id=f"spans-{uuid.uuid4().hex[:8]}", **kw)


def receiver_port(svc: BridgeService) -> int:
    assert wait_until(lambda: svc.grpc_receiver is not None and svc.publisher.connected, 30), \
        f"receiver not up / Kafka not connected: {svc.publisher and svc.publisher.error}"
    return svc.grpc_receiver.port




def sdk(endpoint: str, protocol: str = "grpc", batch: bool = False):
    """A TracerProvider of a simulated serving engine whose spans go to `endpoint` over OTLP: one
    export per span (SimpleSpanProcessor), or with `batch` every span in one export at shutdown
    (BatchSpanProcessor, as SGLang uses)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=10)
    rec = RecordingExporter(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": "sglang-sim", "host.name": "gpu-node-1"}))
    provider.add_span_processor(BatchSpanProcessor(rec, max_export_batch_size=512, schedule_delay_millis=60_000)
                                if batch else SimpleSpanProcessor(rec))
    return provider, provider.get_tracer("sglang server", "0.5.23"), rec


def engine_request(tracer, traceparent: str, t0: int) -> dict:
    """SGLang's span shape for one request: a root request span under the caller's traceparent,
    request_process, prefill_forward, two decode_loop steps (decode_ct), an event, a link, an error."""
    ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    root = tracer.start_span(" Req 1a2b3c4d", context=ctx, kind=SpanKind.SERVER, start_time=t0,
                             attributes={"rid": "1a2b3c4d", "module": "sglang::request"})
    in_root = trace.set_span_in_context(root)
    proc = tracer.start_span("request_process", context=in_root, start_time=t0 + 1_000)
    proc.end(end_time=t0 + 2_000)
    prefill = tracer.start_span("prefill_forward", context=in_root, start_time=t0 + 2_000,
                                links=[Link(proc.get_span_context(), {"why": "previous"})])
    prefill.add_event("scheduled", {"batch": 4, "ratio": 0.25}, timestamp=t0 + 2_500)
    prefill.end(end_time=t0 + 5_000)
    loops = []
    for i in range(2):
        s = tracer.start_span("decode_loop", context=in_root, start_time=t0 + 5_000 + i * 1_000,
                              attributes={"decode_ct": i, "finished": i == 1, "tokens": [1, 2]})
        if i == 1:
            s.set_status(Status(StatusCode.ERROR, "aborted by client"))
        s.end(end_time=t0 + 6_000 + i * 1_000)
        loops.append(s)
    root.end(end_time=t0 + 9_000)
    return {"root": root, "process": proc, "prefill": prefill, "loops": loops}


def in_trace(r: SyntheticRequest, trace_id: bytes, span_id: bytes) -> SyntheticRequest:
    """The synthetic request as the plugin would capture it under this traceparent."""
    for rec in r.records:
        rec.trace_id, rec.span_id = trace_id, span_id
    r.summary.trace_id, r.summary.span_id = trace_id, span_id
    r.trace_id = trace_id
    return r


def raw_export(port: int, body: bytes):
    """One Export call with raw bytes (no client-side serialization): 'OK' or (code, details)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            ch.unary_unary(EXPORT_METHOD)(body, timeout=15)
            return "OK"
        except grpc.RpcError as e:
            return e.code(), e.details()


def one_span_request(trace_id: bytes, span_id: bytes = b"\x01" * 8, pad: int = 0) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "raw-client"
    s = rs.scope_spans.add().spans.add(trace_id=trace_id, span_id=span_id, name="raw", start_time_unix_nano=1,
                                       end_time_unix_nano=2)
    if pad:
        s.attributes.add(key="pad").value.string_value = "x" * pad
    return req.SerializeToString()


def test_engine_spans_and_capture_spans_of_one_request_share_one_trace_in_otel_traces(
        kafka_broker, ch_dsn, ch_database, ch_client):
    bs = kafka_broker.bootstrap
    topic, spans_topic = new_topic(bs), new_topic(bs, partitions=2)
    # a message on the spans topic that is not an OTLP request: dead-lettered, nothing else lost
    produce(bs, spans_topic, [(b"junk", b"\xff\xff\xff not an OTLP request")])
    trace_id = uuid.uuid4().bytes
    tp = TRACEPARENT.format(trace_id.hex())
    caller_span = bytes.fromhex("00f067aa0ba902b7")
    cfg = receiver_config(bs, topic, spans_topic, clickhouse_dsn=ch_dsn, traces_database=ch_database)
    with Running(cfg) as svc:
        port = receiver_port(svc)
        provider, tracer, rec = sdk(f"127.0.0.1:{port}")
        t0 = time.time_ns()
        sp = engine_request(tracer, tp, t0)
        provider.shutdown()
        assert rec.results == [SpanExportResult.SUCCESS] * 5     # SimpleSpanProcessor: one export per span
        # the plugin captured the same request under the same traceparent
        syn = in_trace(SyntheticRequest.make("sgl-1a2b3c4d", layers=2, hidden=8, model_id="m/sgl"), trace_id,
                       caller_span)
        produce(bs, topic, syn.messages())
        assert wait_until(lambda: svc.engine_stats.written_spans >= 5 and svc.stats.spans >= 3, 30), \
            (svc.engine_stats, svc.stats)
        assert wait_until(lambda: svc.spans_core.stats.dlq_by_reason == {"envelope": 1}, 10)
        reg = svc.registry
        assert reg.get_sample_value("tensortrace_bridge_otlp_requests_total", {"result": "accepted"}) == 5
        assert reg.get_sample_value("tensortrace_bridge_otlp_spans_received_total") == 5
        assert reg.get_sample_value("tensortrace_bridge_engine_spans_total", {"destination": "clickhouse"}) == 5
        assert reg.get_sample_value("tensortrace_bridge_spans_dead_letters_total", {"reason": "envelope"}) == 1

    rows = ch_client.query(
        f"SELECT SpanName, SpanId, ParentSpanId, SpanKind, ServiceName, ScopeName, ScopeVersion, SpanAttributes, "
        f"ResourceAttributes, StatusCode, StatusMessage, Duration, toUnixTimestamp64Nano(Timestamp), Events.Name, "
        f"Events.Attributes, Links.SpanId, Links.Attributes FROM {ch_database}.otel_traces "
        f"WHERE TraceId = {{t:String}} LIMIT 1 BY SpanId", parameters={"t": trace_id.hex()}).result_rows
    names = sorted(r[0] for r in rows)
    assert names == sorted([" Req 1a2b3c4d", "request_process", "prefill_forward", "decode_loop", "decode_loop",
                            CAPTURE, EXPORT, KAFKA])
    by_id = {r[1]: r for r in rows}
    hexid = lambda s: format(s.get_span_context().span_id, "016x")   # noqa: E731
    root = by_id[hexid(sp["root"])]
    # the engine's request span and TensorTrace's capture span are siblings under the caller's span
    assert root[2] == caller_span.hex() == next(r for r in rows if r[0] == CAPTURE)[2]
    assert (root[3], root[4], root[5], root[6]) == ("Server", "sglang-sim", "sglang server", "0.5.23")
    assert root[7] == {"rid": "1a2b3c4d", "module": "sglang::request"}
    assert root[8]["service.name"] == "sglang-sim" and root[8]["host.name"] == "gpu-node-1"
    assert root[8]["telemetry.sdk.name"] == "opentelemetry"
    assert (root[11], root[12]) == (9_000, t0)
    for child in ("process", "prefill"):
        assert by_id[hexid(sp[child])][2] == hexid(sp["root"])
    pre = by_id[hexid(sp["prefill"])]
    assert pre[3] == "Internal" and pre[13] == ["scheduled"] and pre[14] == [{"batch": "4", "ratio": "0.25"}]
    assert pre[15] == [hexid(sp["process"])] and pre[16] == [{"why": "previous"}]
    loops = [by_id[hexid(s)] for s in sp["loops"]]
    assert [lp[7] for lp in loops] == [{"decode_ct": "0", "finished": "false", "tokens": "[1,2]"},
                                       {"decode_ct": "1", "finished": "true", "tokens": "[1,2]"}]
    assert [(lp[9], lp[10]) for lp in loops] == [("Unset", ""), ("Error", "aborted by client")]
    cap = next(r for r in rows if r[0] == CAPTURE)
    assert cap[4] == "tensortrace-bridge" and cap[7]["tensortrace.complete"] == "true"
    # the trace-id -> time side table knows the trace from both writers' rows
    assert ch_client.query(f"SELECT count() FROM {ch_database}.otel_traces_trace_id_ts WHERE TraceId = {{t:String}}",
                           parameters={"t": trace_id.hex()}).result_rows[0][0] >= 2

    # the spans topic holds each export as it was sent, keyed by its trace id
    consumer = KafkaConsumer(spans_topic, bootstrap_servers=bs, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000, group_id=None)
    try:
        msgs = [m for m in consumer if m.key != b"junk"]
    finally:
        consumer.close()
    assert len(msgs) == 5 and {m.key for m in msgs} == {trace_id.hex().encode()}
    got = {s.name for m in msgs for rs in ExportTraceServiceRequest.FromString(m.value).resource_spans
           for ss in rs.scope_spans for s in ss.spans}
    assert got == {" Req 1a2b3c4d", "request_process", "prefill_forward", "decode_loop"}


def test_malformed_otlp_is_refused_with_invalid_argument_and_the_next_good_request_still_lands(kafka_broker,
                                                                                               otlp_grpc):
    bs = kafka_broker.bootstrap
    topic, spans_topic = new_topic(bs, partitions=1), new_topic(bs, partitions=1)
    cfg = receiver_config(bs, topic, spans_topic, otlp_endpoint=otlp_grpc.endpoint, otlp_receiver_max_bytes=4096,
                          otlp_http_receiver_port=0)
    with Running(cfg) as svc:
        port = receiver_port(svc)
        code, details = raw_export(port, b"\xff\xff\xff not protobuf")
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "not an OTLP ExportTraceServiceRequest (protobuf decoding failed" in details
        code, details = raw_export(port, one_span_request(b"abc"))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert details == "resource_spans[0].scope_spans[0].spans[0] 'raw': trace_id is 3 bytes, not 16"
        code, details = raw_export(port, one_span_request(b"\x07" * 16, pad=5000))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "more than this receiver accepts (4096 bytes" in details

        # OTLP/HTTP: the same checks, OTLP/HTTP's error shape (400 + google.rpc.Status)
        url = f"http://127.0.0.1:{svc.http_receiver.port}/v1/traces"

        def post(body, ctype="application/x-protobuf"):
            req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
            try:
                with urllib.request.urlopen(req, timeout=15) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
        st, body = post(one_span_request(b"\x07" * 16, span_id=b"\x00" * 8))
        assert st == 400 and "span_id is all zero" in status_pb2.Status.FromString(body).message
        st, body = post(json.dumps({"resourceSpans": []}).encode(), "application/json")
        assert st == 415 and "OTLP/JSON is not accepted" in status_pb2.Status.FromString(body).message

        # the next good requests, from the SDK over gRPC and over HTTP, still land (forwarded to the
        # OTLP destination as they were sent: their own resource and scope)
        assert raw_export(port, one_span_request(b"\x07" * 16)) == "OK"
        for endpoint, protocol in ((f"127.0.0.1:{port}", "grpc"), (url, "http")):
            provider, tracer, rec = sdk(endpoint, protocol)
            tracer.start_span(f"after-{protocol}").end()
            provider.shutdown()
            assert rec.results == [SpanExportResult.SUCCESS]
        received = otlp_grpc.wait_for(3, timeout_s=30)
        reg = svc.registry
        assert reg.get_sample_value("tensortrace_bridge_otlp_rejected_total", {"reason": "decode"}) == 1
        assert reg.get_sample_value("tensortrace_bridge_otlp_rejected_total", {"reason": "trace_id"}) == 1
        assert reg.get_sample_value("tensortrace_bridge_otlp_rejected_total", {"reason": "span_id"}) == 1
        assert reg.get_sample_value("tensortrace_bridge_otlp_rejected_total", {"reason": "too_large"}) == 1
        assert reg.get_sample_value("tensortrace_bridge_otlp_requests_total", {"result": "accepted"}) == 3
        # (the receiver has the spans a moment before the forwarder counts its export as accepted)
        assert wait_until(lambda: reg.get_sample_value("tensortrace_bridge_engine_spans_total",
                                                       {"destination": "otlp"}) == 3, 10)
    by_name = {s["name"]: s for s in received}
    assert set(by_name) == {"raw", "after-grpc", "after-http"}
    assert by_name["raw"]["resource"] == {"service.name": "raw-client"} and by_name["raw"]["trace_id"] == "07" * 16
    for p in ("grpc", "http"):
        s = by_name[f"after-{p}"]
        assert s["resource"]["service.name"] == "sglang-sim" and s["scope"] == "sglang server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exports_get_unavailable_while_kafka_is_down():
    dead = f"127.0.0.1:{free_port()}"   # nothing listens there
    cfg = BridgeConfig(kafka=KafkaConfig(bootstrap_servers=dead), otlp_endpoint="127.0.0.1:9",
                       otlp_receiver_port=0, otlp_receiver_host="127.0.0.1", spans_consumer=False,
                       otlp_receiver_security=EndpointSecurity.loopback_plaintext(),
                       spans_publish_timeout_s=1.0, retry_initial_s=0.05, retry_max_s=0.2, group_id="down")
    with Running(cfg) as svc:
        assert wait_until(lambda: svc.grpc_receiver is not None, 10)
        assert wait_until(lambda: svc.publisher.error != "connecting", 15)
        code, details = raw_export(svc.grpc_receiver.port, one_span_request(b"\x07" * 16))
        assert code is grpc.StatusCode.UNAVAILABLE and details.startswith("Kafka is not connected (")
        assert dead in details
        assert not svc.ready()
        assert svc.registry.get_sample_value("tensortrace_bridge_otlp_requests_total", {"result": "unavailable"}) == 1
        assert svc.registry.get_sample_value("tensortrace_bridge_otlp_kafka_connected") == 0


def test_a_stopped_broker_makes_exports_unavailable_until_it_is_back(kafka_broker):
    bs = kafka_broker.bootstrap
    topic, spans_topic = new_topic(bs, partitions=1), new_topic(bs, partitions=1)
    cfg = receiver_config(bs, topic, spans_topic, otlp_endpoint="127.0.0.1:9", spans_consumer=False,
                          spans_publish_timeout_s=1.0)
    with Running(cfg) as svc:
        port = receiver_port(svc)
        assert raw_export(port, one_span_request(b"\x07" * 16)) == "OK"
        kafka_broker.stop()
        try:
            code, details = raw_export(port, one_span_request(b"\x08" * 16))
            assert code is grpc.StatusCode.UNAVAILABLE and "did not acknowledge the spans within 1s" in details
        finally:
            kafka_broker.start()
        assert wait_until(lambda: raw_export(port, one_span_request(b"\x09" * 16)) == "OK", 60)


def test_a_request_over_the_message_limit_is_split_in_kafka_and_forwarded_whole_over_otlp_http(kafka_broker,
                                                                                               otlp_http):
    bs = kafka_broker.bootstrap
    topic, spans_topic = new_topic(bs, partitions=1), new_topic(bs, partitions=2)
    cfg = receiver_config(bs, topic, spans_topic, otlp_endpoint=otlp_http.endpoint, otlp_protocol="http/protobuf",
                          spans_message_max_bytes=4096)
    with Running(cfg) as svc:
        port = receiver_port(svc)
        provider, tracer, rec = sdk(f"127.0.0.1:{port}", batch=True)
        # one export of 30 spans of ~500 bytes each: ~15 KB, over the 4096-byte message limit
        for i in range(30):
            tracer.start_span(f"decode_loop-{i}", attributes={"decode_ct": i, "pad": "p" * 400}).end()
        provider.shutdown()
        assert rec.results == [SpanExportResult.SUCCESS]
        received = otlp_http.wait_for(30, timeout_s=30)
        assert svc.receiver_stats.messages >= 4 and svc.receiver_stats.spans == 30
    assert sorted(s["attrs"]["decode_ct"] for s in received) == list(range(30))
    assert {s["resource"]["service.name"] for s in received} == {"sglang-sim"}
    assert {s["scope"] for s in received} == {"sglang server"}
