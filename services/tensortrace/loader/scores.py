"""The probe scores topic -> ClickHouse `probe_scores`: the loader's second consumer.

    sink = ScoresTableSink(client, database="tensortrace")
    core = ConsumerCore(cfg.scores_consumer_config(), sink, name="loader-scores", decode=decode_probe_score)

It runs inside the loader process because an embedded chDB engine has one owner process (docs/
storage.md, "One engine path per process"): the loader's client is shared (ThreadSafeClient).
Each Kafka message of `tensortrace.probe_scores` is one `tensortrace.v1.ProbeScore` (the probe
service publishes them, docs/probes.md). The core reads them with a decoder (no envelopes, no chunk
reassembly); a message that is not a ProbeScore, or lacks its identity, is dead-lettered to
`<scores topic>.dlq` with a typed reason; the others are batched and inserted, retrying with
backoff until ClickHouse accepts, and only then are their offsets committed.

Exactly once in effect, as for the activations: a retried insert carries the same
`insert_deduplication_token` (the batch's offset ranges); a re-read after a crash, or a score the
probe service published twice (it was restarted before committing), lands with the same identity
(trace_id, request_id, probe, probe_hash) — the table's sort key, collapsed by merges and by
`FINAL` on read.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tensortrace.consume.sink import SealedBatch, Source
from tensortrace.service.backoff import Backoff
from tensortrace.storage.schema import PROBE_SCORE_COLUMNS
from tensortrace.v1 import records_pb2 as pb

log = logging.getLogger("tensortrace.loader.scores")


@dataclass
class ScoresTableStats:
    messages: int = 0          # scores read off the topic (re-reads included)
    rows: int = 0              # rows ClickHouse accepted
    batches: int = 0
    insert_failures: int = 0
    last_insert_error: str = ""
    insert_seconds: float = 0.0


class ScoresTableSink:
    """ProbeScores -> `probe_scores` rows (a Sink for `ConsumerCore(..., decode=decode_probe_score)`)."""

    def __init__(self, client, database: str, *, max_rows: int = 20_000, retry_initial_s: float = 0.2,
                 retry_max_s: float = 10.0, stats: ScoresTableStats | None = None):
        self.client = client
        self.table = f"{database}.probe_scores"
        self.max_rows = max_rows
        self.retry = (retry_initial_s, retry_max_s)
        self.stats = stats if stats is not None else ScoresTableStats()
        self._rows: list[tuple[pb.ProbeScore, int, int]] = []
        # flush thread, after ClickHouse accepted a batch: (scores, time_ns) — the benchmark's hook
        self.on_inserted = None

    # consume thread
    def add_message(self, sc: pb.ProbeScore, source: Source) -> None:
        self.stats.messages += 1
        self._rows.append((sc, source.partition, source.offset))

    def add_tensor(self, rec, source: Source) -> None:   # the Sink protocol; never called with decode=
        raise TypeError("the scores topic holds ProbeScores, not tensor records")

    add_summary = add_tensor

    def due(self) -> bool:
        return len(self._rows) >= self.max_rows

    def seal(self):
        if not self._rows:
            return None
        out, self._rows = self._rows, []
        return out

    # flush thread
    def flush(self, batch: SealedBatch, stopping: threading.Event) -> bool:
        rows = batch.data
        table = scores_table(rows, time.time_ns())
        backoff = Backoff(*self.retry)
        t0 = time.perf_counter()
        while True:
            try:
                self.client.insert_arrow(self.table, table, settings={"insert_deduplication_token": f"s:{batch.token()}"})
                break
            except Exception as e:   # any client/engine/network error: back off and retry
                self.stats.insert_failures += 1
                self.stats.last_insert_error = f"{type(e).__name__}: {e}"[:500]
                log.error("insert into %s failed (%s); retrying", self.table, self.stats.last_insert_error)
                if backoff.wait(stopping):
                    return False
        self.stats.insert_seconds += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.rows += len(rows)
        if self.on_inserted is not None:
            self.on_inserted([sc for sc, _, _ in rows], time.time_ns())
        return True


def _fixed(b: bytes, n: int) -> bytes:
    return b if len(b) == n else b"\0" * n


def scores_table(rows: list[tuple[pb.ProbeScore, int, int]], load_time_ns: int) -> pa.Table:
    """The Arrow table of `probe_scores` rows (PROBE_SCORE_COLUMNS order)."""
    ts = pa.timestamp("ns", tz="UTC")
    scs = [r[0] for r in rows]
    cols = {
        "trace_id": pa.array([_fixed(s.trace_id, 16) for s in scs], pa.binary(16)),
        "span_id": pa.array([_fixed(s.span_id, 8) for s in scs], pa.binary(8)),
        "request_id": pa.array([s.request_id for s in scs], pa.string()),
        "model": pa.array([s.model_id for s in scs], pa.string()),
        "probe": pa.array([s.probe for s in scs], pa.string()),
        "probe_hash": pa.array([s.probe_hash for s in scs], pa.string()),
        "score": pa.array([s.score for s in scs], pa.float64()),
        "threshold": pa.array([s.threshold for s in scs], pa.float64()),
        "flagged": pa.array([s.flagged for s in scs], pa.bool_()),
        "shadow": pa.array([s.shadow for s in scs], pa.bool_()),
        "complete": pa.array([s.complete for s in scs], pa.bool_()),
        "incomplete_reason": pa.array([s.incomplete_reason for s in scs], pa.string()),
        "hook": pa.array([s.hook for s in scs], pa.string()),
        "layers": pa.array([list(s.layers) for s in scs], pa.list_(pa.int32())),
        "pooling": pa.array([s.pooling for s in scs], pa.string()),
        "tokens_scored": pa.array([s.tokens_scored for s in scs], pa.uint32()),
        "token_scores": pa.array([np.asarray(s.token_scores, dtype=np.float32) for s in scs], pa.list_(pa.float32())),
        "token_positions": pa.array([np.asarray(s.token_positions, dtype=np.uint32) for s in scs], pa.list_(pa.uint32())),
        "request_end_time": pa.array([s.request_end_time_unix_nano for s in scs], ts),
        "scored_time": pa.array([s.scored_time_unix_nano for s in scs], ts),
        "release": pa.array([s.release for s in scs], pa.string()),
        "load_time": pa.array([load_time_ns] * len(scs), ts),
        "kafka_partition": pa.array([r[1] for r in rows], pa.uint32()),
        "kafka_offset": pa.array([r[2] for r in rows], pa.uint64()),
    }
    return pa.table([cols[c] for c in PROBE_SCORE_COLUMNS], names=list(PROBE_SCORE_COLUMNS))
