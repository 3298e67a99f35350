"""The ClickHouse schema (loader <-> readers contract): migrations, column lists, client creation.

    client = connect("chdb:///var/lib/tensortrace")
    apply_migrations(client, database="tensortrace", ttl_days=7)   # the schema version now applied

Tables (docs/storage.md has the reasoning):
  activations        one row per TensorRecord (chunks reassembled); ReplacingMergeTree on the dedup
                     identity, ordered by trace id; projection by (model, hook, layer, time).
  requests           one row per RequestSummary.
  activation_traces  trace id -> request ids and capture time bounds (materialized view).
  probe_scores       one row per (request, probe version) score, from the probe service's scores topic.
  forgotten          what `tensortrace forget` deleted (trace ids, request ids), for the loader's sweep.
  schema_migrations  applied migration versions.
"""

from __future__ import annotations

import re
import datetime

from tensortrace.storage.migrations import MIGRATIONS

SCHEMA_VERSION = MIGRATIONS[-1][0]
DEFAULT_DATABASE = "tensortrace"
DEFAULT_TTL_DAYS = 7
# Two tiers for the payload column (docs/storage.md, "Payload encoding"): fresh parts are written
# with the part's default codec (LZ4: the cheapest insert and the fastest read-back, while a request
# is most likely to be looked at), and merges recompress parts older than RECOMPRESS_AFTER_HOURS
# with ZSTD(1), 23% smaller on bf16 rows (a TTL RECOMPRESS rule only touches CODEC(Default)
# columns, so the payload column must not name a codec for the second tier to apply).
DEFAULT_PAYLOAD_CODEC = "Default"
DEFAULT_RECOMPRESS_AFTER_HOURS = 24
DEFAULT_RECOMPRESS_CODEC = "ZSTD(1)"

ACTIVATION_COLUMNS = (
    "trace_id", "span_id", "request_id", "model", "hook", "layer", "tp_rank", "tp_size",
    "positions_kind", "token_start", "token_end", "positions", "phase", "step", "dtype", "shape",
    "encoding", "raw_size", "payload", "capture_time", "export_time", "load_time",
    "producer_node", "producer_pod", "producer_pid", "producer_rank", "producer_generation", "seq",
    "kafka_partition", "kafka_offset",
)
REQUEST_COLUMNS = (
    "trace_id", "span_id", "request_id", "model", "records_captured", "records_dropped",
    "dropped_by_reason", "bytes_captured", "complete", "incomplete_reason", "prompt_tokens",
    "generated_tokens", "finish_reason", "hooks", "sampled", "producers", "start_time", "end_time", "export_time",
    "load_time", "producer_node", "producer_pod", "producer_pid", "producer_rank",
    "producer_generation", "seq", "kafka_partition", "kafka_offset",
)
PROBE_SCORE_COLUMNS = (
    "trace_id", "span_id", "request_id", "model", "probe", "probe_hash", "score", "threshold", "flagged",
    "shadow", "complete", "incomplete_reason", "hook", "layers", "pooling", "tokens_scored", "token_scores",
    "token_positions", "request_end_time", "scored_time", "release", "load_time", "kafka_partition", "kafka_offset",
)
# A score's identity: a re-published score (a restarted probe service) has the same one.
PROBE_SCORE_IDENTITY = ("trace_id", "request_id", "probe", "probe_hash")
# activations' ORDER BY (migration 1, storage/migrations.py; a test checks the two agree): the loader
# hands rows over in this order so the engine need not sort them (loader/rows.py).
ACTIVATION_SORT_KEY = ("trace_id", "hook", "layer", "token_start", "tp_rank", "producer_pod", "producer_pid",
                       "producer_generation", "seq")
# Dedup identity of a stored record (codec.record_key); reads collapse on it (query/backend.py).
IDENTITY_COLUMNS = ("producer_pod", "producer_pid", "producer_generation", "seq")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_CODEC = re.compile(r"^(Default|NONE|LZ4|LZ4HC\(\d{1,2}\)|ZSTD\(\d{1,2}\)|ZSTD)$")


class SchemaError(RuntimeError):
    """The database holds a schema this code cannot use (e.g. newer than SCHEMA_VERSION)."""


def check_identifier(name: str, what: str = "database") -> str:
    """Identifiers cannot be query parameters in ClickHouse, so they are validated instead."""
    if not _IDENT.match(name or ""):
        raise ValueError(f"{what} name {name!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63 chars)")
    return name


def check_payload_codec(codec: str) -> str:
    if not _CODEC.match(codec or ""):
        raise ValueError(f"payload codec {codec!r} is not one of Default, NONE, LZ4, LZ4HC(n), ZSTD(n)")
    return codec


def connect(dsn: str, **kwargs):
    """A clickhouse-connect client for `chdb:///path`, `chdb://memory` or `http(s)://user:pw@host:port`."""
    import os

    import clickhouse_connect

    # Credentials for a server may come from the environment (the chart passes a Secret that way)
    # rather than the DSN, so they never appear in a process listing.
    if dsn.startswith(("http://", "https://")) and "@" not in dsn:
        if os.environ.get("CLICKHOUSE_USER"):
            kwargs.setdefault("username", os.environ["CLICKHOUSE_USER"])
        if os.environ.get("CLICKHOUSE_PASSWORD"):
            kwargs.setdefault("password", os.environ["CLICKHOUSE_PASSWORD"])
    return clickhouse_connect.get_client(dsn=dsn, **kwargs)


def applied_versions(client, database: str) -> list[int]:
    rows = client.query(f"SELECT version FROM {database}.schema_migrations ORDER BY version").result_rows
    return [int(r[0]) for r in rows]


def apply_migrations(client, database: str = DEFAULT_DATABASE, ttl_days: int = DEFAULT_TTL_DAYS,
                     payload_codec: str = DEFAULT_PAYLOAD_CODEC,
                     recompress_after_hours: int = DEFAULT_RECOMPRESS_AFTER_HOURS,
                     recompress_codec: str = DEFAULT_RECOMPRESS_CODEC, retention: dict | str | None = None) -> int:
    """Create/upgrade the schema; idempotent. Returns the schema version now in force.

    Retention: every table gets a TTL, `retention` ({table: Period} or 'activations=7d,requests=30d';
    storage/retention.py) for the tables it names, `ttl_days` for the others. The TTLs (and
    recompression of payloads older than `recompress_after_hours`; 0: never) and the payload column
    codec are checked on every start and altered where they differ from the config (metadata only:
    materialize_ttl_after_modify = 0; a new codec applies to parts written or merged from then on),
    so changing `--retention`, `--ttl-days`, `--recompress-after-hours` or `--payload-codec` needs no
    migration. Each TTL change is logged (tensortrace.storage.retention).
    """
    from tensortrace.storage import retention as ret

    db = check_identifier(database)
    check_payload_codec(payload_codec)
    check_payload_codec(recompress_codec)
    if int(ttl_days) < 1:
        raise ValueError(f"ttl_days must be >= 1, got {ttl_days}")
    if int(recompress_after_hours) < 0:
        raise ValueError(f"recompress_after_hours must be >= 0, got {recompress_after_hours}")
    periods = ret.table_periods(ret.parse_retention(retention) if isinstance(retention, str) else (retention or {}),
                                int(ttl_days))
    client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, name String, "
        f"applied_at DateTime64(3, 'UTC')) ENGINE = MergeTree ORDER BY version")
    done = set(applied_versions(client, db))
    if done and max(done) > SCHEMA_VERSION:
        raise SchemaError(f"database {db} is at schema version {max(done)}, newer than this loader's {SCHEMA_VERSION}")
    for version, name, statements in MIGRATIONS:
        if version in done:
            continue
        for sql in statements:
            client.command(sql.format(db=db, ttl_days=int(ttl_days), payload_codec=payload_codec))
        client.insert(f"{db}.schema_migrations", [[version, name, datetime.datetime.now(datetime.timezone.utc)]],
                      column_names=["version", "name", "applied_at"])
    client.command(f"ALTER TABLE {db}.activations MODIFY COLUMN payload String CODEC({payload_codec})")
    have = {r[0] for r in client.query("SELECT name FROM system.tables WHERE database = {d:String}",
                                       parameters={"d": db}).result_rows}
    ret.apply_retention(client, db, {t: p for t, p in periods.items() if t in have},   # all, once migrated
                        int(recompress_after_hours), recompress_codec)
    return SCHEMA_VERSION
