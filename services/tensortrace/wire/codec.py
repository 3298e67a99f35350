"""Wire format v1 codec: records <-> bytes, tensors <-> records, payload encodings, chunking.

The schema is proto/tensortrace/v1/records.proto; this module is the only place that turns it into
bytes and back. It imports torch lazily: the exporter and loader never need it.

>>> import torch
>>> rec = tensor_to_record(torch.ones(2, 4), request_id="r1", hook="resid_pre", layer=0)
>>> data = encode_envelope([rec])
>>> [back] = decode_envelope(data)
>>> torch.equal(record_to_tensor(back.tensor), torch.ones(2, 4))
True
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import zstandard
import lz4.frame
from google.protobuf.message import DecodeError

from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire.dtypes import BY_NAME, DTYPES

ENVELOPE_VERSION = 1
# Kafka's default max.message.bytes is 1 MiB (1048588); keep the whole message below it.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
DEFAULT_CHUNK_PAYLOAD_BYTES = 900_000

DType = pb.DType
Encoding = pb.Encoding
Phase = pb.Phase
PositionsKind = pb.PositionsKind

_DTYPES = DTYPES
_BY_NAME = BY_NAME


class WireError(ValueError):
    """Bytes or a record that do not form a valid v1 record. The message names what is wrong."""


def dtype_code(dtype) -> int:
    """DType code of a torch dtype (or its name, e.g. "bfloat16")."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    try:
        return _BY_NAME[name]
    except KeyError:
        raise WireError(f"dtype {name} has no v1 wire code") from None


def dtype_name(code: int) -> str:
    try:
        return _DTYPES[code][0]
    except KeyError:
        raise WireError(f"unknown dtype code {code}") from None


def element_size(code: int) -> int:
    try:
        return _DTYPES[code][1]
    except KeyError:
        raise WireError(f"unknown dtype code {code}") from None


def torch_dtype(code: int):
    import torch

    name = dtype_name(code)
    dt = getattr(torch, name, None)
    if dt is None:
        raise WireError(f"this torch has no dtype {name}")
    return dt


# -- payload encodings ---------------------------------------------------------------------

_ZSTD_LEVEL = 1
_zc = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
_zd = zstandard.ZstdDecompressor()


def shuffle_bytes(raw: bytes | memoryview, elem: int) -> bytes:
    """Byte-shuffle: all first bytes of the elements, then all second bytes, ... (as HDF5/Blosc)."""
    if elem <= 1 or len(raw) == 0:
        return bytes(raw)
    a = np.frombuffer(raw, dtype=np.uint8)
    if a.size % elem:
        raise WireError(f"{a.size} bytes are not a whole number of {elem}-byte elements")
    return a.reshape(-1, elem).T.tobytes()


def unshuffle_bytes(data: bytes | memoryview, elem: int) -> bytes:
    if elem <= 1 or len(data) == 0:
        return bytes(data)
    a = np.frombuffer(data, dtype=np.uint8)
    if a.size % elem:
        raise WireError(f"{a.size} shuffled bytes are not a whole number of {elem}-byte elements")
    return a.reshape(elem, -1).T.tobytes()


def encode_payload(raw: bytes | memoryview, encoding: int, elem: int) -> bytes:
    if encoding == pb.RAW:
        return bytes(raw)
    if encoding == pb.ZSTD:
        return _zc.compress(raw)
    if encoding == pb.SHUFFLE_ZSTD:
        return _zc.compress(shuffle_bytes(raw, elem))
    if encoding == pb.LZ4:
        return lz4.frame.compress(bytes(raw))
    raise WireError(f"unknown encoding {encoding}")


def decode_payload(payload: bytes | memoryview, encoding: int, raw_size: int, elem: int) -> bytes:
    try:
        if encoding == pb.RAW:
            raw = bytes(payload)
        elif encoding == pb.ZSTD:
            raw = _zd.decompress(payload, max_output_size=raw_size)
        elif encoding == pb.SHUFFLE_ZSTD:
            raw = unshuffle_bytes(_zd.decompress(payload, max_output_size=raw_size), elem)
        elif encoding == pb.LZ4:
            raw = lz4.frame.decompress(bytes(payload))
        else:
            raise WireError(f"unknown encoding {encoding}")
    except (zstandard.ZstdError, RuntimeError) as e:
        raise WireError(f"payload does not decode as {pb.Encoding.Name(encoding)}: {e}") from None
    if len(raw) != raw_size:
        raise WireError(f"decoded payload is {len(raw)} bytes, record says raw_size {raw_size}")
    return raw


# -- tensors <-> records ---------------------------------------------------------------------

def tensor_bytes(t) -> memoryview:
    """The RAW bytes of a CPU tensor (C-contiguous), without a copy where possible."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_to_record(t, *, encoding: int = pb.RAW, **fields) -> pb.TensorRecord:
    """A TensorRecord holding tensor `t`; keyword args set the other TensorRecord fields."""
    code = dtype_code(t.dtype)
    raw = tensor_bytes(t)
    rec = pb.TensorRecord(dtype=code, shape=list(t.shape), encoding=encoding, raw_size=len(raw),
                          payload=encode_payload(raw, encoding, element_size(code)), **fields)
    if not rec.capture_time_unix_nano:
        rec.capture_time_unix_nano = time.time_ns()
    if not rec.positions_kind:
        rec.positions_kind = pb.TOKEN_RANGE if t.dim() > 0 else pb.NO_TOKEN_AXIS
        if rec.positions_kind == pb.TOKEN_RANGE and not rec.token_end:
            rec.token_end = rec.token_start + t.shape[0]
    return rec


def record_raw_bytes(rec: pb.TensorRecord) -> bytes:
    """Validate a (reassembled) TensorRecord and return its RAW payload bytes."""
    elem = element_size(rec.dtype)
    if any(d < 0 for d in rec.shape):
        raise WireError(f"negative dimension in shape {list(rec.shape)}")
    expect = math.prod(rec.shape) * elem
    if rec.raw_size != expect:
        raise WireError(f"raw_size {rec.raw_size} != {expect} implied by shape {list(rec.shape)} and dtype {dtype_name(rec.dtype)}")
    if rec.chunk_count > 1:
        raise WireError(f"record seq {rec.seq} is chunk {rec.chunk_index}/{rec.chunk_count}; reassemble first")
    return decode_payload(rec.payload, rec.encoding, rec.raw_size, elem)


def record_to_tensor(rec: pb.TensorRecord):
    """The torch tensor a TensorRecord holds (a fresh CPU tensor, bit-identical to the captured one)."""
    import torch

    raw = record_raw_bytes(rec)
    dt = torch_dtype(rec.dtype)
    if not raw:
        return torch.empty(tuple(rec.shape), dtype=dt)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(tuple(rec.shape))


# -- envelopes -----------------------------------------------------------------------------

def encode_envelope(records: Iterable[pb.TensorRecord | pb.RequestSummary | pb.Record]) -> bytes:
    env = pb.Envelope(version=ENVELOPE_VERSION)
    for r in records:
        if isinstance(r, pb.TensorRecord):
            env.records.add(tensor=r)
        elif isinstance(r, pb.RequestSummary):
            env.records.add(summary=r)
        elif isinstance(r, pb.Record):
            env.records.append(r)
        else:
            raise TypeError(f"cannot put {type(r).__name__} in an envelope")
    return env.SerializeToString()


def decode_envelope(data: bytes | memoryview) -> list[pb.Record]:
    """Parse one Kafka message value. Raises WireError naming what is wrong."""
    if data is None or len(data) == 0:
        raise WireError("empty message: not a v1 envelope")
    env = pb.Envelope()
    try:
        env.ParseFromString(bytes(data))
    except DecodeError as e:
        raise WireError(f"message of {len(data)} bytes is not a v1 envelope: {e}") from None
    if env.version != ENVELOPE_VERSION:
        raise WireError(f"envelope version {env.version} is not {ENVELOPE_VERSION}")
    if not env.records:
        # No producer sends one; a message cut right after its version field parses as this.
        raise WireError(f"envelope of {len(data)} bytes holds no records (truncated?)")
    for i, r in enumerate(env.records):
        kind = r.WhichOneof("kind")
        if kind is None:
            raise WireError(f"record {i} of the envelope is empty (unknown record kind?)")
        body = r.tensor if kind == "tensor" else r.summary
        if body.trace_id and len(body.trace_id) != 16:
            raise WireError(f"record {i}: trace_id is {len(body.trace_id)} bytes, not 16")
        if body.span_id and len(body.span_id) != 8:
            raise WireError(f"record {i}: span_id is {len(body.span_id)} bytes, not 8")
        if kind == "tensor":
            t = r.tensor
            if t.dtype not in _DTYPES:
                raise WireError(f"record {i}: unknown dtype code {t.dtype}")
            if t.encoding not in (pb.RAW, pb.ZSTD, pb.SHUFFLE_ZSTD, pb.LZ4):
                raise WireError(f"record {i}: unknown encoding {t.encoding}")
            if t.chunk_count > 1 and t.chunk_index >= t.chunk_count:
                raise WireError(f"record {i}: chunk {t.chunk_index} of {t.chunk_count}")
    return list(env.records)


# -- chunking ------------------------------------------------------------------------------

def chunk_record(rec: pb.TensorRecord, max_payload: int = DEFAULT_CHUNK_PAYLOAD_BYTES) -> list[pb.TensorRecord]:
    """Split a record whose payload exceeds max_payload into chunks (rule: docs/wire-format.md)."""
    n = len(rec.payload)
    if n <= max_payload:
        return [rec]
    count = (n + max_payload - 1) // max_payload
    payload = rec.payload
    template = pb.TensorRecord()
    template.CopyFrom(rec)
    template.ClearField("payload")  # copy the metadata once, not the payload per chunk
    out = []
    for i in range(count):
        c = pb.TensorRecord()
        c.CopyFrom(template)
        c.chunk_index = i
        c.chunk_count = count
        c.chunk_offset = i * max_payload
        c.payload_size = n
        c.payload = payload[i * max_payload:(i + 1) * max_payload]
        out.append(c)
    return out


def record_key(rec: pb.TensorRecord | pb.RequestSummary) -> tuple:
    """Identity of a record across retries: (pod, pid, generation, seq)."""
    p = rec.producer
    return (p.pod, p.pid, p.generation, rec.seq)


@dataclass
class _Pending:
    parts: dict[int, pb.TensorRecord] = field(default_factory=dict)
    first_seen: float = 0.0


class ChunkAssembler:
    """Reassembles chunked TensorRecords. Bounded: chunk sets that never complete within
    `timeout_s`, or beyond `max_pending`, are evicted and returned by `expired()`.

    >>> rec = pb.TensorRecord(request_id="r1", seq=7, payload=bytes(10), raw_size=10)
    >>> first, second = chunk_record(rec, max_payload=6)
    >>> asm = ChunkAssembler()
    >>> asm.add(first) is None        # None until the last chunk arrives
    True
    >>> asm.add(second).payload == rec.payload
    True
    """

    def __init__(self, timeout_s: float = 300.0, max_pending: int = 10_000):
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._pending: dict[tuple, _Pending] = {}
        self._expired: list[tuple[tuple, list[pb.TensorRecord], str]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, rec: pb.TensorRecord, now: float | None = None) -> pb.TensorRecord | None:
        if rec.chunk_count <= 1:
            return rec
        key = record_key(rec)
        p = self._pending.get(key)
        if p is None:
            if len(self._pending) >= self.max_pending:
                oldest = min(self._pending, key=lambda k: self._pending[k].first_seen)
                self._evict(oldest, "too many incomplete chunked records")
            p = self._pending[key] = _Pending(first_seen=now if now is not None else time.monotonic())
        p.parts[rec.chunk_index] = rec
        if len(p.parts) < rec.chunk_count:
            return None
        del self._pending[key]
        parts = [p.parts[i] for i in range(rec.chunk_count)]
        whole = pb.TensorRecord()
        whole.CopyFrom(parts[0])
        whole.payload = b"".join(c.payload for c in parts)
        if len(whole.payload) != parts[0].payload_size:
            raise WireError(f"record seq {rec.seq}: chunks hold {len(whole.payload)} bytes, expected {parts[0].payload_size}")
        whole.chunk_index = whole.chunk_count = 0
        whole.chunk_offset = 0
        return whole

    def discard(self, key: tuple) -> None:
        """Forget a chunk set without reporting it (its partition moved to another consumer)."""
        self._pending.pop(key, None)

    def _evict(self, key: tuple, reason: str) -> None:
        p = self._pending.pop(key)
        self._expired.append((key, list(p.parts.values()), reason))

    def expire(self, now: float | None = None) -> list[tuple[tuple, list[pb.TensorRecord], str]]:
        """Evict chunk sets older than timeout_s; return everything evicted since the last call."""
        now = now if now is not None else time.monotonic()
        for key in [k for k, p in self._pending.items() if now - p.first_seen > self.timeout_s]:
            self._evict(key, f"chunks incomplete after {self.timeout_s:.0f}s")
        out, self._expired = self._expired, []
        return out


def new_trace_id() -> bytes:
    import os

    while True:
        b = os.urandom(16)
        if any(b):
            return b


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def parse_traceparent(header: str | None) -> tuple[bytes, bytes] | None:
    """(trace_id, parent span id) from a W3C traceparent header, or None if absent/invalid.

    W3C Trace Context: lower-case hex only, version ff is invalid, version 00 has exactly four
    fields, a later version may append fields, all-zero ids are invalid.

    >>> tid, sid = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    >>> tid.hex(), sid.hex()
    ('4bf92f3577b34da6a3ce929d0e0e4736', '00f067aa0ba902b7')
    >>> parse_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01") is None   # upper case
    True
    """
    if not header:
        return None
    m = _TRACEPARENT.fullmatch(header.strip())
    if m is None:
        return None
    version, tid_hex, sid_hex, _, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    tid, sid = bytes.fromhex(tid_hex), bytes.fromhex(sid_hex)
    if not any(tid) or not any(sid):
        return None
    return tid, sid


def format_traceparent(trace_id: bytes, span_id: bytes, sampled: bool = True) -> str:
    """The W3C traceparent header (version 00) of a trace id and span id.

    >>> format_traceparent(bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"), bytes.fromhex("00f067aa0ba902b7"))
    '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
    """
    return f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"
