"""Captured tensor records (wire v1) -> the (layer, positions, rows, phase) a probe's `update` takes.

numpy only (no torch): bfloat16 and float16 rows are widened to float32 exactly.

    for rec in captured_request.records:
        if probe.wants(rec.hook, rec.layer):
            update_from_record(probe, state, rec)
"""

from __future__ import annotations

import numpy as np

from tensortrace.probes.errors import ProbeInputError
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire.codec import dtype_name, record_raw_bytes

_NP = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def record_rows(rec: pb.TensorRecord) -> tuple[int, np.ndarray, np.ndarray, str]:
    """(layer, positions int64 (n,), rows float32 (n, width), phase) of one reassembled record."""
    raw = record_raw_bytes(rec)
    name = dtype_name(rec.dtype)
    shape = tuple(rec.shape)
    if len(shape) != 2:
        raise ProbeInputError(f"record {rec.hook}/{rec.layer} seq {rec.seq} has shape {list(shape)}; a probe "
                              f"reads [tokens, width] tensors")
    if name == "bfloat16":
        rows = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif name in _NP:
        rows = np.frombuffer(raw, dtype=_NP[name]).astype(np.float32, copy=False)
    else:
        raise ProbeInputError(f"record {rec.hook}/{rec.layer} seq {rec.seq} has dtype {name}; a probe reads floats")
    rows = rows.reshape(shape)
    if rec.positions_kind == pb.TOKEN_LIST:
        positions = np.asarray(rec.positions, dtype=np.int64)
    elif rec.positions_kind == pb.TOKEN_RANGE:
        positions = np.arange(rec.token_start, rec.token_end, dtype=np.int64)
    else:
        raise ProbeInputError(f"record {rec.hook}/{rec.layer} seq {rec.seq} has no token axis")
    phase = "decode" if rec.phase == pb.DECODE else "prefill"
    return rec.layer, positions, rows, phase


def update_from_record(probe, state, rec: pb.TensorRecord) -> None:
    """`probe.update` with the rows of one record (ignored unless the probe wants its hook and layer)."""
    if not probe.wants(rec.hook, rec.layer):
        return
    layer, positions, rows, phase = record_rows(rec)
    probe.update(state, layer, positions, rows, phase)
