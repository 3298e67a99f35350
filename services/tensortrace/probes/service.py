"""`tensortrace probes` as a consumer service: the activation stream -> probe scores, live.

    svc = ProbesService(ProbesConfig(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"),
                                     probe_dir="/etc/tensortrace/probes"))
    threading.Thread(target=svc.run).start(); ...; svc.stop()

Three threads of its own beside the HTTP endpoint's:
  consume   ConsumerCore: poll, decode envelopes, reassemble chunks -> ScoresSink (RequestView
            with keep(): only the payloads some probe needs are held);
  flush     released requests -> every probe that fits -> ProbeScore -> `--scores-topic` (and
            `--escalation-topic` when flagged, not shadow), acks=all; only when Kafka acknowledged
            every score does the core commit the activation offsets behind them;
  reload    every `--reload-interval-s`: a new, changed or removed probe file takes effect (a bad
            file is refused and reported; the others keep scoring).

Nothing here is on an inference thread: a slow probe or a Kafka outage backs the consumer up
(fetching pauses, the group keeps its partitions) and the activations wait in Kafka.

Delivery: at least once, idempotent in effect. A restarted service re-reads from the last commit,
which is behind every request it had not scored (RequestView.commit_offset), and publishes those
scores again with the same identity (trace id, request id, probe, probe hash); the loader's
`probe_scores` table collapses them (ReplacingMergeTree on that identity) and the bridge's span
ids are derived from it.
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Producer

from tensortrace.consume import ConsumerCore
from tensortrace.consume.publish import acked_producer, send_acked
from tensortrace.probes.config import ProbesConfig
from tensortrace.probes.metrics import ProbesMetrics
from tensortrace.probes.service_probeset import ProbeDirectory
from tensortrace.probes.sink import ScoresSink, ScoresStats
from tensortrace.service.backoff import Backoff

log = logging.getLogger("tensortrace.probes")


class ScoresPublisher:
    """Publishes (topic, key, value) messages with acks=all and returns once Kafka acknowledged every
    one; failed sends are retried with backoff (only `stopping` ends the wait, returning False).
    librdkafka (confluent-kafka) batches and sends on its own threads: a score costs the flush
    thread one produce() call, not a Python request of its own."""

    def __init__(self, cfg: ProbesConfig, stats: ScoresStats):
        self.cfg = cfg
        self.stats = stats
        self._producer: Producer | None = None
        self.error = ""

    def _connect(self) -> Producer:
        if self._producer is None:
            self._producer = acked_producer(self.cfg.kafka, f"tensortrace-probes-{self.cfg.group_id}",
                                            max_message_bytes=8 << 20, timeout_s=self.cfg.publish_timeout_s,
                                            logger="tensortrace.probes.rdkafka")
        return self._producer

    def __call__(self, messages: list[tuple[str, bytes, bytes]], stopping: threading.Event) -> bool:
        backoff = Backoff(self.cfg.retry_initial_s, self.cfg.retry_max_s)
        pending = messages
        while True:
            again, problem = send_acked(self._connect(), pending, self.cfg.publish_timeout_s)
            if not again:
                self.error = ""
                return True
            self.error = f"{len(again)} of {len(pending)} scores not acknowledged: {problem[:300]}"
            pending = again
            self.stats.publish_failures += 1
            log.error("publishing scores failed (%s); retrying", self.error)
            if backoff.wait(stopping):
                return False

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None


class ProbesService:
    """`tensortrace probes` as a `tensortrace.service.Service` (module docstring)."""

    def __init__(self, cfg: ProbesConfig):
        self.cfg = cfg.validate()
        self.stats = ScoresStats()
        self.probes = ProbeDirectory(cfg.probe_dir, model_id=cfg.model_id, hidden_size=cfg.hidden_size,
                                     shadow=cfg.shadow, shadow_names=cfg.shadow_names, thresholds=cfg.thresholds)
        self.probes.reload(force=True)
        self.publisher = ScoresPublisher(cfg, self.stats)
        self.metrics = ProbesMetrics(self)
        self.registry = self.metrics.registry
        self.sink = ScoresSink(self.probes, self.publisher, scores_topic=cfg.scores_topic,
                               escalation_topic=cfg.escalation_topic, timeout_s=cfg.request_timeout_s,
                               max_requests=cfg.max_open_requests, max_bytes=cfg.max_open_bytes,
                               retry_initial_s=cfg.retry_initial_s, retry_max_s=cfg.retry_max_s,
                               token_scores=cfg.token_scores, max_token_scores=cfg.max_token_scores,
                               stats=self.stats, on_durable=self.metrics.observe_scores)
        self.core = ConsumerCore(cfg, self.sink, name="probes")
        self._stop = threading.Event()
        self._reloader: threading.Thread | None = None

    # -- Service ----------------------------------------------------------------------------------

    def run(self) -> None:
        self._reloader = threading.Thread(target=self._reload_loop, name="probes-reload", daemon=True)
        self._reloader.start()
        try:
            self.core.run()
        finally:
            self._stop.set()
            self._reloader.join(timeout=5)
            self.publisher.close()

    def stop(self) -> None:
        self._stop.set()
        self.core.stop()

    def live(self) -> bool:
        return self.core.live() and (self._reloader is None or self._reloader.is_alive() or self._stop.is_set())

    def ready(self) -> bool:
        return self.core.ready.is_set()

    def not_ready_reason(self) -> str:
        return self.core.kafka_error or "consumer has not joined the group (no partitions assigned)"

    def ports(self) -> dict[str, int]:
        return {}

    # -- hot reload -------------------------------------------------------------------------------

    def _reload_loop(self) -> None:
        while not self._stop.wait(self.cfg.reload_interval_s):
            try:
                self.probes.reload(settle=True)
            except Exception:   # a reload bug must not stop scoring with the probes already loaded
                self.probes.reload_failures += 1
                log.exception("reloading %s failed; the loaded probes keep scoring", self.cfg.probe_dir)

    def reload_now(self) -> bool:
        """Re-read the probe directory now (tests, benchmarks); True when it changed."""
        return self.probes.reload()

    def wait_idle(self, timeout_s: float = 30.0) -> bool:   # benchmarks: nothing open, nothing queued
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sink.view.stats.requests_open == 0:
                return True
            time.sleep(0.05)
        return False
