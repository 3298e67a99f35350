"""10,000 requests through the bridge on real parts (a real Kafka broker, the bridge service
in-process with step spans, chDB): exactly one capture span per request, every forward step's links
complete, no attribute or link limit exceeded, and a replay of the topic from offset 0 by a new
consumer group adds no span (the same deterministic ids; readers collapse by SpanId).

Traffic: 40 batches of 250 requests, one producer (one TP rank). Each batch is three forward steps
(a prefill of 4 tokens, two decode steps) shared by its 250 requests: 250 links per step span, about
twice the SDK's default link limit (128). A request is one Kafka message: its 3 records (one hook,
one layer, tiny payloads: the bridge never reads them) and its summary.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tensortrace.bridge.config import BridgeConfig
from tensortrace.bridge.service import BridgeService
from tensortrace.bridge.spans import CAPTURE, STEP, span_id, step_ids
from tensortrace.service.kafka import KafkaConfig
from tensortrace.testing.kafka import create_topics
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUESTS, BATCH, STEPS_PER_BATCH = 10_000, 250, 3
ATTRIBUTE_LIMIT = 128      # the SDK's default attribute count limit (OTEL_ATTRIBUTE_COUNT_LIMIT)
STEP_IDS_MAX = 32


def traffic() -> tuple[list[tuple[bytes, bytes]], dict[str, tuple[bytes, int]]]:
    """Kafka messages of REQUESTS requests, and request id -> (trace id, batch)."""
    template = SyntheticRequest.make("template", layers=1, hidden=2, prompt=4, generated=3, final_hook=None)
    pre, dec = template.records[0], template.records[1]
    base = time.time_ns() - 10_000_000_000
    out, truth = [], {}
    for i in range(REQUESTS):
        rid = f"req-{i:05d}"
        b = i // BATCH
        tid = uuid.uuid4().bytes
        sid = uuid.uuid4().bytes[:8]
        recs = []
        for k, tmpl in enumerate((pre, dec, dec)):
            r = pb.TensorRecord()
            r.CopyFrom(tmpl)
            step = b * STEPS_PER_BATCH + k
            r.request_id, r.trace_id, r.span_id, r.step, r.seq = rid, tid, sid, step, i * 10 + k
            r.capture_time_unix_nano = base + step * 1_000_000 + (i % BATCH)
            r.export_time_unix_nano = r.capture_time_unix_nano + 500_000
            if k == 2:
                r.token_start, r.token_end = 5, 6
            recs.append(r)
        s = pb.RequestSummary()
        s.CopyFrom(template.summary)
        s.request_id, s.trace_id, s.span_id, s.seq = rid, tid, sid, i * 10 + 3
        s.records_captured, s.bytes_captured = 3, sum(r.raw_size for r in recs)
        s.start_time_unix_nano = recs[0].capture_time_unix_nano - 100
        s.end_time_unix_nano = s.export_time_unix_nano = recs[-1].export_time_unix_nano
        out.append((rid.encode(), codec.encode_envelope([*recs, s])))
        truth[rid] = (tid, b)
    return out, truth


def run_until(cfg: BridgeConfig, want_requests: int, want_steps: int, timeout_s: float = 120.0) -> float:
    svc = BridgeService(cfg)
    import threading

    t = threading.Thread(target=svc.run, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if sum(svc.stats.requests.values()) >= want_requests and svc.stats.steps >= want_steps:
                break
            time.sleep(0.1)
        took = time.monotonic() - t0
        assert sum(svc.stats.requests.values()) == want_requests, svc.stats
        assert svc.stats.steps == want_steps and svc.stats.step_late_records == 0, svc.stats
        assert svc.stats.requests == {"complete": want_requests}, svc.stats.requests
        assert svc.stats.steps_emitted_early == 0
    finally:
        svc.stop()
        t.join(timeout=60)
    assert not t.is_alive()
    return took


def test_ten_thousand_requests_one_capture_span_each_complete_step_links_and_a_replay_adds_no_span(
        kafka_broker, ch_dsn, ch_database, ch_client):
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 4, prefix="tt-bridge-scale", dlq=True)
    messages, truth = traffic()
    t0 = time.monotonic()
    produce(bs, topic, messages)
    produced_s = time.monotonic() - t0
    steps = REQUESTS // BATCH * STEPS_PER_BATCH
    db = ch_database

    def cfg(group: str) -> BridgeConfig:
        return BridgeConfig(kafka=KafkaConfig(bootstrap_servers=bs), topic=topic, dlq_topic=topic + ".dlq",
                            group_id=group, clickhouse_dsn=ch_dsn, traces_database=db, otlp_receiver_port=-1,
                            spans_consumer=False, probe_scores_consumer=False, step_spans=True, step_linger_s=0.5, request_timeout_s=30,
                            step_ids_max=STEP_IDS_MAX, batch_max_delay_s=0.1, retry_initial_s=0.05, retry_max_s=0.5)

    first_s = run_until(cfg(f"scale-{uuid.uuid4().hex[:8]}"), REQUESTS, steps)
    q = lambda sql: ch_client.query(sql).result_rows   # noqa: E731
    table = f"{db}.otel_traces"
    once = q(f"SELECT SpanName, count(), uniqExact(SpanId) FROM {table} GROUP BY SpanName ORDER BY SpanName")
    assert once == [(CAPTURE, REQUESTS, REQUESTS), ("tensortrace.export", REQUESTS, REQUESTS),
                    ("tensortrace.kafka", REQUESTS, REQUESTS), (STEP, steps, steps)], once

    # exactly one capture span per request, under its own trace, with the derived id
    caps = q(f"SELECT SpanAttributes['tensortrace.request_id'], TraceId, SpanId, SpanAttributes FROM {table} "
             f"WHERE SpanName = '{CAPTURE}'")
    assert len({r[0] for r in caps}) == REQUESTS
    producer = (pb.Producer(node="node-a", pod="pod-a", pid=4242, tp_rank=0, generation=1))
    for rid, tid, sid, attrs in caps:
        trace, b = truth[rid]
        assert tid == trace.hex() and sid == span_id(trace, rid, CAPTURE).hex()
        assert attrs["tensortrace.complete"] == "true" and attrs["tensortrace.steps"] == "3"
        # the request's step spans, named on its capture span (bounded: 3 <= STEP_IDS_MAX, none omitted)
        want = [step_ids(producer.pod, producer.pid, producer.generation, b * STEPS_PER_BATCH + k)
                for k in range(STEPS_PER_BATCH)]
        assert attrs["tensortrace.step.span_ids"] == "[" + ",".join(f'"{s.hex()}"' for _, s in want) + "]"
        assert attrs["tensortrace.step.trace_ids"] == "[" + ",".join(f'"{t.hex()}"' for t, _ in want) + "]"
        assert attrs["tensortrace.step.span_ids.omitted"] == "0"

    # every forward step links every request of its batch, none dropped, no link span needed
    by_batch: dict[int, set[tuple[str, str]]] = {}
    for rid, (trace, b) in truth.items():
        by_batch.setdefault(b, set()).add((trace.hex(), span_id(trace, rid, CAPTURE).hex()))
    step_rows = q(f"SELECT TraceId, SpanId, SpanAttributes, Links.TraceId, Links.SpanId FROM {table} "
                  f"WHERE SpanName = '{STEP}'")
    for tid, sid, attrs, link_traces, link_spans in step_rows:
        step = int(attrs["tensortrace.step"])
        assert (tid, sid) == tuple(x.hex() for x in step_ids(producer.pod, producer.pid, producer.generation, step))
        assert len(link_spans) == BATCH == int(attrs["tensortrace.batch.requests"]) == int(attrs["tensortrace.batch.links"])
        assert set(zip(link_traces, link_spans)) == by_batch[step // STEPS_PER_BATCH]
        assert attrs["tensortrace.batch.link_spans"] == "1" and "tensortrace.batch.links_dropped" not in attrs
    # no span has more attributes than the SDK's default limit, and no array grows with the request
    assert q(f"SELECT max(length(SpanAttributes)), max(length(Links.SpanId)) FROM {table}")[0] == (
        max(len(r[3]) for r in caps), BATCH)
    assert max(len(r[3]) for r in caps) <= ATTRIBUTE_LIMIT

    # replay from offset 0 with a new group: every span written again, with the same ids
    replay_s = run_until(cfg(f"scale-replay-{uuid.uuid4().hex[:8]}"), REQUESTS, steps)
    twice = q(f"SELECT SpanName, count(), uniqExact(SpanId) FROM {table} GROUP BY SpanName ORDER BY SpanName")
    assert twice == [(n, 2 * c, u) for n, c, u in once], twice
    # what readers see (collapsed by SpanId, docs/bridge.md): the same spans as after the first run
    collapsed = q(f"SELECT SpanName, count() FROM (SELECT SpanName, SpanId FROM {table} LIMIT 1 BY SpanId) "
                  f"GROUP BY SpanName ORDER BY SpanName")
    assert collapsed == [(n, c) for n, c, _ in once]
    assert q(f"SELECT count() FROM (SELECT SpanId FROM {table} GROUP BY SpanId HAVING uniqExact(TraceId, "
             f"ParentSpanId, SpanName) > 1)")[0][0] == 0   # a span id never names two different spans
    # the step spans' links agree between the two runs
    assert q(f"SELECT count() FROM (SELECT SpanId FROM {table} WHERE SpanName = '{STEP}' GROUP BY SpanId "
             f"HAVING uniqExact(arraySort(Links.SpanId)) > 1)")[0][0] == 0
    print(f"\n{REQUESTS} requests ({len(messages)} messages) produced in {produced_s:.1f}s; bridge: {first_s:.1f}s, "
          f"replay: {replay_s:.1f}s; {steps} step spans of {BATCH} links")
