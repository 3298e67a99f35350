"""The loader: the activation topic -> ClickHouse, exactly-once in effect. A sink on the consumer core.

    loader = Loader(LoaderConfig(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"), clickhouse_dsn="chdb:///tmp/tt"))
    threading.Thread(target=loader.run).start(); ...; loader.stop()

`tensortrace.consume.ConsumerCore` reads the topic (poll, decode, chunk reassembly, offsets,
rebalances, dead letters; its docstring says why nothing is lost). This module is the sink:
  consume thread  records -> a ColumnBatch (rows/bytes/time bounded);
  flush thread    the batch's Arrow tables into activations and requests (ThreadSafeClient.
                  insert_arrow_batch: on embedded chDB the engine reads the Arrow buffers in place),
                  retrying with backoff until ClickHouse accepts; only then may the core commit the
                  offsets read before it.

Why each record ends up in ClickHouse once (docs/storage.md, "Exactly once"):
  * a re-read after a crash or rebalance re-inserts rows with the same dedup identity
    (producer pod, pid, generation, seq); both tables are ReplacingMergeTree on it, and every read
    collapses on it (the tensor read drops repeats, summaries use FINAL) -> nothing is counted twice;
  * a retried insert of the same batch carries the same insert_deduplication_token (topic,
    partition, offset range), so ClickHouse drops it before it even becomes a part.
Activations are inserted with optimize_on_insert = 0: ReplacingMergeTree would otherwise collapse
duplicate identities inside each inserted block, a merge pass that copies every column again (about
a quarter of the engine's CPU per GB of 4 KiB rows; docs/BENCHMARKS.md, loader, session 6). Nothing
relies on it: duplicates from re-reads land in different blocks anyway, and reads collapse them (above).

Forgotten requests stay forgotten: a Kafka record cannot be deleted, so a request removed by
`tensortrace forget` comes back if its records are read again (a restart before a commit, an offset
reset, records in flight at the forget). `run()` therefore also sweeps every `forget_sweep_s`
(storage/forget.py: Forgetter.sweep), deleting again whatever matches an id in the `forgotten`
table; `stats.forget_swept_rows` counts what it deleted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tensortrace.consume import ConsumerCore, ConsumerStats, SealedBatch, Source
from tensortrace.loader.config import LoaderConfig
from tensortrace.loader.rows import ColumnBatch
from tensortrace.service.backoff import Backoff
from tensortrace.storage import ThreadSafeClient, schema

log = logging.getLogger("tensortrace.loader")


@dataclass
class LoaderStats(ConsumerStats):
    """The core's counters plus the ClickHouse sink's (monotonic)."""
    tensor_rows: int = 0            # rows accepted by ClickHouse (includes re-inserted duplicates)
    summary_rows: int = 0
    payload_bytes: int = 0
    batches: int = 0
    insert_failures: int = 0
    last_insert_error: str = ""
    insert_path: str = ""           # how batches go into ClickHouse (storage/client.py: chdb-python | insert_arrow)
    # where the time goes (seconds, cumulative): the flush thread building Arrow tables, and
    # waiting on ClickHouse inserts (decode_seconds, on the consume thread, is the core's)
    arrow_seconds: float = 0.0
    insert_seconds: float = 0.0
    # capture -> queryable, per activation row: the insert's return minus the row's capture time
    # (cumulative histogram counts per FRESHNESS_BUCKETS upper bound, then +Inf; seconds)
    freshness_counts: list = field(default_factory=lambda: [0] * (len(FRESHNESS_BUCKETS) + 1))
    freshness_sum: float = 0.0
    # `tensortrace forget` sweeps (storage/forget.py): runs, and rows of forgotten requests that a
    # Kafka re-read had inserted again and the sweep deleted
    forget_sweeps: int = 0
    forget_swept_rows: int = 0

    def observe_freshness(self, capture_ns, now_ns: int) -> None:
        if not len(capture_ns):
            return
        lag = (now_ns - np.asarray(capture_ns, dtype=np.int64)) / 1e9
        idx = np.searchsorted(FRESHNESS_BUCKETS, lag, side="left")   # first bound >= lag
        for i, n in enumerate(np.bincount(idx, minlength=len(FRESHNESS_BUCKETS) + 1)):
            self.freshness_counts[i] += int(n)
        self.freshness_sum += float(lag.sum())


FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class ClickHouseSink:
    """Records -> column batches -> ClickHouse (a `tensortrace.consume.Sink`)."""

    def __init__(self, config: LoaderConfig, client, stats: LoaderStats):
        self.config = config
        self.client = client
        self.stats = stats
        self.columns = ColumnBatch()
        # Called on the flush thread after ClickHouse accepted a batch: (ColumnBatch, time_ns),
        # the moment its rows became queryable; the benchmark measures freshness with it.
        self.on_inserted = None

    # consume thread
    def add_tensor(self, rec, source: Source) -> None:
        self.columns.add_tensor(rec, source.partition, source.offset)

    def add_summary(self, summary, source: Source) -> None:
        self.columns.add_summary(summary, source.partition, source.offset)

    def add_scan(self, sc, source: Source) -> list:
        """A natively scanned envelope (tensortrace.wire.native): rows without a Python object each.
        The same records add_tensor / add_summary would get (ConsumerCore's docstring): a filter added to
        those (e.g. for a forgotten request) must be applied here too, on the scan's columns."""
        return self.columns.add_scan(sc, source.partition, source.offset)

    def due(self) -> bool:
        c = self.columns
        return c.rows >= self.config.batch_max_rows or c.payload_bytes >= self.config.batch_max_bytes

    def seal(self) -> ColumnBatch | None:
        c = self.columns
        if not c.rows:
            return None
        self.columns = ColumnBatch()
        return c

    # flush thread
    def flush(self, batch: SealedBatch, stopping: threading.Event) -> bool:
        """Insert a batch, retrying until ClickHouse accepts it. False: gave up because of stop
        (the batch is then not committed, so the next loader re-reads it)."""
        c: ColumnBatch = batch.data
        token = batch.token()
        now = time.time_ns()
        db = self.config.database
        work = []
        t0 = time.perf_counter()
        if c.tensor_rows:
            work.append((f"{db}.activations", c.activations_table(now),
                         {"insert_deduplication_token": f"a:{token}", "optimize_on_insert": 0}))
        if c.summary_rows:
            work.append((f"{db}.requests", c.requests_table(now), {"insert_deduplication_token": f"r:{token}"}))
        t1 = time.perf_counter()
        self.stats.arrow_seconds += t1 - t0
        for table, arrow, settings in work:
            backoff = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
            while True:
                try:
                    self.stats.insert_path = self.client.insert_arrow_batch(table, arrow, settings)
                    break
                except Exception as e:  # any client/engine/network error: back off and retry
                    self.stats.insert_failures += 1
                    self.stats.last_insert_error = f"{type(e).__name__}: {e}"[:500]
                    log.error("insert into %s failed (%s); retrying", table, self.stats.last_insert_error)
                    if backoff.wait(stopping):
                        return False
        self.stats.insert_seconds += time.perf_counter() - t1
        done = time.time_ns()
        self.stats.observe_freshness(c.capture_times(), done)
        if self.on_inserted is not None:
            self.on_inserted(c, done)
        self.stats.batches += 1
        self.stats.tensor_rows += c.tensor_rows
        self.stats.summary_rows += c.summary_rows
        self.stats.payload_bytes += c.payload_bytes
        return True


class Loader:
    """The loader service: a ClickHouseSink driven by a ConsumerCore."""

    def __init__(self, config: LoaderConfig, client=None, producer=None):
        self.config = config.validate()
        raw = client if client is not None else schema.connect(config.clickhouse_dsn)
        self.client = raw if isinstance(raw, ThreadSafeClient) else ThreadSafeClient(raw)
        schema.apply_migrations(self.client, config.database, config.ttl_days, config.payload_codec,
                                config.recompress_after_hours, config.recompress_codec, retention=config.retention)
        self._sweep_stop = threading.Event()
        self.stats = LoaderStats()
        self.sink = ClickHouseSink(self.config, self.client, self.stats)
        self.core = ConsumerCore(self.config, self.sink, name="loader", stats=self.stats, producer=producer)

    @property
    def ready(self) -> threading.Event:
        """Set once the consumer has joined the group and holds partitions."""
        return self.core.ready

    @property
    def assigned(self):
        return self.core.assigned

    @property
    def on_inserted(self):
        return self.sink.on_inserted

    @on_inserted.setter
    def on_inserted(self, fn) -> None:
        self.sink.on_inserted = fn

    def live(self) -> bool:
        return self.core.live()

    def run(self) -> None:
        """Consume until stop(); flushes and commits what it read before returning. With
        `forget_sweep_s`, a thread re-deletes forgotten requests that a Kafka re-read brought back."""
        sweeper = None
        if self.config.forget_sweep_s > 0:
            sweeper = threading.Thread(target=self._sweep_loop, name="loader-forget-sweep", daemon=True)
            sweeper.start()
        try:
            self.core.run()
        finally:
            self._sweep_stop.set()
            if sweeper is not None:
                sweeper.join(timeout=30)

    def sweep_forgotten(self) -> int:
        """One forget sweep (storage/forget.py): rows deleted again because they came back."""
        from tensortrace.storage.forget import Forgetter

        odb, _, table = self.config.forget_traces_table.rpartition(".")
        reps = Forgetter(self.client, self.config.database, odb or "otel", table).sweep()
        n = sum(sum(r.deleted.values()) for r in reps)
        self.stats.forget_sweeps += 1
        self.stats.forget_swept_rows += n
        return n

    def _sweep_loop(self) -> None:
        while not self._sweep_stop.wait(self.config.forget_sweep_s):
            try:
                self.sweep_forgotten()
            except Exception as e:   # ClickHouse down or busy: the next sweep tries again
                log.warning("forget sweep failed (%s: %s); retrying in %.0fs", type(e).__name__, str(e)[:300],
                            self.config.forget_sweep_s)

    def stop(self) -> None:
        self._sweep_stop.set()
        self.core.stop()
