"""The split rule from ring SLAB frames to per-request TensorRecords (docs/ARCHITECTURE.md).

Standalone on purpose (imports only the generated protobuf modules and the dtype table): the
exporter uses it to publish, the agent's tests use it to check what they wrote.

For each part of a slab one TensorRecord: request_id, trace_id, span_id, phase from the step's
RequestRows at `part.request_index`; hook, layer, tp_rank, tp_size, dtype, step from the slab;
shape = [row_count, *row_shape];
positions TOKEN_RANGE [part.position_start, + row_count); payload = the part's rows of the slab
payload; producer from the ring header; seq = frame_seq * 65536 + part_index.

    recs = split_slab(step, slab, payload, frame_seq=7, producer=producer)
    [(r.request_id, r.seq) for r in recs]       # [('r1', 458752), ('r2', 458753)]

Hostile input. The ring reader checks a frame's framing (lengths, sequence, meta checksum); what the
meta *says* is checked here, because a producer can write well-formed, checksummed frames with any
content (docs/ring-format.md "Hostile producers"). A slab is refused (SlabError, naming the field
and the mismatch) unless: its dtype is known; its row shape has at most MAX_ROW_DIMS positive
dimensions; it has parts and they tile the payload (every row in exactly one part, no part empty;
any order); every part's request index exists, with W3C-sized trace/span ids or none (what every
consumer's `codec.decode_envelope` requires of each record of a message), and its token range fits
the uint32 positions; the frame sequence keeps `seq` within 64 bits; each record's metadata stays under
MAX_RECORD_META_BYTES (so a record always fits a Kafka message: ids cannot make one that the broker
refuses forever) and the request id (the Kafka key) under MAX_REQUEST_ID_BYTES. Frame meta is
parsed only up to MAX_META_BYTES and a step only up to MAX_REQUESTS_PER_STEP requests, and nothing
is allocated from a count a frame claims: sizes are compared (Python ints, no overflow) before any
view is taken. Per-request record fields are built lazily (`StepRequests`), once per request that a
slab names, so a step with many requests costs its parse, not a record per request.
"""

from __future__ import annotations

import math

from tensortrace.v1 import records_pb2 as pb
from tensortrace.v1 import ring_pb2
from tensortrace.wire.dtypes import ELEMENT_SIZE as _ELEMENT_SIZE

SEQ_PARTS_PER_FRAME = 65536
MAX_FRAME_SEQ = (1 << 64) // SEQ_PARTS_PER_FRAME - 1   # record seq = frame_seq * 65536 + part: a uint64
MAX_ROW_DIMS = 32                      # numpy's historical limit; activations have 1-3
MAX_META_BYTES = 2 << 20               # STEP / SLAB / SUMMARY meta parsed at most (honest: a few KiB)
MAX_REQUESTS_PER_STEP = SEQ_PARTS_PER_FRAME
MAX_REQUEST_ID_BYTES = 512             # request id = Kafka key (honest ids: ~40 bytes)
MAX_RECORD_META_BYTES = 8192           # a record's metadata; the config keeps >= 16 KiB per message for it
_U32 = 0xFFFFFFFF


class SlabError(ValueError):
    """A SLAB frame that cannot be split (names what is inconsistent)."""


def record_seq(frame_seq: int, part_index: int = 0) -> int:
    """seq of part `part_index` of frame `frame_seq` (a SUMMARY frame's record: part 0)."""
    if part_index >= SEQ_PARTS_PER_FRAME:
        raise SlabError(f"part index {part_index} exceeds {SEQ_PARTS_PER_FRAME - 1}")
    if frame_seq > MAX_FRAME_SEQ:
        _check_frame_seq(frame_seq)
    return frame_seq * SEQ_PARTS_PER_FRAME + part_index


def _check_frame_seq(frame_seq: int) -> None:
    if frame_seq > MAX_FRAME_SEQ:
        raise SlabError(f"frame sequence {frame_seq} exceeds {MAX_FRAME_SEQ}: record seq "
                        f"(frame_seq * {SEQ_PARTS_PER_FRAME} + part) would not fit in 64 bits")


def _check_meta_size(what: str, meta) -> None:
    if len(meta) > MAX_META_BYTES:
        raise SlabError(f"{what} meta is {len(meta)} bytes; at most {MAX_META_BYTES} are parsed")


def parse_step(meta) -> ring_pb2.RingStep:
    """A STEP frame's RingStep, bounded (SlabError: too large, too many requests; DecodeError: not
    a RingStep)."""
    _check_meta_size("STEP", meta)
    step = ring_pb2.RingStep.FromString(meta)
    if len(step.requests) > MAX_REQUESTS_PER_STEP:
        raise SlabError(f"step {step.step} has {len(step.requests)} requests; at most {MAX_REQUESTS_PER_STEP}")
    return step


def parse_slab(meta) -> ring_pb2.RingSlab:
    """A SLAB frame's RingSlab, bounded (SlabError: too large; DecodeError: not a RingSlab)."""
    if len(meta) > MAX_META_BYTES:
        _check_meta_size("SLAB", meta)
    return ring_pb2.RingSlab.FromString(meta)


def parse_summary(meta) -> pb.RequestSummary:
    """A SUMMARY frame's RequestSummary, bounded (SlabError: too large; DecodeError: not a
    RequestSummary). Its ids are checked by summary_record."""
    if len(meta) > MAX_META_BYTES:
        _check_meta_size("SUMMARY", meta)
    return pb.RequestSummary.FromString(meta)


def _check_trace_ids(trace_id: bytes, span_id: bytes, where: str) -> None:
    # what every consumer's codec.decode_envelope requires of each record: one record breaking it
    # would make the whole message (every record with it) unreadable downstream
    if trace_id and len(trace_id) != 16:
        raise SlabError(f"{where}: trace_id is {len(trace_id)} bytes, not 16 (W3C) or empty")
    if span_id and len(span_id) != 8:
        raise SlabError(f"{where}: span_id is {len(span_id)} bytes, not 8 (W3C) or empty")


def _check_request_id(request_id: str, where) -> bytes:
    key = request_id.encode()
    if len(key) > MAX_REQUEST_ID_BYTES:
        raise SlabError(f"{where}: request id of {len(key)} bytes ({request_id[:32]!r}...); at most "
                        f"{MAX_REQUEST_ID_BYTES} (it is the Kafka key)")
    return key


def row_bytes(slab: ring_pb2.RingSlab) -> int:
    try:
        elem = _ELEMENT_SIZE[slab.dtype]
    except KeyError:
        raise SlabError(f"slab {slab.hook!r} layer {slab.layer}: unknown dtype code {slab.dtype}") from None
    if len(slab.row_shape) > MAX_ROW_DIMS:
        raise SlabError(f"slab {slab.hook[:64]!r}: row_shape has {len(slab.row_shape)} dimensions; at most {MAX_ROW_DIMS}")
    if any(d <= 0 for d in slab.row_shape):
        raise SlabError(f"slab {slab.hook[:64]!r}: zero or negative dimension in row_shape {list(slab.row_shape)}")
    return math.prod(slab.row_shape) * elem   # a Python int: a product beyond 64 bits stays exact


def request_metas(step: ring_pb2.RingStep) -> list[bytes]:
    """Per RequestRows of a step, the serialized TensorRecord fields that come from it (request_id,
    trace_id, span_id, phase). Eager; the exporter uses the lazy `StepRequests`."""
    return [_request_meta(rr) for rr in step.requests]


def _request_meta(rr) -> bytes:
    return pb.TensorRecord(request_id=rr.request_id, trace_id=rr.trace_id, span_id=rr.span_id,
                           phase=rr.phase).SerializeToString()


class StepRequests:
    """The per-request record fields of a step, built on first use and kept for its later slabs:
    `sr[i]` is what `request_metas(step)[i]` would be; `sr.keys[i]` (a list) is the request's Kafka
    key once `sr[i]` was built (slab_part_metas builds it for every request its parts name). A
    request whose ids are too long or malformed raises SlabError when a slab names it."""

    __slots__ = ("_step", "_metas", "keys")

    def __init__(self, step: ring_pb2.RingStep):
        self._step = step
        n = len(step.requests)
        self._metas: list = [None] * n
        self.keys: list = [None] * n

    def __len__(self) -> int:
        return len(self._metas)

    def __getitem__(self, i: int) -> bytes:
        m = self._metas[i]
        if m is None:
            rr = self._step.requests[i]
            key, trace_id, span_id = rr.request_id.encode(), rr.trace_id, rr.span_id
            if len(key) > MAX_REQUEST_ID_BYTES or (trace_id and len(trace_id) != 16) or (span_id and len(span_id) != 8):
                where = f"step {self._step.step} request {i}"
                _check_request_id(rr.request_id, where)
                _check_trace_ids(trace_id, span_id, where)
            m = self._metas[i] = pb.TensorRecord(request_id=rr.request_id, trace_id=trace_id, span_id=span_id,
                                                 phase=rr.phase).SerializeToString()
            self.keys[i] = key
        return m


def slab_part_metas(step: ring_pb2.RingStep, slab: ring_pb2.RingSlab, payload, frame_seq: int,
                    producer: pb.Producer, export_time_unix_nano: int = 0, encoding: int = 0,
                    requests_meta: list[bytes] | None = None):
    """[(serialized TensorRecord without payload, request index, payload view of the part's rows)].

    The record bytes are the concatenation of three serialized pieces (fields from the slab, from the
    step's RequestRows, from the part); protobuf parses concatenated messages as one message, and no field is in
    two pieces. This is the one implementation of the split rule: `slab_parts` parses these bytes.
    No payload byte is copied: the views slice `payload` (typically a memoryview into the ring).
    """
    if slab.step != step.step:
        raise SlabError(f"slab {slab.hook[:64]!r} names step {slab.step}, resolved against step {step.step}")
    if frame_seq > MAX_FRAME_SEQ:
        _check_frame_seq(frame_seq)
    rb = row_bytes(slab)
    view = payload if isinstance(payload, memoryview) else memoryview(payload)
    parts = slab.parts
    if not parts:
        raise SlabError(f"slab {slab.hook[:64]!r} layer {slab.layer} step {slab.step} has no parts (no request's rows)")
    if len(parts) > SEQ_PARTS_PER_FRAME:
        raise SlabError(f"slab {slab.hook[:64]!r} has {len(parts)} parts; at most {SEQ_PARTS_PER_FRAME}")
    total_rows = sum(p.row_count for p in parts)
    if len(view) != total_rows * rb:
        raise SlabError(
            f"slab {slab.hook[:64]!r} layer {slab.layer} step {slab.step}: payload is {len(view)} bytes, "
            f"parts need {total_rows} rows x {rb} bytes = {total_rows * rb}")
    n_requests = len(step.requests)
    if requests_meta is None:
        requests_meta = StepRequests(step)
    common = pb.TensorRecord(
        model_id=step.model_id, hook=slab.hook, layer=slab.layer, tp_rank=slab.tp_rank,
        tp_size=slab.tp_size or step.tp_size or 1, positions_kind=pb.TOKEN_RANGE, step=slab.step,
        dtype=slab.dtype, encoding=encoding,
        capture_time_unix_nano=slab.capture_time_unix_nano or step.capture_time_unix_nano,
        export_time_unix_nano=export_time_unix_nano, producer=producer).SerializeToString()
    if len(common) > MAX_RECORD_META_BYTES:
        raise SlabError(f"slab {slab.hook[:64]!r}: record metadata of {len(common)} bytes from the slab and step "
                        f"alone (hook, model id); at most {MAX_RECORD_META_BYTES}")
    row_shape = list(slab.row_shape)
    base_seq = frame_seq * SEQ_PARTS_PER_FRAME
    Rec = pb.TensorRecord
    metas = requests_meta._metas if requests_meta.__class__ is StepRequests else requests_meta
    room = MAX_RECORD_META_BYTES - len(common)
    out = []
    expect = 0        # the agent writes parts in row order, contiguous: checked on the way
    in_order = True
    for i, part in enumerate(parts):
        ri = part.request_index
        if ri >= n_requests:
            raise SlabError(f"slab {slab.hook[:64]!r} part {i}: request index {ri} but step {step.step} has "
                            f"{n_requests} requests")
        n = part.row_count
        r0 = part.slab_row_start
        if r0 != expect or not n:
            in_order = False
        expect = r0 + n
        start = part.position_start
        end = start + n
        if end > _U32:
            raise SlabError(f"slab {slab.hook[:64]!r} part {i}: token range [{start}, {start} + {n}) does not fit "
                            f"the uint32 token positions")
        own = Rec(token_start=start, token_end=end, shape=[n, *row_shape], raw_size=n * rb,
                  seq=base_seq + i).SerializeToString()
        rmeta = metas[ri]
        if rmeta is None:
            rmeta = requests_meta[ri]     # built (and checked) on first use
        if len(rmeta) + len(own) > room:
            raise SlabError(f"slab {slab.hook[:64]!r} part {i}: record metadata of "
                            f"{MAX_RECORD_META_BYTES - room + len(rmeta) + len(own)} bytes (ids of request {ri}); "
                            f"at most {MAX_RECORD_META_BYTES}")
        out.append((common + rmeta + own, ri, view[r0 * rb: (r0 + n) * rb]))
    if not in_order:
        _check_tiling(slab, parts, total_rows)
    return out


def _check_tiling(slab, parts, total_rows: int) -> None:
    """Every slab row in exactly one part, no part empty, parts in any row order (the in-order case
    is checked by slab_part_metas' loop)."""
    spans = sorted((p.slab_row_start, p.row_count, i) for i, p in enumerate(parts))
    expect, prev = 0, None
    for r0, n, i in spans:
        if n == 0:
            raise SlabError(f"slab {slab.hook[:64]!r} part {i}: no rows")
        if r0 < expect:
            raise SlabError(f"slab {slab.hook[:64]!r} part {i}: rows [{r0}, +{n}) overlap part {prev}'s "
                            f"(which end at row {expect})")
        if r0 > expect:
            raise SlabError(f"slab {slab.hook[:64]!r}: rows [{expect}, {r0}) of the slab's {total_rows} belong to "
                            f"no part (part {i} starts at {r0})")
        expect, prev = r0 + n, i


def slab_parts(step: ring_pb2.RingStep, slab: ring_pb2.RingSlab, payload, frame_seq: int,
               producer: pb.Producer, export_time_unix_nano: int = 0):
    """[(TensorRecord without payload/encoding, payload view of the part's rows)], in part order.

    The record carries `raw_size`; the caller sets encoding and payload.
    """
    return [(pb.TensorRecord.FromString(meta), view)
            for meta, _, view in slab_part_metas(step, slab, payload, frame_seq, producer, export_time_unix_nano)]


def split_slab(step: ring_pb2.RingStep, slab: ring_pb2.RingSlab, payload, frame_seq: int,
               producer: pb.Producer, export_time_unix_nano: int = 0) -> list[pb.TensorRecord]:
    """Complete TensorRecords (RAW payload, copied) for every part of a slab."""
    out = []
    for rec, rows in slab_parts(step, slab, payload, frame_seq, producer, export_time_unix_nano):
        rec.encoding = pb.RAW
        rec.payload = bytes(rows)
        out.append(rec)
    return out


def summary_record(summary: pb.RequestSummary, frame_seq: int, producer: pb.Producer,
                   export_time_unix_nano: int = 0) -> pb.RequestSummary:
    """The RequestSummary of a SUMMARY frame as published: producer and seq set by the ring."""
    if len(summary.request_id) > MAX_REQUEST_ID_BYTES // 4:     # characters: only then can the UTF-8 be too long
        _check_request_id(summary.request_id, "summary")
    trace_id, span_id = summary.trace_id, summary.span_id
    if (trace_id and len(trace_id) != 16) or (span_id and len(span_id) != 8):
        _check_trace_ids(trace_id, span_id, f"summary of request {summary.request_id[:64]!r}")
    summary.producer.CopyFrom(producer)
    summary.seq = record_seq(frame_seq)
    if export_time_unix_nano:
        summary.export_time_unix_nano = export_time_unix_nano
    return summary


def ring_producer(header) -> pb.Producer:
    """The Producer every record of a ring carries (from its RingHeader)."""
    ident = header.identity
    return pb.Producer(node=ident.node, pod=ident.pod, pid=ident.pid, tp_rank=ident.tp_rank,
                       generation=header.generation)


def decode_frame(frame, steps: dict, producer: pb.Producer):
    """(RingStep or None, [v1 records]) for one ring frame, by the split rule.

    A STEP frame is remembered in `steps` (step number -> RingStep) for the slabs that follow it and
    returned; a SLAB becomes one RAW TensorRecord per part; a SUMMARY its RequestSummary.

        steps, producer = {}, ring_producer(reader.header)
        for frame in reader.frames():
            step, records = decode_frame(frame, steps, producer)
    """
    from tensortrace.ring.format import FrameKind

    if frame.kind == FrameKind.STEP:
        st = parse_step(bytes(frame.meta))
        steps[st.step] = st
        return st, []
    if frame.kind == FrameKind.SLAB:
        slab = parse_slab(bytes(frame.meta))
        if slab.step not in steps:
            raise SlabError(f"slab {slab.hook[:64]!r} of step {slab.step} arrived without its STEP frame")
        return None, split_slab(steps[slab.step], slab, frame.payload, frame.seq, producer)
    if frame.kind == FrameKind.SUMMARY:
        return None, [summary_record(parse_summary(bytes(frame.meta)), frame.seq, producer)]
    return None, []
