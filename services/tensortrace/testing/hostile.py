"""A hostile ring producer for the fuzz tests: well-formed, checksummed frames with adversarial
content (docs/ring-format.md "Hostile producers").

It writes with the real `RingWriter`, so the framing is always valid (lengths, sequence, meta crc):
what is hostile is what the meta says — random protobuf fields, unicode and huge ids, huge or
negative shapes, overlapping or out-of-order parts, wrong/duplicate/decreasing steps, payloads that
do not match shape x dtype. Hypothesis strategies build the frames (`hostile_frames()`); the
`Written` log keeps what was written so a test can check every published byte against it.

    frames = data.draw(hostile_frames())
    w = HostileWriter(RingWriter.create(path, 1 << 20))
    for f in frames: w.write(f)          # returns the frame seq, or None (too large for the ring)

Fuzz budget: `fuzz_settings(ci_examples)` — derandomized, no example database, no deadline, so CI
is reproducible; `TENSORTRACE_FUZZ_EXAMPLES=20000` runs the long campaign (docs/ring-format.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tensortrace.ring.format import FrameKind, RingWriter
from tensortrace.v1 import records_pb2 as pb
from tensortrace.v1 import ring_pb2
from tensortrace.wire.dtypes import ELEMENT_SIZE
from tensortrace.exporter.envelopes import varint

FUZZ_EXAMPLES = int(os.environ.get("TENSORTRACE_FUZZ_EXAMPLES", "0") or 0)
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


def fuzz_settings(ci_examples: int, **kw) -> settings:
    """Hypothesis settings for a CI budget of `ci_examples` (TENSORTRACE_FUZZ_EXAMPLES overrides)."""
    return settings(max_examples=FUZZ_EXAMPLES or ci_examples, deadline=None, derandomize=True, database=None,
                    print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture], **kw)


# -- protobuf-level building blocks --------------------------------------------------------

_varint = varint   # the exporter's own protobuf varint (exporter/envelopes.py)


@st.composite
def unknown_fields(draw) -> bytes:
    """Random well-encoded protobuf fields (unknown numbers, or known numbers with another wire type)."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        number = draw(st.one_of(st.integers(1, 12), st.integers(13, (1 << 29) - 1)))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        tag = _varint(number << 3 | wire)
        if wire == 0:
            out += tag + _varint(draw(st.integers(0, U64)))
        elif wire == 1:
            out += tag + draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += tag + draw(st.binary(min_size=4, max_size=4))
        else:
            body = draw(st.binary(max_size=64))
            out += tag + _varint(len(body)) + body
    return out


_chars = st.characters(exclude_categories=("Cs",))    # any code point UTF-8 can encode (protobuf strings)


def ids(max_huge: int = 300_000):
    """Request ids, hooks, model ids: mostly short unicode (any plane), sometimes empty or huge."""
    short = st.one_of(st.text(_chars, max_size=24), st.text(st.characters(min_codepoint=0x80, exclude_categories=("Cs",)), max_size=12),
                      st.sampled_from(["req-0", "req-1", "r\u00e9q-\U0001f600", "\x00", ""]))
    huge = st.integers(400, max_huge).map(lambda n: "\u00e9" * (n // 2))     # 2-byte UTF-8: ~n bytes
    return st.one_of(short, short, short, huge)


def w3c_id(size: int):
    """A trace (16) or span (8) id: mostly the right size or empty, sometimes any length."""
    right = st.binary(min_size=size, max_size=size)
    return st.one_of(right, right, right, st.just(b""), st.binary(max_size=2 * size + 4))


small_u32 = st.one_of(st.integers(0, 8), st.integers(0, 8), st.sampled_from([U32, U32 - 1, 1 << 31, 65535, 65536]))
_valid_dtypes = st.sampled_from(sorted(ELEMENT_SIZE))
dtypes = st.one_of(_valid_dtypes, _valid_dtypes, _valid_dtypes, st.sampled_from([0, 99, (1 << 31) - 1, -1]))
dims = st.one_of(st.integers(1, 5), st.sampled_from([0, -1, -(1 << 63), 1 << 31, 1 << 40, (1 << 63) - 1]))
row_shapes = st.one_of(st.lists(st.integers(1, 4), max_size=3), st.lists(st.integers(1, 4), max_size=3),
                       st.lists(st.integers(1, 4), max_size=3), st.lists(dims, max_size=4), st.just([1] * 40),
                       st.just([1000, 40]))     # 40000-byte rows and more: chunked records


@dataclass
class HostileFrame:
    kind: int
    meta: bytes
    payload: bytes = b""
    msg: object = None          # the message the meta was built from (None: junk bytes, or extra fields)


_SHORT_IDS = st.sampled_from(["req-0", "req-1", "r\u00e9q-\U0001f600", "", "\u0000x", "a" * 40])


def _with_extra(draw, kind, msg, payload=b"", clean=False):
    meta = msg.SerializeToString()
    extra = b"" if clean else draw(st.one_of(st.just(b""), st.just(b""), st.just(b""), unknown_fields()))
    if extra:    # random protobuf fields after the message (unknown numbers, or known ones overridden)
        return HostileFrame(kind, meta + extra, payload, None)
    return HostileFrame(kind, meta, payload, msg)


@st.composite
def step_frames(draw, step_numbers, clean=False) -> HostileFrame:
    """A STEP; `clean`: ids of valid sizes, no extra fields (what a slab needs to be published)."""
    n = draw(st.integers(1 if clean else 0, 4))
    rid = _SHORT_IDS if clean else ids()
    trace = st.binary(min_size=16, max_size=16) if clean else w3c_id(16)
    span = st.one_of(st.just(b""), st.binary(min_size=8, max_size=8)) if clean else w3c_id(8)
    reqs = [ring_pb2.RequestRows(request_id=draw(rid), trace_id=draw(trace), span_id=draw(span),
                                 row_start=draw(small_u32), row_count=draw(small_u32),
                                 position_start=draw(small_u32), phase=draw(st.integers(0, 4)))
            for _ in range(n)]
    msg = ring_pb2.RingStep(step=draw(step_numbers), model_id=draw(_SHORT_IDS if clean else ids(20_000)),
                            requests=reqs, capture_time_unix_nano=draw(st.integers(0, U64)), tp_size=draw(small_u32))
    if not clean and draw(st.integers(0, 19)) == 0:   # a step claiming very many (empty) requests
        return HostileFrame(FrameKind.STEP, msg.SerializeToString() + b"\x1a\x00" * 70_000, b"", None)
    return _with_extra(draw, FrameKind.STEP, msg, clean=clean)


@st.composite
def slab_frames(draw, step_numbers, n_requests: int = 4, clean=False) -> HostileFrame:
    """A SLAB naming a step from `step_numbers`, request indices mostly below `n_requests`; `clean`:
    a valid dtype, shape and hook, parts that tile a matching payload (unless `n_requests` is 0)."""
    row_shape = draw(st.one_of(st.lists(st.integers(1, 4), max_size=3), st.just([1000, 40])) if clean else row_shapes)
    dtype = draw(_valid_dtypes if clean else dtypes)
    elem = ELEMENT_SIZE.get(dtype, 1)
    row_bytes = elem
    for d in row_shape:
        row_bytes *= d
    request_index = st.integers(0, max(0, n_requests - 1)) if n_requests else small_u32
    layout = draw(st.sampled_from(["tiled", "permuted"] if clean else ["tiled", "tiled", "permuted", "random"]))
    if layout == "random":    # anything: overlapping, gaps, empty parts, huge counts
        parts = [ring_pb2.SlabPart(request_index=draw(st.one_of(request_index, small_u32)),
                                   slab_row_start=draw(small_u32), row_count=draw(small_u32),
                                   position_start=draw(small_u32))
                 for _ in range(draw(st.integers(0, 5)))]
    else:
        counts = draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
        starts = [sum(counts[:i]) for i in range(len(counts))]
        parts = [ring_pb2.SlabPart(request_index=draw(request_index), slab_row_start=s, row_count=c,
                                   position_start=draw(small_u32)) for s, c in zip(starts, counts)]
        if layout == "permuted":
            parts = draw(st.permutations(parts))
    rows = sum(p.row_count for p in parts)
    want = rows * row_bytes if 0 <= rows * row_bytes <= 1 << 18 else 0
    payload_len = want if clean else draw(st.one_of(st.just(want), st.just(want), st.integers(0, 4096),
                                                    st.just(max(0, want - 1)), st.just(want + elem)))
    seed = draw(st.binary(min_size=1, max_size=64))
    payload = (seed * (payload_len // len(seed) + 1))[:payload_len]
    msg = ring_pb2.RingSlab(step=draw(step_numbers), hook=draw(_SHORT_IDS if clean else ids(20_000)),
                            layer=draw(st.integers(-(1 << 31), (1 << 31) - 1)), tp_rank=draw(small_u32),
                            tp_size=draw(small_u32), dtype=dtype, row_shape=row_shape, parts=parts,
                            capture_time_unix_nano=draw(st.integers(0, U64)))
    return _with_extra(draw, FrameKind.SLAB, msg, payload, clean=clean)


@st.composite
def summary_frames(draw) -> HostileFrame:
    msg = pb.RequestSummary(model_id=draw(ids(2000)), request_id=draw(ids()), trace_id=draw(w3c_id(16)),
                            span_id=draw(w3c_id(8)),
                            records_captured=draw(st.integers(0, U64)), records_dropped=draw(st.integers(0, U64)),
                            dropped_by_reason=draw(st.dictionaries(ids(2000), st.integers(0, U64), max_size=3)),
                            complete=draw(st.booleans()), hooks=draw(st.lists(ids(2000), max_size=3)),
                            seq=draw(st.integers(0, U64)))
    if draw(st.integers(0, 9)) == 0:     # a summary too big for any Kafka message
        msg.hooks.extend(["h" * 1000] * 300)
    return _with_extra(draw, FrameKind.SUMMARY, msg)


def junk_frames():
    """Frames whose meta is not the message its kind says (random bytes)."""
    return st.builds(HostileFrame, st.sampled_from([FrameKind.STEP, FrameKind.SLAB, FrameKind.SUMMARY]),
                     st.binary(max_size=200), st.binary(max_size=256))


@st.composite
def hostile_frames(draw, max_groups: int = 8) -> list:
    """Groups of frames: mostly a STEP and slabs naming it, with duplicate, decreasing and extreme
    step numbers, slabs naming steps never written, summaries and junk in between."""
    step_numbers = st.one_of(st.integers(0, 4), st.integers(0, 4), st.sampled_from([U64, 1 << 63]))
    frames = []
    for _ in range(draw(st.integers(1, max_groups))):
        what = draw(st.sampled_from(["step", "step", "step", "slab", "summary", "junk"]))
        if what == "step":
            clean = draw(st.sampled_from([True, True, False]))   # only what a slab needs to be published
            f = draw(step_frames(step_numbers, clean))
            frames.append(f)
            number = f.msg.step if f.msg is not None else draw(step_numbers)
            n = len(f.msg.requests) if f.msg is not None else 4
            for _ in range(draw(st.integers(0, 3))):
                same = clean or draw(st.booleans()) or draw(st.booleans())
                frames.append(draw(slab_frames(st.just(number) if same else step_numbers, n,
                                               clean and draw(st.sampled_from([True, True, True, False])))))
        elif what == "slab":
            frames.append(draw(slab_frames(step_numbers)))
        elif what == "summary":
            frames.append(draw(summary_frames()))
        else:
            frames.append(draw(junk_frames()))
    return frames


@dataclass
class Written:
    """A frame the hostile writer committed."""

    seq: int
    frame: HostileFrame


@dataclass
class HostileWriter:
    """Writes HostileFrames with the real RingWriter (valid framing, any content)."""

    writer: RingWriter
    written: list = field(default_factory=list)       # [Written] in ring order
    refused: int = 0                                   # larger than half the ring: never written

    def write(self, frame: HostileFrame) -> int | None:
        """The frame's seq, None when the writer refuses it as too large, or False when the ring is full."""
        w = self.writer
        if _too_large(w, frame):
            self.refused += 1
            return None
        if not w.write(frame.kind, frame.meta, frame.payload):
            return False
        seq = w._seq - 1
        self.written.append(Written(seq, frame))
        return seq


def _too_large(w: RingWriter, frame: HostileFrame) -> bool:
    from tensortrace.ring.format import frame_size
    return frame_size(len(frame.meta), len(frame.payload)) > w.capacity // 2
