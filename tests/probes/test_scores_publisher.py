"""The probe service's score publisher (librdkafka, acks=all) against a real broker and a dead one:
every score is acknowledged and readable; with no broker it reports why, counts the failures, keeps
retrying, and gives up only when the service stops (nothing is committed behind unpublished scores)."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Consumer

from tensortrace.probes.config import ProbesConfig
from tensortrace.probes.service import ScoresPublisher
from tensortrace.probes.sink import ScoresStats
from tensortrace.service.kafka import KafkaConfig
from tensortrace.testing.kafka import create_topics

pytestmark = pytest.mark.integration


def _cfg(bootstrap: str, tmp_path, **kw) -> ProbesConfig:
    return ProbesConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), probe_dir=str(tmp_path), **kw)


def test_every_score_is_acknowledged_and_readable(kafka_broker, tmp_path):
    topic = create_topics(kafka_broker.bootstrap, 2, prefix="tt-scores")
    stats = ScoresStats()
    pub = ScoresPublisher(_cfg(kafka_broker.bootstrap, tmp_path), stats)
    sent = [(topic, f"r{i}".encode(), f"score-{i}".encode() * (1 + i % 7)) for i in range(500)]
    try:
        assert pub(sent, threading.Event())
    finally:
        pub.close()
    assert stats.publish_failures == 0 and pub.error == ""
    c = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": f"g-{topic}", "auto.offset.reset": "earliest"})
    try:
        c.subscribe([topic])
        got, deadline = [], time.monotonic() + 60
        while len(got) < len(sent) and time.monotonic() < deadline:
            got += [(m.topic(), m.key(), m.value()) for m in c.consume(500, 0.5) if m.error() is None]
    finally:
        c.close()
    assert sorted(got) == sorted(sent)


def test_a_dead_broker_is_reported_counted_and_retried_until_the_service_stops(tmp_path):
    stats = ScoresStats()
    # a closed port on loopback: every attempt fails; each wait for acknowledgements is 1 s
    pub = ScoresPublisher(_cfg("127.0.0.1:9", tmp_path, publish_timeout_s=1.0, retry_initial_s=0.1,
                               retry_max_s=0.2), stats)
    stopping = threading.Event()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("ok", pub([("scores", b"r1", b"v")], stopping)))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while stats.publish_failures < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats.publish_failures >= 2, "the publisher did not retry"
        assert "not acknowledged" in pub.error
    finally:
        stopping.set()
        t.join(timeout=30)
        pub.close()
    assert not t.is_alive() and result["ok"] is False
