"""Probe scores -> `tensortrace.probe` spans: one span per (request, probe, probe version), a child
of the request's `tensortrace.capture` span, in the request's trace.

    core = ConsumerCore(probe_scores_consumer_config, ProbeSpansSink(writers.write), decode=decode_probe_score)
    probe_span(score)             # pure: a tensortrace.v1.ProbeScore -> SpanData (None: no trace id)

The probe service (`tensortrace probes`) publishes one `tensortrace.v1.ProbeScore` per probe and
request to `tensortrace.probe_scores`, keyed by the request id (records.proto). Its identity is
(trace id, request id, probe, probe hash); the span id is derived from exactly that, the same way as
the capture span's (spans.span_id), so a re-published score (a restarted probe service) or a replayed
topic gives the same span again, never a second one:

    span_id = span_id(trace_id, request_id, "tensortrace.probe\\0<probe>\\0<probe_hash>")
    parent  = span_id(trace_id, request_id, "tensortrace.capture")

    start   = request_end_time_unix_nano (the request's end, from its summary), else scored_time
    end     = scored_time_unix_nano (when the probe service produced the score): the span is the
              time from the request's end to its verdict

Attributes follow the OTel GenAI evaluation conventions (in development: `gen_ai.evaluation.name`,
`gen_ai.evaluation.score.value`, `gen_ai.evaluation.score.label`) plus `tensortrace.probe.*`
(hash, threshold, complete, incomplete_reason, pooling, layers, hook, tokens_scored, release). The
per-token scores stay out of the span (unbounded; the `probe_scores` table has them: `tensortrace
trace` draws them). A score over an incomplete request is not an error of the span (status UNSET):
`tensortrace.probe.complete` says it, with the reason.

A score without a trace id (the request had none) gets no span (counted: `no_trace_id`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from opentelemetry.trace import SpanKind

from tensortrace.bridge.spans import CAPTURE, SpanData, has_trace_id, span_id
from tensortrace.consume.sink import SealedBatch, Source
from tensortrace.v1 import records_pb2 as pb

PROBE = "tensortrace.probe"
FLAGGED, PASS, SHADOW = "flagged", "pass", "shadow"


def probe_span_id(trace_id: bytes, request_id: str, probe: str, probe_hash: str) -> bytes:
    return span_id(trace_id, request_id, f"{PROBE}\x00{probe}\x00{probe_hash}")


def score_label(score: pb.ProbeScore) -> str:
    """`shadow` (scored, never alerted), else `flagged` (score >= threshold), else `pass`."""
    return SHADOW if score.shadow else (FLAGGED if score.flagged else PASS)


def probe_span(score: pb.ProbeScore) -> SpanData | None:
    """The `tensortrace.probe` span of one score (None when the score has no trace id)."""
    tid, rid = score.trace_id, score.request_id
    if not has_trace_id(tid):
        return None
    end = score.scored_time_unix_nano
    start = score.request_end_time_unix_nano or end
    attrs = {
        "gen_ai.evaluation.name": score.probe,
        "gen_ai.evaluation.score.value": score.score,
        "gen_ai.evaluation.score.label": score_label(score),
        "gen_ai.request.model": score.model_id,
        "tensortrace.request_id": rid,
        "tensortrace.trace_id": tid.hex(),
        "tensortrace.probe.hash": score.probe_hash,
        "tensortrace.probe.threshold": score.threshold,
        "tensortrace.probe.complete": score.complete,
        "tensortrace.probe.pooling": score.pooling,
        "tensortrace.probe.layers": list(score.layers),
        "tensortrace.probe.hook": score.hook,
        "tensortrace.probe.tokens_scored": score.tokens_scored,
    }
    if score.incomplete_reason:
        attrs["tensortrace.probe.incomplete_reason"] = score.incomplete_reason
    if score.release:
        attrs["tensortrace.probe.release"] = score.release
    return SpanData(tid, probe_span_id(tid, rid, score.probe, score.probe_hash), span_id(tid, rid, CAPTURE), PROBE,
                    SpanKind.INTERNAL, start, max(end, start), attrs)


def decode_probe_score(value: bytes) -> pb.ProbeScore:
    """A probe scores topic message -> the ProbeScore (the ConsumerCore `decode` hook): the shared
    checks (tensortrace.consume.validate.decode_probe_score), and the score time a span ends at."""
    from tensortrace.consume import DeadLetterReason, InvalidRecord
    from tensortrace.consume.validate import decode_probe_score as decode

    score = decode(value)
    if not score.scored_time_unix_nano:
        raise InvalidRecord(DeadLetterReason.MISSING_FIELD, f"probe score of {score.request_id!r} ({score.probe}): "
                                                            "no scored_time_unix_nano")
    return score


@dataclass
class ProbeStats:
    scores: int = 0                 # ProbeScores read off the topic
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> scores without a span
    spans: int = 0                  # probe spans made durable at every destination (re-sends included)
    write_seconds: float = 0.0


class ProbeSpansSink:
    """A Sink for `ConsumerCore(..., decode=decode_probe_score)`: scores -> probe spans, batched
    (until `max_spans` or the core's batch delay), each batch written to every destination and durable
    before the core commits its offsets. A score read twice in one batch is written once (same id)."""

    def __init__(self, write: Callable[[list[SpanData], threading.Event], bool], *, max_spans: int = 5000,
                 stats: ProbeStats | None = None):
        self.write = write
        self.max_spans = max_spans
        self.stats = stats if stats is not None else ProbeStats()
        self._batch: dict[tuple[bytes, bytes], SpanData] = {}

    # consume thread
    def add_message(self, score: pb.ProbeScore, source: Source) -> None:
        self.stats.scores += 1
        s = probe_span(score)
        if s is None:
            self.stats.skipped["no_trace_id"] = self.stats.skipped.get("no_trace_id", 0) + 1
            return
        self._batch[(s.trace_id, s.span_id)] = s   # the latest verdict of one identity wins

    def add_tensor(self, rec, source: Source) -> None:   # the Sink protocol; never called with decode=
        raise TypeError("the probe scores topic holds ProbeScores, not tensor records")

    add_summary = add_tensor

    def due(self) -> bool:
        return len(self._batch) >= self.max_spans

    def seal(self):
        if not self._batch:
            return None
        out, self._batch = list(self._batch.values()), {}
        return out

    # flush thread
    def flush(self, batch: SealedBatch, stopping: threading.Event) -> bool:
        t0 = time.perf_counter()
        if not self.write(batch.data, stopping):
            return False
        self.stats.write_seconds += time.perf_counter() - t0
        self.stats.spans += len(batch.data)
        return True
