"""Acknowledged sends for the consumer services: the core's dead letters and the probe service's
scores. One librdkafka producer configuration (acks=all, delivery reports for failures only) and one
send that waits for the broker; each caller keeps its own retry policy.

    producer = acked_producer(kafka_config, "tensortrace-probes-g", max_message_bytes=8 << 20, timeout_s=30)
    again, why = send_acked(producer, [(topic, key, value), (topic, key, value, headers)], timeout_s=30)
    # again == []: every message acknowledged; else the messages to send again, and why
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException, Producer

from tensortrace.service.kafka import KafkaConfig


def acked_producer(kc: KafkaConfig, client_id: str, *, max_message_bytes: int, timeout_s: float,
                   error_cb=None, logger: str = "tensortrace.consume.rdkafka") -> Producer:
    conf = kc.rdkafka_conf(client_id=client_id)
    conf.update({"acks": "all", "message.max.bytes": max_message_bytes, "linger.ms": 2,
                 # a message not acknowledged within this comes back as failed (and is sent again)
                 "message.timeout.ms": max(1000, int(timeout_s * 1000)),
                 # success is flush() returning with nothing left and no failure reported: no
                 # Python callback per acknowledged message
                 "delivery.report.only.error": True,
                 "logger": logging.getLogger(logger)})
    if error_cb is not None:
        conf["error_cb"] = error_cb
    return Producer(conf)


def send_acked(producer: Producer, messages: list[tuple], timeout_s: float) -> tuple[list[tuple], str]:
    """Send (topic, key, value[, headers]) messages and wait up to `timeout_s` for the broker to
    acknowledge them all. Returns ([], "") when it did; else the messages to send again (all of them
    when the wait ran out: which ones are missing is not known; a repeat carries the same identity)
    and why."""
    failed: list[tuple] = []
    errors: set[str] = set()

    def on_error(err, msg):   # only failed deliveries are reported (delivery.report.only.error)
        if err is not None:
            failed.append((msg.topic(), msg.key(), msg.value(), msg.headers()))
            errors.add(err.str())
    try:
        for m in messages:
            while True:
                try:
                    producer.produce(m[0], key=m[1], value=m[2], headers=m[3] if len(m) > 3 else None,
                                     on_delivery=on_error)
                    break
                except BufferError:   # librdkafka's local queue is full: let it send
                    producer.poll(0.05)
        left = producer.flush(timeout_s)
    except KafkaException as e:   # a message or configuration librdkafka refuses
        return list(messages), f"{type(e).__name__}: {e}"
    if left:
        return list(messages), f"{left} not acknowledged within {timeout_s:g}s" + (
            f" ({', '.join(sorted(errors))})" if errors else "")
    if failed:
        return failed, ", ".join(sorted(errors))
    return [], ""
