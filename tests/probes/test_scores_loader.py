"""Scores into ClickHouse: the probe service (a real `tensortrace probes` process, SIGKILLed mid-stream
and restarted, then a second group replaying everything) -> the scores topic -> the loader's scores
consumer -> `probe_scores` in chDB. Re-published scores carry the same identity, so the table holds
one row per (request, probe version) after FINAL and after a merge; the rows join with the loader's
requests; a message on the scores topic that is not a ProbeScore is dead-lettered and counted."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tensortrace.loader.config import LoaderConfig
from tensortrace.loader.main import LoaderService
from tensortrace.consume.validate import decode_probe_score
from tensortrace.loader.scores import scores_table
from tensortrace.probes import Probe, ProbeMeta, save_probe
from tensortrace.probes.config import ProbesConfig
from tensortrace.probes.service import ProbesService
from tensortrace.service import KafkaConfig
from tensortrace.consume import InvalidRecord
from tensortrace.storage.schema import PROBE_SCORE_COLUMNS
from tensortrace.testing.kafka import committed, end_offsets, produce as produce_raw
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.testing.waiting import wait_until
from tensortrace.v1 import records_pb2 as pb

MODEL = "synthetic/tiny"
HIDDEN = 16


def make_probe(name, layers=(1,), pooling="mean", seed=0):
    rng = np.random.default_rng(seed)
    meta = ProbeMeta(model_id=MODEL, hook="resid_pre", layers=list(layers), width=HIDDEN, pooling=pooling)
    return Probe(meta, {"weight": rng.normal(size=HIDDEN * len(layers)).astype(np.float32),
                        "bias": np.zeros(1, np.float32)}, name=name)


def q(client, sql):
    return client.query(sql).result_rows[0][0]


@pytest.mark.unit
def test_decode_refuses_what_is_not_a_probe_score_with_a_typed_reason():
    for value, reason in ((b"", "envelope"), (b"\xff\xff\xff", "envelope"),
                          (pb.ProbeScore(request_id="r", probe="p").SerializeToString(), "missing_field"),
                          (pb.ProbeScore(request_id="r", probe="p", probe_hash="h", trace_id=b"x" * 3).SerializeToString(),
                           "trace_id")):
        with pytest.raises(InvalidRecord) as e:
            decode_probe_score(value)
        assert e.value.reason.value == reason
    sc = pb.ProbeScore(request_id="r", probe="p", probe_hash="h", trace_id=b"t" * 16, token_scores=[0.5],
                       token_positions=[3])
    assert decode_probe_score(sc.SerializeToString()) == sc


@pytest.mark.integration
def test_score_rows_round_trip_and_a_repeated_identity_collapses(tt_db):
    client, db = tt_db
    now = time.time_ns()    # (rows older than the TTL would be dropped by the engine)
    sc = pb.ProbeScore(model_id=MODEL, request_id="r1", trace_id=b"t" * 16, span_id=b"s" * 8, probe="p", probe_hash="h1",
                       score=0.75, threshold=0.5, flagged=True, complete=False, incomplete_reason="timeout: 3 of 4",
                       hook="resid_pre", layers=[1, 3], pooling="max", tokens_scored=2, token_scores=[0.25, 0.75],
                       token_positions=[4, 5], request_end_time_unix_nano=now - 10**8,
                       scored_time_unix_nano=now, release="timeout")
    no_trace = pb.ProbeScore(model_id=MODEL, request_id="r2", probe="p", probe_hash="h1", score=float("nan"),
                             scored_time_unix_nano=now + 1)
    for offset in (0, 10):     # the same scores twice (a re-read)
        client.insert_arrow(f"{db}.probe_scores", scores_table([(sc, 0, offset), (no_trace, 0, offset + 1)], now))
    assert q(client, f"SELECT count() FROM {db}.probe_scores") == 4
    assert q(client, f"SELECT count() FROM {db}.probe_scores FINAL") == 2
    row = client.query(f"SELECT {', '.join(PROBE_SCORE_COLUMNS)} FROM {db}.probe_scores FINAL WHERE request_id = 'r1'"
                       ).result_rows[0]
    got = dict(zip(PROBE_SCORE_COLUMNS, row))
    assert got["trace_id"] == b"t" * 16 and got["flagged"] is True and got["complete"] is False
    assert got["layers"] == [1, 3] and got["token_positions"] == [4, 5] and got["token_scores"] == [0.25, 0.75]
    assert got["incomplete_reason"] == "timeout: 3 of 4" and got["release"] == "timeout" and got["pooling"] == "max"


class Running:
    def __init__(self, svc):
        self.svc = svc
        self.thread = threading.Thread(target=svc.run, daemon=True)
        self.thread.start()

    def stop(self):
        self.svc.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def start_probes_process(tmp_path, name, bootstrap, topic, scores, pdir, group):
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tensortrace.cli", "probes", "--kafka-bootstrap-servers", bootstrap,
                             "--topic", topic, "--dlq-topic", topic + ".dlq", "--group-id", group, "--probe-dir", str(pdir),
                             "--scores-topic", scores, "--escalation-topic", "", "--batch-max-delay-s", "0.05",
                             "--http-port", "-1", "--session-timeout-ms", "6000"],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_restarted_and_replayed_probe_service_leaves_one_score_row_per_request_and_probe(
        kafka_broker, fresh_topic, ch_dsn, ch_database, tmp_path):
    bs = kafka_broker.bootstrap
    topic = fresh_topic(partitions=2, dlq=True)
    scores = fresh_topic(dlq=True)
    pdir = tmp_path / "probes"
    probes = [make_probe("mean1"), make_probe("max2", layers=(2,), pooling="max", seed=1)]
    for p in probes:
        save_probe(p, pdir)
    reqs = [SyntheticRequest.make(f"r{i}", layers=3, hidden=HIDDEN, prompt=6, generated=5) for i in range(60)]
    n_scores = len(reqs) * len(probes)
    group = f"g-probes-{topic}"
    procs = []
    try:
        # first process: killed with SIGKILL once it has published some scores (and may not have committed)
        first = start_probes_process(tmp_path, "first", bs, topic, scores, pdir, group)
        procs.append(first)
        msgs = [m for r in reqs for m in r.messages(per_message=4)]
        produce(bs, topic, msgs[: len(msgs) // 2])
        assert wait_until(lambda: end_offsets(bs, scores)[0] > 0 or first.poll() is not None, timeout_s=120)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        produce(bs, topic, msgs[len(msgs) // 2:])
        # second process, same group: scores what the first did not commit (some of it again)
        second = start_probes_process(tmp_path, "second", bs, topic, scores, pdir, group)
        procs.append(second)
        assert wait_until(lambda: committed(bs, group, topic, 2) == end_offsets(bs, topic, 2), timeout_s=180), \
            (tmp_path / "second.log").read_text()[-3000:]
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    # a replay in another group re-publishes every score (same identities)
    replay = Running(ProbesService(ProbesConfig(kafka=KafkaConfig(bootstrap_servers=bs), topic=topic,
                                                dlq_topic=topic + ".dlq", group_id=f"g-replay-{topic}",
                                                probe_dir=str(pdir), scores_topic=scores, escalation_topic="",
                                                batch_max_delay_s=0.05)))
    try:
        assert wait_until(lambda: replay.svc.stats.scores == n_scores, timeout_s=120)
    finally:
        replay.stop()
    published = end_offsets(bs, scores)[0]
    assert published >= 2 * n_scores
    produce_raw(bs, scores, [b"\x08\xff not a probe score"])     # bad input on the scores topic

    # the loader, with its scores consumer, loads activations, requests and scores
    cfg = LoaderConfig(kafka=KafkaConfig(bootstrap_servers=bs), topic=topic, dlq_topic=topic + ".dlq",
                       group_id=f"g-loader-{topic}", clickhouse_dsn=ch_dsn, database=ch_database, scores_topic=scores,
                       scores_group_id=f"g-loader-scores-{topic}", batch_max_delay_s=0.1)
    loader = LoaderService(cfg)
    run = Running(loader)
    try:
        assert wait_until(lambda: loader.scores_stats is not None and loader.scores_core.stats.messages == published + 1,
                          timeout_s=120)
        assert wait_until(lambda: committed(bs, cfg.scores_group_id, scores) == end_offsets(bs, scores), timeout_s=60)
        assert wait_until(lambda: committed(bs, cfg.group_id, topic, 2) == end_offsets(bs, topic, 2), timeout_s=120)
        assert loader.scores_core.stats.dlq_by_reason == {"envelope": 1}
        client = loader.loader.client
        db = ch_database
        # every published score was inserted (loader_rows_total, below); background merges may already
        # have collapsed some repeats, so the raw count lies between the two
        assert n_scores <= q(client, f"SELECT count() FROM {db}.probe_scores") <= published
        assert loader.scores_stats.rows == published
        assert q(client, f"SELECT count() FROM {db}.probe_scores FINAL") == n_scores
        assert q(client, f"SELECT uniqExact(trace_id, request_id, probe, probe_hash) FROM {db}.probe_scores") == n_scores
        assert q(client, f"SELECT countIf(complete) FROM {db}.probe_scores FINAL") == n_scores
        # scores join with the requests the loader stored (same trace id and request id)
        assert q(client, f"SELECT count() FROM {db}.probe_scores AS s FINAL INNER JOIN (SELECT DISTINCT trace_id, "
                         f"request_id FROM {db}.requests) AS r ON s.trace_id = r.trace_id AND "
                         f"s.request_id = r.request_id") == n_scores
        client.command(f"OPTIMIZE TABLE {db}.probe_scores FINAL")
        assert q(client, f"SELECT count() FROM {db}.probe_scores") == n_scores
        text = __import__("prometheus_client").generate_latest(loader.registry).decode()
        assert f'tensortrace_loader_rows_total{{table="probe_scores"}} {float(published)}' in text
        assert 'tensortrace_loader_scores_dead_letters_total{reason="envelope"} 1.0' in text
    finally:
        run.stop()
