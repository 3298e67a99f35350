"""What a consumer service implements: a Sink. The consumer core (core.py) does the rest.

>>> class Printer:                                   # a complete sink
...     def __init__(self): self.open = []
...     def add_tensor(self, rec, source): self.open.append(rec)
...     def add_summary(self, summary, source): self.open.append(summary)
...     def due(self): return len(self.open) >= 1000
...     def seal(self):
...         batch, self.open = self.open, []
...         return batch or None
...     def flush(self, batch, stopping): print(len(batch.data)); return True

Threads: `add_*`, `due`, `seal` and `commit_offset` run on the consume thread; `flush` on the flush
thread, one batch at a time, while the consume thread decodes the next (so they must not share
unlocked state beyond the sealed batch). `flush` returns True once the batch is durable (inserted,
produced with acks, handed to the handler): only then are the offsets read before it committed.
It retries transient failures itself (use `Backoff`) and returns False only when `stopping` is
set — the batch is then not committed, and re-read by whoever owns the partition next.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from tensortrace.v1 import records_pb2 as pb


class Source(NamedTuple):
    """Where a record was read: its Kafka partition and the offset of its message (of its first
    chunk, for a reassembled record)."""
    topic: str
    partition: int
    offset: int


@dataclass
class SealedBatch:
    """A sink's batch on its way to `flush`: `data` is what `Sink.seal()` returned (None when the
    batch only moves offsets, e.g. after dead letters); `ranges` the first/last offset read per
    (topic, partition) while it was open — a stable id for an idempotent retry (insert dedup token)."""
    data: Any
    ranges: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    commit: dict = field(default_factory=dict)      # TopicPartition -> next offset; core-internal
    created: float = 0.0

    def token(self) -> str:
        return ";".join(f"{t}/{p}/{lo}-{hi}" for (t, p), (lo, hi) in sorted(self.ranges.items()))


@runtime_checkable
class Sink(Protocol):
    def add_tensor(self, rec: pb.TensorRecord, source: Source) -> None:
        """A whole (reassembled) tensor record. Raise InvalidRecord to dead-letter it."""

    def add_summary(self, summary: pb.RequestSummary, source: Source) -> None:
        """A request summary. Raise InvalidRecord to dead-letter it."""

    def due(self) -> bool:
        """True when the open batch should be flushed now (it is full, or something is ready)."""

    def seal(self) -> Any:
        """Take the open batch (None if there is nothing to flush) and start a new one."""

    def flush(self, batch: SealedBatch, stopping: threading.Event) -> bool:
        """Make `batch.data` durable; True when done, False only if `stopping` was set first."""

    # optional: commit_offset(partition, candidate) -> int (see commit_offset below), and
    # revoked(partitions: set[int]) -> None (forget what was held for partitions that moved).
    # A sink of a topic that does not hold v1 envelopes (ConsumerCore(..., decode=fn)) implements
    # add_message(decoded, source) -> None instead of add_tensor / add_summary: `decoded` is what
    # fn returned for one Kafka message; raise InvalidRecord to dead-letter that message.


def commit_offset(sink, partition: int, candidate: int) -> int:
    """Where a commit of `partition` may go, given the core's candidate (the next offset to read,
    held back to any chunk set still being reassembled). A sink that holds records outside its
    batch (the per-request view holds each request until it is released) implements
    `commit_offset(partition, candidate) -> int` and returns an offset <= candidate that a restart
    can resume from without losing or cutting anything it holds; other sinks need not."""
    f = getattr(sink, "commit_offset", None)
    return candidate if f is None else min(candidate, f(partition, candidate))
