"""Probe scores -> tensortrace.probe spans: the pure mapping, and the bridge's probe scores consumer on
a real Kafka broker (ProbeScore messages published here, as the probe service publishes them),
writing to chDB's otel_traces and to a real OTLP/gRPC receiver."""

from __future__ import annotations

import time
import uuid

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from tensortrace.bridge.config import BridgeConfig
from tensortrace.bridge.probes import PROBE, decode_probe_score, probe_span, probe_span_id
from tensortrace.bridge.spans import CAPTURE, span_id
from tensortrace.consume import InvalidRecord
from tensortrace.service.kafka import KafkaConfig
from tensortrace.testing.kafka import create_topics
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.v1 import records_pb2 as pb

from test_bridge import Running, wait_until


def score_of(syn: SyntheticRequest, probe: str, value: float, *, threshold: float = 0.5, shadow: bool = False,
             probe_hash: str = "0123456789abcdef", complete: bool = True, after_ms: float = 25.0,
             end: bool = True) -> pb.ProbeScore:
    end_ns = syn.summary.end_time_unix_nano
    return pb.ProbeScore(model_id=syn.summary.model_id, request_id=syn.request_id, trace_id=syn.trace_id,
                         span_id=syn.summary.span_id, probe=probe, probe_hash=probe_hash, score=value,
                         threshold=threshold, flagged=value >= threshold and not shadow, shadow=shadow,
                         complete=complete, incomplete_reason="" if complete else "records missing at the timeout",
                         hook="resid_pre", layers=[3, 5], pooling="last", tokens_scored=7,
                         token_scores=[0.1, 0.2], token_positions=[5, 6],
                         request_end_time_unix_nano=end_ns if end else 0,
                         scored_time_unix_nano=end_ns + int(after_ms * 1e6), release="complete")


@pytest.mark.unit
def test_a_probe_span_is_a_child_of_the_capture_span_from_the_request_end_to_the_verdict():
    syn = SyntheticRequest.make("p1", layers=1, hidden=8)
    sc = score_of(syn, "injection", 0.93)
    s = probe_span(sc)
    tid = syn.trace_id
    assert (s.name, s.kind, s.status) == (PROBE, SpanKind.INTERNAL, StatusCode.UNSET)
    assert s.trace_id == tid and s.parent_span_id == span_id(tid, "p1", CAPTURE)
    assert s.span_id == span_id(tid, "p1", "tensortrace.probe\x00injection\x000123456789abcdef")
    assert s.span_id == probe_span_id(tid, "p1", "injection", "0123456789abcdef") == probe_span(sc).span_id
    assert (s.start_ns, s.end_ns) == (sc.request_end_time_unix_nano, sc.scored_time_unix_nano)
    a = s.attributes
    assert (a["gen_ai.evaluation.name"], a["gen_ai.evaluation.score.value"], a["gen_ai.evaluation.score.label"]) == (
        "injection", 0.93, "flagged")
    assert a["tensortrace.probe.hash"] == "0123456789abcdef" and a["tensortrace.probe.threshold"] == 0.5
    assert a["tensortrace.probe.complete"] is True and "tensortrace.probe.incomplete_reason" not in a
    assert (a["tensortrace.probe.pooling"], a["tensortrace.probe.layers"], a["tensortrace.probe.hook"],
            a["tensortrace.probe.tokens_scored"]) == ("last", [3, 5], "resid_pre", 7)
    assert a["tensortrace.request_id"] == "p1" and a["gen_ai.request.model"] == syn.summary.model_id
    # labels, another version, no request end, no trace id
    assert probe_span(score_of(syn, "x", 0.1)).attributes["gen_ai.evaluation.score.label"] == "pass"
    shadow = probe_span(score_of(syn, "x", 0.9, shadow=True, complete=False))
    assert shadow.attributes["gen_ai.evaluation.score.label"] == "shadow"
    assert shadow.attributes["tensortrace.probe.incomplete_reason"] == "records missing at the timeout"
    assert probe_span(score_of(syn, "injection", 0.93, probe_hash="ffff")).span_id != s.span_id
    late = score_of(syn, "x", 0.1, end=False)
    assert probe_span(late).start_ns == probe_span(late).end_ns == late.scored_time_unix_nano
    sc.trace_id = b""
    assert probe_span(sc) is None


@pytest.mark.unit
def test_a_message_that_is_not_a_probe_score_is_refused_with_the_reason():
    syn = SyntheticRequest.make("p2", layers=1, hidden=8)
    good = score_of(syn, "injection", 0.4)
    assert decode_probe_score(good.SerializeToString()) == good
    bad_tid = score_of(syn, "injection", 0.4)
    bad_tid.trace_id = b"\x01" * 5
    no_time = score_of(syn, "injection", 0.4)
    no_time.scored_time_unix_nano = 0
    for value, msg in ((b"\xff\xff\xff", "not a tensortrace.v1.ProbeScore"),
                       (pb.ProbeScore(probe="x").SerializeToString(), "ProbeScore without request_id"),
                       (bad_tid.SerializeToString(), "trace_id of 5 bytes, not 16"),
                       (no_time.SerializeToString(), "no scored_time_unix_nano")):
        with pytest.raises(InvalidRecord, match=msg):
            decode_probe_score(value)


@pytest.mark.unit
def test_the_probe_scores_flags_are_validated():
    base = dict(otlp_endpoint="127.0.0.1:4317", otlp_receiver_port=-1)   # no receiver: its TLS is not the point here
    assert BridgeConfig(**base).probe_scores_consumer and BridgeConfig(**base).probe_scores_topic == "tensortrace.probe_scores"
    assert "probe_scores_topic: 'a b' must be a non-empty name without spaces" in BridgeConfig(
        **base, probe_scores_topic="a b").problems()
    assert any("is also the activation" in p for p in BridgeConfig(**base, probe_scores_topic="tensortrace.spans").problems())
    assert any("must differ" in p for p in BridgeConfig(**base, probe_scores_group_id="tensortrace-bridge").problems())
    assert BridgeConfig(**base, probe_scores_consumer=False, probe_scores_topic="").problems() == []


@pytest.mark.integration
def test_probe_scores_become_probe_spans_under_the_capture_span_once_each(kafka_broker, ch_dsn, ch_database, ch_client,
                                                                          otlp_grpc):
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 2, prefix="tt-bridge-pact", dlq=True)
    scores_topic = create_topics(bs, 2, prefix="tt-bridge-pscores", dlq=True)
    reqs = [SyntheticRequest.make(f"pr{i}", layers=1, hidden=8, model_id="m/p") for i in range(3)]
    produce(bs, topic, [m for r in reqs for m in r.messages()])
    scores = [score_of(reqs[0], "injection", 0.91), score_of(reqs[0], "sentiment", 0.2),
              score_of(reqs[1], "injection", 0.3, shadow=True), score_of(reqs[2], "injection", 0.6, complete=False)]
    orphan = score_of(reqs[0], "injection", 0.5)
    orphan.trace_id, orphan.request_id = b"", "no-trace"
    msgs = [(s.request_id.encode(), s.SerializeToString()) for s in scores]
    msgs += [msgs[0],                                    # re-published by a restarted probe service
             (orphan.request_id.encode(), orphan.SerializeToString()),
             (b"pr1", b"\x08\x96\x01junk")]               # not a ProbeScore: dead-lettered
    produce(bs, scores_topic, msgs)

    def cfg() -> BridgeConfig:
        return BridgeConfig(kafka=KafkaConfig(bootstrap_servers=bs), topic=topic, dlq_topic=topic + ".dlq",
                            group_id=f"b-{uuid.uuid4().hex[:8]}", clickhouse_dsn=ch_dsn, traces_database=ch_database,
                            otlp_endpoint=otlp_grpc.endpoint, otlp_receiver_port=-1, spans_consumer=False,
                            probe_scores_topic=scores_topic, probe_scores_group_id=f"p-{uuid.uuid4().hex[:8]}",
                            request_timeout_s=5, batch_max_delay_s=0.05, retry_initial_s=0.05, retry_max_s=0.5)

    with Running(cfg()) as svc:
        assert wait_until(lambda: svc.probe_stats.scores == 6 and svc.probe_stats.spans >= 4
                          and sum(svc.stats.requests.values()) == 3)
        assert wait_until(lambda: svc.probe_core.stats.dlq_by_reason)
        metrics = {k: svc.registry.get_sample_value(k, labels) for k, labels in (
            ("tensortrace_bridge_probe_scores_total", {}), ("tensortrace_bridge_probe_spans_total", {}),
            ("tensortrace_bridge_probe_scores_skipped_total", {"reason": "no_trace_id"}))}
        dlq = dict(svc.probe_core.stats.dlq_by_reason)
        assert svc.ready(), svc.not_ready_reason()
    assert metrics["tensortrace_bridge_probe_scores_total"] == 6 and metrics[
        "tensortrace_bridge_probe_scores_skipped_total"] == 1
    assert sum(dlq.values()) == 1, dlq

    table = f"{ch_database}.otel_traces"
    rows = ch_client.query(f"SELECT TraceId, SpanId, ParentSpanId, SpanName, toUnixTimestamp64Nano(Timestamp), "
                           f"Duration, SpanAttributes FROM {table} LIMIT 1 BY SpanId").result_rows
    probes = [r for r in rows if r[3] == PROBE]
    caps = {r[0]: r for r in rows if r[3] == CAPTURE}
    assert len(probes) == 4                                # one per (request, probe, version): the re-publish is the same
    for tid, sid, parent, _, start, duration, attrs in probes:
        req = next(r for r in reqs if r.trace_id.hex() == tid)
        assert parent == caps[tid][1] == span_id(req.trace_id, req.request_id, CAPTURE).hex()
        assert start == req.summary.end_time_unix_nano and duration == 25_000_000
        assert sid == probe_span_id(req.trace_id, req.request_id, attrs["gen_ai.evaluation.name"],
                                    "0123456789abcdef").hex()
    labels = sorted((r[6]["tensortrace.request_id"], r[6]["gen_ai.evaluation.name"],
                     r[6]["gen_ai.evaluation.score.label"], r[6]["tensortrace.probe.complete"]) for r in probes)
    assert labels == [("pr0", "injection", "flagged", "true"), ("pr0", "sentiment", "pass", "true"),
                      ("pr1", "injection", "shadow", "true"), ("pr2", "injection", "flagged", "false")]
    got = otlp_grpc.wait_for(3 * 3 + 4)
    otlp_probes = [s for s in got if s["name"] == PROBE]
    assert {(s["trace_id"], s["span_id"]) for s in otlp_probes} == {(r[0], r[1]) for r in probes}
    assert all(s["attrs"]["gen_ai.evaluation.score.value"] in (0.91, 0.2, 0.3, 0.6) for s in otlp_probes)

    # a replay of both topics by new groups: the same span ids, no new span
    time.sleep(0.1)
    with Running(cfg()) as svc:
        assert wait_until(lambda: svc.probe_stats.scores == 6 and sum(svc.stats.requests.values()) == 3)
        assert wait_until(lambda: svc.probe_stats.spans >= 4)
    n_rows, n_spans = ch_client.query(f"SELECT count(), uniqExact(SpanId) FROM {table} WHERE SpanName = '{PROBE}'"
                                      ).result_rows[0]
    assert n_spans == 4 and n_rows >= 8
