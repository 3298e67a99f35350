"""The split rule from ring SLAB frames to per-request TensorRecords (docs/ARCHITECTURE.md).

Standalone on purpose (imports only the generated protobuf modules): the exporter uses it to
publish, the agent's tests use it to check what they wrote.

For each part of a slab one TensorRecord: request_id, trace_id, span_id, phase from the step's
span; hook, layer, tp_rank, tp_size, dtype, step from the slab; shape = [row_count, *row_shape];
positions TOKEN_RANGE [part.position_start, + row_count); payload = the part's rows of the slab
payload; producer from the ring header; seq = frame_seq * 65536 + part_index.

>>> recs = split_slab(step, slab, payload, frame_seq=7, producer=producer)
>>> [(r.request_id, r.seq) for r in recs]
[('r1', 458752), ('r2', 458753)]
"""

from __future__ import annotations

import math

from tensortrace.v1 import records_pb2 as pb
from tensortrace.v1 import ring_pb2

SEQ_PARTS_PER_FRAME = 65536

# element size in bytes per DType code (the codec has the same table; kept here so this module
# stays free of numpy/zstd imports and can be reused anywhere)
_ELEMENT_SIZE = {
    pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT64: 8, pb.INT8: 1, pb.UINT8: 1,
    pb.INT16: 2, pb.INT32: 4, pb.INT64: 8, pb.BOOL: 1, pb.FLOAT8_E4M3FN: 1, pb.FLOAT8_E5M2: 1,
    pb.FLOAT8_E4M3FNUZ: 1, pb.FLOAT8_E5M2FNUZ: 1,
}


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


def slab_parts(step: ring_pb2.RingStep, slab: ring_pb2.RingSlab, payload, frame_seq: int,
               producer: pb.Producer, export_time_unix_nano: int = 0):
    """[(TensorRecord without payload/encoding, payload view of the part's rows)], in part order.

    The record carries `raw_size`; the caller sets encoding and payload (this split never copies
    payload bytes: the views slice `payload`, typically a memoryview into the ring).
    """
    if slab.step != step.step:
        raise SlabError(f"slab {slab.hook!r} names step {slab.step}, resolved against step {step.step}")
    rb = row_bytes(slab)
    view = payload if isinstance(payload, memoryview) else memoryview(payload)
    total_rows = sum(p.row_count for p in slab.parts)
    if len(view) != total_rows * rb:
        raise SlabError(
            f"slab {slab.hook!r} layer {slab.layer} step {slab.step}: payload is {len(view)} bytes, "
            f"parts need {total_rows} rows x {rb} bytes = {total_rows * rb}")
    spans = step.spans
    row_shape = list(slab.row_shape)
    # fields shared by every part, set once (CopyFrom is ~2x faster than keyword construction)
    template = pb.TensorRecord(
        model_id=step.model_id, hook=slab.hook, layer=slab.layer, tp_rank=slab.tp_rank,
        tp_size=slab.tp_size or step.tp_size or 1, positions_kind=pb.TOKEN_RANGE, step=slab.step,
        dtype=slab.dtype, capture_time_unix_nano=slab.capture_time_unix_nano or step.capture_time_unix_nano,
        export_time_unix_nano=export_time_unix_nano, producer=producer)
    out = []
    for i, part in enumerate(slab.parts):
        if part.span_index >= len(spans):
            raise SlabError(f"slab {slab.hook!r} part {i}: span index {part.span_index} but step {step.step} has {len(spans)} spans")
        if part.slab_row_start + part.row_count > total_rows:
            raise SlabError(f"slab {slab.hook!r} part {i}: rows [{part.slab_row_start}, +{part.row_count}) outside the slab's {total_rows} rows")
        span = spans[part.span_index]
        n = part.row_count
        rec = pb.TensorRecord()
        rec.CopyFrom(template)
        rec.request_id = span.request_id
        rec.trace_id = span.trace_id
        rec.span_id = span.span_id
        rec.phase = span.phase
        rec.token_start = part.position_start
        rec.token_end = part.position_start + n
        rec.shape.append(n)
        rec.shape.extend(row_shape)
        rec.raw_size = n * rb
        rec.seq = record_seq(frame_seq, i)
        start = part.slab_row_start * rb
        out.append((rec, view[start: start + n * rb]))
    return out


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
