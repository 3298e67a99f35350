"""Draining one ring (one producer generation): frames -> Kafka messages -> release on ack.

Release rule (at-least-once, docs/exporter.md): ring space is released only up to the first frame
whose messages Kafka has not acknowledged, and never past the STEP frame that a not-yet-acknowledged
slab (or the newest step, which later slabs may still name) needs: an exporter restarted after a
crash re-reads from the tail and must find each slab's STEP frame before the slab. Frames released
are counted in the ring header (`frames_consumed`), so accounting survives exporter restarts.

Ring states (`RingState`): attached -> draining (the producer is gone; what it committed is still
read) -> detached (drained; the file is removed after the cleanup grace); quarantined (a corrupt
frame: nothing more is read from it). Frame drop reasons: `FrameDropReason`. Both are str enums:
their members equal, print and serialize as the strings they replaced (control RingStatus.state,
the `reason` label of tensortrace_exporter_frames_dropped_total).

    d = RingDrain(reader, cfg, metrics)
    d.drain_pass(publisher)   # read frames, send messages
    d.on_complete(unit, exc)  # called per message outcome; then d.release_acked()
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import time
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from tensortrace.exporter.config import ExporterConfig
from tensortrace.exporter.envelopes import EnvelopeBatcher, summary_entry, tensor_entry_bytes
from tensortrace.exporter.metrics import ExporterMetrics
from tensortrace.ring.format import FrameKind, RingCorruptError, RingReader
from tensortrace.ring.slabs import (SlabError, StepRequests, parse_slab, parse_step, parse_summary,
                                    slab_part_metas, summary_record)
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

log = logging.getLogger("tensortrace.exporter")

# Memory of the STEP metas kept per ring (besides max_steps_kept): estimated as meta bytes + 96 per
# request (the parsed message's overhead). A hostile producer writing big steps evicts its own older
# steps (their slabs are then dropped as step_unknown); the newest step is always kept. Per ring, and
# a pod may hold max_rings_per_pod (64) rings: 8 MiB each is at most 512 MiB per pod. Honest: 64 kept
# steps of a 512-request batch are ~5.3 MiB (docs/ring-format.md "Hostile producers").
STEPS_KEPT_BYTES = 8 << 20


class RingState(str, enum.Enum):
    """Lifecycle of one attached ring (RingDrain.state; control RingStatus.state)."""

    __str__ = str.__str__
    __format__ = str.__format__

    ATTACHED = "attached"        # the producer is alive; frames are drained as they come
    DRAINING = "draining"        # the producer is gone (exited or died); committed frames are still read
    DETACHED = "detached"        # drained and closed; the file is removed after cleanup_grace_s
    QUARANTINED = "quarantined"  # a corrupt frame: nothing more is read; the loss is counted


READABLE_STATES = frozenset({RingState.ATTACHED, RingState.DRAINING})


class FrameDropReason(str, enum.Enum):
    """Why the exporter (or, for producer_dropped, the agent) lost a frame: the `reason` label of
    tensortrace_exporter_frames_dropped_total and the keys of RingStatus.frames_dropped_by_reason."""

    __str__ = str.__str__
    __format__ = str.__format__

    BAD_META = "bad_meta"                  # the frame's metadata does not parse
    STEP_UNKNOWN = "step_unknown"          # a slab whose STEP frame is not (any more) known
    BAD_SLAB = "bad_slab"                  # a slab that cannot be split (slabs.SlabError)
    UNKNOWN_KIND = "unknown_kind"          # a frame kind this exporter does not know
    PRODUCER_DROPPED = "producer_dropped"  # dropped by the agent (ring full), from the ring header
    RING_CORRUPT = "ring_corrupt"          # committed frames lost behind a corrupt one (quarantine)
    IDENTITY_MISMATCH = "identity_mismatch"  # a ring whose header claims another pod than its directory (quarantine)
    INTERNAL_ERROR = "internal_error"      # frames left unreleased by a ring quarantined for an exporter bug


@dataclass
class SendUnit:
    """The frames of one drain pass and the messages built from them."""

    start: int                 # ring position of the first frame
    start_frames: int          # frames read (this attachment) before it
    end: int = 0
    end_frames: int = 0
    hold: tuple[int, int] | None = None  # (position, frames before) of the oldest STEP frame its slabs need
    pending: int = 0           # messages not yet acknowledged
    failed: bool = False
    records: int = 0
    payload_bytes: int = 0
    messages: int = 0
    message_bytes: int = 0
    oldest_capture_ns: int = 0
    ring: "RingDrain" = field(default=None, repr=False)


class RingDrain:
    """State of one attached ring, keyed by (path, generation): never shared between generations."""

    def __init__(self, reader: RingReader, cfg: ExporterConfig, metrics: ExporterMetrics, inode: tuple[int, int],
                 name: str | None = None, producer: pb.Producer | None = None):
        """`name` (default: the file name) labels the ring in metrics and status; `producer` (default:
        from the ring header) is the identity every record carries: the exporter passes the one it
        derived from the ring's pod directory (docs/operations.md "Pod isolation")."""
        self.reader = reader
        self.cfg = cfg
        self.metrics = metrics
        self.inode = inode
        h = reader.header
        self.path = reader.path
        self.name = name or os.path.basename(reader.path)
        self.generation = h.generation
        self.key = (self.path, self.generation)
        self.producer = producer or pb.Producer(node=h.identity.node, pod=h.identity.pod, pid=h.identity.pid,
                                                tp_rank=h.identity.tp_rank, generation=h.generation)
        self.state = RingState.ATTACHED
        self.reason = ""
        self.detached_at = 0.0
        self.producer_alive = True
        # step -> (RingStep, STEP frame position, frames read before it, request metas, request id keys)
        self.steps: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self.steps_bytes = 0          # estimated memory of `steps` (STEPS_KEPT_BYTES)
        self.latest_step: tuple[int, int] | None = None   # (position, frames before) of the newest STEP frame
        self.units: collections.deque[SendUnit] = collections.deque()
        self.read_pos = reader.tail
        self.released_pos = reader.tail
        self.frames_read = 0          # frames yielded since attach (or since the last rewind: from tail)
        self.released_frames = 0
        self.needs_rewind = False
        self.passes_record_limited = 0   # passes stopped by max_pass_records (the rest read by the next)
        self.units_abandoned = False      # quarantined for an exporter bug in its release: units forgotten
        self.last_head, self.last_head_change = reader.head, time.monotonic()
        self.dropped: collections.Counter[FrameDropReason] = collections.Counter()
        self.records_out = self.bytes_out = self.messages_out = 0
        self.records_in = self.bytes_in = 0
        self._rate_snapshot = (time.monotonic(), 0, 0)
        self.rates = (0.0, 0.0)
        self.control_seq = 0
        self.control_json = ""
        self._producer_drops_seen = reader.producer_stats()["frames_dropped"]
        self._corrupt_counted = 0
        self._loss_reason = FrameDropReason.RING_CORRUPT   # what the frames a quarantine leaves unread count as
        self._encoding = cfg.payload_encoding_code
        m = metrics
        self._m_records_in = m.records_in.labels(self.name)
        self._m_bytes_in = m.bytes_in.labels(self.name)
        self._m_frames_in = m.frames_in.labels(self.name)
        self._m_records_out = m.records_out.labels(self.name, cfg.topic)
        self._m_bytes_out = m.bytes_out.labels(self.name, cfg.topic)

    # -- state -----------------------------------------------------------------------------
    @property
    def state(self) -> RingState:
        return self._state

    @state.setter
    def state(self, value: RingState | str) -> None:
        self._state = RingState(value)   # a plain string is accepted; an unknown one raises ValueError

    @property
    def active(self) -> bool:
        """Attached or draining: frames may still be read."""
        return self._state in READABLE_STATES

    # -- reading ---------------------------------------------------------------------------
    @property
    def readable(self) -> bool:
        return self._state in READABLE_STATES and not self.needs_rewind

    def has_unread(self) -> bool:
        return self.readable and self.reader.head > self.read_pos

    def drain_pass(self, publisher) -> int:
        """Read up to one pass of frames, send their messages. Returns frames read."""
        cfg = self.cfg
        unit = SendUnit(start=self.read_pos, start_frames=self.frames_read, ring=self)
        batcher = EnvelopeBatcher(cfg.max_message_bytes)
        export_ns = time.time_ns()
        n = 0
        corrupt = None
        # A pass is bounded by frames, bytes and records (max-pass-records: one-byte rows would pack
        # ~900k records into 8 MiB, seconds of this one thread). The frame that would take the pass
        # past the record budget is put back (RingReader.unread) and read first by the next pass:
        # nothing is skipped or read twice. A frame is never split: the first frame of a pass is
        # taken whole (a slab has at most SEQ_PARTS_PER_FRAME parts), whatever its record count.
        max_records = cfg.max_pass_records
        frames = self.reader.frames(cfg.max_pass_frames, cfg.max_pass_bytes)
        put_back = None
        try:
            for frame in frames:
                slab = None
                if frame.kind == FrameKind.SLAB:
                    try:
                        slab = parse_slab(frame.meta)
                    except (DecodeError, SlabError) as e:
                        slab = e
                    if unit.records and not isinstance(slab, Exception) and unit.records + len(slab.parts) > max_records:
                        put_back = frame
                        break
                elif frame.kind == FrameKind.SUMMARY and unit.records >= max_records:
                    put_back = frame
                    break
                n += 1
                self._frame(frame, unit, batcher, export_ns, slab)
                self.frames_read += 1
                self.read_pos = frame.end
        except RingCorruptError as e:
            corrupt = e
        finally:
            frames.close()
        if put_back is not None:
            self.reader.unread(put_back)
            self.passes_record_limited += 1
            self.metrics.passes_record_limited.labels(self.name).inc()
        if n == 0 and corrupt is None:
            return 0
        unit.end, unit.end_frames = self.read_pos, self.frames_read
        self._m_frames_in.inc(n)
        self._m_records_in.inc(unit.records)
        self._m_bytes_in.inc(unit.payload_bytes)
        self.records_in += unit.records
        self.bytes_in += unit.payload_bytes
        if n:
            self.units.append(unit)
            for key, value, nrec in batcher.messages():
                unit.pending += 1
                unit.messages += 1
                unit.message_bytes += len(value)
                publisher.send(key, value, unit)
        if corrupt is not None:
            self.quarantine("corrupt_frame", str(corrupt))
        elif n and unit.pending == 0:
            # nothing to wait for (only STEP or dropped frames): release now; no acknowledgement
            # would come to do it, and an idle ring is only released when it has no units
            self.release_acked()
        return n

    def _frame(self, frame, unit: SendUnit, batcher: EnvelopeBatcher, export_ns: int, slab=None) -> None:
        """`slab`: the SLAB meta drain_pass already parsed (or the error parsing it raised)."""
        kind = frame.kind
        if kind == FrameKind.SLAB:
            if slab is None:
                try:
                    slab = parse_slab(frame.meta)
                except (DecodeError, SlabError) as e:
                    slab = e
            if isinstance(slab, Exception):
                self._drop(FrameDropReason.BAD_META, frame, slab)
                return
            entry = self.steps.get(slab.step)
            if entry is None:
                self._drop(FrameDropReason.STEP_UNKNOWN, frame)
                return
            step, step_pos, step_frames, requests_meta, keys, _cost = entry
            enc = self._encoding
            try:
                parts = slab_part_metas(step, slab, frame.payload, frame.seq, self.producer, export_ns,
                                        enc, requests_meta)
            except SlabError as e:
                self._drop(FrameDropReason.BAD_SLAB, frame, e)
                return
            if step_pos >= self.released_pos and (unit.hold is None or step_pos < unit.hold[0]):
                unit.hold = (step_pos, step_frames)
            capture = slab.capture_time_unix_nano or step.capture_time_unix_nano
            if capture and (not unit.oldest_capture_ns or capture < unit.oldest_capture_ns):
                unit.oldest_capture_ns = capture
            chunk = self.cfg.chunk_payload_bytes
            add = batcher.add
            unit.records += len(parts)
            for meta, request_index, rows in parts:
                unit.payload_bytes += len(rows)
                payload = rows if enc == pb.RAW else codec.encode_payload(rows, enc, codec.element_size(slab.dtype))
                if len(payload) <= chunk:
                    add(keys[request_index], tensor_entry_bytes(meta, payload))
                else:
                    total = len(payload)
                    count = (total + chunk - 1) // chunk
                    for i in range(count):  # the chunking rule of codec.chunk_record, without copies
                        fields = pb.TensorRecord(chunk_index=i, chunk_count=count, chunk_offset=i * chunk,
                                                 payload_size=total).SerializeToString()
                        add(keys[request_index], tensor_entry_bytes(meta + fields, payload[i * chunk:(i + 1) * chunk]))
        elif kind == FrameKind.STEP:
            try:
                step = parse_step(frame.meta)
            except (DecodeError, SlabError) as e:
                self._drop(FrameDropReason.BAD_META, frame, e)
                return
            requests = StepRequests(step)    # per-request record fields: built when a slab names them
            cost = len(frame.meta) + 96 * len(requests)
            old = self.steps.pop(step.step, None)
            if old is not None:
                self.steps_bytes -= old[5]
            self.steps[step.step] = (step, frame.position, self.frames_read, requests, requests.keys, cost)
            self.steps_bytes += cost
            while len(self.steps) > self.cfg.max_steps_kept or (self.steps_bytes > STEPS_KEPT_BYTES and len(self.steps) > 1):
                self.steps_bytes -= self.steps.popitem(last=False)[1][5]
            self.latest_step = (frame.position, self.frames_read)
        elif kind == FrameKind.SUMMARY:
            try:
                summary = summary_record(parse_summary(frame.meta), frame.seq, self.producer, export_ns)
                entry = summary_entry(summary)
                if entry.size + 16 > self.cfg.max_message_bytes:
                    raise SlabError(f"summary of request {summary.request_id[:64]!r} is {entry.size} bytes; a message "
                                    f"holds at most {self.cfg.max_message_bytes} (max-message-bytes)")
            except (DecodeError, SlabError) as e:
                self._drop(FrameDropReason.BAD_META, frame, e)
                return
            unit.records += 1
            batcher.add(summary.request_id.encode(), entry)
        else:
            self._drop(FrameDropReason.UNKNOWN_KIND, frame)

    def _drop(self, reason: FrameDropReason, frame, error: Exception | None = None) -> None:
        if error is not None and not self.dropped[reason]:   # the first of each reason: the log stays bounded
            log.warning("%s: frame %d dropped (%s): %s", self.name, frame.seq, reason, str(error)[:500])
        self.dropped[reason] += 1
        self.metrics.frames_dropped.labels(self.name, reason).inc()

    # -- acknowledgements and release ------------------------------------------------------
    def on_complete(self, unit: SendUnit, exc) -> None:
        unit.pending -= 1
        if exc is not None and not unit.failed:
            unit.failed = True
            if not self.needs_rewind:
                log.warning("%s: delivery failed (%s: %s); will re-read the ring from its tail once in-flight sends finish",
                            self.name, type(exc).__name__, exc)
            self.needs_rewind = True

    def release_acked(self, force_all: bool = False) -> None:
        """Pop acknowledged units in order and release ring space (see the module's release rule)."""
        units = self.units
        while units and units[0].pending == 0 and not units[0].failed:
            u = units.popleft()
            self.records_out += u.records
            self.bytes_out += u.payload_bytes
            self.messages_out += u.messages
            self._m_records_out.inc(u.records)
            self._m_bytes_out.inc(u.payload_bytes)
            self.metrics.messages_out.labels(self.cfg.topic).inc(u.messages)
            self.metrics.message_bytes_out.labels(self.cfg.topic).inc(u.message_bytes)
        if self.needs_rewind and not any(u.pending for u in units):
            self._rewind()
        if units:
            limit = (units[0].start, units[0].start_frames)
            for u in units:
                if u.hold is not None and u.hold[0] < limit[0]:
                    limit = u.hold
        else:
            limit = (self.read_pos, self.frames_read)
        if not force_all and self.latest_step is not None and self.latest_step[0] < limit[0]:
            # keep the newest STEP frame (later slabs may name it) unless that holds back too much
            if limit[0] - self.latest_step[0] <= self.reader.capacity // 4:
                limit = self.latest_step
        if limit[0] > self.released_pos:
            self.reader.release(limit[0])
            self.reader.count_consumed(limit[1] - self.released_frames)
            self.released_pos, self.released_frames = limit

    def _rewind(self) -> None:
        """After a failed delivery: forget what was read beyond the tail and read it again."""
        self.units.clear()
        self.reader.rewind()
        self.read_pos = self.reader.tail
        self.frames_read = self.released_frames
        self.latest_step = None
        self.needs_rewind = False
        self.metrics.rewinds.labels(self.name).inc()
        log.info("%s: re-reading from position %d (at-least-once: frames after it may be published twice)",
                 self.name, self.read_pos)

    def oldest_undelivered_ns(self) -> int:
        oldest = 0
        for u in self.units:
            if u.oldest_capture_ns and (not oldest or u.oldest_capture_ns < oldest):
                oldest = u.oldest_capture_ns
        return oldest

    # -- lifecycle -------------------------------------------------------------------------
    def quarantine(self, reason: str, detail: str, loss_reason: FrameDropReason = FrameDropReason.RING_CORRUPT) -> None:
        if self._state is RingState.QUARANTINED:
            return
        self._loss_reason = loss_reason
        self.state = RingState.QUARANTINED
        self.reason = f"{reason}: {detail}"
        log.error("ring quarantined: %s (%s); its remaining frames are counted as dropped, other rings keep flowing",
                  detail, reason)
        self.metrics.rings_quarantined.labels(reason).inc()

    def update_counters(self) -> None:
        """Producer-side drops and corrupt-ring losses into metrics; fill; rates."""
        stats = self.reader.producer_stats()
        d = stats["frames_dropped"] - self._producer_drops_seen
        if d > 0:
            self.metrics.frames_dropped.labels(self.name, FrameDropReason.PRODUCER_DROPPED).inc(d)
            self._producer_drops_seen = stats["frames_dropped"]
        if self._state is RingState.QUARANTINED and not self.units:
            lost = max(0, stats["frames_committed"] - self.frames_released_total() - self._corrupt_counted)
            if lost:
                self.dropped[self._loss_reason] += lost
                self._corrupt_counted += lost
                self.metrics.frames_dropped.labels(self.name, self._loss_reason).inc(lost)
        self.metrics.ring_fill.labels(self.name).set(self.reader.fill())
        self.metrics.agent_thread.set(self.name, stats.get("thread_ns", 0) / 1e9)
        released = self.frames_released_total()
        frames = self.metrics.ring_frames
        frames.labels(self.name, "committed").set(stats["frames_committed"])
        frames.labels(self.name, "producer_dropped").set(stats["frames_dropped"])
        frames.labels(self.name, "released").set(released)
        frames.labels(self.name, "pending").set(max(0, stats["frames_committed"] - released))
        now = time.monotonic()
        t0, r0, b0 = self._rate_snapshot
        if now - t0 >= 1.0:
            self.rates = ((self.records_out - r0) / (now - t0), (self.bytes_out - b0) / (now - t0))
            self._rate_snapshot = (now, self.records_out, self.bytes_out)

    def frames_released_total(self) -> int:
        """Frames released over the ring's life (all exporter incarnations): from the header."""
        return self.reader.frames_consumed

    def drained(self) -> bool:
        return not self.units and self.read_pos == self.reader.head

    def close(self) -> None:
        try:
            self.reader.close()
        except Exception as e:  # already closed / unmapped
            log.debug("%s: close: %s", self.path, e)
