"""The loader as a service (tensortrace.service.runtime.Service). `tensortrace loader` runs it,
assembled with the query service in tensortrace/compose.py (an embedded chDB engine has one owner,
and the loader package imports no other service):

    tensortrace loader --kafka-bootstrap-servers kafka:9092 --clickhouse-dsn chdb:///var/lib/tensortrace/chdb

`LoaderService` waits for ClickHouse (backing off, stoppable: a loader started while ClickHouse is
down neither crash-loops nor ignores SIGTERM), then runs the Loader until stopped, and beside it
(`--scores-consumer`, on by default) a second consumer that loads the probe service's scores topic
into `probe_scores` through the same client (loader/scores.py). Flags: one per
field of LoaderConfig plus the service runtime's; `tensortrace loader --help` lists them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Callable

from tensortrace.loader.config import LoaderConfig
from tensortrace.loader.metrics import LoaderMetrics
from tensortrace.service.backoff import Backoff

HTTP_PORT = 9465   # /healthz, /readyz, /metrics

log = logging.getLogger("tensortrace.loader")


def _emit(doc: dict) -> None:
    """One JSON line on stderr (scripts and tests read these: devstack.processes.LoaderProcess)."""
    print(json.dumps(doc), file=sys.stderr, flush=True)


class LoaderService:
    """A `tensortrace.service.Service` around `loader.service.Loader`.

    Relies on the Loader's `Loader(cfg)` (connects to ClickHouse and migrates; raises while it is
    unreachable), `.run()`, `.stop()`, `.stats` (LoaderStats), `.ready` (threading.Event: the
    consumer holds partitions), `.live()` and `.client` (for whoever composes a reader on the same
    engine: `on_open`)."""

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.loader = None
        self.on_open: list[Callable] = []   # called with the Loader once ClickHouse is open (run thread)
        self._stop = threading.Event()
        self._idle_stats = None
        self.scores_core = None             # the scores-topic consumer, once ClickHouse is open
        self.scores_stats = None
        self.registry = LoaderMetrics(self).registry

    @property
    def stats(self):
        if self.loader is not None:
            return self.loader.stats
        if self._idle_stats is None:
            from tensortrace.loader.service import LoaderStats
            self._idle_stats = LoaderStats()
        return self._idle_stats

    # -- Service ----------------------------------------------------------------------------------
    def run(self) -> None:
        loader = self._open()
        if loader is None:
            return  # stopped while waiting for ClickHouse
        for fn in self.on_open:
            fn(loader)
        scores_thread = self._start_scores_consumer(loader)
        stop_stats = threading.Event()
        if self.cfg.stats_interval_s > 0:
            def report():
                while not stop_stats.wait(self.cfg.stats_interval_s):
                    _emit(loader.stats.snapshot())
            threading.Thread(target=report, name="loader-stats", daemon=True).start()
        try:
            loader.run()
        finally:
            if scores_thread is not None:
                self.scores_core.stop()
                scores_thread.join(timeout=self.cfg.rebalance_flush_timeout_s + 5)
            stop_stats.set()
            _emit({"final_stats": loader.stats.snapshot()})

    def stop(self) -> None:
        self._stop.set()
        if self.loader is not None:
            self.loader.stop()
        if self.scores_core is not None:
            self.scores_core.stop()

    def live(self) -> bool:
        if self.scores_core is not None and not self.scores_core.live():
            return False
        return self.loader.live() if self.loader is not None else True

    def ready(self) -> bool:
        return self.loader is not None and self.loader.ready.is_set()

    def not_ready_reason(self) -> str:
        if self.loader is None:
            return "ClickHouse not reachable yet"
        return "consumer has not joined the group (no partitions assigned)"

    def ports(self) -> dict[str, int]:
        return {}

    # -- startup -----------------------------------------------------------------------------------
    def _start_scores_consumer(self, loader) -> threading.Thread | None:
        """The probe scores topic -> probe_scores, on the loader's own client (one chDB owner)."""
        if not self.cfg.scores_consumer:
            return None
        from tensortrace.consume import ConsumerCore
        from tensortrace.consume.validate import decode_probe_score
        from tensortrace.loader.scores import ScoresTableSink, ScoresTableStats

        self.scores_stats = ScoresTableStats()
        sink = ScoresTableSink(loader.client, self.cfg.database, retry_initial_s=self.cfg.retry_initial_s,
                               retry_max_s=self.cfg.retry_max_s, stats=self.scores_stats)
        self.scores_core = ConsumerCore(self.cfg.scores_consumer_config(), sink, name="loader-scores",
                                        decode=decode_probe_score)
        if self._stop.is_set():
            self.scores_core.stop()
        t = threading.Thread(target=self.scores_core.run, name="loader-scores-consume", daemon=True)
        t.start()
        return t

    def _open(self):
        """The Loader once ClickHouse answers and the schema is migrated; None if stopped meanwhile."""
        from tensortrace.loader.service import Loader

        backoff = Backoff(self.cfg.retry_initial_s, self.cfg.retry_max_s)
        while not self._stop.is_set():
            try:
                loader = Loader(self.cfg)
            except Exception as e:  # connection refused, auth, DNS: report and retry
                if "EmbeddedServer" in str(e) or "Cannot lock file" in str(e):
                    raise  # another process holds this chdb path: retrying will not help
                _emit({"clickhouse_unavailable": f"{type(e).__name__}: {str(e)[:300]}", "retry_in_s": backoff.delay})
                log.warning("ClickHouse not reachable (%s); retrying in %.1fs", e, backoff.delay)
                if backoff.wait(self._stop):
                    return None
                continue
            self.loader = loader
            if self._stop.is_set():  # stop() came while the Loader was being made
                loader.stop()
            return loader
        return None

