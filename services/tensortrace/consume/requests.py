"""The per-request view: for consumers that think in requests (the OTel bridge, probes).

    class TokenCounter:                          # a RequestHandler
        def on_request(self, req: CapturedRequest) -> None:
            print(req.request_id, req.completeness.state, len(req.records))
    core = ConsumerCore(ConsumerConfig(group_id="tokens"), RequestView(TokenCounter()), name="tokens")

Records of one request (same trace id and request id; the exporter keys them by request id, so
they share a partition) are gathered, de-duplicated by record identity (producer pod, pid,
generation, seq: an at-least-once re-delivery adds nothing), and the request is released to the
handler exactly when one of these holds:
  * COMPLETE   every producer (TP rank) the summaries count (`producers`) and every producer that
               sent records has sent its summary, and every record the summaries announce
               (records_captured) has arrived. Completeness follows
               the query SDK's rule (tensortrace.wire.completeness — one implementation): "complete",
               or "incomplete" when a summary says records were dropped or the request was cut short;
               a summary with sampled=false announces no tensors and releases at once;
  * TIMEOUT    nothing new arrived for `timeout_s`: released with `final=True` completeness —
               "incomplete" with "k of n captured records arrived", or "no_summary";
  * EVICTED    the view holds more than `max_requests` requests or `max_bytes` of kept payload:
               the oldest is released early, incomplete, with the reason (memory stays bounded).
Never silently partial: `req.completeness.complete` is True only in the first case with nothing
dropped. A record or summary arriving after its request was released is counted (`late_records`)
and dropped; the released identities are remembered (bounded) so a late duplicate never releases
a second, partial copy of a request.

Offsets: the view tells the core where a commit may go (`commit_offset`): never past the first
record of a request it still holds, so after a crash the request is re-read whole; and never
inside a request it already released (requests interleave in a partition: with r1 at offsets 0..9,
r2 from 5 on, r1 released and r2 open, a commit at 5 would make a restart re-read r1's tail alone
and release it again, partial). It remembers the offset ranges of released requests until commits
have passed them, and moves a commit point that falls inside one back to its start: a restart
re-reads every request it touches whole (and releases it again; handlers are idempotent). Handlers run on the flush thread and must be idempotent per request
(a re-read after a crash can release a request again): derive output ids from the request's
identity, as the bridge's span ids and the probes' score keys do.

`keep(record) -> bool` lets a consumer take only the records it needs (e.g. one hook and layer):
the others are counted for completeness, and their payloads are not kept. It is called exactly once
per distinct record of an open request (after de-duplication, never for a late record), on the
consume thread, so it can also fold a record's metadata into the consumer's own per-request state
(the bridge keeps times, hooks and steps that way and no payload at all).

Natively scanned envelopes (`add_scan`, from the consumer core with tensortrace.wire.native): the
same effect as add_tensor/add_summary record by record, with the bookkeeping per run of records of
one request and producer (one set operation de-duplicates a run; `keep_scan(scan, run, key) -> bool
mask` is keep() for the run; only kept records become TensorRecord messages). A run that could change
its request's state part-way goes record by record, so the outcome is the per-record path's exactly
(tests/consume/test_native_view.py). A view with `keep` but no `keep_scan` is not `scan_ready`.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from tensortrace.consume.deadletter import InvalidRecord
from tensortrace.consume.sink import SealedBatch, Source
from tensortrace.consume.validate import check_summary, check_tensor_record
from tensortrace.service.backoff import Backoff
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec, native
from tensortrace.wire.completeness import Completeness, completeness

log = logging.getLogger("tensortrace.consume.requests")
_EMPTY: frozenset = frozenset()


class Release(str, enum.Enum):
    COMPLETE = "complete"   # every summary and every announced record arrived
    TIMEOUT = "timeout"     # nothing new for timeout_s
    EVICTED = "evicted"     # the view's memory bound
    STOPPED = "stopped"     # never used for delivery: open requests at shutdown are re-read


@dataclass
class CapturedRequest:
    """One request as the stream delivered it."""
    trace_id: bytes
    request_id: str
    model: str = ""
    records: list[pb.TensorRecord] = field(default_factory=list)   # kept records, de-duplicated, arrival order
    summaries: list[pb.RequestSummary] = field(default_factory=list)
    completeness: Completeness | None = None
    release: Release = Release.COMPLETE
    records_seen: int = 0          # distinct tensor records, kept or not
    first_seen_ns: int = 0         # wall clock when its first record or summary arrived here
    released_ns: int = 0
    sources: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> (first, last offset)

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.trace_id, self.request_id)


class RequestHandler(Protocol):
    def on_request(self, request: CapturedRequest) -> None:
        """Called on the flush thread, once per released request (again only after a re-read).
        Raise to have it retried with backoff (the handler's output was not made durable);
        catch what should be skipped."""


@dataclass
class RequestViewStats:
    requests_open: int = 0
    released: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in Release if r is not Release.STOPPED})
    released_complete: int = 0      # completeness.state == "complete"
    released_incomplete: int = 0
    duplicate_records: int = 0      # re-deliveries collapsed on record identity
    late_records: int = 0           # arrived after their request was released
    kept_bytes: int = 0             # payload bytes held now
    handler_failures: int = 0       # on_request raised (retried)


class _Open:
    __slots__ = ("req", "ids", "summary_ids", "producers", "captured", "last_ns", "kept_bytes", "offsets", "last_source")

    def __init__(self, req: CapturedRequest):
        self.req = req
        self.ids: dict[tuple, set[int]] = {}           # producer -> seqs of its distinct records
        self.summary_ids: set[tuple] = set()
        self.producers: dict[tuple, int] = {}          # producer -> distinct records seen from it
        self.captured: dict[tuple, int] = {}           # producer -> records its summary announces
        self.last_ns = 0
        self.kept_bytes = 0
        self.offsets: dict[int, int] = {}               # partition -> lowest offset held
        self.last_source = None                         # the Source last folded into offsets/sources


def _producer(rec) -> tuple:
    p = rec.producer
    return (p.pod, p.pid, p.generation)


class RequestView:
    """A `tensortrace.consume.Sink` that groups records by request (module docstring)."""

    def __init__(self, handler: RequestHandler, *, timeout_s: float = 30.0, keep: Callable[[pb.TensorRecord], bool] | None = None,
                 keep_scan: Callable[..., np.ndarray] | None = None, max_requests: int = 10_000, max_bytes: int = 512 << 20, remember_released: int = 200_000,
                 retry_initial_s: float = 0.2, retry_max_s: float = 10.0, clock: Callable[[], int] = time.monotonic_ns):
        if timeout_s <= 0 or max_requests < 1 or max_bytes < 1:
            raise ValueError("RequestView: timeout_s, max_requests and max_bytes must be positive")
        self.handler = handler
        self.timeout_ns = int(timeout_s * 1e9)
        self.keep = keep
        self.keep_scan = keep_scan
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.remember = remember_released
        self.retry = (retry_initial_s, retry_max_s)
        self.clock = clock
        self.stats = RequestViewStats()
        self._open: OrderedDict[tuple, _Open] = OrderedDict()   # oldest first (by first arrival)
        self._released: OrderedDict[tuple, None] = OrderedDict()
        self._ready: list[CapturedRequest] = []
        self._released_ranges: dict[int, list[tuple[int, int]]] = {}   # partition -> (first, last) offsets
        self._last_scan = 0

    # -- Sink: consume thread -------------------------------------------------------------------

    def add_tensor(self, rec: pb.TensorRecord, source: Source) -> None:
        check_tensor_record(rec)
        o = self._entry(rec.trace_id, rec.request_id, source)
        if o is None:
            return
        p = rec.producer   # one wrapper, not three (upb builds one per read)
        prod, seq = (p.pod, p.pid, p.generation), rec.seq
        seqs = o.ids.get(prod)
        if seqs is None:
            seqs = o.ids[prod] = set()
        elif seq in seqs:
            self.stats.duplicate_records += 1
            return
        seqs.add(seq)
        o.req.records_seen += 1
        o.producers[prod] = o.producers.get(prod, 0) + 1
        if self.keep is None or self.keep(rec):
            o.req.records.append(rec)
            n = len(rec.payload)
            o.kept_bytes += n
            self.stats.kept_bytes += n
            if not o.req.model:
                o.req.model = rec.model_id
        self._check(o)
        if self.stats.kept_bytes > self.max_bytes:
            self._evict_until_within_bounds()

    def add_summary(self, s: pb.RequestSummary, source: Source) -> None:
        check_summary(s)
        o = self._entry(s.trace_id, s.request_id, source)
        if o is None:
            return
        ident = codec.record_key(s)
        if ident in o.summary_ids:
            self.stats.duplicate_records += 1
            return
        o.summary_ids.add(ident)
        o.req.summaries.append(s)
        if not o.req.model:
            o.req.model = s.model_id
        prod = _producer(s)
        o.captured[prod] = o.captured.get(prod, 0) + s.records_captured
        self._check(o)

    @property
    def scan_ready(self) -> bool:
        """Whether the consumer core may hand this view whole scanned envelopes (add_scan): always,
        unless a per-record `keep` was given without its columnar twin `keep_scan`."""
        return self.keep is None or self.keep_scan is not None

    def add_scan(self, sc: native.Scan, source: Source) -> list[tuple[int, InvalidRecord]]:
        """A whole envelope scanned by the native decoder (tensortrace.wire.native), no chunked
        records in it. The same effect as add_tensor / add_summary on each record in order, with the
        bookkeeping done per run of records (one request, one producer): de-duplication with one set
        operation, `keep_scan(scan, lo, hi, key) -> bool mask` instead of keep() per record, and only
        the kept records parsed into messages. Returns the records refused, as (index, InvalidRecord),
        for the core to dead-letter."""
        failed = []
        for run in sc.runs:
            lo, hi, kind, status = run[0], run[1], run[2], run[3]
            if status != native.S_OK or kind != native.KIND_TENSOR:
                try:   # a summary, or a record that fails a check (its exact error): one at a time
                    rec = sc.record(lo)
                    if kind == native.KIND_TENSOR:
                        self.add_tensor(rec, source)
                    else:
                        self.add_summary(rec, source)
                except InvalidRecord as e:
                    failed.append((lo, e))
                continue
            self._add_run(sc, run, source)
        return failed

    def _add_run(self, sc: native.Scan, run: tuple, source: Source) -> None:
        """Valid tensor records lo..hi-1 of one request and one producer (add_scan)."""
        lo, hi, _, _, trace_id, request_id, prod, new, payload_bytes, _, _ = run
        n = hi - lo
        key = (trace_id, request_id)
        o = self._open.get(key)
        # Record by record where the run could change the request's state part-way: a summary is
        # already in (a record may complete it), the run could pass the memory bound, a record is
        # late or a repeat. Re-deliveries and bounds are rare; the common run takes the fast path.
        if (len(new) != n or (o is None and key in self._released)
                or (o is not None and (o.captured or not o.ids.get(prod, _EMPTY).isdisjoint(new)))
                or self.stats.kept_bytes + payload_bytes > self.max_bytes):
            for i in range(lo, hi):
                self.add_tensor(sc.record(i), source)
            return
        o = self._entry(trace_id, request_id, source)
        if o is None:
            return
        seqs = o.ids.get(prod)
        if seqs is None:
            o.ids[prod] = new
        else:
            seqs |= new
        o.req.records_seen += n
        o.producers[prod] = o.producers.get(prod, 0) + n
        if self.keep is None:
            kept = range(lo, hi)
        else:
            mask = self.keep_scan(sc, run, key)
            kept = range(lo, hi) if mask is True else () if mask is False else (np.flatnonzero(mask) + lo).tolist()
        if kept:
            records = o.req.records
            nbytes = 0
            model = o.req.model
            for i in kept:
                rec = sc.record(i)
                records.append(rec)
                nbytes += sc.row(i)[3]
                if not model:
                    model = rec.model_id
            o.req.model = model
            o.kept_bytes += nbytes
            self.stats.kept_bytes += nbytes
        self._check(o)
        if self.stats.kept_bytes > self.max_bytes:
            self._evict_until_within_bounds()

    def due(self) -> bool:
        now = self.clock()
        if now - self._last_scan >= 50_000_000:   # timeouts: scanned every 50 ms at most
            self._last_scan = now
            self._expire(now)
        return bool(self._ready)

    def seal(self) -> list[CapturedRequest] | None:
        self.due()
        if not self._ready:
            return None
        out, self._ready = self._ready, []
        return out

    def commit_offset(self, partition: int, candidate: int) -> int:
        """Where a commit of `partition` may go (module docstring): at most `candidate`, never past
        an open request's first record, never inside a released request's offset range."""
        at = candidate
        for o in self._open.values():
            off = o.offsets.get(partition)
            if off is not None and off < at:
                at = off
        ranges = self._released_ranges.get(partition)
        if ranges:
            moved = True
            while moved:
                moved = False
                for lo, hi in ranges:
                    if lo < at <= hi:
                        at, moved = lo, True
            # ranges wholly behind the commit point are never re-read in part: forget them
            self._released_ranges[partition] = [r for r in ranges if r[1] >= at]
        return at

    def revoked(self, partitions: set[int]) -> list[tuple]:
        """The core lost these partitions: forget their open requests (the new owner re-reads
        them whole from the last commit, which the held offsets kept behind them). Returns the
        keys forgotten, for a consumer that keeps state of its own per open request."""
        gone = [k for k, o in self._open.items() if set(o.offsets) & partitions]
        for key in gone:
            o = self._open.pop(key)
            self.stats.kept_bytes -= o.kept_bytes
        for partition in partitions:
            self._released_ranges.pop(partition, None)
        self.stats.requests_open = len(self._open)
        return gone

    # -- Sink: flush thread ---------------------------------------------------------------------

    def flush(self, batch: SealedBatch, stopping: threading.Event) -> bool:
        for req in batch.data:
            backoff = Backoff(*self.retry)
            while True:
                try:
                    self.handler.on_request(req)
                    break
                except Exception:  # the handler's output is not durable: retry, never skip silently
                    self.stats.handler_failures += 1
                    log.exception("request handler failed on %s (%s); retrying", req.request_id, req.trace_id.hex())
                    if backoff.wait(stopping):
                        return False
        return True

    # -- internals ------------------------------------------------------------------------------

    def _entry(self, trace_id: bytes, request_id: str, source: Source) -> _Open | None:
        key = (trace_id, request_id)
        o = self._open.get(key)
        if o is None:
            if key in self._released:
                self.stats.late_records += 1
                return None
            now_wall = time.time_ns()
            o = self._open[key] = _Open(CapturedRequest(trace_id=trace_id, request_id=request_id,
                                                        first_seen_ns=now_wall))
            self.stats.requests_open = len(self._open)
            if len(self._open) > self.max_requests:
                self._evict_until_within_bounds()
                if key not in self._open:   # the new one was the oldest (cannot happen) or evicted
                    return None
        o.last_ns = self.clock()
        if source is not o.last_source:   # the records of one message share their Source: fold it once
            o.last_source = source
            if source.partition not in o.offsets or source.offset < o.offsets[source.partition]:
                o.offsets[source.partition] = source.offset
            first, last = o.req.sources.get(source.partition, (source.offset, source.offset))
            o.req.sources[source.partition] = (min(first, source.offset), max(last, source.offset))
        return o

    def _check(self, o: _Open) -> None:
        if not o.captured:
            return
        if any(p not in o.captured for p in o.producers):
            return   # a rank sent records but no summary yet
        if len(o.captured) < max(max(s.producers for s in o.req.summaries), 1):
            return   # the summaries say more ranks write one
        if all(o.producers.get(p, 0) >= n for p, n in o.captured.items()):
            self._release(o, Release.COMPLETE, final=False)

    def _release(self, o: _Open, why: Release, final: bool, reason: str = "") -> None:
        req = o.req
        key = req.key
        self._open.pop(key, None)
        self.stats.kept_bytes -= o.kept_bytes
        self.stats.requests_open = len(self._open)
        waited = (self.clock() - o.last_ns) / 1e9 if final else None
        c = completeness(req.summaries, req.records_seen, final=final, waited_s=waited)
        if why is Release.EVICTED:
            c.state = "incomplete" if c.state != "no_summary" else c.state
            c.incomplete_reason = "; ".join(x for x in (c.incomplete_reason, reason) if x)
        req.completeness = c
        req.release = why
        req.released_ns = time.time_ns()
        self._ready.append(req)
        self.stats.released[why.value] += 1
        if c.complete:
            self.stats.released_complete += 1
        else:
            self.stats.released_incomplete += 1
        for partition, span in req.sources.items():
            self._released_ranges.setdefault(partition, []).append(span)
        self._released[key] = None
        while len(self._released) > self.remember:
            self._released.popitem(last=False)

    def _expire(self, now: int) -> None:
        stale = [o for o in self._open.values() if now - o.last_ns >= self.timeout_ns]
        for o in stale:
            self._release(o, Release.TIMEOUT, final=True)

    def _evict_until_within_bounds(self) -> None:
        while self._open and (len(self._open) > self.max_requests or self.stats.kept_bytes > self.max_bytes):
            _, o = next(iter(self._open.items()))
            self._release(o, Release.EVICTED, final=True,
                          reason=f"evicted: the view holds more than {self.max_requests} requests or {self.max_bytes} payload bytes")
