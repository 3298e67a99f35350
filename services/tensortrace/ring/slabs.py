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
"""

from __future__ import annotations

import math

from tensortrace.v1 import records_pb2 as pb
from tensortrace.v1 import ring_pb2
from tensortrace.wire.dtypes import ELEMENT_SIZE as _ELEMENT_SIZE

SEQ_PARTS_PER_FRAME = 65536



class SlabError(ValueError):
    """A SLAB frame that cannot be split (names what is inconsistent)."""


def record_seq(frame_seq: int, part_index: int = 0) -> int:
    """seq of part `part_index` of frame `frame_seq` (a SUMMARY frame's record: part 0)."""
    if part_index >= SEQ_PARTS_PER_FRAME:
        raise SlabError(f"part index {part_index} exceeds {SEQ_PARTS_PER_FRAME - 1}")
    return frame_seq * SEQ_PARTS_PER_FRAME + part_index


def row_bytes(slab: ring_pb2.RingSlab) -> int:
    try:
        elem = _ELEMENT_SIZE[slab.dtype]
    except KeyError:
        raise SlabError(f"slab {slab.hook!r} layer {slab.layer}: unknown dtype code {slab.dtype}") from None
    if any(d < 0 for d in slab.row_shape):
        raise SlabError(f"slab {slab.hook!r}: negative dimension in row_shape {list(slab.row_shape)}")
    return math.prod(slab.row_shape) * elem


def request_metas(step: ring_pb2.RingStep) -> list[bytes]:
    """Per RequestRows of a step, the serialized TensorRecord fields that come from it (request_id,
    trace_id, span_id, phase). Computed once per step and shared by all its slabs."""
    return [pb.TensorRecord(request_id=rr.request_id, trace_id=rr.trace_id, span_id=rr.span_id,
                            phase=rr.phase).SerializeToString() for rr in step.requests]


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
        raise SlabError(f"slab {slab.hook!r} names step {slab.step}, resolved against step {step.step}")
    rb = row_bytes(slab)
    view = payload if isinstance(payload, memoryview) else memoryview(payload)
    parts = slab.parts
    total_rows = sum(p.row_count for p in parts)
    if len(view) != total_rows * rb:
        raise SlabError(
            f"slab {slab.hook!r} layer {slab.layer} step {slab.step}: payload is {len(view)} bytes, "
            f"parts need {total_rows} rows x {rb} bytes = {total_rows * rb}")
    n_requests = len(step.requests)
    if requests_meta is None:
        requests_meta = request_metas(step)
    common = pb.TensorRecord(
        model_id=step.model_id, hook=slab.hook, layer=slab.layer, tp_rank=slab.tp_rank,
        tp_size=slab.tp_size or step.tp_size or 1, positions_kind=pb.TOKEN_RANGE, step=slab.step,
        dtype=slab.dtype, encoding=encoding,
        capture_time_unix_nano=slab.capture_time_unix_nano or step.capture_time_unix_nano,
        export_time_unix_nano=export_time_unix_nano, producer=producer).SerializeToString()
    row_shape = list(slab.row_shape)
    base_seq = frame_seq * SEQ_PARTS_PER_FRAME
    if len(parts) > SEQ_PARTS_PER_FRAME:
        raise SlabError(f"slab {slab.hook!r} has {len(parts)} parts; at most {SEQ_PARTS_PER_FRAME}")
    Rec = pb.TensorRecord
    out = []
    for i, part in enumerate(parts):
        ri = part.request_index
        if ri >= n_requests:
            raise SlabError(f"slab {slab.hook!r} part {i}: request index {ri} but step {step.step} has "
                            f"{n_requests} requests")
        n = part.row_count
        r0 = part.slab_row_start
        if r0 + n > total_rows:
            raise SlabError(f"slab {slab.hook!r} part {i}: rows [{r0}, +{n}) outside the slab's {total_rows} rows")
        start = part.position_start
        own = Rec(token_start=start, token_end=start + n, shape=[n, *row_shape], raw_size=n * rb,
                  seq=base_seq + i).SerializeToString()
        out.append((common + requests_meta[ri] + own, ri, view[r0 * rb: (r0 + n) * rb]))
    return out


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
        st = ring_pb2.RingStep.FromString(bytes(frame.meta))
        steps[st.step] = st
        return st, []
    if frame.kind == FrameKind.SLAB:
        slab = ring_pb2.RingSlab.FromString(bytes(frame.meta))
        if slab.step not in steps:
            raise SlabError(f"slab {slab.hook!r} of step {slab.step} arrived without its STEP frame")
        return None, split_slab(steps[slab.step], slab, frame.payload, frame.seq, producer)
    if frame.kind == FrameKind.SUMMARY:
        return None, [summary_record(pb.RequestSummary.FromString(bytes(frame.meta)), frame.seq, producer)]
    return None, []
