"""The loader against a real Kafka broker and the real chDB engine (in-process loaders here; the
kill -9 test runs loaders as subprocesses)."""

import threading

import pytest
from kafka import KafkaConsumer

from tensortrace.consume.deadletter import DLQ_REASON_HEADER, DLQ_SOURCE_HEADER
from tensortrace.loader.config import KafkaConfig, LoaderConfig
from tensortrace.loader.service import Loader
from tensortrace.storage import ThreadSafeClient
from tensortrace.testing.kafka import committed, create_topics, end_offsets
from tensortrace.testing.synthetic import SyntheticRequest, assert_read_back_bit_exact, produce
from tensortrace.testing.waiting import wait_until
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

pytestmark = pytest.mark.integration


def loader_config(bootstrap, topic, db, **kw):
    return LoaderConfig(kafka=KafkaConfig(bootstrap_servers=bootstrap), topic=topic, dlq_topic=topic + ".dlq", group_id=f"g-{topic}",
                        clickhouse_dsn="chdb://memory", database=db, batch_max_delay_s=0.1, **kw)


class RunningLoader:
    def __init__(self, loader):
        self.loader = loader
        self.thread = threading.Thread(target=loader.run, daemon=True)
        self.thread.start()

    def stop(self):
        self.loader.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "loader did not stop"


@pytest.fixture
def loaders():
    running = []

    def start(loader):
        r = RunningLoader(loader)
        running.append(r)
        return r
    yield start
    for r in running:
        if r.thread.is_alive():
            r.stop()


def distinct_records(client, db):
    return client.query(f"SELECT uniqExact(producer_pod, producer_pid, producer_generation, seq) FROM {db}.activations").result_rows[0][0]



def assert_each_record_once(client, db, n_records, n_summaries):
    assert distinct_records(client, db) == n_records
    assert client.query(f"SELECT count() FROM {db}.activations FINAL").result_rows[0][0] == n_records
    assert client.query(f"SELECT count() FROM {db}.requests FINAL").result_rows[0][0] == n_summaries
    client.command(f"OPTIMIZE TABLE {db}.activations FINAL")
    client.command(f"OPTIMIZE TABLE {db}.requests FINAL")
    assert client.query(f"SELECT count() FROM {db}.activations").result_rows[0][0] == n_records
    assert client.query(f"SELECT count() FROM {db}.requests").result_rows[0][0] == n_summaries


def test_loader_loads_chunked_and_plain_records_bit_exact_and_commits(kafka_broker, tt_db, loaders):
    client, db = tt_db
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 3, prefix="tt-loader", dlq=True)
    reqs = [SyntheticRequest.make(f"req-{i}", layers=3, hidden=64, prompt=16, generated=4,
                                  encoding=pb.SHUFFLE_ZSTD if i % 2 else pb.RAW,
                                  producer=pb.Producer(pod="pod-a", pid=100 + i, generation=1)) for i in range(6)]
    for r in reqs:
        produce(bs, topic, r.messages(max_payload=700))  # prefill records (2 KiB) arrive in chunks
    cfg = loader_config(bs, topic, db)
    run = loaders(Loader(cfg, client=ThreadSafeClient(client)))
    n = sum(len(r.records) for r in reqs)
    assert wait_until(lambda: distinct_records(client, db) == n)
    ends = end_offsets(bs, topic, 3)
    assert wait_until(lambda: committed(bs, cfg.group_id, topic, 3) == ends)
    # what the chart's alerts read: lag 0 once all is committed; one freshness sample per row inserted
    assert wait_until(lambda: run.loader.core.lag and run.loader.core.lag_total() == 0)
    text = scrape(run.loader)
    assert f'tensortrace_loader_freshness_seconds_count {float(run.loader.stats.tensor_rows)}' in text
    assert 'tensortrace_loader_consumer_lag_messages{partition="0"} 0.0' in text
    run.stop()
    assert run.loader.stats.dlq_messages == 0
    assert_read_back_bit_exact(client, db, reqs)
    assert_each_record_once(client, db, n, len(reqs))


def scrape(loader) -> str:
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from tensortrace.loader.metrics import LoaderMetrics
    return generate_latest(LoaderMetrics(SimpleNamespace(stats=loader.stats, loader=loader)).registry).decode()


def test_undecodable_messages_go_to_the_dlq_with_a_reason_and_nothing_else_is_lost(kafka_broker, tt_db, loaders):
    client, db = tt_db
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 1, prefix="tt-loader", dlq=True)
    good = [SyntheticRequest.make(f"good-{i}", layers=2, hidden=32) for i in range(3)]
    bad_record = SyntheticRequest.make("bad-rec", layers=1, hidden=8, final_hook=None).records[0]
    bad_record.raw_size += 2  # does not match shape x dtype
    ok_neighbour = SyntheticRequest.make("neighbour", layers=1, hidden=8, final_hook=None)
    produce(bs, topic, good[0].messages())
    produce(bs, topic, [(b"junk", b"\x00\x01 this is not protobuf \xff\xff"),
                        (b"v9", pb.Envelope(version=9).SerializeToString()),
                        (b"mixed", codec.encode_envelope([bad_record] + ok_neighbour.records + [ok_neighbour.summary]))])
    produce(bs, topic, good[1].messages() + good[2].messages())
    run = loaders(Loader(loader_config(bs, topic, db), client=ThreadSafeClient(client)))
    n = sum(len(r.records) for r in good) + len(ok_neighbour.records)
    assert wait_until(lambda: distinct_records(client, db) == n and run.loader.stats.dlq_messages == 3)
    run.stop()
    assert_read_back_bit_exact(client, db, good + [ok_neighbour])
    c = KafkaConsumer(topic + ".dlq", bootstrap_servers=bs, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    dead = list(c)
    c.close()
    assert len(dead) == 3
    reasons = [dict(m.headers)[DLQ_REASON_HEADER].decode() for m in dead]
    assert "not a v1 envelope" in reasons[0]
    assert "version 9" in reasons[1]
    assert "raw_size" in reasons[2]
    assert all(dict(m.headers)[DLQ_SOURCE_HEADER].decode().startswith(f"{topic}/0/") for m in dead)
    # the dead letter of the mixed message holds only the bad record
    [rec] = codec.decode_envelope(dead[2].value)
    assert rec.tensor.request_id == "bad-rec"
    assert run.loader.stats.dlq_by_reason == {"envelope": 2, "raw_size": 1}


def test_chunks_that_never_complete_go_to_the_dlq_and_offsets_move_on(kafka_broker, tt_db, loaders):
    client, db = tt_db
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 1, prefix="tt-loader", dlq=True)
    orphan = SyntheticRequest.make("orphan", layers=1, hidden=512, prompt=8, generated=1, final_hook=None)
    chunks = codec.chunk_record(orphan.records[0], max_payload=2048)
    assert len(chunks) == 4
    good = SyntheticRequest.make("after", layers=2, hidden=32)
    produce(bs, topic, [(b"orphan", codec.encode_envelope(chunks[:2]))] + good.messages())
    cfg = loader_config(bs, topic, db, chunk_timeout_s=1.0)
    run = loaders(Loader(cfg, client=ThreadSafeClient(client)))
    assert wait_until(lambda: run.loader.stats.dlq_messages == 1 and distinct_records(client, db) == len(good.records))
    ends = end_offsets(bs, topic, 1)
    assert wait_until(lambda: committed(bs, cfg.group_id, topic, 1) == ends)
    run.stop()
    assert run.loader.stats.dlq_by_reason == {"chunks": 1}
    c = KafkaConsumer(topic + ".dlq", bootstrap_servers=bs, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    [dead] = list(c)
    c.close()
    assert "chunks incomplete" in dict(dead.headers)[DLQ_REASON_HEADER].decode()
    assert [r.tensor.chunk_index for r in codec.decode_envelope(dead.value)] == [0, 1]
    assert_read_back_bit_exact(client, db, [good])


class FaultInjectingClient:
    """FAULT INJECTOR (not a fake engine): forwards every call to the real chDB client, except that
    insert_arrow raises ConnectionError while `down` is set, as a ClickHouse server outage would."""

    def __init__(self, client):
        self.client = client
        self.down = threading.Event()
        self.refused = 0

    def insert_arrow(self, *args, **kwargs):
        if self.down.is_set():
            self.refused += 1
            raise ConnectionError("fault injector: ClickHouse unreachable")
        return self.client.insert_arrow(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_clickhouse_outage_backs_off_commits_nothing_and_catches_up(kafka_broker, tt_db, loaders):
    client, db = tt_db
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 2, prefix="tt-loader", dlq=True)
    faulty = FaultInjectingClient(client)
    cfg = loader_config(bs, topic, db, retry_initial_s=0.05, retry_max_s=0.2)
    loader = Loader(cfg, client=ThreadSafeClient(faulty))
    faulty.down.set()
    run = loaders(loader)
    reqs = [SyntheticRequest.make(f"outage-{i}", layers=2, hidden=64) for i in range(4)]
    for r in reqs:
        produce(bs, topic, r.messages(max_payload=100))
    assert wait_until(lambda: faulty.refused >= 5)
    assert distinct_records(client, db) == 0
    assert committed(bs, cfg.group_id, topic, 2) == {0: 0, 1: 0}
    faulty.down.clear()
    n = sum(len(r.records) for r in reqs)
    assert wait_until(lambda: distinct_records(client, db) == n)
    ends = end_offsets(bs, topic, 2)
    assert wait_until(lambda: committed(bs, cfg.group_id, topic, 2) == ends)
    run.stop()
    assert loader.stats.insert_failures >= 5
    assert_read_back_bit_exact(client, db, reqs)
    assert_each_record_once(client, db, n, len(reqs))


def test_two_loaders_in_one_group_rebalance_and_leave_each_record_once(kafka_broker, tt_db, loaders):
    client, db = tt_db
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 4, prefix="tt-loader", dlq=True)
    shared = ThreadSafeClient(client)
    cfg = loader_config(bs, topic, db)
    first_half = [SyntheticRequest.make(f"rb-{i}", layers=2, hidden=64, seed=i) for i in range(8)]
    second_half = [SyntheticRequest.make(f"rb-{i}", layers=2, hidden=64, seed=i) for i in range(8, 16)]
    a = loaders(Loader(cfg, client=shared))
    for r in first_half:
        produce(bs, topic, r.messages(max_payload=300))
    b = loaders(Loader(cfg, client=shared))  # joins: the group rebalances while records flow
    assert wait_until(lambda: a.loader.assigned and b.loader.assigned)
    for r in second_half:
        produce(bs, topic, r.messages(max_payload=300))
    n = sum(len(r.records) for r in first_half + second_half)
    assert wait_until(lambda: distinct_records(client, db) == n)
    assert wait_until(lambda: a.loader.assigned and b.loader.assigned)
    ends = end_offsets(bs, topic, 4)
    assert wait_until(lambda: committed(bs, cfg.group_id, topic, 4) == ends)
    a.stop()
    b.stop()
    assert a.loader.stats.tensor_rows > 0 and b.loader.stats.tensor_rows > 0
    assert_read_back_bit_exact(client, db, first_half + second_half)
    assert_each_record_once(client, db, n, 16)
