"""The native envelope scanner (wire/_decode.c), and the switch that turns it off.

    sc = native.scan(message_value)     # a Scan, or None: take the Python path (codec.decode_envelope)
    if sc is not None:
        sc.n, sc.col(native.C_LAYER)     # one int64 column per field, no Python object per record
        sc.text(i, native.C_HOOK)        # a string field of record i
        sc.record(i)                     # record i as a pb.TensorRecord / pb.RequestSummary (upb)

Why: the consumers' consume thread spent ~12-35 µs of Python per record on envelope parsing,
validation and bookkeeping; the probe service and the loader are bound by it (docs/BENCHMARKS.md).
The scanner parses an envelope in C, applies consume/validate.py's `check_tensor_record` to every
record (the `status` column: 0, or which check failed), and returns every field as an int64 column
or an (offset, length) slice of the message. Consumers do their bookkeeping per run of records (the
`run` column: consecutive valid tensor records of one request and producer) and turn only the
records they keep into objects.

The Python path stays the oracle: `scan` answers None for any message it does not decode exactly as
upb would (a parse error, an envelope codec.decode_envelope refuses, a non-ASCII string, an unusual
encoding upb merges or concatenates), and the caller then runs codec.decode_envelope, which raises
its own error. A record whose status is not 0 is re-checked by check_tensor_record for its exact
error. tests/wire/test_native_decode.py compares both ways on valid, corrupted and random bytes.

TENSORTRACE_NATIVE=0 in the environment disables every native path (this one and the agent's);
without a compiler the extension is absent, `AVAILABLE` is False and one log line says so.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from tensortrace.v1 import records_pb2 as pb

log = logging.getLogger("tensortrace.wire")

try:
    from tensortrace.wire import _decode
except ImportError as e:   # no compiler at install time, or a build error: the Python path
    _decode = None
    _IMPORT_ERROR = str(e)
else:
    _IMPORT_ERROR = ""

(C_KIND, C_STATUS, C_BODY_OFF, C_BODY_LEN, C_MODEL_OFF, C_MODEL_LEN, C_RID_OFF, C_RID_LEN,
 C_TRACE_OFF, C_TRACE_LEN, C_SPAN_OFF, C_SPAN_LEN, C_HOOK_OFF, C_HOOK_LEN, C_LAYER, C_TP_RANK,
 C_TP_SIZE, C_POS_KIND, C_TOKEN_START, C_TOKEN_END, C_POS_OFF, C_POS_LEN, C_POS_COUNT, C_PHASE,
 C_STEP, C_DTYPE, C_SHAPE_OFF, C_SHAPE_LEN, C_NDIM, C_ENCODING, C_RAW_SIZE, C_PAYLOAD_OFF,
 C_PAYLOAD_LEN, C_CAPTURE_NS, C_EXPORT_NS, C_NODE_OFF, C_NODE_LEN, C_POD_OFF, C_POD_LEN, C_PID,
 C_PRANK, C_GENERATION, C_SEQ, C_CHUNK_INDEX, C_CHUNK_COUNT, C_CHUNK_OFFSET, C_PAYLOAD_SIZE,
 C_RUN, C_MH, C_SHAPE0, C_LASTDIM, C_ELEM, NCOL) = range(53)

KIND_TENSOR, KIND_SUMMARY = 1, 2
S_OK, S_CHUNKED = 0, 1   # other statuses: a check_tensor_record failure (the record is re-checked in Python)

# uint64 fields travel as int64 bits; view these as uint64 before using them as numbers
UNSIGNED = (C_STEP, C_RAW_SIZE, C_GENERATION, C_SEQ, C_CHUNK_OFFSET, C_PAYLOAD_SIZE, C_CAPTURE_NS, C_EXPORT_NS)


def enabled() -> bool:
    """True when the extension is built and TENSORTRACE_NATIVE is not "0"."""
    return _decode is not None and os.environ.get("TENSORTRACE_NATIVE", "1") != "0"


def why_disabled() -> str:
    if _decode is None:
        return f"native decoder not built ({_IMPORT_ERROR}); using the Python path"
    if os.environ.get("TENSORTRACE_NATIVE", "1") == "0":
        return "native paths disabled by TENSORTRACE_NATIVE=0; using the Python path"
    return ""


AVAILABLE = _decode is not None
if _decode is not None:
    assert _decode.NCOL == NCOL, "wire/_decode.c and wire/native.py disagree on the columns"
else:
    log.info("tensortrace.wire: native decoder not built (%s); consumers use the Python path", _IMPORT_ERROR)


class Scan:
    """One scanned envelope: `n` records, `cols` an (n, NCOL) int64 matrix, `data` the message, and
    `runs`: one tuple per run of records (lo, hi, kind, status, trace_id, request_id,
    (pod, pid, generation), set of seqs, payload bytes, raw bytes, one (model, hook)) for a run of
    valid tensor records of one request and producer; (lo, lo + 1, kind, status, None, ...) for a
    summary or a record that failed a check."""
    __slots__ = ("data", "n", "cols", "runs")

    def __init__(self, data: bytes, n: int, cols: np.ndarray, runs: list):
        self.data, self.n, self.cols, self.runs = data, n, cols, runs

    def row(self, i: int) -> tuple:
        """(kind, body offset, body length, payload length) of record i, as plain ints."""
        item = self.cols.item
        return item(i, C_KIND), item(i, C_BODY_OFF), item(i, C_BODY_LEN), item(i, C_PAYLOAD_LEN)

    def col(self, c: int) -> np.ndarray:
        return self.cols[:, c]

    def raw(self, i: int, c_off: int) -> bytes:
        """The bytes of slice field (offset column c_off, length column c_off + 1) of record i."""
        item = self.cols.item
        o = item(i, c_off)
        return self.data[o:o + item(i, c_off + 1)]

    def text(self, i: int, c_off: int) -> str:
        return self.raw(i, c_off).decode("ascii")    # the scanner accepts ASCII strings only

    def record(self, i: int):
        """Record i as the protobuf message the Python path would hand out (parsed by upb)."""
        kind, off, n, _ = self.row(i)
        body = self.data[off:off + n]
        if kind == KIND_TENSOR:
            return pb.TensorRecord.FromString(body)
        return pb.RequestSummary.FromString(body)


def scan(data) -> Scan | None:
    """Scan one envelope; None: take the Python path (module docstring). Only call when enabled()."""
    got = _decode.scan(data)
    if got is None:
        return None
    n, cols, runs = got
    return Scan(data if isinstance(data, bytes) else bytes(data), n, np.frombuffer(cols, dtype=np.int64).reshape(n, NCOL),
                runs)


def gather(buffers: list, which: np.ndarray, off: np.ndarray, length: np.ndarray, width: int = 0) -> tuple[bytes, bytes]:
    """Concatenate slices of many messages: (values, int64 offsets) or, with `width`, fixed-size values
    (an empty slice becomes zeros) and no offsets."""
    return _decode.gather(buffers, _i64(which), _i64(off), _i64(length), width)


def unpack(buffers: list, which: np.ndarray, off: np.ndarray, length: np.ndarray, kind: int) -> tuple[bytes, bytes]:
    """Packed varint slices -> (values: uint32 for kind 0, int64 for kind 1; int32 list offsets)."""
    return _decode.unpack(buffers, _i64(which), _i64(off), _i64(length), kind)


def _i64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)
