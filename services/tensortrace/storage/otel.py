"""The `otel_traces` tables, in the OpenTelemetry Collector ClickHouse exporter's own shape, so that
whatever reads that exporter's tables (Grafana's ClickHouse plugin, its trace view and "trace id"
lookups) reads the bridge's spans unchanged, next to the spans a Collector writes there.

    apply_otel_schema(client, database="otel", ttl_days=7)          # idempotent
    client.query("SELECT SpanName FROM otel.otel_traces WHERE TraceId = {t:String}", parameters={"t": tid})

>>> otel_ddl("otel", "otel_traces", ttl_days=7)[0].splitlines()[-3:]
['ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)', 'TTL toDateTime(Timestamp) + toIntervalDay(7)', 'SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1']

Source of the DDL: opentelemetry-collector-contrib, `exporter/clickhouseexporter/internal/sqltemplates/`
(`traces_table.sql`, `traces_id_ts_lookup_table.sql`, `traces_id_ts_lookup_mv.sql`), the branch of
the traces template that the exporter renders for servers without text indexes (before ClickHouse
26.2): bloom filters on TraceId and the attribute maps. The statements below are that DDL with its
defaults filled in: engine `MergeTree()` (the exporter's default `table_engine`), `TTL
toDateTime(Timestamp) + toIntervalDay(N)` (its `GenerateTTLExpr` for a whole number of days; none
when the TTL is 0), no `ON CLUSTER`. The insert writes the exporter's column list and value
conventions: hex ids ('' for none), SpanKind and StatusCode as pdata names them (`Internal`,
`Producer`, `Consumer`; `Unset`, `Ok`, `Error`), attribute values as strings (`AsString()`:
booleans `true`/`false`, arrays as JSON), ServiceName from the resource's `service.name`.

Why not ReplacingMergeTree (the exporter allows any engine): its sort key is (ServiceName,
SpanName, toDateTime(Timestamp), Timestamp), so replacing would merge *different* spans that share
a name and a start time, and would never merge a replay (same span id) whose start differs. The
bridge's span ids are deterministic instead (docs/bridge.md): a re-delivered request writes rows
with the same SpanId, and readers collapse them (`LIMIT 1 BY TraceId, SpanId`, or `any()` grouped
by SpanId). Grafana's trace view shows a span id once.

This table is an external contract, not part of the loader's numbered migrations
(storage/migrations.py): a Collector may have created it first, so it is created only IF NOT
EXISTS and then checked for the columns the bridge writes (`OtelSchemaError` names what is
missing, e.g. a table from an old exporter without ScopeName).
"""

from __future__ import annotations

import logging

from tensortrace.storage.retention import current_ttl, ensure_ttl
from tensortrace.storage.schema import check_identifier

log = logging.getLogger("tensortrace.storage.otel")

DEFAULT_OTEL_DATABASE = "otel"        # the exporter's default database
DEFAULT_TRACES_TABLE = "otel_traces"  # the exporter's default traces_table_name

# The columns the bridge inserts, in the exporter's insert order (traces_insert.sql).
TRACES_COLUMNS = (
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind", "ServiceName",
    "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration", "StatusCode",
    "StatusMessage", "Events.Timestamp", "Events.Name", "Events.Attributes",
    "Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes",
)

_TRACES = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    ResourceAttributeItems Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(ResourceAttributes, 'Array(Tuple(String, String))')),
    SpanAttributeItems Array(String) ALIAS arrayMap(kv -> concat(kv.1, '=', kv.2), CAST(SpanAttributes, 'Array(Tuple(String, String))')),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = MergeTree()
PARTITION BY toDate(Timestamp)
PRIMARY KEY (ServiceName, SpanName, toDateTime(Timestamp))
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
{ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
"""

_TRACE_ID_TS = """
CREATE TABLE IF NOT EXISTS {db}.{table}_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta(4), ZSTD(1)),
    End DateTime CODEC(Delta(4), ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree()
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start)
{ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
"""

_TRACE_ID_TS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{table}_trace_id_ts_mv
TO {db}.{table}_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM {db}.{table}
WHERE TraceId != ''
GROUP BY TraceId
"""


class OtelSchemaError(RuntimeError):
    """An existing traces table lacks columns the bridge writes (e.g. made by an old exporter)."""


def ttl_clause(ttl_days: int, column: str) -> str:
    """The exporter's TTL expression for whole days; '' (no TTL) for 0."""
    return f"TTL {column} + toIntervalDay({int(ttl_days)})" if int(ttl_days) > 0 else ""


def otel_ddl(database: str = DEFAULT_OTEL_DATABASE, table: str = DEFAULT_TRACES_TABLE, ttl_days: int = 0) -> list[str]:
    """The CREATE statements, in order: traces table, trace-id -> time table, its materialized view."""
    db = check_identifier(database)
    t = check_identifier(table, "table")
    if int(ttl_days) < 0:
        raise ValueError(f"ttl_days must be >= 0 (0: no TTL), got {ttl_days}")
    return [_TRACES.format(db=db, table=t, ttl=ttl_clause(ttl_days, "toDateTime(Timestamp)")),
            _TRACE_ID_TS.format(db=db, table=t, ttl=ttl_clause(ttl_days, "toDateTime(Start)")),
            _TRACE_ID_TS_MV.format(db=db, table=t)]


def apply_otel_schema(client, database: str = DEFAULT_OTEL_DATABASE, ttl_days: int = 0,
                      table: str = DEFAULT_TRACES_TABLE) -> None:
    """Create the traces tables if absent (idempotent), re-apply the TTL (metadata only, as the
    loader does for its tables), and check the columns the bridge inserts are there."""
    db = check_identifier(database)
    t = check_identifier(table, "table")
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    for sql in otel_ddl(db, t, ttl_days):
        client.command(sql)
    for name, column in ((t, "toDateTime(Timestamp)"), (f"{t}_trace_id_ts", "toDateTime(Start)")):
        if int(ttl_days) > 0:   # altered only when it differs (storage/retention.py), and logged
            ensure_ttl(client, db, name, ttl_clause(ttl_days, column).removeprefix("TTL "))
        elif current_ttl(client, db, name):
            client.command(f"ALTER TABLE {db}.{name} REMOVE TTL")
            log.info("retention: %s.%s TTL removed (ttl_days 0: kept until deleted)", db, name)
    have = {r[0] for r in client.query(
        "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": db, "t": t}).result_rows}
    missing = [c for c in TRACES_COLUMNS if c not in have]
    if missing:
        raise OtelSchemaError(f"{db}.{t} exists but lacks the columns {', '.join(missing)} that the bridge writes "
                              "(made by an older OpenTelemetry Collector ClickHouse exporter?); use another "
                              "--traces-table or migrate it")

