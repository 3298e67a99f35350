"""Structural checks of a decoded record: what must hold before any consumer uses it.

    check_tensor_record(rec)     # raises InvalidRecord(DeadLetterReason.RAW_SIZE, "...") and the like

Cheap (no payload decode), and the same for every consumer: a record that passes can be stored,
assembled and scored; one that does not is dead-lettered with its typed reason.
"""

from __future__ import annotations

import math

from tensortrace.consume.deadletter import DeadLetterReason as R
from tensortrace.consume.deadletter import InvalidRecord
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec


def fixed_id(value: bytes, size: int, what: str) -> bytes:
    """A trace id (16 bytes) or span id (8 bytes); empty means none (zeros)."""
    if not value:
        return b"\0" * size
    if len(value) != size:
        raise InvalidRecord(R.TRACE_ID if what == "trace_id" else R.SPAN_ID, f"{what} is {len(value)} bytes, not {size}")
    return value


def check_tensor_record(rec: pb.TensorRecord) -> None:
    try:
        elem = codec.element_size(rec.dtype)
    except codec.WireError as e:
        raise InvalidRecord(R.DTYPE, str(e)) from None
    if rec.encoding not in _ENCODINGS:
        raise InvalidRecord(R.ENCODING, f"unknown payload encoding {rec.encoding}")
    if any(d < 0 for d in rec.shape):
        raise InvalidRecord(R.SHAPE, f"negative dimension in shape {list(rec.shape)}")
    expect = math.prod(rec.shape) * elem
    if rec.raw_size != expect:
        raise InvalidRecord(R.RAW_SIZE, f"raw_size {rec.raw_size} != {expect} implied by shape {list(rec.shape)} "
                                        f"and dtype {codec.dtype_name(rec.dtype)}")
    if rec.encoding == pb.RAW and len(rec.payload) != rec.raw_size:
        raise InvalidRecord(R.RAW_SIZE, f"RAW payload is {len(rec.payload)} bytes, raw_size says {rec.raw_size}")
    if rec.positions_kind == pb.TOKEN_RANGE and rec.shape and rec.token_end - rec.token_start != rec.shape[0]:
        raise InvalidRecord(R.TOKEN_RANGE, f"token range [{rec.token_start}, {rec.token_end}) does not match {rec.shape[0]} rows")
    if rec.positions_kind == pb.TOKEN_LIST and rec.shape and len(rec.positions) != rec.shape[0]:
        raise InvalidRecord(R.POSITIONS, f"{len(rec.positions)} positions for {rec.shape[0]} rows")
    if not rec.request_id:
        raise InvalidRecord(R.MISSING_FIELD, "tensor record has no request_id")
    if not rec.hook:
        raise InvalidRecord(R.MISSING_FIELD, "tensor record has no hook")
    fixed_id(rec.trace_id, 16, "trace_id")
    fixed_id(rec.span_id, 8, "span_id")


def check_summary(s: pb.RequestSummary) -> None:
    if not s.request_id:
        raise InvalidRecord(R.MISSING_FIELD, "request summary has no request_id")
    fixed_id(s.trace_id, 16, "trace_id")
    fixed_id(s.span_id, 8, "span_id")


_ENCODINGS = frozenset(pb.Encoding.values())
