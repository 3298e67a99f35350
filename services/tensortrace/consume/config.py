"""What every consumer of the activation topic is configured with: one dataclass, inherited by the
services' own configs (loader, bridge, probes) so their flags are the same everywhere.

>>> cfg = ConsumerConfig(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"), group_id="my-probes")
>>> cfg.consumer_problems(), cfg.dlq_topic
([], 'tensortrace.activations.dlq')
>>> ConsumerConfig(group_id="").consumer_problems()
["group_id: '' must be a non-empty name without spaces"]
"""

from __future__ import annotations

from dataclasses import dataclass

from tensortrace.service.config import option
from tensortrace.service.kafka import KafkaConfig

DEFAULT_TOPIC = "tensortrace.activations"
DEFAULT_DLQ_TOPIC = "tensortrace.activations.dlq"


@dataclass
class ConsumerConfig:
    kafka: KafkaConfig = option(factory=KafkaConfig, help="Kafka client settings (bootstrap, security)")
    topic: str = option(DEFAULT_TOPIC, "the activation topic")
    group_id: str = option("tensortrace-consumer", "Kafka consumer group (one per consumer service)")
    dlq_topic: str = option(DEFAULT_DLQ_TOPIC, "dead-letter topic: undecodable messages, refused records, chunk sets that never complete")
    auto_offset_reset: str = option("earliest", "where a new group starts: earliest (all retained data) or latest")

    # The sink is flushed when it says it is due (size) or when its batch is this old (bounds
    # freshness at low load).
    batch_max_delay_s: float = option(0.25, "flush the sink's batch when it is this old (seconds)")
    # Sealed batches waiting for the flush thread; bounds memory. When full, fetching pauses.
    insert_queue_batches: int = option(2, "sealed batches queued for the flush thread; when full, fetching pauses")

    chunk_timeout_s: float = option(120.0, "a chunk set incomplete this long goes to the dead-letter topic")
    max_pending_chunk_sets: int = option(10_000, "chunk sets reassembled at once; beyond, the oldest is dead-lettered")

    retry_initial_s: float = option(0.2, "first retry delay (flush, dead letters, Kafka connect); doubles up to --retry-max-s")
    retry_max_s: float = option(10.0, "longest retry delay")
    rebalance_flush_timeout_s: float = option(30.0, "on a rebalance, time allowed to flush and commit what was read")

    # A consumer that dies without leaving the group holds its partitions until this expires.
    session_timeout_ms: int = option(10_000, "consumer group session timeout: a dead consumer's partitions move after it")
    # The consume thread must call poll() at least this often, or the client leaves the group (its
    # partitions move; the core then re-joins and re-reads from the last commit).
    max_poll_interval_ms: int = option(300_000, "longest time between two polls before the consumer leaves its group")
    poll_timeout_ms: int = option(100, "longest wait of one poll")
    max_poll_records: int = option(5000, "records per poll")
    fetch_max_bytes: int = option(64 << 20, "bytes per fetch")
    max_partition_fetch_bytes: int = option(16 << 20, "bytes per partition per fetch")

    def consumer_problems(self) -> list[str]:
        """Every problem with the consumer settings, each as "field: why"."""
        out = [f"kafka.{p}" for p in self.kafka.problems()]
        for name in ("topic", "group_id", "dlq_topic"):
            v = getattr(self, name)
            if not v or any(ch.isspace() for ch in v):
                out.append(f"{name}: {v!r} must be a non-empty name without spaces")
        if self.dlq_topic == self.topic:
            out.append("dlq_topic: must differ from topic (a dead letter would be read again)")
        if self.auto_offset_reset not in ("earliest", "latest"):
            out.append(f"auto_offset_reset: {self.auto_offset_reset!r} is not earliest or latest")
        if not 0 < self.batch_max_delay_s <= 60:
            out.append(f"batch_max_delay_s: {self.batch_max_delay_s} not in (0, 60]")
        if self.insert_queue_batches < 1:
            out.append(f"insert_queue_batches: {self.insert_queue_batches} < 1")
        if self.chunk_timeout_s <= 0:
            out.append(f"chunk_timeout_s: {self.chunk_timeout_s} <= 0")
        if self.max_pending_chunk_sets < 1:
            out.append(f"max_pending_chunk_sets: {self.max_pending_chunk_sets} < 1")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            out.append(f"retry_initial_s/retry_max_s: need 0 < {self.retry_initial_s} <= {self.retry_max_s}")
        if not 6_000 <= self.session_timeout_ms <= 300_000:
            out.append(f"session_timeout_ms: {self.session_timeout_ms} not in [6000, 300000] (the broker's default bounds)")
        if self.max_poll_interval_ms < self.session_timeout_ms:
            out.append(f"max_poll_interval_ms: {self.max_poll_interval_ms} < session_timeout_ms {self.session_timeout_ms} "
                       "(the Kafka client refuses it)")
        for name in ("poll_timeout_ms", "max_poll_records", "fetch_max_bytes", "max_partition_fetch_bytes"):
            if getattr(self, name) < 1:
                out.append(f"{name}: {getattr(self, name)} < 1")
        return out
