"""The loader: Kafka consumer group -> ClickHouse, exactly-once in effect.

>>> loader = Loader(LoaderConfig(bootstrap="127.0.0.1:9092", clickhouse_dsn="chdb:///tmp/tt"))
>>> threading.Thread(target=loader.run).start(); ...; loader.stop()

Two threads, one bounded queue between them:
  consume thread  poll -> decode envelopes -> reassemble chunks -> column batch (rows/bytes/time
                  bounded) -> insert queue; commits the offsets the insert thread reports done.
                  (KafkaConsumer is not thread-safe, so every consumer call stays on this thread.)
  insert thread   insert_arrow into activations and requests, retrying with backoff until ClickHouse
                  accepts; then reports the batch's offsets as safe to commit.

Why each record ends up in ClickHouse once (docs/storage.md, "Exactly once"):
  * offsets are committed only after ClickHouse accepted every row read before them, and never past
    the first message of a chunk set still being reassembled -> nothing is lost;
  * a re-read after a crash or rebalance re-inserts rows with the same dedup identity
    (producer pod, pid, generation, seq); both tables are ReplacingMergeTree on it, and every read
    collapses on it (the tensor read drops repeats, summaries use FINAL) -> nothing is counted twice;
  * a retried insert of the same batch carries the same insert_deduplication_token (topic,
    partition, offset range), so ClickHouse drops it before it even becomes a part.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from tensortrace.loader import schema
from tensortrace.loader.config import LoaderConfig
from tensortrace.loader.rows import ColumnBatch, InvalidRecord
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

log = logging.getLogger("tensortrace.loader")

DLQ_REASON_HEADER = "tensortrace.dlq.reason"
DLQ_SOURCE_HEADER = "tensortrace.dlq.source"  # "topic/partition/offset"


class ThreadSafeClient:
    """Serialises calls on one clickhouse-connect client: the loader's insert thread and the query
    service's handlers share the process's single chDB engine."""

    def __init__(self, client):
        self.client = client
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)
        return locked


@dataclass
class LoaderStats:
    """Counters (monotonic). dlq_by_reason keys are short reason classes, see _dlq_class."""
    messages: int = 0
    tensor_rows: int = 0            # rows accepted by ClickHouse (includes re-inserted duplicates)
    summary_rows: int = 0
    payload_bytes: int = 0
    batches: int = 0
    insert_failures: int = 0
    commits: int = 0
    commit_failures: int = 0
    dlq_messages: int = 0
    dlq_by_reason: dict[str, int] = field(default_factory=dict)
    last_insert_error: str = ""
    # where the time goes (seconds, cumulative): consume thread decoding + building rows,
    # insert thread building Arrow tables, and waiting on ClickHouse inserts
    decode_seconds: float = 0.0
    arrow_seconds: float = 0.0
    insert_seconds: float = 0.0

    def snapshot(self) -> dict:
        d = dict(self.__dict__)
        d["dlq_by_reason"] = dict(self.dlq_by_reason)
        return d


@dataclass
class _Batch:
    columns: ColumnBatch
    commit: dict[TopicPartition, int]          # offsets to commit once inserted
    ranges: dict[TopicPartition, list[int]]    # first/last offset read per partition (dedup token)
    created: float


def _dlq_class(reason: str) -> str:
    for key in ("envelope", "chunks", "raw_size", "dtype", "encoding", "trace_id", "span_id", "token range", "positions"):
        if key in reason:
            return key.replace(" ", "_")
    return "invalid_record"


class Loader:
    def __init__(self, config: LoaderConfig, client=None, producer=None):
        self.config = config.validate()
        raw = client if client is not None else schema.connect(config.clickhouse_dsn)
        self.client = raw if isinstance(raw, ThreadSafeClient) else ThreadSafeClient(raw)
        schema.apply_migrations(self.client, config.database, config.ttl_days, config.payload_codec,
                                config.recompress_after_hours, config.recompress_codec)
        self.stats = LoaderStats()
        self._stop = threading.Event()
        self._insert_q: queue.Queue[_Batch | None] = queue.Queue(maxsize=config.insert_queue_batches)
        self._done_q: queue.Queue[dict[TopicPartition, int]] = queue.Queue()
        self._assembler = codec.ChunkAssembler(timeout_s=config.chunk_timeout_s,
                                               max_pending=config.max_pending_chunk_sets)
        # chunk set key -> (partition, offset of its first chunk): commits never pass it.
        self._holds: dict[tuple, tuple[TopicPartition, int]] = {}
        self._producer = producer
        self._consumer: KafkaConsumer | None = None
        self._batch = self._new_batch()
        self._read_upto: dict[TopicPartition, int] = {}   # next offset to read, per partition
        self._committed: dict[TopicPartition, int] = {}
        self._inflight = 0
        self._inflight_lock = threading.Condition()
        self.assigned: set[TopicPartition] = set()
        # Called on the insert thread after ClickHouse accepted a batch: (ColumnBatch, time_ns).
        # The moment the rows became queryable; the benchmark measures freshness with it.
        self.on_inserted = None
        self.ready = threading.Event()   # set once the consumer has joined the group

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Consume until stop(); flushes and commits what it read before returning."""
        cfg = self.config
        inserter = threading.Thread(target=self._insert_loop, name="loader-insert", daemon=True)
        inserter.start()
        self._consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap.split(","), group_id=cfg.group_id,
            enable_auto_commit=False, auto_offset_reset=cfg.auto_offset_reset,
            max_poll_records=cfg.max_poll_records, fetch_max_bytes=cfg.fetch_max_bytes,
            max_partition_fetch_bytes=cfg.max_partition_fetch_bytes,
            session_timeout_ms=cfg.session_timeout_ms, heartbeat_interval_ms=max(1000, cfg.session_timeout_ms // 3),
            client_id=f"tensortrace-loader-{cfg.group_id}")
        self._consumer.subscribe([cfg.topic], listener=_Rebalance(self))
        try:
            while not self._stop.is_set():
                self._commit_done()
                polled = self._consumer.poll(timeout_ms=cfg.poll_timeout_ms)
                if not self.ready.is_set() and self._consumer.assignment():
                    self.ready.set()
                t0 = time.perf_counter()
                for tp, messages in polled.items():
                    for m in messages:
                        self._handle_message(tp, m)
                self.stats.decode_seconds += time.perf_counter() - t0
                self._expire_chunks()
                self._maybe_hand_off()
            self._hand_off()
            self._drain(timeout_s=cfg.rebalance_flush_timeout_s)
        finally:
            self._stop.set()  # also on an exception: the insert thread must not retry forever
            self._insert_q.put(None)
            inserter.join(timeout=cfg.rebalance_flush_timeout_s)
            self._commit_done()
            self._consumer.close(autocommit=False)
            if self._producer is not None:
                self._producer.flush(timeout=10)
                self._producer.close(timeout=10)

    # -- consume side ---------------------------------------------------------------------------

    def _new_batch(self) -> _Batch:
        return _Batch(ColumnBatch(), {}, {}, time.monotonic())

    def _handle_message(self, tp: TopicPartition, m) -> None:
        self.stats.messages += 1
        b = self._batch
        r = b.ranges.setdefault(tp, [m.offset, m.offset])
        r[1] = m.offset
        self._read_upto[tp] = m.offset + 1
        try:
            records = codec.decode_envelope(m.value)
        except codec.WireError as e:
            self._dead_letter(tp, m.offset, m.key, m.value, f"envelope: {e}")
            return
        for rec in records:
            kind = rec.WhichOneof("kind")
            try:
                if kind == "summary":
                    b.columns.add_summary(rec.summary, tp.partition, m.offset)
                    continue
                t = rec.tensor
                if t.chunk_count > 1:
                    key = codec.record_key(t)
                    self._holds.setdefault(key, (tp, m.offset))
                    whole = self._assembler.add(t)
                    if whole is None:
                        continue
                    self._holds.pop(key, None)
                    t = whole
                b.columns.add_tensor(t, tp.partition, m.offset)
            except (InvalidRecord, codec.WireError) as e:
                if kind == "tensor" and rec.tensor.chunk_count > 1:
                    self._holds.pop(codec.record_key(rec.tensor), None)  # the assembler dropped the set
                self._dead_letter(tp, m.offset, m.key, codec.encode_envelope([rec]), str(e))

    def _expire_chunks(self) -> None:
        for key, parts, reason in self._assembler.expire():
            hold = self._holds.pop(key, None)
            tp, offset = hold if hold else (None, -1)
            self._dead_letter(tp, offset, (parts[0].request_id.encode() if parts else None),
                              codec.encode_envelope(parts), f"chunks: {reason} ({len(parts)} of {parts[0].chunk_count if parts else '?'} arrived)")

    def _dead_letter(self, tp, offset: int, key, value: bytes, reason: str) -> None:
        """Send one message to the DLQ and wait for the broker's ack (the offset after it may be
        committed only once the dead letter is safe)."""
        cls = _dlq_class(reason)
        log.warning("dead letter (%s) from %s@%s: %s", cls, tp, offset, reason)
        if self._producer is None:
            self._producer = KafkaProducer(bootstrap_servers=self.config.bootstrap.split(","), acks="all",
                                           max_request_size=16 << 20)
        source = f"{tp.topic}/{tp.partition}/{offset}" if tp is not None else "unknown"
        headers = [(DLQ_REASON_HEADER, reason.encode()), (DLQ_SOURCE_HEADER, source.encode())]
        delay = self.config.retry_initial_s
        while True:
            try:
                self._producer.send(self.config.dlq_topic, key=key, value=value, headers=headers).get(timeout=30)
                break
            except KafkaError as e:
                if self._stop.is_set():
                    raise
                log.error("dead-letter topic %s not writable (%s); retrying in %.1fs", self.config.dlq_topic, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)
        self.stats.dlq_messages += 1
        self.stats.dlq_by_reason[cls] = self.stats.dlq_by_reason.get(cls, 0) + 1

    def _commit_positions(self) -> dict[TopicPartition, int]:
        """Per partition: the next offset to read, held back to the first chunk of any open set."""
        out = dict(self._read_upto)
        for tp, offset in self._holds.values():
            if tp in out and offset < out[tp]:
                out[tp] = offset
        return {tp: o for tp, o in out.items() if o > self._committed.get(tp, -1)}

    def _maybe_hand_off(self) -> None:
        b, cfg = self._batch, self.config
        full = b.columns.rows >= cfg.batch_max_rows or b.columns.payload_bytes >= cfg.batch_max_bytes
        due = time.monotonic() - b.created >= cfg.batch_max_delay_s
        if full or (due and (b.columns.rows or b.ranges or self._commit_positions())):
            self._hand_off()
        elif due:
            b.created = time.monotonic()

    def _hand_off(self, in_rebalance: bool = False) -> bool:
        """Queue the current batch for insertion. False: gave up (only inside a rebalance, after
        rebalance_flush_timeout_s); the batch is then dropped uncommitted, so it is re-read."""
        b = self._batch
        self._batch = self._new_batch()
        b.commit = self._commit_positions()
        if not b.columns.rows and not b.commit:
            return True
        with self._inflight_lock:
            self._inflight += 1
        # Bounded queue: when the insert side is behind (or ClickHouse is down), pause fetching
        # but keep polling so the group membership stays alive (not from inside a rebalance
        # callback, which already runs inside poll()).
        deadline = time.monotonic() + self.config.rebalance_flush_timeout_s
        while True:
            try:
                self._insert_q.put(b, timeout=0.1)
                return True
            except queue.Full:
                self._commit_done()
                if in_rebalance:
                    if time.monotonic() > deadline:
                        with self._inflight_lock:
                            self._inflight -= 1
                        return False
                elif self._consumer is not None:
                    assigned = self._consumer.assignment()
                    self._consumer.pause(*assigned)
                    self._consumer.poll(timeout_ms=0)
                    self._consumer.resume(*assigned)

    def _commit_done(self) -> None:
        offsets: dict[TopicPartition, int] = {}
        while True:
            try:
                offsets.update(self._done_q.get_nowait())
            except queue.Empty:
                break
        if not offsets or self._consumer is None:
            return
        mine = {tp: o for tp, o in offsets.items() if tp in self.assigned}
        if not mine:
            return
        try:
            self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in mine.items()})
            self._committed.update(mine)
            self.stats.commits += 1
        except (CommitFailedError, KafkaError) as e:
            # Rebalanced away: the new owner re-reads from the last commit; duplicates collapse.
            self.stats.commit_failures += 1
            log.warning("offset commit failed (%s); the records will be re-read and deduplicated", e)

    def _drain(self, timeout_s: float) -> bool:
        """Wait until every handed-off batch is inserted, then commit. False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._inflight_lock:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_lock.wait(timeout=0.1)
            ok = self._inflight == 0
        self._commit_done()
        return ok

    def _on_revoked(self, revoked) -> None:
        self._hand_off(in_rebalance=True)
        self._drain(timeout_s=self.config.rebalance_flush_timeout_s)
        revoked = set(revoked)
        for key in [k for k, (tp, _) in self._holds.items() if tp in revoked]:
            self._holds.pop(key)
            self._assembler._pending.pop(key, None)  # the new owner re-reads these chunks
        for tp in revoked:
            self._read_upto.pop(tp, None)
            self._committed.pop(tp, None)
        self.assigned -= revoked

    def _on_assigned(self, assigned) -> None:
        self.assigned |= set(assigned)
        for tp in assigned:
            self._committed.pop(tp, None)

    # -- insert side ----------------------------------------------------------------------------

    def _insert_loop(self) -> None:
        while True:
            b = self._insert_q.get()
            if b is None:
                return
            try:
                if self._insert(b):
                    self._done_q.put(b.commit)
            finally:
                with self._inflight_lock:
                    self._inflight -= 1
                    self._inflight_lock.notify_all()

    def _insert(self, b: _Batch) -> bool:
        """Insert a batch, retrying until ClickHouse accepts it. False: gave up because of stop()
        (the batch is then not committed, so the next loader re-reads it)."""
        c = b.columns
        if not c.rows:
            return True
        token = ";".join(f"{tp.topic}/{tp.partition}/{lo}-{hi}" for tp, (lo, hi) in sorted(b.ranges.items()))
        now = time.time_ns()
        db = self.config.database
        work = []
        t0 = time.perf_counter()
        if c.tensor_rows:
            work.append((f"{db}.activations", c.activations_table(now), f"a:{token}"))
        if c.summary_rows:
            work.append((f"{db}.requests", c.requests_table(now), f"r:{token}"))
        t1 = time.perf_counter()
        self.stats.arrow_seconds += t1 - t0
        for table, arrow, tok in work:
            delay = self.config.retry_initial_s
            while True:
                try:
                    self.client.insert_arrow(table, arrow, settings={"insert_deduplication_token": tok})
                    break
                except Exception as e:  # any client/engine/network error: back off and retry
                    self.stats.insert_failures += 1
                    self.stats.last_insert_error = f"{type(e).__name__}: {e}"[:500]
                    log.error("insert into %s failed (%s); retrying in %.1fs", table, self.stats.last_insert_error, delay)
                    if self._stop.wait(delay):
                        return False
                    delay = min(delay * 2, self.config.retry_max_s)
        self.stats.insert_seconds += time.perf_counter() - t1
        if self.on_inserted is not None:
            self.on_inserted(c, time.time_ns())
        self.stats.batches += 1
        self.stats.tensor_rows += c.tensor_rows
        self.stats.summary_rows += c.summary_rows
        self.stats.payload_bytes += c.payload_bytes
        return True


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, loader: Loader):
        self.loader = loader

    def on_partitions_revoked(self, revoked):
        self.loader._on_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.loader._on_assigned(assigned)
