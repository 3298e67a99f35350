"""Schema migrations, loader config validation and the record -> row checks."""

import time

import pytest

from tensortrace.loader.config import ConfigError, KafkaConfig, LoaderConfig
from tensortrace.loader.rows import ColumnBatch, InvalidRecord
from tensortrace.storage import schema
from tensortrace.testing.synthetic import SyntheticRequest


@pytest.mark.integration
def test_migrations_are_recorded_idempotent_and_ttl_follows_config(tt_db):
    client, db = tt_db  # already migrated once by the fixture
    every = list(range(1, schema.SCHEMA_VERSION + 1))
    assert schema.applied_versions(client, db) == every
    assert schema.apply_migrations(client, db, ttl_days=30) == schema.SCHEMA_VERSION
    assert schema.applied_versions(client, db) == every
    ddl = client.query(f"SHOW CREATE TABLE {db}.activations").result_rows[0][0]
    assert "toIntervalDay(30)" in ddl
    assert "toIntervalHour(24) RECOMPRESS CODEC(ZSTD(1))" in ddl   # the payload's cold tier
    assert "`payload` String CODEC(Default)" in ddl
    schema.apply_migrations(client, db, ttl_days=30, payload_codec="LZ4", recompress_after_hours=0)
    ddl = client.query(f"SHOW CREATE TABLE {db}.activations").result_rows[0][0]
    assert "RECOMPRESS" not in ddl and "`payload` String CODEC(LZ4)" in ddl
    assert "ReplacingMergeTree" in ddl and "PARTITION BY toDate(capture_time)" in ddl
    assert "ORDER BY (trace_id, hook, layer, token_start, tp_rank, producer_pod, producer_pid, producer_generation, seq)" in ddl
    assert "PROJECTION by_hook_layer" in ddl and "bloom_filter" in ddl
    tables = {r[0] for r in client.query(f"SHOW TABLES FROM {db}").result_rows}
    assert {"activations", "requests", "activation_traces", "activation_traces_mv", "schema_migrations"} <= tables


@pytest.mark.integration
def test_old_payloads_are_recompressed_by_merges_and_read_back_unchanged(tt_db):
    """The two payload tiers: fresh rows stay in LZ4 parts; rows older than recompress_after_hours
    are rewritten by merges with ZSTD(1), and what reads back is bit-identical."""
    import torch

    from tensortrace.query import TensorTraceClient

    client, db = tt_db
    fresh = SyntheticRequest.make("req-hot", layers=2, hidden=256, prompt=40, generated=8)
    cold = SyntheticRequest.make("req-cold", layers=2, hidden=256, prompt=40, generated=8)
    old = time.time_ns() - 30 * 3600 * 10**9   # captured 30 h ago: past the 24 h default
    for r in cold.records:
        r.capture_time_unix_nano = old
    for records in (fresh.records, cold.records[0::2], cold.records[1::2]):
        b = ColumnBatch()
        for i, r in enumerate(records):
            b.add_tensor(r, 0, i)
        client.insert_arrow(f"{db}.activations", b.activations_table(time.time_ns()))

    def codecs():
        rows = client.query(f"SELECT min_time < now() - INTERVAL 25 HOUR, default_compression_codec FROM system.parts "
                            f"WHERE database = '{db}' AND table = 'activations' AND active").result_rows
        return {("cold" if is_old else "hot", c) for is_old, c in rows}

    client.command(f"OPTIMIZE TABLE {db}.activations FINAL")
    assert codecs() == {("hot", "LZ4"), ("cold", "ZSTD(1)")}
    tt = TensorTraceClient(client, database=db)
    for req in (fresh, cold):
        got = tt.tensors(request_id=req.request_id)
        for key, want in req.truth.items():
            assert torch.equal(got[key].tensor, want), key


@pytest.mark.integration
def test_a_database_from_a_newer_loader_is_refused(tt_db):
    client, db = tt_db
    client.command(f"INSERT INTO {db}.schema_migrations VALUES ({schema.SCHEMA_VERSION + 1}, 'future', now())")
    with pytest.raises(schema.SchemaError, match="newer than this loader"):
        schema.apply_migrations(client, db)


@pytest.mark.integration
def test_one_hook_layer_across_requests_reads_the_projection(tt_db):
    """The probe-training read (one hook/layer, many requests) uses the by_hook_layer projection."""
    client, db = tt_db
    b = ColumnBatch()
    for i in range(30):  # > index_granularity rows, so reading the projection is actually cheaper
        for r in SyntheticRequest.make(f"p-{i}", layers=8, hidden=8, generated=8).records:
            b.add_tensor(r, 0, 0)
    client.insert_arrow(f"{db}.activations", b.activations_table(time.time_ns()))
    plan = "\n".join(r[0] for r in client.query(
        f"EXPLAIN indexes = 1 SELECT trace_id, request_id FROM {db}.activations "
        f"WHERE model = 'synthetic/tiny' AND hook = 'resid_pre' AND layer = 2").result_rows)
    assert "by_hook_layer" in plan


@pytest.mark.unit
def test_config_validate_names_the_wrong_field():
    LoaderConfig().validate()
    cases = {
        "bootstrap_servers": dict(kafka=KafkaConfig(bootstrap_servers="nohostport")),
        "dlq_topic": dict(dlq_topic="tensortrace.activations"),
        "clickhouse_dsn": dict(clickhouse_dsn="mysql://x"),
        "database": dict(database="a;b"),
        "batch_max_delay_s": dict(batch_max_delay_s=0),
        "retry_initial_s": dict(retry_initial_s=5, retry_max_s=1),
        "ttl_days": dict(ttl_days=0),
        "recompress_after_hours": dict(recompress_after_hours=-1),
        "recompress_codec": dict(recompress_codec="GZIP; DROP"),
    }
    for field, kw in cases.items():
        with pytest.raises(ConfigError, match=field):
            LoaderConfig(**kw).validate()


@pytest.mark.unit
def test_cli_flags_map_onto_the_config():
    from tensortrace.compose import LOADER   # `tensortrace loader`: the loader + its query service

    cfg, _runtime = LOADER.parse(["--bootstrap-servers", "h:1", "--group-id", "g", "--dead-letter-topic", "d",
                                  "--clickhouse-dsn", "http://ch:8123", "--ttl-days", "3", "--query-port", "0",
                                  "--query-plaintext"])
    assert (cfg.kafka.bootstrap_servers, cfg.group_id, cfg.dlq_topic, cfg.clickhouse_dsn, cfg.ttl_days, cfg.query_port) == \
        ("h:1", "g", "d", "http://ch:8123", 3, 0)


@pytest.mark.unit
@pytest.mark.parametrize("mutate, reason", [
    (lambda r: setattr(r, "raw_size", r.raw_size + 1), "raw_size"),
    (lambda r: setattr(r, "trace_id", b"short"), "trace_id"),
    (lambda r: setattr(r, "token_end", r.token_end + 5), "token range"),
    (lambda r: setattr(r, "payload", r.payload[:-2]), "RAW payload"),
    (lambda r: setattr(r, "hook", ""), "no hook"),
    (lambda r: setattr(r, "dtype", 99), "dtype"),
])
def test_invalid_records_are_refused_with_the_reason(mutate, reason):
    rec = SyntheticRequest.make("r", layers=1, hidden=4, final_hook=None).records[0]
    mutate(rec)
    b = ColumnBatch()
    with pytest.raises(InvalidRecord, match=reason):
        b.add_tensor(rec, 0, 0)
    assert b.rows == 0


@pytest.mark.unit
def test_a_zero_capture_time_falls_back_so_the_ttl_does_not_delete_the_row():
    rec = SyntheticRequest.make("r", layers=1, hidden=4, final_hook=None).records[0]
    rec.capture_time_unix_nano = 0
    rec.export_time_unix_nano = 0
    b = ColumnBatch()
    before = time.time_ns()
    b.add_tensor(rec, 0, 0)
    assert b.act["capture_time"][0] >= before


@pytest.mark.unit
def test_metrics_expose_the_loader_counters():
    from prometheus_client import CollectorRegistry, generate_latest

    from tensortrace.loader.metrics import _LoaderCollector
    from tensortrace.loader.service import LoaderStats

    class FakeLoader:  # only .stats is read
        stats = LoaderStats(messages=7, tensor_rows=5, summary_rows=1, dlq_by_reason={"envelope": 2})

    reg = CollectorRegistry()
    reg.register(_LoaderCollector(FakeLoader()))
    text = generate_latest(reg).decode()
    assert "tensortrace_loader_messages_total 7.0" in text
    assert 'tensortrace_loader_rows_total{table="activations"} 5.0' in text
    assert 'tensortrace_loader_dead_letters_total{reason="envelope"} 2.0' in text


@pytest.mark.integration
def test_a_retried_insert_with_the_same_token_adds_no_rows(tt_db):
    """The loader's retry path: same batch, same insert_deduplication_token -> ClickHouse drops it."""
    client, db = tt_db
    b = ColumnBatch()
    for i, r in enumerate(SyntheticRequest.make("tok", layers=2, hidden=8).records):
        b.add_tensor(r, 0, i)
    table = b.activations_table(time.time_ns())
    for _ in range(2):
        client.insert_arrow(f"{db}.activations", table, settings={"insert_deduplication_token": "a:t/0/0-9"})
    assert client.query(f"SELECT count() FROM {db}.activations").result_rows[0][0] == b.tensor_rows
    client.insert_arrow(f"{db}.activations", table, settings={"insert_deduplication_token": "a:t/0/10-19"})
    assert client.query(f"SELECT count() FROM {db}.activations").result_rows[0][0] == 2 * b.tensor_rows
    assert client.query(f"SELECT count() FROM {db}.activations FINAL").result_rows[0][0] == b.tensor_rows


@pytest.mark.integration
def test_a_version_1_database_upgrades_and_its_old_summaries_read_as_one_producer(ch_client, ch_database):
    from tensortrace.storage import migrations

    client, db = ch_client, ch_database
    v1_only = [m for m in migrations.MIGRATIONS if m[0] == 1]
    original = migrations.MIGRATIONS[:]
    try:
        schema.MIGRATIONS[:] = v1_only
        schema.SCHEMA_VERSION, saved = 1, schema.SCHEMA_VERSION
        schema.apply_migrations(client, db)
    finally:
        schema.MIGRATIONS[:] = original
        schema.SCHEMA_VERSION = saved
    req = SyntheticRequest.make("old", layers=1, hidden=8)
    cols = [c for c in schema.REQUEST_COLUMNS if c != "producers"]
    batch = ColumnBatch()
    batch.add_summary(req.summary, 0, 0)
    table = batch.requests_table(time.time_ns()).drop_columns(["producers"]).select(cols)
    client.insert_arrow(f"{db}.requests", table)
    assert schema.apply_migrations(client, db) == schema.SCHEMA_VERSION
    assert schema.applied_versions(client, db) == [v for v, _, _ in migrations.MIGRATIONS]
    rows = client.query(f"SELECT producers FROM {db}.requests").result_rows
    assert rows == [(1,)]
