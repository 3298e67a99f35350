"""The consumer core: the one implementation of reading the activation topic.

    core = ConsumerCore(ConsumerConfig(group_id="my-sink"), MySink(), name="my-sink")
    threading.Thread(target=core.run).start(); ...; core.stop()

Two threads, one bounded queue between them:
  consume thread  poll -> decode envelopes -> reassemble chunks -> sink.add_tensor / add_summary;
                  seals the sink's batch when it is due (or batch_max_delay_s old) and queues it;
                  commits the offsets the flush thread reports durable. Every call to the Kafka
                  consumer stays on this thread, and librdkafka runs the rebalance callbacks only
                  inside those calls, so they run here too.
  flush thread    sink.flush(batch) until the sink says it is durable; then reports the batch's
                  offsets as safe to commit.

Why nothing is lost and nothing is counted twice (docs/consumers.md):
  * an offset is committed only once every record read before it is durable in the sink, and never
    past the first message of a chunk set still being reassembled, nor past the first record of
    anything the sink still holds (`commit_offset`, e.g. a request not yet released) -> a crash or a
    rebalance re-reads from there, nothing is lost;
  * a re-read delivers records again with the same identity (producer pod, pid, generation, seq):
    sinks are idempotent on it (the loader's tables collapse on it; the per-request view
    de-duplicates; span and score ids are derived from it);
  * a message that cannot be decoded, a record a sink refuses (InvalidRecord) and a chunk set that
    never completes go to the dead-letter topic with a typed reason, acknowledged by the broker
    before the offset after them may be committed.
Foreign payloads (`decode=`): a topic whose messages are not v1 envelopes (the bridge's spans
topic holds OTLP ExportTraceServiceRequests) is read by the same core with a decoder,
`ConsumerCore(config, sink, decode=fn)`: each message's value goes through `fn(value)` and what it
returns to `sink.add_message(decoded, source)` (no chunk reassembly, no add_tensor/add_summary).
`fn` raises InvalidRecord for a message it cannot decode, which is dead-lettered as it came. Offsets,
batching, backpressure, rebalances and dead letters are the same as for envelopes.
Native decoding: a sink with `add_scan` (the loader's, the per-request view's) gets whole envelopes
scanned by tensortrace.wire.native (C: no Python object per record, the record checks applied),
and returns the records it refuses for dead-lettering; a message the scanner does not decode exactly
as upb would, or that holds chunks, takes the Python path below, which is also the oracle its tests
compare against. TENSORTRACE_NATIVE=0, or no compiled extension: the Python path throughout.
Backpressure: when the queue is full (the sink is slow or down) the consumer pauses its partitions
but keeps polling, so it stays in the group. A rebalance flushes what was read, commits, and drops
the state of the partitions that moved (their new owner re-reads from the last commit). Partitions
*lost* (the consume thread did not poll for max_poll_interval_ms, or the session expired) are not
flushed or committed: their state is dropped and they are re-read from the last commit.
The Kafka client is confluent-kafka (librdkafka): kafka-python's fetch alone cost 150-230 us of
CPU per message and bounded every consumer at ~220 MB/s on this machine; librdkafka fetches on its
own threads, in C, and hands over whole batches (docs/consumers.md "The Kafka client").
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from typing import NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as RdTopicPartition

from tensortrace.consume.config import ConsumerConfig
from tensortrace.consume.publish import acked_producer, send_acked
from tensortrace.consume.deadletter import (DLQ_REASON_CODE_HEADER, DLQ_REASON_HEADER, DLQ_SOURCE_HEADER,
                                            DeadLetterReason, InvalidRecord)
from tensortrace.consume.sink import SealedBatch, Source, commit_offset
from tensortrace.service.backoff import Backoff
from tensortrace.service.kafka import KafkaUnavailable
from tensortrace.wire import codec, native

log = logging.getLogger("tensortrace.consume")

class TopicPartition(NamedTuple):
    """A partition of the topic this core reads (hashable; the keys of offsets and holds)."""
    topic: str
    partition: int


@dataclass
class ConsumerStats:
    """Counters of the core (monotonic); services extend it with their sink's own."""
    messages: int = 0
    commits: int = 0
    commit_failures: int = 0
    dlq_messages: int = 0
    dlq_by_reason: dict[str, int] = field(default_factory=dict)   # DeadLetterReason.value -> count
    paused: int = 0                 # times fetching paused because the flush queue was full
    connect_failures: int = 0       # attempts to reach Kafka that failed (retried with backoff)
    decode_seconds: float = 0.0     # consume thread: decoding and handing records to the sink
    partitions_lost: int = 0        # partitions lost (poll too late, session expired): re-read, not committed
    kafka_errors: int = 0           # errors librdkafka reported (connection, authentication, topic)

    def snapshot(self) -> dict:
        d = dict(self.__dict__)
        d["dlq_by_reason"] = dict(self.dlq_by_reason)
        return d


class ConsumerCore:
    def __init__(self, config: ConsumerConfig, sink, *, name: str = "consumer", stats: ConsumerStats | None = None,
                 producer=None, decode: Callable[[bytes], Any] | None = None):
        """`decode`: None (the default) reads v1 envelopes into sink.add_tensor / add_summary; a
        function `bytes -> object` reads any other payload into sink.add_message (module docstring)."""
        problems = config.consumer_problems()
        if problems:
            from tensortrace.service.config import ConfigError
            raise ConfigError(f"{name} config: " + "; ".join(problems))
        self.config = config
        self.sink = sink
        self.name = name
        self.decode = decode
        self.stats = stats if stats is not None else ConsumerStats()
        self.stopping = threading.Event()
        self.ready = threading.Event()   # set once the consumer has partitions assigned
        self.assigned: set[TopicPartition] = set()
        self._queue: queue.Queue[SealedBatch | None] = queue.Queue(maxsize=config.insert_queue_batches)
        self._done: queue.Queue[dict[TopicPartition, int]] = queue.Queue()
        self._assembler = codec.ChunkAssembler(timeout_s=config.chunk_timeout_s,
                                               max_pending=config.max_pending_chunk_sets)
        # chunk set key -> (partition, offset of its first chunk): commits never pass it
        self._holds: dict[tuple, tuple[TopicPartition, int]] = {}
        self._producer = producer        # a confluent_kafka.Producer for dead letters, or made on first use
        self._consumer: Consumer | None = None
        self._backlog: list = []          # messages a consume() returned while the partitions were paused
        self._tps: dict[int, TopicPartition] = {}
        self._ranges: dict[tuple[str, int], list[int]] = {}
        self._opened = time.monotonic()
        self._read_upto: dict[TopicPartition, int] = {}   # next offset to read, per partition
        self._committed: dict[TopicPartition, int] = {}
        self._inflight = 0
        self._inflight_lock = threading.Condition()
        self._flusher: threading.Thread | None = None
        self._consume_thread: threading.Thread | None = None
        self.kafka_error = ""            # why Kafka is not usable now ("" once connected)
        # Consumer lag per partition (messages): the partition's high watermark, as the last fetch
        # response reported it, minus the committed offset (the read position before the first
        # commit). Updated by the consume thread, read by metrics at scrape time (a dict swap).
        self.lag: dict[int, int] = {}
        self._lag_at = 0.0
        # The native envelope scanner (tensortrace.wire.native), for a sink that takes whole scanned
        # envelopes (add_scan); TENSORTRACE_NATIVE=0 or no compiled extension: the Python path.
        add_scan = getattr(sink, "add_scan", None) if decode is None else None
        if add_scan is not None and not getattr(sink, "scan_ready", True):
            add_scan = None
        self._add_scan = add_scan if (add_scan is not None and native.enabled()) else None
        self.native = self._add_scan is not None
        if add_scan is not None and not self.native:
            log.info("%s: %s", name, native.why_disabled())

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping.set()

    def disable_native(self) -> None:
        """Use the Python decoding path from now on (benchmarks compare the two in one process;
        TENSORTRACE_NATIVE=0 does the same for a whole process)."""
        self._add_scan = None
        self.native = False

    def live(self) -> bool:
        """False once the flush thread died (a sink bug): the service should be restarted."""
        return self._flusher is None or self._flusher.is_alive() or self.stopping.is_set()

    def run(self) -> None:
        """Consume until stop(); flushes and commits what it read before returning."""
        cfg = self.config
        self._consume_thread = threading.current_thread()
        self._flusher = threading.Thread(target=self._flush_loop, name=f"{self.name}-flush", daemon=True)
        self._flusher.start()
        self._consumer = self._connect()
        if self._consumer is None:   # stopped before Kafka answered
            self._queue.put(None)
            self._flusher.join(timeout=cfg.rebalance_flush_timeout_s)
            return
        self._consumer.subscribe([cfg.topic], on_assign=self._cb_assign, on_revoke=self._cb_revoke,
                                 on_lost=self._cb_lost)
        try:
            while not self.stopping.is_set():
                self._commit_done()
                messages = self._poll()
                t0, handing = time.perf_counter(), 0.0
                for i, m in enumerate(messages, 1):
                    self._handle_message(m)
                    if not i & 255:   # a poll holds up to max_poll_records: keep batches near the sink's bounds
                        t1 = time.perf_counter()
                        self._maybe_hand_off()
                        handing += time.perf_counter() - t1
                self.stats.decode_seconds += time.perf_counter() - t0 - handing
                self._expire_chunks()
                self._maybe_hand_off()
                self._update_lag()
            self._hand_off()
            self._drain(timeout_s=cfg.rebalance_flush_timeout_s)
        finally:
            self.stopping.set()  # also on an exception: the flush thread must not retry forever
            self._queue.put(None)
            self._flusher.join(timeout=cfg.rebalance_flush_timeout_s)
            self._commit_done()
            self._consumer.close()   # leaves the group (its revocation finds nothing left to flush)
            if self._producer is not None:
                self._producer.flush(10)
                self._producer = None   # librdkafka's client closes when the object goes

    def _poll(self) -> list:
        """The next messages: what a pause left over first; else whatever librdkafka has queued, up
        to max_poll_records, without waiting; else wait up to poll_timeout_ms for the first one and
        take what came with it. (consume(n, timeout) alone would wait for n messages or the whole
        timeout: up to poll_timeout_ms of latency added to every message at low rates.)"""
        if self._backlog:
            out, self._backlog = self._backlog, []
            return out
        c, n = self._consumer, self.config.max_poll_records
        out = c.consume(n, 0)
        if not out:
            first = c.poll(self.config.poll_timeout_ms / 1000)
            if first is not None:
                out = [first]
                if n > 1:
                    out += c.consume(n - 1, 0)
        return out

    def _connect(self) -> Consumer | None:
        """The group consumer, once Kafka answers. Until then (broker down, wrong password, TLS
        trust) it logs one clear line per attempt (KafkaConfig.check_connection names the listener
        and the cause) and backs off; a service started before its broker never crash-loops.
        librdkafka reconnects by itself after that; what it reports goes to _on_kafka_error."""
        cfg = self.config
        backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s)
        while not self.stopping.is_set():
            try:
                cfg.kafka.check_connection(timeout_s=10.0)
                conf = cfg.kafka.rdkafka_conf(client_id=f"tensortrace-{self.name}-{cfg.group_id}")
                conf.update({
                    "group.id": cfg.group_id, "enable.auto.commit": False, "auto.offset.reset": cfg.auto_offset_reset,
                    "enable.partition.eof": False,
                    "fetch.max.bytes": cfg.fetch_max_bytes, "max.partition.fetch.bytes": cfg.max_partition_fetch_bytes,
                    # a fetch response may carry fetch.max.bytes plus its framing
                    "receive.message.max.bytes": max(100_000_000, cfg.fetch_max_bytes + (1 << 20)),
                    "session.timeout.ms": cfg.session_timeout_ms,
                    "heartbeat.interval.ms": max(1000, cfg.session_timeout_ms // 3),
                    "max.poll.interval.ms": cfg.max_poll_interval_ms,
                    # a topic created after the group joined is seen within seconds
                    "topic.metadata.refresh.interval.ms": 5000,
                    # librdkafka prefetches up to queued.max.messages.kbytes (64 MiB) and, once over it,
                    # postpones the next fetch by fetch.queue.backoff.ms (1 s by default): a consumer
                    # that drains the queue in tens of ms then waits out the rest of the second
                    # (measured: the probe service idle half the time on a 30-layer stream)
                    "fetch.queue.backoff.ms": 10,
                    "error_cb": self._on_kafka_error,
                    "logger": logging.getLogger("tensortrace.consume.rdkafka"),
                })
                consumer = Consumer(conf)
                self.kafka_error = ""
                return consumer
            except (KafkaUnavailable, KafkaException) as e:
                self.kafka_error = str(e)
                self.stats.connect_failures += 1
                log.error("%s: Kafka not usable: %s; retrying", self.name, e)
                backoff.wait(self.stopping)
        return None

    def _on_kafka_error(self, err: KafkaError) -> None:
        """librdkafka's client-wide errors (called inside poll/consume, on the consume thread):
        brokers down, authentication, TLS. It keeps reconnecting; the error is kept for readiness
        messages until partitions are assigned again."""
        self.stats.kafka_errors += 1
        self.kafka_error = f"{err.name()}: {err.str()}"
        level = logging.ERROR if err.fatal() or err.code() in (KafkaError._AUTHENTICATION, KafkaError._ALL_BROKERS_DOWN,
                                                               KafkaError._SSL) else logging.WARNING
        log.log(level, "%s: Kafka: %s", self.name, self.kafka_error)

    # -- consume side ---------------------------------------------------------------------------

    def _handle_message(self, m) -> None:
        err = m.error()
        if err is not None:   # a message that is an error report (unknown topic, a broker's fetch error)
            if err.code() != KafkaError._PARTITION_EOF:
                self._on_kafka_error(err)
            return
        self.stats.messages += 1
        p = m.partition()
        tp = self._tps.get(p)
        if tp is None:
            tp = self._tps[p] = TopicPartition(m.topic(), p)
        offset = m.offset()
        r = self._ranges.get(tp)
        if r is None:
            self._ranges[tp] = [offset, offset]
        else:
            r[1] = offset
        self._read_upto[tp] = offset + 1
        value = m.value()
        if self.decode is not None:
            self._handle_decoded(tp, offset, m.key(), value)
            return
        if self._add_scan is not None and value:
            sc = native.scan(value)
            # None: a message the scanner does not decode exactly as upb (the Python path below
            # refuses it with its own error, or decodes it); chunks are reassembled in Python
            if sc is not None and not any(run[3] == native.S_CHUNKED for run in sc.runs):   # (a chunk: a run of one)
                for i, e in self._add_scan(sc, Source(tp.topic, tp.partition, offset)):
                    self._dead_letter(tp, offset, m.key(), codec.encode_envelope([sc.record(i)]), e.reason, str(e))
                return
        try:
            records = codec.decode_envelope(value)
        except codec.WireError as e:
            self._dead_letter(tp, offset, m.key(), value, DeadLetterReason.ENVELOPE, str(e))
            return
        sink = self.sink
        source = Source(tp.topic, tp.partition, offset)
        for rec in records:
            kind = rec.WhichOneof("kind")
            try:
                if kind == "summary":
                    sink.add_summary(rec.summary, source)
                    continue
                t = rec.tensor
                if t.chunk_count > 1:
                    key = codec.record_key(t)
                    hold = self._holds.setdefault(key, (tp, offset))
                    try:
                        whole = self._assembler.add(t)
                    except codec.WireError as e:
                        self._holds.pop(key, None)
                        raise InvalidRecord(DeadLetterReason.CHUNKS, f"chunks: {e}") from None
                    if whole is None:
                        continue
                    self._holds.pop(key, None)
                    sink.add_tensor(whole, Source(tp.topic, tp.partition, hold[1]))
                    continue
                sink.add_tensor(t, source)
            except InvalidRecord as e:
                self._dead_letter(tp, offset, m.key(), codec.encode_envelope([rec]), e.reason, str(e))

    def _handle_decoded(self, tp: TopicPartition, offset: int, key: bytes | None, value: bytes) -> None:
        """A message of a foreign payload: decode(value) -> sink.add_message; InvalidRecord from
        either dead-letters the message as it came."""
        try:
            self.sink.add_message(self.decode(value), Source(tp.topic, tp.partition, offset))
        except InvalidRecord as e:
            self._dead_letter(tp, offset, key, value, e.reason, str(e))

    def _expire_chunks(self) -> None:
        for key, parts, reason in self._assembler.expire():
            hold = self._holds.pop(key, None)
            tp, offset = hold if hold else (None, -1)
            n = parts[0].chunk_count if parts else "?"
            self._dead_letter(tp, offset, (parts[0].request_id.encode() if parts else None),
                              codec.encode_envelope(parts), DeadLetterReason.CHUNKS,
                              f"chunks: {reason} ({len(parts)} of {n} arrived)")

    def _dead_letter(self, tp, offset: int, key, value: bytes, reason: DeadLetterReason, message: str) -> None:
        """Send one message to the dead-letter topic and wait for the broker's ack (the offset after
        it may be committed only once the dead letter is safe)."""
        reason = DeadLetterReason(reason)
        log.warning("dead letter (%s) from %s@%s: %s", reason.value, tp, offset, message)
        if self._producer is None:
            self._producer = acked_producer(self.config.kafka, f"tensortrace-{self.name}-dlq",
                                            max_message_bytes=16 << 20, timeout_s=30, error_cb=self._on_kafka_error)
        source = f"{tp.topic}/{tp.partition}/{offset}" if tp is not None else "unknown"
        headers = [(DLQ_REASON_HEADER, message.encode()), (DLQ_REASON_CODE_HEADER, reason.value.encode()),
                   (DLQ_SOURCE_HEADER, source.encode())]
        backoff = Backoff(self.config.retry_initial_s, self.config.retry_max_s)
        while True:
            again, problem = send_acked(self._producer, [(self.config.dlq_topic, key, value, headers)], timeout_s=30)
            if not again:
                break
            if self.stopping.is_set():
                raise KafkaException(f"dead-letter topic {self.config.dlq_topic} not writable at stop: {problem}")
            log.error("dead-letter topic %s not writable (%s); retrying", self.config.dlq_topic, problem)
            backoff.wait()
        self.stats.dlq_messages += 1
        self.stats.dlq_by_reason[reason.value] = self.stats.dlq_by_reason.get(reason.value, 0) + 1

    def _update_lag(self, every_s: float = 1.0) -> None:
        """Refresh `lag` at most every `every_s`. The high watermark is what the last fetch response
        said (librdkafka's cached value, no request of its own); a partition not fetched yet has
        none and is left out."""
        now = time.monotonic()
        if now - self._lag_at < every_s or self._consumer is None:
            return
        self._lag_at = now
        lag = {}
        for tp in self.assigned:
            hw = self._highwater(tp)
            if hw is None:
                continue
            done = self._committed.get(tp, self._read_upto.get(tp))
            if done is not None:
                lag[tp.partition] = max(0, hw - done)
        self.lag = lag

    def _highwater(self, tp: TopicPartition) -> int | None:
        _, high = self._consumer.get_watermark_offsets(RdTopicPartition(tp.topic, tp.partition), cached=True)
        return None if high < 0 else high

    def unread_partitions(self) -> set[int] | None:
        """Assigned partitions not yet read up to their high watermark (as the last fetch reported
        it; no request to the broker). Consume thread only (a sink's seal/due). None before the
        consumer is open."""
        if self._consumer is None:
            return None
        out = set()
        for tp in self.assigned:
            hw = self._highwater(tp)
            if hw is None or self._read_upto.get(tp, -1) < hw:
                out.add(tp.partition)
        return out

    def lag_total(self) -> int:
        """Messages on the assigned partitions not yet committed (the sum of `lag`)."""
        return sum(self.lag.values())

    def _commit_positions(self) -> dict[TopicPartition, int]:
        """Per partition: the next offset to read, held back to the first chunk of any open chunk
        set, then to where the sink says a restart must resume (commit_offset)."""
        out = dict(self._read_upto)
        for tp, offset in self._holds.values():
            if tp in out and offset < out[tp]:
                out[tp] = offset
        out = {tp: commit_offset(self.sink, tp.partition, o) for tp, o in out.items()}
        return {tp: o for tp, o in out.items() if o > self._committed.get(tp, -1)}

    def _maybe_hand_off(self) -> None:
        cfg = self.config
        due = time.monotonic() - self._opened >= cfg.batch_max_delay_s
        if self.sink.due() or due:
            self._hand_off()

    def _hand_off(self, in_rebalance: bool = False) -> bool:
        """Queue the sink's batch for flushing. False: gave up (only inside a rebalance, after
        rebalance_flush_timeout_s); the batch is then dropped uncommitted, so it is re-read."""
        data = self.sink.seal()
        ranges = {k: (v[0], v[1]) for k, v in self._ranges.items()}
        self._ranges = {}
        self._opened = time.monotonic()
        b = SealedBatch(data=data, ranges=ranges, commit=self._commit_positions(), created=self._opened)
        if data is None and not b.commit:
            return True
        with self._inflight_lock:
            self._inflight += 1
        # Bounded queue: when the flush side is behind (or the sink's store is down), pause
        # fetching but keep polling so the group membership stays alive (not from inside a
        # rebalance callback, which already runs inside poll()).
        deadline = time.monotonic() + self.config.rebalance_flush_timeout_s
        paused: list = []
        while True:
            try:
                self._queue.put(b, timeout=0.1)
                if paused:
                    self._resume()
                return True
            except queue.Full:
                self._commit_done()
                if in_rebalance:
                    if time.monotonic() > deadline:
                        with self._inflight_lock:
                            self._inflight -= 1
                            self._inflight_lock.notify_all()
                        return False
                elif self._consumer is not None:
                    if not paused:
                        self.stats.paused += 1
                        paused = self._consumer.assignment()
                        self._consumer.pause(paused)
                    # keep polling (max_poll_interval_ms; rebalance callbacks run in here): what
                    # librdkafka had fetched before the pause is kept and handled next
                    self._backlog += self._consumer.consume(self.config.max_poll_records, 0)

    def _resume(self) -> None:
        """Fetch again on every partition assigned now (a rebalance during the pause may have
        changed them; librdkafka assigns new partitions unpaused)."""
        try:
            self._consumer.resume(self._consumer.assignment())
        except KafkaException as e:
            log.warning("%s: resuming fetch failed (%s); it is retried at the next pause", self.name, e)

    def _commit_done(self) -> None:
        offsets: dict[TopicPartition, int] = {}
        while True:
            try:
                offsets.update(self._done.get_nowait())
            except queue.Empty:
                break
        if not offsets or self._consumer is None:
            return
        mine = {tp: o for tp, o in offsets.items() if tp in self.assigned}
        if not mine:
            return
        try:
            result = self._consumer.commit(offsets=[RdTopicPartition(tp.topic, tp.partition, o) for tp, o in mine.items()],
                                           asynchronous=False)
            failed = [r for r in result or [] if r.error is not None]
            if failed:
                raise KafkaException(failed[0].error)
            self._committed.update(mine)
            self.stats.commits += 1
        except KafkaException as e:
            # Rebalanced away: the new owner re-reads from the last commit; duplicates collapse.
            self.stats.commit_failures += 1
            log.warning("offset commit failed (%s); the records will be re-read and deduplicated", e)

    def _drain(self, timeout_s: float) -> bool:
        """Wait until every queued batch is flushed, then commit. False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._inflight_lock:
            while self._inflight and time.monotonic() < deadline:
                self._inflight_lock.wait(timeout=0.1)
            ok = self._inflight == 0
        self._commit_done()
        return ok

    def _cb_assign(self, _consumer, partitions) -> None:
        self._on_assigned([TopicPartition(p.topic, p.partition) for p in partitions])

    def _cb_revoke(self, _consumer, partitions) -> None:
        self._on_revoked([TopicPartition(p.topic, p.partition) for p in partitions])

    def _cb_lost(self, _consumer, partitions) -> None:
        self._on_revoked([TopicPartition(p.topic, p.partition) for p in partitions], lost=True)

    def _on_revoked(self, revoked, lost: bool = False) -> None:
        """librdkafka calls this inside consume()/poll() on the consume thread, or inside close().
        A revocation: flush what was read and commit it while the partitions are still ours. Lost
        partitions (this member was evicted: no poll for max_poll_interval_ms, or its session
        expired) already belong to someone else: nothing is handed off, waited for or committed
        (a commit would fail), their state is dropped, and their next owner (maybe this consumer
        again) re-reads them from the last commit; duplicates collapse by identity.
        A revocation while closing comes after the final flush and after the flush thread ended:
        nothing is left to hand off, and nobody would flush it."""
        if lost:
            if revoked:
                self.stats.partitions_lost += 1
                log.warning("%s: partitions %s lost (evicted from the group); not committed, re-read from the "
                            "last commit", self.name, sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked))
        elif self._flusher is not None and self._flusher.is_alive():
            self._hand_off(in_rebalance=True)
            self._drain(timeout_s=self.config.rebalance_flush_timeout_s)
        revoked = set(revoked)
        for key in [k for k, (tp, _) in self._holds.items() if tp in revoked]:
            self._holds.pop(key)
            self._assembler.discard(key)  # the new owner re-reads these chunks
        forget = getattr(self.sink, "revoked", None)
        if forget is not None:
            forget({tp.partition for tp in revoked})
        for tp in revoked:
            self._read_upto.pop(tp, None)
            self._committed.pop(tp, None)
        self.assigned -= revoked
        self._backlog = [m for m in self._backlog if TopicPartition(m.topic(), m.partition()) not in revoked]

    def _on_assigned(self, assigned) -> None:
        self.assigned |= set(assigned)
        for tp in assigned:
            self._committed.pop(tp, None)
        if self.assigned:
            self.kafka_error = ""
            self.ready.set()

    # -- flush side -----------------------------------------------------------------------------

    def _flush_loop(self) -> None:
        # Once a batch was not made durable (the sink gave up at stop, or raised), no later batch's
        # offsets may be committed either: they lie past it (a later batch that only moves offsets
        # would otherwise commit over the lost one).
        gave_up = False
        while True:
            b = self._queue.get()
            if b is None:
                return
            try:
                if not gave_up and (b.data is None or self.sink.flush(b, self.stopping)):
                    self._done.put(b.commit)
                else:
                    gave_up = True
            except Exception:  # a sink bug: never commit past it; the next owner re-reads
                gave_up = True
                log.exception("%s: flush failed; its offsets and every later batch's are not committed", self.name)
                self.stopping.set()
            finally:
                with self._inflight_lock:
                    self._inflight -= 1
                    self._inflight_lock.notify_all()

