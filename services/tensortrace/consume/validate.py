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
from tensortrace.wire.dtypes import ELEMENT_SIZE


def fixed_id(value: bytes, size: int, what: str) -> bytes:
    """A trace id (16 bytes) or span id (8 bytes); empty means none (zeros)."""
    if not value:
        return b"\0" * size
    if len(value) != size:
        raise InvalidRecord(R.TRACE_ID if what == "trace_id" else R.SPAN_ID, f"{what} is {len(value)} bytes, not {size}")
    return value


def check_tensor_record(rec: pb.TensorRecord) -> None:
    # Every consumer runs this once per record on its consume thread: each field is read once
    # (a upb field read costs ~0.1 us, a bytes field copies), the common case falls straight through.
    dtype, enc = rec.dtype, rec.encoding
    elem = ELEMENT_SIZE.get(dtype)
    if elem is None:
        raise InvalidRecord(R.DTYPE, f"unknown dtype code {dtype}")
    if enc not in _ENCODINGS:
        raise InvalidRecord(R.ENCODING, f"unknown payload encoding {enc}")
    shape = rec.shape[:]   # a list; list(rec.shape) iterates the container (~3x slower)
    if shape and min(shape) < 0:
        raise InvalidRecord(R.SHAPE, f"negative dimension in shape {shape}")
    expect = math.prod(shape) * elem
    raw_size = rec.raw_size
    if raw_size != expect:
        raise InvalidRecord(R.RAW_SIZE, f"raw_size {raw_size} != {expect} implied by shape {shape} "
                                        f"and dtype {codec.dtype_name(dtype)}")
    if enc == _RAW:
        n = len(rec.payload)
        if n != raw_size:
            raise InvalidRecord(R.RAW_SIZE, f"RAW payload is {n} bytes, raw_size says {raw_size}")
    kind = rec.positions_kind
    if kind == _TOKEN_RANGE:
        if shape and rec.token_end - rec.token_start != shape[0]:
            raise InvalidRecord(R.TOKEN_RANGE, f"token range [{rec.token_start}, {rec.token_end}) does not match {shape[0]} rows")
    elif kind == _TOKEN_LIST and shape and len(rec.positions) != shape[0]:
        raise InvalidRecord(R.POSITIONS, f"{len(rec.positions)} positions for {shape[0]} rows")
    if not rec.request_id:
        raise InvalidRecord(R.MISSING_FIELD, "tensor record has no request_id")
    if not rec.hook:
        raise InvalidRecord(R.MISSING_FIELD, "tensor record has no hook")
    t, sp = rec.trace_id, rec.span_id
    if (t and len(t) != 16) or (sp and len(sp) != 8):
        fixed_id(t, 16, "trace_id")
        fixed_id(sp, 8, "span_id")


def check_summary(s: pb.RequestSummary) -> None:
    if not s.request_id:
        raise InvalidRecord(R.MISSING_FIELD, "request summary has no request_id")
    fixed_id(s.trace_id, 16, "trace_id")
    fixed_id(s.span_id, 8, "span_id")


_ENCODINGS = frozenset(pb.Encoding.values())
_RAW, _TOKEN_RANGE, _TOKEN_LIST = pb.RAW, pb.TOKEN_RANGE, pb.TOKEN_LIST


def decode_probe_score(value: bytes) -> pb.ProbeScore:
    """One probe-scores-topic message -> ProbeScore (a ConsumerCore `decode` hook: the loader's
    `probe_scores` consumer and the bridge's probe spans read the topic through it). InvalidRecord,
    dead-lettered with a typed reason, when it is not one or lacks its identity."""
    if not value:
        raise InvalidRecord(R.ENVELOPE, "empty message: not a tensortrace.v1.ProbeScore")
    sc = pb.ProbeScore()
    try:
        sc.ParseFromString(value)
    except Exception as e:   # protobuf's DecodeError
        raise InvalidRecord(R.ENVELOPE, f"not a tensortrace.v1.ProbeScore: {e}") from None
    if not sc.request_id or not sc.probe or not sc.probe_hash:
        missing = [n for n in ("request_id", "probe", "probe_hash") if not getattr(sc, n)]
        raise InvalidRecord(R.MISSING_FIELD, f"ProbeScore without {', '.join(missing)} (its identity)")
    if len(sc.trace_id) not in (0, 16):
        raise InvalidRecord(R.TRACE_ID, f"trace_id of {len(sc.trace_id)} bytes, not 16")
    if len(sc.span_id) not in (0, 8):
        raise InvalidRecord(R.SPAN_ID, f"span_id of {len(sc.span_id)} bytes, not 8")
    if len(sc.token_scores) != len(sc.token_positions):
        raise InvalidRecord(R.POSITIONS, f"{len(sc.token_scores)} token scores for {len(sc.token_positions)} positions")
    return sc
