"""The serving engine's spans, from the spans topic to the destinations: a Sink for a
`ConsumerCore(..., decode=otlp.decode_message)`.

    sink = EngineSpansSink(writers.write_requests)
    core = ConsumerCore(spans_consumer_config, sink, name="bridge-spans", decode=decode_message)

Each Kafka message is one ExportTraceServiceRequest as the receiver got it (receiver.py). The sink
batches them (until `max_spans` or the core's batch_max_delay_s) and `flush` writes the batch to
every destination — ClickHouse otel_traces rows as the Collector's ClickHouse exporter makes them,
and/or each request forwarded unchanged to the OTLP destination — retrying until durable, so the
core commits the offsets only behind spans that are stored. ClickHouse down: the batch is retried,
fetching pauses (the core's bounded queue), and the spans wait in Kafka.

Nothing here depends on a sampling decision: whatever the engine sent is stored. (TensorTrace's
capture never looks at the traceparent's sampled flag either: docs/bridge.md.)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from tensortrace.consume.sink import SealedBatch, Source


@dataclass
class EngineStats:
    requests: int = 0          # ExportTraceServiceRequests read off the spans topic
    spans: int = 0             # spans in them
    written_spans: int = 0     # spans made durable at every destination
    write_seconds: float = 0.0


class EngineSpansSink:
    def __init__(self, write: Callable[[list, threading.Event], bool], *, max_spans: int = 20_000,
                 stats: EngineStats | None = None):
        self.write = write
        self.max_spans = max_spans
        self.stats = stats if stats is not None else EngineStats()
        self._batch: list = []
        self._spans = 0

    # consume thread
    def add_message(self, req, source: Source) -> None:
        n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        self.stats.requests += 1
        self.stats.spans += n
        if n:
            self._batch.append((req, n))
            self._spans += n

    def add_tensor(self, rec, source: Source) -> None:   # the Sink protocol; never called with decode=
        raise TypeError("the spans topic holds OTLP requests, not tensor records")

    add_summary = add_tensor

    def due(self) -> bool:
        return self._spans >= self.max_spans

    def seal(self):
        if not self._batch:
            return None
        out, self._batch, self._spans = self._batch, [], 0
        return out

    # flush thread
    def flush(self, batch: SealedBatch, stopping: threading.Event) -> bool:
        import time

        t0 = time.perf_counter()
        if not self.write([req for req, _ in batch.data], stopping):
            return False
        self.stats.write_seconds += time.perf_counter() - t0
        self.stats.written_spans += sum(n for _, n in batch.data)
        return True
