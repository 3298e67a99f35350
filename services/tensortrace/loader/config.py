"""Loader configuration: the consumer settings every stream consumer has (ConsumerConfig: Kafka,
topic, group, dead letters, batching, retries), plus the ClickHouse sink's own.

>>> cfg = LoaderConfig(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"), clickhouse_dsn="chdb:///tmp/tt")
>>> cfg.validate() is cfg
True
>>> LoaderConfig(clickhouse_dsn="mysql://db", batch_max_rows=0).problems()
["clickhouse_dsn: 'mysql://db': expected chdb:///path, chdb://memory or http(s)://user:pw@host:port", 'batch_max_rows: 0 < 1']

Flags are generated from the fields (tensortrace.service.config): `--kafka-bootstrap-servers`,
`--group-id`, `--clickhouse-dsn`, ...; `flag_aliases` keeps the short names scripts and the demo use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from tensortrace.consume.config import ConsumerConfig
from tensortrace.service.config import ConfigError, option, raise_problems  # noqa: F401 (ConfigError re-exported)
from tensortrace.service.kafka import KafkaConfig  # noqa: F401 (re-exported for callers)
from tensortrace.storage import schema
from tensortrace.storage.retention import parse_retention

DEFAULT_GROUP = "tensortrace-loader"
DEFAULT_DSN = "chdb:///var/lib/tensortrace/chdb"
DEFAULT_SCORES_TOPIC = "tensortrace.probe_scores"
DEFAULT_SCORES_GROUP = "tensortrace-loader-scores"


@dataclass
class LoaderConfig(ConsumerConfig):
    # the names scripts, tests and the demo have always used, for fields this class inherits
    flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {
        "kafka.bootstrap_servers": ("--bootstrap-servers", "--bootstrap"),
        "group_id": ("--group",),
        "dlq_topic": ("--dead-letter-topic",),
        "batch_max_delay_s": ("--batch-max-delay",),
        "chunk_timeout_s": ("--chunk-timeout",),
    }

    group_id: str = option(DEFAULT_GROUP, "Kafka consumer group")

    clickhouse_dsn: str = option(DEFAULT_DSN, "chdb:///path | chdb://memory | http(s)://user:password@host:port",
                                 aliases=("--clickhouse",))
    database: str = option(schema.DEFAULT_DATABASE, "ClickHouse database")
    ttl_days: int = option(schema.DEFAULT_TTL_DAYS, "rows older than this are deleted by ClickHouse")
    # Per-table retention (storage/retention.py; docs/data-lifecycle.md): enforced by each table's
    # TTL, altered at start where it differs. Tables not named keep --ttl-days.
    retention: str = option("", "per-table retention, e.g. activations=3d,requests=30d,probe_scores=30d,"
                                "forgotten=30d (h or d); tables not named: --ttl-days")
    # `tensortrace forget` re-applied to requests Kafka delivers again after they were forgotten.
    forget_sweep_s: float = option(60.0, "every N s delete again what `tensortrace forget` deleted, if a "
                                         "re-read from Kafka re-inserted it; 0: off")
    forget_traces_table: str = option("otel.otel_traces", "spans table [db.]table the forget sweep also "
                                                          "covers when it is in this ClickHouse")
    payload_codec: str = option(schema.DEFAULT_PAYLOAD_CODEC,
                                "ClickHouse codec of the payload column (Default: the part codec, LZ4)")
    recompress_after_hours: int = option(schema.DEFAULT_RECOMPRESS_AFTER_HOURS,
                                         "merges recompress payloads older than this with --recompress-codec; 0: never")
    recompress_codec: str = option(schema.DEFAULT_RECOMPRESS_CODEC, "codec of recompressed payloads")

    # A batch is inserted when it holds batch_max_rows rows or batch_max_bytes payload bytes, or
    # when its oldest row is batch_max_delay_s old (ConsumerConfig).
    batch_max_rows: int = option(20_000, "insert when a batch holds this many rows")
    batch_max_bytes: int = option(64 << 20, "insert when a batch holds this many payload bytes")

    # The probe service's scores (tensortrace.v1.ProbeScore) into probe_scores: a second consumer in
    # this process, since an embedded chDB engine has one owner (loader/scores.py).
    scores_consumer: bool = option(True, "also load the probe scores topic into the probe_scores table")
    scores_topic: str = option(DEFAULT_SCORES_TOPIC, "Kafka topic of the probe scores (tensortrace probes --scores-topic)")
    scores_group_id: str = option(DEFAULT_SCORES_GROUP, "Kafka consumer group of the scores consumer")

    stats_interval_s: float = option(0.0, "print the counters as a JSON line on stderr every N s; 0: off",
                                     aliases=("--stats-interval",))

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
        try:
            parse_retention(self.retention)
        except ValueError as e:
            out.append(f"retention: {e}")
        if self.forget_sweep_s < 0:
            out.append(f"forget_sweep_s: {self.forget_sweep_s} < 0")
        if self.forget_traces_table.count(".") > 1:
            out.append(f"forget_traces_table: {self.forget_traces_table!r} is not [db.]table")
        for part in self.forget_traces_table.split("."):
            try:
                schema.check_identifier(part, "table")
            except ValueError as e:
                out.append(f"forget_traces_table: {e}")
        if self.batch_max_rows < 1:
            out.append(f"batch_max_rows: {self.batch_max_rows} < 1")
        if self.batch_max_bytes < 1 << 10:
            out.append(f"batch_max_bytes: {self.batch_max_bytes} < 1024")
        if self.stats_interval_s < 0:
            out.append(f"stats_interval_s: {self.stats_interval_s} < 0")
        if self.scores_consumer:
            for name in ("scores_topic", "scores_group_id"):
                v = getattr(self, name)
                if not v or any(ch.isspace() for ch in v):
                    out.append(f"{name}: {v!r} must be a non-empty name without spaces")
            if self.scores_topic in (self.topic, self.dlq_topic):
                out.append(f"scores_topic: {self.scores_topic!r} is also the activation or dead-letter topic")
            if self.scores_group_id == self.group_id:
                out.append("scores_group_id: must differ from group_id (the two consumers read different topics)")
        return out

    def scores_consumer_config(self) -> ConsumerConfig:
        """The scores consumer's settings: this config's, on the scores topic, its own group, dead
        letters to `<scores_topic>.dlq`."""
        return ConsumerConfig(**{f.name: getattr(self, f.name) for f in fields(ConsumerConfig)} | dict(
            topic=self.scores_topic, group_id=self.scores_group_id, dlq_topic=self.scores_topic + ".dlq"))

    def validate(self) -> "LoaderConfig":
        """Self, or a ConfigError listing every problem (one per line)."""
        return raise_problems(self, "loader config")
