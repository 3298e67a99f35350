"""Publishing to Kafka: kafka-python's KafkaProducer (idempotent, acks=all), bounded by our own
in-flight limits, never blocking the caller on a full buffer.

Completions (acknowledgements and failures) arrive on kafka-python's sender thread; they are
queued and handled on the exporter's main thread by `completions()`, so all accounting happens in
one thread.

    pub = KafkaPublisher(cfg, metrics)
    pub.connect()                  # False while the broker is unreachable; call again later
    pub.last_connect_error         # why not, e.g. "SASL_SSL listener ... authentication failed: ..."
    pub.send(b"r1", value, token)  # token comes back from completions() with the outcome
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time

from tensortrace.exporter.config import CLIENT_ID, ExporterConfig
from tensortrace.exporter.metrics import ExporterMetrics
from tensortrace.service.kafka import KafkaAuthError, KafkaUnavailable, probe

log = logging.getLogger("tensortrace.exporter")

_COMPRESSION = {"zstd": "zstd", "lz4": "lz4", "gzip": "gzip", "none": None}


class KafkaPublisher:
    def __init__(self, cfg: ExporterConfig, metrics: ExporterMetrics):
        self.cfg = cfg
        self.metrics = metrics
        self.producer = None
        self.inflight_bytes = 0
        self.inflight_messages = 0
        self.errors = 0
        self._done: collections.deque = collections.deque()
        self._sent_at: collections.deque = collections.deque()  # monotonic send times, oldest first (approx.)
        self._last_connect_try = 0.0
        self._last_failure = 0.0
        self._last_success = 0.0
        self._connect_error_logged = ""
        self.last_connect_error = ""    # why the last connection attempt failed ("" once connected)
        self.retry_interval_s = 2.0
        self._connect_thread: threading.Thread | None = None
        self.wake = threading.Event()   # set on every completion: the main loop sleeps on it
        self.epoch = 0   # bumped by reset(): completions of an abandoned producer are ignored

    # -- connection ------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.producer is not None

    def ready(self) -> bool:
        """Readiness: a producer exists, deliveries are not failing, and a bootstrap broker accepts
        a TCP connection (probed here, on the caller's thread: the /readyz handler, not the main loop)."""
        if self.producer is None or self._last_failure > self._last_success:
            return False
        for server in self.cfg.kafka.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=1.0).close()
                return True
            except (OSError, ValueError):
                continue
        return False

    def connect(self, retry_interval_s: float = 2.0) -> bool:
        """True when a producer is connected. Otherwise starts (at most one per `retry_interval_s`)
        a background attempt to create it (and the topic when `partitions` > 0) and returns False:
        the main loop keeps scanning rings and serving control while Kafka is unreachable."""
        if self.producer is not None:
            return True
        self.retry_interval_s = retry_interval_s
        now = time.monotonic()
        if (self._connect_thread is not None and self._connect_thread.is_alive()) or \
                now - self._last_connect_try < retry_interval_s:
            return False
        self._last_connect_try = now
        self._connect_thread = threading.Thread(target=self._connect, name="exporter-kafka-connect", daemon=True)
        self._connect_thread.start()
        return False

    def _connect(self) -> None:
        from kafka import KafkaProducer
        cfg = self.cfg
        # kafka-python reports a wrong password, an untrusted certificate or a listener of another
        # protocol as a bare bootstrap timeout; the probe names the cause (KafkaAuthError) and the
        # listener. Either way: log it (once per distinct message), count it, retry later; the
        # records stay in the rings. The password file is read again on every attempt.
        try:
            probe(cfg.kafka, timeout_s=5.0, metadata=False)
        except KafkaUnavailable as e:
            self._connect_failed("auth" if isinstance(e, KafkaAuthError) else "connect", str(e))
            return
        kwargs = dict(
            **cfg.kafka.client_kwargs(CLIENT_ID),
            acks=-1 if str(cfg.acks) in ("all", "-1") else int(cfg.acks),
            compression_type=_COMPRESSION[cfg.compression],
            batch_size=cfg.batch_size,
            linger_ms=cfg.linger_ms,
            max_request_size=cfg.max_request_bytes,
            send_buffer_bytes=cfg.send_buffer_bytes,
            request_timeout_ms=cfg.request_timeout_ms,
            delivery_timeout_ms=cfg.delivery_timeout_ms,
            max_block_ms=5000,
            bootstrap_timeout_ms=3000,
            retry_backoff_ms=200,
            reconnect_backoff_ms=200,
            reconnect_backoff_max_ms=2000,
        )
        if cfg.idempotent:
            kwargs["enable_idempotence"] = True
        else:
            kwargs["enable_idempotence"] = False
        try:
            producer = KafkaProducer(**kwargs)
        except Exception as e:  # NoBrokersAvailable, KafkaTimeoutError, ...
            self._connect_failed("connect", f"{cfg.kafka.describe()}: cannot connect: {type(e).__name__}: {e}")
            return
        try:
            if cfg.partitions:
                self._ensure_topic()
            if producer.partitions_for(cfg.topic) is None:
                raise RuntimeError(f"topic {cfg.topic} has no partitions")
        except Exception as e:
            log.warning("kafka: connected to %s but topic %s is not usable: %s: %s",
                        cfg.kafka.describe(), cfg.topic, type(e).__name__, e)
            self.metrics.kafka_errors.labels("topic").inc()
            producer.close(timeout=1)
            return
        self.producer = producer
        if self._connect_error_logged:
            log.info("kafka: the connection works again (was: %s)", self._connect_error_logged)
        self._connect_error_logged = ""
        self.last_connect_error = ""
        self.metrics.kafka_connected.set(1)
        log.info("kafka: connected to %s, topic %s (compression %s, idempotent %s)",
                 cfg.kafka.describe(), cfg.topic, cfg.compression, cfg.idempotent)

    def _connect_failed(self, kind: str, message: str) -> None:
        self.last_connect_error = message
        if message != self._connect_error_logged:
            log.warning("kafka: %s; retrying every %.0fs, records stay in the rings", message, self.retry_interval_s)
            self._connect_error_logged = message
        self.metrics.kafka_errors.labels(kind).inc()

    def _ensure_topic(self) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError
        kw = self.cfg.kafka.client_kwargs(CLIENT_ID)
        admin = KafkaAdminClient(**{**kw, "client_id": kw["client_id"] + "-admin"})
        try:
            admin.create_topics([NewTopic(self.cfg.topic, self.cfg.partitions, self.cfg.replication_factor)])
            log.info("kafka: created topic %s with %d partitions", self.cfg.topic, self.cfg.partitions)
        except TopicAlreadyExistsError:
            pass
        finally:
            admin.close()

    def reset(self) -> None:
        """Abandon the producer and everything in flight (the caller re-reads those frames from
        the rings); `connect()` makes a new one. Late completions of the old one are ignored."""
        old, self.producer = self.producer, None
        self.epoch += 1
        self.inflight_bytes = self.inflight_messages = 0
        self._sent_at.clear()
        self._done.clear()
        self._last_connect_try = 0.0
        self.metrics.kafka_connected.set(0)
        if old is not None:
            # KafkaProducer.close() flushes first and raises when sends are stuck; force-close its
            # sender instead and mark it closed so its finaliser does not try again.
            try:
                if old._sender is not None:
                    old._sender.force_close()
            except Exception:
                pass
            old._closed = True

    def oldest_inflight_s(self) -> float:
        return time.monotonic() - self._sent_at[0] if self._sent_at else 0.0

    # -- sending ---------------------------------------------------------------------------
    def has_room(self) -> bool:
        cfg = self.cfg
        return (self.inflight_bytes + cfg.max_message_bytes <= cfg.max_inflight_bytes
                and self.inflight_messages < cfg.max_inflight_messages)

    def send(self, key: bytes, value: bytes, token) -> None:
        """Send one message; its outcome comes back from `completions()` with `token`."""
        n = len(value)
        t0 = time.monotonic()
        self.inflight_bytes += n
        self.inflight_messages += 1
        self._sent_at.append(t0)
        done = self._done
        epoch = self.epoch
        try:
            fut = self.producer.send(self.cfg.topic, value=value, key=key)
        except Exception as e:  # the producer could not take it (closed, metadata timeout)
            done.append((token, n, t0, e, epoch))
            return
        wake = self.wake

        def ok(_md):
            done.append((token, n, t0, None, epoch))
            wake.set()

        def failed(exc):
            done.append((token, n, t0, exc, epoch))
            wake.set()

        fut.add_callback(ok)
        fut.add_errback(failed)

    def completions(self):
        """Yield (token, value bytes, send latency seconds, exception or None) for every finished send."""
        done = self._done
        now = time.monotonic()
        observe = self.metrics.send_latency.observe
        while done:
            token, n, t0, exc, epoch = done.popleft()
            if epoch != self.epoch:
                continue  # abandoned by reset(): already accounted as failed
            self.inflight_bytes -= n
            self.inflight_messages -= 1
            if self._sent_at:
                self._sent_at.popleft()
            if exc is None:
                self._last_success = now
                observe(now - t0)
            else:
                self.errors += 1
                self._last_failure = now
                self.metrics.kafka_errors.labels(type(exc).__name__).inc()
            yield token, n, now - t0, exc
        self.metrics.inflight_bytes.set(self.inflight_bytes)
        self.metrics.inflight_messages.set(self.inflight_messages)

    def flush(self, timeout_s: float) -> None:
        if self.producer is not None:
            try:
                self.producer.flush(timeout=timeout_s)
            except Exception as e:
                log.warning("kafka: flush did not finish: %s: %s", type(e).__name__, e)

    def close(self, timeout_s: float = 5.0) -> None:
        if self.producer is not None:
            try:
                self.producer.close(timeout=timeout_s)
            except Exception:
                pass
            self.producer = None
        self.metrics.kafka_connected.set(0)
