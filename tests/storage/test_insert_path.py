"""The loader's insert (ThreadSafeClient.insert_arrow_batch, storage/client.py): on embedded chDB the
engine reads the Arrow table in place (INSERT ... SELECT FROM Python(...)). The same rows as
clickhouse-connect's insert_arrow, byte for byte; a retried batch with the same dedup token adds
nothing, also through the sink's retry loop when the engine accepted the batch but the caller never
heard; anything that is not a chDB client takes insert_arrow."""

from __future__ import annotations

import threading
import time

import pytest

from tensortrace.consume.sink import SealedBatch
from tensortrace.loader.config import LoaderConfig
from tensortrace.loader.rows import ColumnBatch
from tensortrace.loader.service import ClickHouseSink, LoaderStats
from tensortrace.storage import ThreadSafeClient, schema
from tensortrace.storage.client import INSERT_PATH_ARROW, INSERT_PATH_CHDB, insert_python
from tensortrace.testing.synthetic import SyntheticRequest, assert_read_back_bit_exact
from tensortrace.wire import codec, native

pytestmark = pytest.mark.integration


def requests():
    return [SyntheticRequest.make(f"ins-{i}", layers=3, hidden=64, prompt=5, generated=4, seed=i) for i in range(3)]


def batch_of(reqs) -> ColumnBatch:
    """The loader's batch: envelopes scanned natively where the decoder is built, records interleaved
    across requests as Kafka would deliver them."""
    b = ColumnBatch()
    recs = [r for rs in zip(*(q.records for q in reqs)) for r in rs]
    for off in range(0, len(recs), 5):
        env = codec.encode_envelope(recs[off:off + 5])
        sc = native.scan(env) if native.enabled() else None
        if sc is not None:
            assert b.add_scan(sc, 0, off) == []
        else:
            for r in codec.decode_envelope(env):
                b.add_tensor(r.tensor, 0, off)
    for q in reqs:
        b.add_summary(q.summary, 0, len(recs))
    return b


def chdb_only(client):
    if ThreadSafeClient(client).insert_path != INSERT_PATH_CHDB:
        pytest.skip("the in-place insert needs the embedded chDB engine (this run uses a ClickHouse server)")


def count(client, db, final=""):
    return client.query(f"SELECT count() FROM {db}.activations {final}").result_rows[0][0]



@pytest.fixture
def second_db(ch_client, ch_database):
    name = f"{ch_database}_b"
    schema.apply_migrations(ch_client, name)
    yield name
    ch_client.command(f"DROP DATABASE IF EXISTS {name} SYNC")


def test_the_in_place_insert_stores_the_same_bytes_as_insert_arrow(tt_db, second_db):
    client, db = tt_db
    chdb_only(client)
    reqs = requests()
    b = batch_of(reqs)
    now = time.time_ns()
    shared = ThreadSafeClient(client)
    assert shared.insert_arrow_batch(f"{db}.activations", b.activations_table(now),
                                     {"insert_deduplication_token": "a:t/0/0-9", "optimize_on_insert": 0}) == INSERT_PATH_CHDB
    assert shared.insert_arrow_batch(f"{db}.requests", b.requests_table(now)) == INSERT_PATH_CHDB
    client.insert_arrow(f"{second_db}.activations", b.activations_table(now), settings={"insert_deduplication_token": "a:t/0/0-9"})
    client.insert_arrow(f"{second_db}.requests", b.requests_table(now))
    for table in ("activations", "requests"):
        q = f"SELECT * FROM {{}}.{table} ORDER BY producer_pod, producer_pid, producer_generation, seq FORMAT RowBinary"
        mine, theirs = client.raw_query(q.format(db)), client.raw_query(q.format(second_db))
        assert len(mine) > (10_000 if table == "activations" else 100) and mine == theirs, table
    assert count(client, db) == b.tensor_rows
    assert_read_back_bit_exact(client, db, reqs)


def test_a_retried_in_place_insert_with_the_same_token_adds_no_rows(tt_db):
    client, db = tt_db
    chdb_only(client)
    b = batch_of(requests())
    table, shared = b.activations_table(time.time_ns()), ThreadSafeClient(client)
    for _ in range(2):
        shared.insert_arrow_batch(f"{db}.activations", table, {"insert_deduplication_token": "a:t/0/0-9", "optimize_on_insert": 0})
    assert count(client, db) == b.tensor_rows
    shared.insert_arrow_batch(f"{db}.activations", table, {"insert_deduplication_token": "a:t/0/10-19", "optimize_on_insert": 0})
    assert count(client, db) == 2 * b.tensor_rows
    assert count(client, db, "FINAL") == b.tensor_rows


class LostAck(ThreadSafeClient):
    """FAULT INJECTOR (not a fake engine): the first `lose` inserts reach the real engine and are
    stored, then raise, as a connection dropped after the engine accepted the batch would."""

    def __init__(self, client, lose: int):
        super().__init__(client)
        self.lose = lose

    def insert_arrow_batch(self, table, arrow, settings=None):
        path = super().insert_arrow_batch(table, arrow, settings)
        if self.lose:
            self.lose -= 1
            raise ConnectionError("fault injector: the insert's reply was lost")
        return path


def test_the_sink_retries_a_batch_whose_reply_was_lost_and_stores_it_once(tt_db):
    client, db = tt_db
    chdb_only(client)
    reqs = requests()
    b = batch_of(reqs)
    stats = LoaderStats()
    sink = ClickHouseSink(LoaderConfig(database=db, retry_initial_s=0.01, retry_max_s=0.02), LostAck(client, lose=2), stats)
    assert sink.flush(SealedBatch(b, ranges={("t", 0): (0, 41)}), threading.Event())
    assert stats.insert_failures == 2 and stats.insert_path == INSERT_PATH_CHDB
    assert count(client, db) == b.tensor_rows                     # the retries were dropped by the token
    assert client.query(f"SELECT count() FROM {db}.requests").result_rows[0][0] == len(reqs)
    assert_read_back_bit_exact(client, db, reqs)


class Passthrough:
    """Forwards everything to the real client (as the loader tests' fault injector does): not a
    clickhouse-connect chDB client, so the insert must take insert_arrow."""

    def __init__(self, client):
        self.client = client

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_anything_but_a_chdb_client_inserts_through_insert_arrow(tt_db):
    client, db = tt_db
    shared = ThreadSafeClient(Passthrough(client))
    assert shared.insert_path == INSERT_PATH_ARROW
    reqs = requests()
    b = batch_of(reqs)
    assert shared.insert_arrow_batch(f"{db}.activations", b.activations_table(time.time_ns()),
                                     {"insert_deduplication_token": "a:t/0/0-9"}) == INSERT_PATH_ARROW
    assert count(client, db) == b.tensor_rows


def test_names_that_are_not_identifiers_are_refused_before_any_sql():
    b = batch_of(requests()[:1])
    table = b.activations_table(time.time_ns())
    with pytest.raises(ValueError, match="table 'db.activations; DROP TABLE x'"):
        insert_python(None, "db.activations; DROP TABLE x", table, {})
    with pytest.raises(ValueError, match="setting name 'max_threads = 8, x'"):
        insert_python(None, "db.activations", table, {"max_threads = 8, x": 1})
    with pytest.raises(ValueError, match="column name 'a`b'"):
        insert_python(None, "db.t", table.rename_columns(["a`b"] + table.column_names[1:]), {})


def test_the_loaders_sort_key_is_the_tables_order_by(tt_db):
    client, db = tt_db
    key = client.query("SELECT sorting_key FROM system.tables WHERE database = {d:String} AND name = 'activations'",
                       parameters={"d": db}).result_rows[0][0]
    assert key == ", ".join(schema.ACTIVATION_SORT_KEY)
