"""The bridge on real parts: a real Kafka broker, the bridge service in-process, a real OTLP
receiver (gRPC and HTTP, the SDK's own exporters talking to it) and a real ClickHouse engine."""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest

from tensortrace.bridge.config import BridgeConfig
from tensortrace.bridge.service import BridgeService
from tensortrace.bridge.spans import CAPTURE, EXPORT, KAFKA, span_id
from tensortrace.testing.kafka import create_topics
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.service.kafka import KafkaConfig
from tensortrace.wire import codec

pytestmark = pytest.mark.integration


def new_topic(bootstrap: str, partitions: int = 2) -> str:
    """A new topic and its `.dlq`, returned once every partition has a leader (a consumer that joins
    before that can be assigned nothing until its next metadata refresh)."""
    return create_topics(bootstrap, partitions, prefix="tt-bridge", dlq=True)


def config(bootstrap: str, topic: str, **kw) -> BridgeConfig:
    kw.setdefault("group_id", f"bridge-{uuid.uuid4().hex[:8]}")
    kw.setdefault("request_timeout_s", 2.0)
    kw.setdefault("otlp_receiver_port", -1)     # the engine-spans receiver and consumer: test_bridge_receiver.py
    kw.setdefault("spans_consumer", False)
    kw.setdefault("probe_scores_consumer", False)   # test_bridge_probes.py
    return BridgeConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq",
                        batch_max_delay_s=0.05, retry_initial_s=0.05, retry_max_s=0.5, **kw)


class Running:
    def __init__(self, cfg: BridgeConfig):
        self.svc = BridgeService(cfg)
        self.thread = threading.Thread(target=self.svc.run, daemon=True)
        self.thread.start()

    def stop(self):
        self.svc.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()

    def __enter__(self):
        return self.svc

    def __exit__(self, *exc):
        self.stop()


def wait_until(pred, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def incomplete(request_id: str) -> SyntheticRequest:
    """A request whose summary says 2 records were dropped (ring full)."""
    r = SyntheticRequest.make(request_id, layers=2, hidden=8, model_id="m/b")
    r.summary.records_dropped = 2
    r.summary.dropped_by_reason["ring_full"] = 2
    r.summary.complete = False
    r.summary.incomplete_reason = "2 records dropped: ring_full"
    return r


def without_trace(request_id: str) -> SyntheticRequest:
    r = SyntheticRequest.make(request_id, layers=1, hidden=8)
    for rec in r.records:
        rec.trace_id = bytes(16)
    r.summary.trace_id = bytes(16)
    r.trace_id = bytes(16)
    return r


def spans_of(received: list[dict], trace_id: bytes) -> dict[str, dict]:
    out = {}
    for s in received:
        if s["trace_id"] == trace_id.hex():
            assert s["name"] not in out, f"{s['name']} twice in {trace_id.hex()}"
            out[s["name"]] = s
    return out


def test_each_request_becomes_spans_in_its_own_trace_over_otlp_grpc(kafka_broker, otlp_grpc):
    bs = kafka_broker.bootstrap
    topic = new_topic(bs)
    good = [SyntheticRequest.make(f"ok{i}", layers=3, hidden=8, prompt=6, generated=3, model_id="m/a") for i in range(3)]
    bad = incomplete("dropped")
    notrace = without_trace("notrace")
    msgs = [(b"junk", b"\x00not an envelope")]
    for r in good + [bad, notrace]:
        msgs += r.messages(per_message=4)
    msgs += good[0].messages(per_message=2)   # a re-delivery: no second set of spans
    produce(bs, topic, msgs)

    with Running(config(bs, topic, otlp_endpoint=otlp_grpc.endpoint)) as svc:
        received = otlp_grpc.wait_for(3 * 4)
        assert wait_until(lambda: svc.stats.skipped == {"no_trace_id": 1} and svc.core.stats.dlq_messages == 1)
        time.sleep(0.5)
        assert len(otlp_grpc.spans) == 12     # nothing more came: duplicates and the no-trace request make none

    for r in good:
        s = spans_of(received, r.trace_id)
        assert set(s) == {CAPTURE, EXPORT, KAFKA}
        cap = s[CAPTURE]
        assert cap["parent"] == r.summary.span_id.hex()        # under the request's own span
        assert s[EXPORT]["parent"] == cap["span_id"] == s[KAFKA]["parent"]
        assert cap["span_id"] == span_id(r.trace_id, r.request_id, CAPTURE).hex()
        assert (cap["kind"], s[EXPORT]["kind"], s[KAFKA]["kind"]) == ("internal", "producer", "consumer")
        a = cap["attrs"]
        assert a["gen_ai.request.model"] == "m/a" and a["tensortrace.complete"] is True
        assert a["tensortrace.records.captured"] == len(r.records) == a["tensortrace.records.received"]
        assert a["tensortrace.hooks"] == ["resid_final", "resid_pre"] and a["tensortrace.layers"] == [0, 1, 2]
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (6, 3)
        assert a["tensortrace.trace_id"] == r.trace_id.hex() and a["tensortrace.store"] == "clickhouse"
        assert cap["status"] == "unset"
        assert cap["start"] == r.summary.start_time_unix_nano and cap["end"] == r.summary.end_time_unix_nano
        k = s[KAFKA]["attrs"]
        assert k["messaging.system"] == "kafka" and k["messaging.destination.name"] == topic
        assert k["tensortrace.kafka.offset.first"] <= k["tensortrace.kafka.offset.last"]
        assert s[KAFKA]["start"] == s[EXPORT]["end"] <= s[KAFKA]["end"]
        assert cap["resource"]["service.name"] == "tensortrace-bridge" and cap["scope"] == "tensortrace.bridge"

    s = spans_of(received, bad.trace_id)
    cap = s[CAPTURE]
    assert cap["status"] == "error" and "ring_full" in cap["status_message"]
    assert cap["attrs"]["tensortrace.complete"] is False and cap["attrs"]["tensortrace.records.dropped"] == 2
    assert not spans_of(received, bytes(16))
    assert svc.stats.requests == {"complete": 3, "incomplete": 1}
    assert svc.core.stats.dlq_by_reason == {"envelope": 1}
    assert svc.registry.get_sample_value("tensortrace_bridge_spans_total", {"destination": "otlp"}) == 12
    assert svc.registry.get_sample_value("tensortrace_bridge_requests_skipped_total", {"reason": "no_trace_id"}) == 1
    assert svc.registry.get_sample_value("tensortrace_bridge_dead_letters_total", {"reason": "envelope"}) == 1


def test_replaying_the_topic_with_a_new_group_gives_spans_with_the_same_ids(kafka_broker, otlp_grpc):
    bs = kafka_broker.bootstrap
    topic = new_topic(bs)
    reqs = [SyntheticRequest.make(f"r{i}", layers=2, hidden=8) for i in range(4)] + [incomplete("inc")]
    produce(bs, topic, [m for r in reqs for m in r.messages()])
    runs = []
    for _ in range(2):   # two groups, each reading the topic from offset 0
        otlp_grpc.spans.clear()
        with Running(config(bs, topic, otlp_endpoint=otlp_grpc.endpoint)):
            runs.append(otlp_grpc.wait_for(15))
    ids = [sorted((s["trace_id"], s["span_id"], s["parent"], s["name"]) for s in run) for run in runs]
    assert ids[0] == ids[1] and len(ids[0]) == 15 and len({x[1] for x in ids[0]}) == 15


def test_export_failures_are_retried_until_the_receiver_accepts(kafka_broker, otlp_grpc):
    bs = kafka_broker.bootstrap
    topic = new_topic(bs, partitions=1)
    r = SyntheticRequest.make("retry", layers=1, hidden=8)
    produce(bs, topic, r.messages())
    otlp_grpc.fail_next = 2
    with Running(config(bs, topic, otlp_endpoint=otlp_grpc.endpoint)) as svc:
        otlp_grpc.wait_for(3)
        assert otlp_grpc.refused == 2
        assert svc.registry.get_sample_value("tensortrace_bridge_export_failures_total", {"destination": "otlp"}) == 2


def test_otlp_http_exporter_delivers_the_same_spans(kafka_broker, otlp_http):
    bs = kafka_broker.bootstrap
    topic = new_topic(bs, partitions=1)
    r = SyntheticRequest.make("http", layers=1, hidden=8)
    produce(bs, topic, r.messages())
    otlp_http.fail_next = 1
    with Running(config(bs, topic, otlp_endpoint=otlp_http.endpoint, otlp_protocol="http/protobuf")):
        received = otlp_http.wait_for(3)
    s = spans_of(received, r.trace_id)
    assert s[CAPTURE]["parent"] == r.summary.span_id.hex() and s[KAFKA]["parent"] == s[CAPTURE]["span_id"]


def test_clickhouse_mode_writes_otel_traces_rows_queryable_by_trace_id(kafka_broker, ch_dsn, ch_database, ch_client):
    bs = kafka_broker.bootstrap
    topic = new_topic(bs)
    good = SyntheticRequest.make("ch-ok", layers=2, hidden=8, model_id="m/ch")
    bad = incomplete("ch-bad")
    produce(bs, topic, good.messages() + bad.messages())
    db = ch_database

    def rows(trace_id: bytes, dedup: bool = False):
        return ch_client.query(
            f"SELECT SpanName, SpanId, ParentSpanId, SpanKind, StatusCode, StatusMessage, ServiceName, ScopeName, "
            f"SpanAttributes, ResourceAttributes, Duration, toUnixTimestamp64Nano(Timestamp) FROM {db}.otel_traces "
            f"WHERE TraceId = {{t:String}} {'LIMIT 1 BY TraceId, SpanId' if dedup else ''}",
            parameters={"t": trace_id.hex()}).result_rows

    for _ in range(2):   # the second run, a new group, replays the topic: same span ids
        with Running(config(bs, topic, clickhouse_dsn=ch_dsn, traces_database=db)) as svc:
            assert wait_until(lambda: svc.stats.spans == 6)
    assert svc.registry.get_sample_value("tensortrace_bridge_spans_total", {"destination": "clickhouse"}) == 6

    assert len(rows(good.trace_id)) == 6            # written twice ...
    got = {r[0]: r for r in rows(good.trace_id, dedup=True)}   # ... read once: deterministic ids
    assert set(got) == {CAPTURE, EXPORT, KAFKA}
    cap = got[CAPTURE]
    assert cap[2] == good.summary.span_id.hex() and cap[1] == span_id(good.trace_id, "ch-ok", CAPTURE).hex()
    assert got[EXPORT][2] == cap[1] == got[KAFKA][2]
    assert (cap[3], got[EXPORT][3], got[KAFKA][3]) == ("Internal", "Producer", "Consumer")
    assert cap[4] == "Unset" and cap[6] == "tensortrace-bridge" and cap[7] == "tensortrace.bridge"
    assert cap[8]["tensortrace.complete"] == "true" and cap[8]["gen_ai.request.model"] == "m/ch"
    assert cap[8]["tensortrace.layers"] == "[0,1]" and cap[9]["service.name"] == "tensortrace-bridge"
    assert cap[11] == good.summary.start_time_unix_nano
    assert cap[10] == good.summary.end_time_unix_nano - good.summary.start_time_unix_nano

    b = {r[0]: r for r in rows(bad.trace_id, dedup=True)}
    assert b[CAPTURE][4] == "Error" and "ring_full" in b[CAPTURE][5]
    assert b[CAPTURE][8]["tensortrace.complete"] == "false"

    # the trace-id -> time side table (the exporter's materialized view) knows both traces
    ts = ch_client.query(f"SELECT DISTINCT TraceId FROM {db}.otel_traces_trace_id_ts").result_rows
    assert {t[0] for t in ts} == {good.trace_id.hex(), bad.trace_id.hex()}


def test_a_stopped_bridge_commits_nothing_it_did_not_export_and_the_next_one_sends_it(kafka_broker, otlp_grpc):
    bs = kafka_broker.bootstrap
    topic = new_topic(bs, partitions=1)
    r = SyntheticRequest.make("later", layers=1, hidden=8)
    produce(bs, topic, r.messages())
    cfg = config(bs, topic, otlp_endpoint=otlp_grpc.endpoint)
    otlp_grpc.fail_next = 10**6           # the receiver refuses everything
    run = Running(cfg)
    assert wait_until(lambda: otlp_grpc.refused >= 1)
    run.stop()                            # stopping while the export is being retried
    assert not otlp_grpc.spans
    otlp_grpc.fail_next = 0
    with Running(cfg):                    # same group: the request was not committed past
        received = otlp_grpc.wait_for(3)
    assert set(spans_of(received, r.trace_id)) == {CAPTURE, EXPORT, KAFKA}


def test_tensortrace_bridge_runs_as_a_service_with_metrics_and_stops_on_sigterm(kafka_broker, otlp_grpc, tmp_path):
    bs = kafka_broker.bootstrap
    topic = new_topic(bs, partitions=1)
    r = SyntheticRequest.make("svc", layers=1, hidden=8)
    produce(bs, topic, r.messages() + [(b"x", codec.encode_envelope([r.summary]))])
    spans_topic = new_topic(bs, partitions=1)
    status = tmp_path / "status.json"
    proc = subprocess.Popen([sys.executable, "-m", "tensortrace.cli", "bridge", "--kafka-bootstrap-servers", bs,
                             "--topic", topic, "--dlq-topic", topic + ".dlq", "--otlp-endpoint", otlp_grpc.endpoint,
                             "--http-port", "0", "--http-host", "127.0.0.1", "--status-file", str(status),
                             "--batch-max-delay-s", "0.05", "--otlp-receiver-port", "0",
                             "--otlp-receiver-host", "127.0.0.1", "--otlp-receiver-plaintext", "--spans-topic", spans_topic,
                             "--spans-group-id", f"spans-{uuid.uuid4().hex[:8]}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: status.exists() and "otlp" in json.loads(status.read_text())["ports"], 30), \
            "no status file with the OTLP receiver's port"
        ports = json.loads(status.read_text())["ports"]
        port = ports["http"]
        otlp_grpc.wait_for(3)
        # the serving engine's spans: SDK -> the process's OTLP receiver -> Kafka -> forwarded to the
        # OTLP destination, as they were sent
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        provider = TracerProvider(resource=Resource.create({"service.name": "engine"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{ports['otlp']}",
                                                                         insecure=True)))
        provider.get_tracer("engine").start_span("request_process").end()
        provider.shutdown()
        engine = [s for s in otlp_grpc.wait_for(4) if s["name"] == "request_process"]
        assert len(engine) == 1 and engine[0]["resource"]["service.name"] == "engine"

        def metric(name, labels):
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            line = [x for x in body.splitlines() if x.startswith(name + "{") and labels in x]
            return float(line[0].split()[-1]) if line else None
        assert wait_until(lambda: metric("tensortrace_bridge_spans_total", 'destination="otlp"') == 3.0)
        assert metric("tensortrace_bridge_requests_total", 'state="complete"') == 1.0
        assert wait_until(lambda: metric("tensortrace_bridge_engine_spans_total", 'destination="otlp"') == 1.0)
        assert metric("tensortrace_bridge_otlp_requests_total", 'result="accepted"') == 1.0
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_restart_re_reads_an_interleaved_request_whole_and_sends_the_same_complete_spans(kafka_broker, otlp_grpc):
    """r1's records interleave with r2's (r2 never ends): r1 is released and exported, r2 stays open.
    Committing at r2's first offset would cut r1 in two, and a restart would release r1 again with
    only its tail ("10 of 12 arrived"): an ERROR span for a complete request. The bridge commits
    before r1 instead."""
    bs = kafka_broker.bootstrap
    topic = new_topic(bs, partitions=1)
    r1 = SyntheticRequest.make("r1", layers=2, hidden=8)
    r2 = SyntheticRequest.make("r2", layers=1, hidden=8)
    m1 = r1.messages(per_message=2)
    produce(bs, topic, [m1[0], r2.messages(per_message=2, with_summary=False)[0]] + m1[1:], partition=0)
    cfg = config(bs, topic, otlp_endpoint=otlp_grpc.endpoint, request_timeout_s=600)
    with Running(cfg):
        first = spans_of(otlp_grpc.wait_for(3), r1.trace_id)
        time.sleep(0.5)    # several commit rounds
    assert first[CAPTURE]["status"] == "unset"
    otlp_grpc.spans.clear()
    cfg.request_timeout_s = 1.0
    with Running(cfg) as svc:   # same group: a restart
        assert wait_until(lambda: svc.stats.requests.get("no_summary", 0) >= 1)   # r2, at its timeout
        again = spans_of(otlp_grpc.wait_for(6), r1.trace_id)
    assert again[CAPTURE]["status"] == "unset" and again[CAPTURE]["attrs"]["tensortrace.complete"] is True
    assert again[CAPTURE]["span_id"] == first[CAPTURE]["span_id"]


def test_step_spans_link_the_requests_of_each_forward_step(kafka_broker, otlp_grpc):
    bs = kafka_broker.bootstrap
    topic = new_topic(bs, partitions=2)
    reqs = [SyntheticRequest.make(f"st{i}", layers=2, hidden=8, prompt=4, generated=3) for i in range(3)]
    produce(bs, topic, [m for r in reqs for m in r.messages()])
    with Running(config(bs, topic, otlp_endpoint=otlp_grpc.endpoint, step_spans=True, step_linger_s=0.3)) as svc:
        received = otlp_grpc.wait_for(3 * 3 + 3)          # 3 per request + steps 0 (prefill), 1, 2 (decode)
        assert wait_until(lambda: svc.stats.steps == 3)
    steps = {s["attrs"]["tensortrace.step"]: s for s in received if s["name"] == "tensortrace.step"}
    captures = {(s["trace_id"], s["span_id"]) for s in received if s["name"] == CAPTURE}
    assert set(steps) == {0, 1, 2}
    for s in steps.values():
        assert set(s["links"]) == captures                 # every request of the batch, by its capture span
        assert s["attrs"]["tensortrace.batch.requests"] == 3 and s["parent"] == ""
    assert steps[0]["attrs"]["tensortrace.batch.prefill_requests"] == 3
