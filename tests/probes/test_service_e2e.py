"""`tensortrace probes` against a real Kafka broker: synthetic requests as the exporter publishes them
-> the activation topic -> the probe service -> the scores topic. Every request gets a score per
probe, equal to the same probe run offline on the same tensors; incomplete requests are scored
incomplete; an undecodable message is dead-lettered and nothing else is disturbed; offsets are
committed only behind acknowledged scores; probe files change under a running service."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import pytest
from kafka import KafkaConsumer

from tensortrace.consume.deadletter import DLQ_REASON_CODE_HEADER
from tensortrace.probes import Probe, ProbeMeta, save_probe
from tensortrace.probes.config import ProbesConfig
from tensortrace.probes.service import ProbesService
from tensortrace.service import HttpEndpoint, KafkaConfig
from tensortrace.testing.kafka import committed, consume_all, end_offsets
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.testing.waiting import wait_until
from tensortrace.v1 import records_pb2 as pb

pytestmark = pytest.mark.integration

MODEL = "synthetic/tiny"
HIDDEN = 16


def make_probe(name, layers=(1,), pooling="mean", positions="all", seed=0, bias=0.0):
    rng = np.random.default_rng(seed)
    meta = ProbeMeta(model_id=MODEL, hook="resid_pre", layers=list(layers), width=HIDDEN, pooling=pooling,
                     positions=positions, threshold=0.5)
    return Probe(meta, {"weight": rng.normal(size=HIDDEN * len(layers)).astype(np.float32),
                        "bias": np.array([bias], np.float32)}, name=name)


def offline(probe, req):
    n = req.summary.prompt_tokens
    inputs = []
    for layer in probe.meta.layers:
        t = req.truth["resid_pre", layer].float().numpy()
        pos = np.arange(t.shape[0])
        inputs += [(layer, pos[:n], t[:n], "prefill"), (layer, pos[n:], t[n:], "decode")]
    return probe.score(inputs, prompt_tokens=n)


class Running:
    def __init__(self, svc):
        self.svc = svc
        self.thread = threading.Thread(target=svc.run, daemon=True)
        self.thread.start()

    def stop(self):
        self.svc.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "probe service did not stop"


@pytest.fixture
def services():
    running = []

    def start(cfg):
        r = Running(ProbesService(cfg))
        running.append(r)
        return r
    yield start
    for r in running:
        if r.thread.is_alive():
            r.stop()


def config(bootstrap, topic, scores, escalations, probe_dir, **kw):
    return ProbesConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq",
                        group_id=f"g-{topic}", probe_dir=str(probe_dir), scores_topic=scores,
                        escalation_topic=escalations, batch_max_delay_s=0.05, reload_interval_s=0.2, **kw)


def read_scores(bootstrap, topic, expected, timeout_s=120.0):
    out = []
    for msgs in consume_all(bootstrap, topic, expected, timeout_s=timeout_s).values():
        for key, value in msgs:
            sc = pb.ProbeScore()
            sc.ParseFromString(value)
            assert key == sc.request_id.encode()
            out.append(sc)
    return out


def test_every_request_is_scored_like_the_offline_probe_and_incomplete_and_bad_input_are_explicit(
        kafka_broker, fresh_topic, services, tmp_path):
    bs = kafka_broker.bootstrap
    topic = fresh_topic(partitions=2, dlq=True)
    scores, escalations = fresh_topic(), fresh_topic()
    probes = [make_probe("mean1", layers=(1,)), make_probe("last2", layers=(2,), pooling="last", seed=1),
              make_probe("loud", layers=(0,), bias=40.0, seed=2)]
    for p in probes:
        save_probe(p, tmp_path / "probes")
    reqs = [SyntheticRequest.make(f"r{i}", layers=3, hidden=HIDDEN, prompt=4 + i % 5, generated=3 + i % 4)
            for i in range(16)]
    # one request loses a record on the way (never arrives), one reports drops in its summary
    lossy = SyntheticRequest.make("lossy", layers=3, hidden=HIDDEN, prompt=5, generated=4)
    dropped = SyntheticRequest.make("dropped", layers=3, hidden=HIDDEN, prompt=5, generated=4)
    dropped.summary.records_dropped, dropped.summary.complete = 3, False
    dropped.summary.incomplete_reason = "ring full: 3 records dropped"
    msgs = []
    for r in reqs + [dropped]:
        msgs += r.messages(per_message=4)
    lost = next(i for i, rec in enumerate(lossy.records) if rec.layer == 1 and rec.phase == pb.DECODE)
    lossy.records = [rec for i, rec in enumerate(lossy.records) if i != lost]
    msgs += lossy.messages(per_message=4)
    msgs.insert(7, (b"junk", b"\x00not an envelope\xff"))
    produce(bs, topic, msgs)

    cfg = config(bs, topic, scores, escalations, tmp_path / "probes", request_timeout_s=3.0)
    run = services(cfg)
    svc = run.svc
    n_expected = (len(reqs) + 2) * len(probes)
    got = read_scores(bs, scores, n_expected)
    assert len(got) == n_expected, (len(got), n_expected)   # consume_all read past: no extra score either
    by = {(s.request_id, s.probe): s for s in got}
    assert len(by) == n_expected
    for req in reqs:
        for p in probes:
            sc = by[req.request_id, p.name]
            # equal to the offline probe on the same tensors; tolerance 0 (same SDK code path, exact widening)
            assert sc.score == offline(p, req).score and sc.complete and sc.release == "complete", (req.request_id, p.name)
            assert sc.trace_id == req.trace_id and sc.probe_hash == p.hash
    for p in probes:
        sc = by["lossy", p.name]
        assert not sc.complete and sc.release == "timeout" and "of" in sc.incomplete_reason
        sc = by["dropped", p.name]
        assert not sc.complete and sc.incomplete_reason
    # flagged scores (the loud probe flags every request) are on the escalation topic too, and only they
    flagged = sorted((s.request_id, s.probe) for s in got if s.flagged)
    assert {r for r, p in flagged if p == "loud"} == {r.request_id for r in reqs + [lossy, dropped]}
    esc = read_scores(bs, escalations, len(flagged))
    assert sorted((s.request_id, s.probe) for s in esc) == flagged

    # the undecodable message: dead-lettered with its reason, counted, nobody crashed
    assert wait_until(lambda: svc.core.stats.dlq_by_reason == {"envelope": 1}, timeout_s=30)
    dlq = KafkaConsumer(topic + ".dlq", bootstrap_servers=bs, auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    try:
        [m] = [m for m in dlq][:1]
        assert m.value == b"\x00not an envelope\xff"
        assert dict(m.headers)[DLQ_REASON_CODE_HEADER] == b"envelope"
    finally:
        dlq.close()
    assert svc.live() and svc.stats.errors == {}
    # every offset is committed once the scores are acknowledged
    assert wait_until(lambda: committed(bs, cfg.group_id, topic, 2) == end_offsets(bs, topic, 2), timeout_s=30)

    # metrics on the service's own registry, over its HTTP endpoint
    ep = HttpEndpoint(svc, "127.0.0.1", 0).start()
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{ep.port}/metrics", timeout=10).read().decode()
    finally:
        ep.stop()
    assert 'tensortrace_probes_alerts_total{probe="loud"} 18.0' in text
    assert f"tensortrace_probes_escalations_total {float(len(flagged))}" in text
    assert 'tensortrace_probes_scores_total{complete="false",probe="mean1"} 2.0' in text
    assert 'tensortrace_probes_incomplete_scores_total{probe="mean1",release="timeout"} 1.0' in text
    assert 'tensortrace_probes_dead_letters_total{reason="envelope"} 1.0' in text
    assert "tensortrace_probes_loaded 3.0" in text and 'tensortrace_probes_score_bucket{le="0.5",probe="mean1"}' in text
    assert "tensortrace_probes_freshness_seconds_count 54.0" in text
    assert 'tensortrace_probes_consumer_lag_messages{partition="0"} 0.0' in text


def test_a_running_service_picks_up_new_changed_and_broken_probe_files(kafka_broker, fresh_topic, services, tmp_path):
    bs = kafka_broker.bootstrap
    topic = fresh_topic(dlq=True)
    scores = fresh_topic()
    pdir = tmp_path / "probes"
    save_probe(make_probe("a"), pdir)
    run = services(config(bs, topic, scores, "", pdir))
    svc = run.svc
    produce(bs, topic, SyntheticRequest.make("first", layers=3, hidden=HIDDEN).messages())
    assert [s.probe for s in read_scores(bs, scores, 1)] == ["a"]

    save_probe(make_probe("b", layers=(2,), seed=4), pdir)
    (pdir / "broken.json").write_text('{"format": "tensortrace.probe", "format_version": 1, "class": "x.Y"}')
    assert wait_until(lambda: {p.name for p in svc.probes.current.probes} == {"a", "b"}
                      and str(pdir / "broken.json") in svc.probes.current.refused, timeout_s=30)
    produce(bs, topic, SyntheticRequest.make("second", layers=3, hidden=HIDDEN).messages())
    got = read_scores(bs, scores, 3)
    assert sorted((s.request_id, s.probe) for s in got) == [("first", "a"), ("second", "a"), ("second", "b")]
    assert all(s.complete for s in got)
