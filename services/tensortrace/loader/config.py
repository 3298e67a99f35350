"""Loader configuration: the consumer settings every stream consumer has (ConsumerConfig: Kafka,
topic, group, dead letters, batching, retries), plus the ClickHouse sink's own.

>>> cfg = LoaderConfig(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"), clickhouse_dsn="chdb:///tmp/tt")
>>> cfg.validate()
"""

from __future__ import annotations

from dataclasses import dataclass

from tensortrace.consume.config import DEFAULT_DLQ_TOPIC, DEFAULT_TOPIC, ConsumerConfig  # noqa: F401
from tensortrace.service.kafka import KafkaConfig  # noqa: F401 (re-exported for callers)
from tensortrace.storage import schema

try:
    from tensortrace.service.config import ConfigError
except ImportError:  # pragma: no cover - transitional
    class ConfigError(ValueError):
        """A configuration value that cannot work; the message names the field and the reason."""

DEFAULT_GROUP = "tensortrace-loader"
DEFAULT_DSN = "chdb:///var/lib/tensortrace/chdb"


@dataclass
class LoaderConfig(ConsumerConfig):
    group_id: str = DEFAULT_GROUP

    clickhouse_dsn: str = DEFAULT_DSN
    database: str = schema.DEFAULT_DATABASE
    ttl_days: int = schema.DEFAULT_TTL_DAYS
    payload_codec: str = schema.DEFAULT_PAYLOAD_CODEC  # ClickHouse column codec of `payload`
    # merges recompress payloads older than this with recompress_codec (0: never); see schema.py
    recompress_after_hours: int = schema.DEFAULT_RECOMPRESS_AFTER_HOURS
    recompress_codec: str = schema.DEFAULT_RECOMPRESS_CODEC

    # A batch is inserted when it holds batch_max_rows rows or batch_max_bytes payload bytes, or
    # when its oldest row is batch_max_delay_s old (ConsumerConfig).
    batch_max_rows: int = 20_000
    batch_max_bytes: int = 64 << 20

    query_host: str = "127.0.0.1"
    query_port: int | None = None      # also serve the gRPC query service on this port

    def problems(self) -> list[str]:
        out = self.consumer_problems()
        if not self.clickhouse_dsn.startswith(("chdb://", "http://", "https://", "clickhouse://", "clickhouses://")):
            out.append(f"clickhouse_dsn: {self.clickhouse_dsn!r}: expected chdb:///path, chdb://memory or http(s)://user:pw@host:port")
        for name, check in (("database", schema.check_identifier), ("payload_codec", schema.check_payload_codec),
                            ("recompress_codec", schema.check_payload_codec)):
            try:
                check(getattr(self, name))
            except ValueError as e:
                out.append(f"{name}: {e}")
        if self.recompress_after_hours < 0:
            out.append(f"recompress_after_hours: {self.recompress_after_hours} < 0")
        if self.ttl_days < 1:
            out.append(f"ttl_days: {self.ttl_days} < 1")
        if self.batch_max_rows < 1:
            out.append(f"batch_max_rows: {self.batch_max_rows} < 1")
        if self.batch_max_bytes < 1 << 10:
            out.append(f"batch_max_bytes: {self.batch_max_bytes} < 1024")
        if self.query_port is not None and not 0 <= self.query_port <= 65535:
            out.append(f"query_port: {self.query_port} is not a TCP port")
        return out

    def validate(self) -> "LoaderConfig":
        problems = self.problems()
        if problems:
            raise ConfigError("loader config: " + "; ".join(problems))
        return self
