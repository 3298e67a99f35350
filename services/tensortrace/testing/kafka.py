"""Kafka for tests: topics that are ready (every partition has a leader) before a test uses them, and
a consumer group's committed offsets against the end of the log.

    topic = create_topics(bootstrap, partitions=3, dlq=True)     # also f"{topic}.dlq", 1 partition
    ends = end_offsets(bootstrap, topic, 3)                       # {partition: offset}
    assert wait_until(lambda: committed(bootstrap, "g-loader", topic, 3) == ends)
    produce(bootstrap, topic, [b"a", b"b"])                       # acks=all, keys b"0", b"1"
    consume_all(bootstrap, topic, 2, partitions=3)                # {partition: [(key, value), ...]}

Extra keyword arguments go to every kafka-python client this module opens (e.g. security_protocol,
sasl_mechanism, sasl_plain_username for a SASL listener). Each call opens its own client and closes
it: right after a broker restart a long-lived kafka-python client can sit in reconnect backoff.

>>> unique_topic_name("tt-test_x[1]").startswith("tt-test_x-1-")
True
"""

from __future__ import annotations

import re
import time
import uuid


def unique_topic_name(prefix: str = "tt") -> str:
    """`<prefix>-<10 hex digits>`, the prefix cut to characters and a length Kafka accepts."""
    prefix = re.sub(r"[^a-zA-Z0-9_-]+", "-", prefix)[:60].strip("-") or "tt"
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topics(bootstrap: str, partitions: int = 1, *, name: str | None = None, prefix: str = "tt",
                  dlq: bool = False, replication: int = 1, configs: dict[str, str] | None = None,
                  timeout_s: float = 60.0, **client) -> str:
    """Create a topic (a unique name unless `name` is given; `dlq`: also `<name>.dlq`, one partition)
    and return its name once every partition has a leader. `configs` are topic configs by their Kafka
    names ({"min.insync.replicas": "2"}). Retried until `timeout_s` while the broker cannot be
    reached (a test that just restarted it)."""
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    name = name or unique_topic_name(prefix)
    wanted = {name: partitions, **({f"{name}.dlq": 1} if dlq else {})}
    deadline = time.monotonic() + timeout_s
    first_attempt = True
    while True:
        try:
            admin = admin_client(bootstrap, **client)
            try:
                for topic, n in wanted.items():
                    try:
                        admin.create_topics([NewTopic(topic, n, replication,
                                                      topic_configs=dict(configs or {}) if topic == name else {})])
                    except TopicAlreadyExistsError:
                        if first_attempt:
                            raise
                        # created by an earlier attempt that failed afterwards
                _wait_for_leaders(admin, wanted, deadline)
                return name
            finally:
                admin.close()
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            first_attempt = False
            time.sleep(0.5)


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1, **client) -> dict[int, int]:
    """{partition: the group's committed offset}; 0 where it never committed."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False, **client)
    try:
        return {p: c.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)}
    finally:
        c.close()


def end_offsets(bootstrap: str, topic: str, partitions: int = 1, **client) -> dict[int, int]:
    """{partition: the offset the next message will get}."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, **client)
    try:
        ends = c.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        c.close()


def produce(bootstrap, topic: str, values: list[bytes], **client) -> None:
    """Send `values` (keys b"0", b"1", ...) with acks=all and return once every one is acknowledged."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, **client)
    try:
        for i, v in enumerate(values):
            producer.send(topic, key=str(i).encode(), value=v)
        producer.flush(30)
    finally:
        producer.close(10)


def consume_all(bootstrap, topic: str, expected: int, partitions: int = 1, *, timeout_s: float = 60.0,
                **client) -> dict[int, list[tuple[bytes | None, bytes]]]:
    """Every record of the topic from the beginning: {partition: [(key, value), ...]} in offset
    order. Reads until `expected` records came (or `timeout_s`), then polls once more, so that
    duplicates behind the expected count show."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                             **client)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: dict[int, list] = {p: [] for p in range(partitions)}
        deadline = time.monotonic() + timeout_s
        while sum(map(len, out.values())) < expected and time.monotonic() < deadline:
            for tp, batch in consumer.poll(timeout_ms=500).items():
                out[tp.partition].extend((m.key, m.value) for m in batch)
        for tp, batch in consumer.poll(timeout_ms=500).items():
            out[tp.partition].extend((m.key, m.value) for m in batch)
        return out
    finally:
        consumer.close()


def admin_client(bootstrap: str, **client):
    """A new KafkaAdminClient (the caller closes it)."""
    from kafka import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tensortrace-tests",
                            request_timeout_ms=30_000, **client)


def _wait_for_leaders(admin, wanted: dict[str, int], deadline: float) -> None:
    while True:
        try:
            described = {d.get("name", d.get("topic")): d for d in admin.describe_topics(list(wanted))}
            if all(_all_led(described.get(t) or {}, n) for t, n in wanted.items()):
                return
        except Exception:   # metadata not there yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics {sorted(wanted)}: partitions without a leader")
        time.sleep(0.05)


def _all_led(desc: dict, partitions: int) -> bool:
    parts = desc.get("partitions") or []
    return len(parts) == partitions and all(p.get("leader_id", -1) >= 0 and p.get("error_code", 0) == 0
                                            for p in parts)
