"""The consumer core against a real Kafka broker: offsets stay behind what a sink holds, a restart
re-reads an unreleased request whole, dead letters carry a typed reason."""

import threading
import time

import pytest
from kafka import KafkaConsumer

from tensortrace.consume import ConsumerConfig, ConsumerCore, RequestView
from tensortrace.consume.deadletter import DLQ_REASON_CODE_HEADER, DLQ_REASON_HEADER
from tensortrace.service.kafka import KafkaConfig
from tensortrace.testing.kafka import committed, create_topics
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.testing.waiting import wait_until
from tensortrace.wire import codec

pytestmark = pytest.mark.integration


class Collect:
    def __init__(self):
        self.requests = []

    def on_request(self, req):
        self.requests.append(req)


class Running:
    def __init__(self, core):
        self.core = core
        self.thread = threading.Thread(target=core.run, daemon=True)
        self.thread.start()

    def stop(self):
        self.core.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def config(bootstrap, topic, **kw):
    return ConsumerConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq",
                          group_id=f"g-{topic}", batch_max_delay_s=0.05, **kw)


def test_commits_stay_behind_an_unreleased_request_and_a_restart_delivers_it_whole(kafka_broker):
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, prefix="tt-core", dlq=True)
    slow = SyntheticRequest.make("slow", layers=2, hidden=16, prompt=6, generated=4)
    quick = SyntheticRequest.make("quick", layers=2, hidden=16)
    produce(bs, topic, slow.messages(with_summary=False, per_message=3))          # offsets 0..k-1
    first_quick = len(slow.messages(with_summary=False, per_message=3))
    produce(bs, topic, quick.messages(per_message=3))
    cfg = config(bs, topic)
    handler = Collect()
    run = Running(ConsumerCore(cfg, RequestView(handler, timeout_s=600), name="test"))
    assert wait_until(lambda: [r.request_id for r in handler.requests] == ["quick"])
    assert handler.requests[0].completeness.complete
    time.sleep(0.5)   # several flush rounds: the commit must still not pass the slow request's first record
    assert committed(bs, cfg.group_id, topic) == {0: 0}
    # The lag counts from the commit, not from what was read: everything held is still owed.
    held = first_quick + len(quick.messages(per_message=3))
    assert wait_until(lambda: run.core.lag == {0: held}) and run.core.lag_total() == held
    run.stop()        # the slow request is still open: it is not delivered, and not committed past

    produce(bs, topic, [(b"slow", codec.encode_envelope([slow.summary]))])
    again = Collect()
    run = Running(ConsumerCore(cfg, RequestView(again, timeout_s=600), name="test"))
    assert wait_until(lambda: {r.request_id for r in again.requests} == {"slow", "quick"})
    assert wait_until(lambda: run.core.lag == {0: 0})   # all committed
    run.stop()
    [got] = [r for r in again.requests if r.request_id == "slow"]
    assert got.completeness.complete and len(got.records) == len(slow.records)
    assert [r.seq for r in got.records] == [r.seq for r in slow.records]
    for rec, want in zip(got.records, slow.records):
        assert rec.payload == want.payload
    total = first_quick + len(quick.messages(per_message=3)) + 1
    assert committed(bs, cfg.group_id, topic) == {0: total}
    assert min(got.sources[0]) == 0


def test_undecodable_messages_and_refused_records_are_dead_lettered_with_a_typed_reason(kafka_broker):
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, prefix="tt-core", dlq=True)
    good = SyntheticRequest.make("good", layers=1, hidden=8)
    bad = SyntheticRequest.make("bad", layers=1, hidden=8)
    bad.records[0].raw_size += 2
    produce(bs, topic, [(b"junk", b"\x00not an envelope")] + bad.messages() + good.messages())
    handler = Collect()
    core = ConsumerCore(config(bs, topic), RequestView(handler, timeout_s=1), name="test")
    run = Running(core)
    assert wait_until(lambda: any(r.request_id == "good" for r in handler.requests) and core.stats.dlq_messages == 2)
    assert wait_until(lambda: any(r.request_id == "bad" for r in handler.requests))   # released at its timeout
    run.stop()
    assert core.stats.dlq_by_reason == {"envelope": 1, "raw_size": 1}
    [b] = [r for r in handler.requests if r.request_id == "bad"]
    assert not b.completeness.complete and len(b.records) == len(bad.records) - 1
    c = KafkaConsumer(topic + ".dlq", bootstrap_servers=bs, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    dead = list(c)
    c.close()
    codes = sorted(dict(m.headers)[DLQ_REASON_CODE_HEADER].decode() for m in dead)
    assert codes == ["envelope", "raw_size"]
    assert all(dict(m.headers)[DLQ_REASON_HEADER] for m in dead)


class GiveUpAtStop:
    """A sink whose store never accepts: flush waits until the service stops, then gives up."""

    def __init__(self):
        self.open = []
        self.flushing = threading.Event()

    def add_tensor(self, rec, source):
        self.open.append(rec)

    def add_summary(self, s, source):
        self.open.append(s)

    def due(self):
        return False

    def seal(self):
        out, self.open = self.open, []
        return out or None

    def flush(self, batch, stopping):
        self.flushing.set()
        stopping.wait()
        return False


def test_a_batch_given_up_at_stop_keeps_every_later_offset_uncommitted(kafka_broker):
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, prefix="tt-core", dlq=True)
    req = SyntheticRequest.make("kept", layers=1, hidden=8)
    produce(bs, topic, req.messages())
    cfg = config(bs, topic)
    sink = GiveUpAtStop()
    core = ConsumerCore(cfg, sink, name="test")
    run = Running(core)
    assert wait_until(sink.flushing.is_set)
    # a later batch that only moves offsets (a dead letter), queued behind the stuck one
    produce(bs, topic, [(b"junk", b"\x00not an envelope")])
    assert wait_until(lambda: core.stats.dlq_messages == 1)
    time.sleep(3 * cfg.batch_max_delay_s)
    run.stop()
    assert committed(bs, cfg.group_id, topic) == {0: 0}   # nothing is durable: a restart re-reads it all


class Lines:
    """A sink of a foreign payload (ConsumerCore(..., decode=...)): keeps what decode returned."""

    def __init__(self):
        self.open, self.flushed = [], []

    def add_message(self, decoded, source):
        if decoded == "refuse":
            from tensortrace.consume import DeadLetterReason, InvalidRecord
            raise InvalidRecord(DeadLetterReason.INVALID_RECORD, "the sink refuses this one")
        self.open.append((decoded, source.offset))

    def due(self):
        return False

    def seal(self):
        out, self.open = self.open, []
        return out or None

    def flush(self, batch, stopping):
        self.flushed.extend(batch.data)
        return True


def test_a_decode_hook_reads_a_foreign_payload_into_add_message_with_the_same_offsets_and_dead_letters(
        kafka_broker):
    from tensortrace.consume import DeadLetterReason, InvalidRecord

    def decode(value: bytes) -> str:
        if not value.startswith(b"line:"):
            raise InvalidRecord(DeadLetterReason.ENVELOPE, f"not a line: {value[:10]!r}")
        return value[5:].decode()

    bs = kafka_broker.bootstrap
    topic = create_topics(bs, prefix="tt-core", dlq=True)
    produce(bs, topic, [(b"k", b"line:a"), (b"k", b"\x00junk"), (b"k", b"line:refuse"), (b"k", b"line:b")])
    cfg = config(bs, topic)
    sink = Lines()
    core = ConsumerCore(cfg, sink, name="lines", decode=decode)
    run = Running(core)
    assert wait_until(lambda: committed(bs, cfg.group_id, topic) == {0: 4})
    run.stop()
    assert sink.flushed == [("a", 0), ("b", 3)]
    assert core.stats.dlq_by_reason == {"envelope": 1, "invalid_record": 1}
    dlq = KafkaConsumer(topic + ".dlq", bootstrap_servers=bs, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    try:
        got = [(m.value, dict(m.headers)[DLQ_REASON_CODE_HEADER]) for m in dlq]
    finally:
        dlq.close()
    assert got == [(b"\x00junk", b"envelope"), (b"line:refuse", b"invalid_record")]


class StallOnce(RequestView):
    """A view whose first add_tensor blocks the consume thread past max_poll_interval_ms."""

    def __init__(self, handler, stall_s: float):
        super().__init__(handler, timeout_s=600)
        self.stall_s = stall_s

    def _stall(self):
        if self.stall_s:
            time.sleep(self.stall_s)
            self.stall_s = 0

    def add_tensor(self, rec, source):
        self._stall()
        super().add_tensor(rec, source)

    def add_scan(self, sc, source):   # the native decoder's entry (tensortrace.wire.native)
        self._stall()
        return super().add_scan(sc, source)


def test_a_membership_lost_while_the_consume_thread_is_busy_is_survived_and_nothing_is_lost(kafka_broker):
    # librdkafka leaves the group when poll() is not called for max_poll_interval_ms and reports
    # the partitions lost at the next poll. The core must drop their state without committing,
    # re-join and re-read: every request is still delivered whole, and offsets end up committed
    # to the end.
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, prefix="tt-core", dlq=True)
    reqs = [SyntheticRequest.make(f"r{i}", layers=2, hidden=16) for i in range(3)]
    n_msgs = 0
    for r in reqs:
        msgs = r.messages(per_message=3)
        produce(bs, topic, msgs)
        n_msgs += len(msgs)
    cfg = config(bs, topic, max_poll_interval_ms=6000, session_timeout_ms=6000)
    handler = Collect()
    core = ConsumerCore(cfg, StallOnce(handler, stall_s=8.0), name="test")
    run = Running(core)
    assert wait_until(lambda: {r.request_id for r in handler.requests} == {"r0", "r1", "r2"}, timeout_s=60)
    assert wait_until(lambda: committed(bs, cfg.group_id, topic) == {0: n_msgs}, timeout_s=30)
    assert run.thread.is_alive() and core.live()
    run.stop()
    assert core.stats.partitions_lost >= 1
    for got in handler.requests:
        assert got.completeness.complete
