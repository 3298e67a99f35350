"""Loader configuration: one dataclass, its defaults in one place, validate() that names the problem.

>>> cfg = LoaderConfig(bootstrap="127.0.0.1:9092", clickhouse_dsn="chdb:///tmp/tt")
>>> cfg.validate()
"""

from __future__ import annotations

from dataclasses import dataclass

from tensortrace.loader import schema

DEFAULT_TOPIC = "tensortrace.activations"
DEFAULT_DLQ_TOPIC = "tensortrace.activations.dlq"
DEFAULT_GROUP = "tensortrace-loader"
DEFAULT_DSN = "chdb:///var/lib/tensortrace/chdb"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the reason."""


@dataclass
class LoaderConfig:
    bootstrap: str = "127.0.0.1:9092"
    topic: str = DEFAULT_TOPIC
    group_id: str = DEFAULT_GROUP
    dlq_topic: str = DEFAULT_DLQ_TOPIC
    auto_offset_reset: str = "earliest"  # where a new group starts: all retained data

    clickhouse_dsn: str = DEFAULT_DSN
    database: str = schema.DEFAULT_DATABASE
    ttl_days: int = schema.DEFAULT_TTL_DAYS
    payload_codec: str = schema.DEFAULT_PAYLOAD_CODEC  # ClickHouse column codec of `payload`
    # merges recompress payloads older than this with recompress_codec (0: never); see schema.py
    recompress_after_hours: int = schema.DEFAULT_RECOMPRESS_AFTER_HOURS
    recompress_codec: str = schema.DEFAULT_RECOMPRESS_CODEC

    # A batch is inserted when it holds batch_max_rows rows or batch_max_bytes payload bytes, or
    # when its oldest row is batch_max_delay_s old (bounds freshness at low load).
    batch_max_rows: int = 20_000
    batch_max_bytes: int = 64 << 20
    batch_max_delay_s: float = 0.25
    # Batches built but not yet inserted; bounds memory (queue_batches x batch_max_bytes).
    insert_queue_batches: int = 2

    chunk_timeout_s: float = 120.0     # a chunk set incomplete this long goes to the DLQ
    max_pending_chunk_sets: int = 10_000

    retry_initial_s: float = 0.2       # insert retry backoff: doubles up to retry_max_s, forever
    retry_max_s: float = 10.0
    rebalance_flush_timeout_s: float = 30.0

    # A loader that dies without leaving the group holds its partitions until this expires.
    session_timeout_ms: int = 10_000
    poll_timeout_ms: int = 100
    max_poll_records: int = 5000
    fetch_max_bytes: int = 64 << 20
    max_partition_fetch_bytes: int = 16 << 20

    query_host: str = "127.0.0.1"
    query_port: int | None = None      # also serve the gRPC query service on this port

    def validate(self) -> "LoaderConfig":
        def bad(field: str, why: str):
            raise ConfigError(f"loader config: {field}: {why}")

        if not self.bootstrap or ":" not in self.bootstrap:
            bad("bootstrap", f"{self.bootstrap!r} is not host:port[,host:port...]")
        for name in ("topic", "group_id", "dlq_topic"):
            v = getattr(self, name)
            if not v or any(ch.isspace() for ch in v):
                bad(name, f"{v!r} must be a non-empty name without spaces")
        if self.dlq_topic == self.topic:
            bad("dlq_topic", "must differ from topic (a dead letter would be read again)")
        if self.auto_offset_reset not in ("earliest", "latest"):
            bad("auto_offset_reset", f"{self.auto_offset_reset!r} is not earliest or latest")
        if not self.clickhouse_dsn.startswith(("chdb://", "http://", "https://", "clickhouse://", "clickhouses://")):
            bad("clickhouse_dsn", f"{self.clickhouse_dsn!r}: expected chdb:///path, chdb://memory or http(s)://user:pw@host:port")
        try:
            schema.check_identifier(self.database)
            schema.check_payload_codec(self.payload_codec)
            schema.check_payload_codec(self.recompress_codec)
        except ValueError as e:
            bad("database/payload_codec/recompress_codec", str(e))
        if self.recompress_after_hours < 0:
            bad("recompress_after_hours", f"{self.recompress_after_hours} < 0")
        if self.ttl_days < 1:
            bad("ttl_days", f"{self.ttl_days} < 1")
        if self.batch_max_rows < 1:
            bad("batch_max_rows", f"{self.batch_max_rows} < 1")
        if self.batch_max_bytes < 1 << 10:
            bad("batch_max_bytes", f"{self.batch_max_bytes} < 1024")
        if not 0 < self.batch_max_delay_s <= 60:
            bad("batch_max_delay_s", f"{self.batch_max_delay_s} not in (0, 60]")
        if self.insert_queue_batches < 1:
            bad("insert_queue_batches", f"{self.insert_queue_batches} < 1")
        if self.chunk_timeout_s <= 0:
            bad("chunk_timeout_s", f"{self.chunk_timeout_s} <= 0")
        if self.max_pending_chunk_sets < 1:
            bad("max_pending_chunk_sets", f"{self.max_pending_chunk_sets} < 1")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            bad("retry_initial_s/retry_max_s", f"need 0 < {self.retry_initial_s} <= {self.retry_max_s}")
        if not 6_000 <= self.session_timeout_ms <= 300_000:
            bad("session_timeout_ms", f"{self.session_timeout_ms} not in [6000, 300000] (the broker's default bounds)")
        if self.query_port is not None and not 0 <= self.query_port <= 65535:
            bad("query_port", f"{self.query_port} is not a TCP port")
        return self
