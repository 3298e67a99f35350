"""The native envelope scanner (tensortrace.wire.native) against its oracle, the Python path
(codec.decode_envelope + consume/validate.py): the same envelopes decoded both ways — valid, invalid
records, corrupted, truncated and random bytes — give the same records, the same per-record verdict
and the same error reasons. A message the scanner refuses (None) must be one the Python path either
refuses itself or decodes (a fallback is allowed, a different answer never is)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensortrace.consume.deadletter import InvalidRecord
from tensortrace.consume.validate import check_summary, check_tensor_record
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec, native

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not native.AVAILABLE, reason="native decoder not built (no compiler)")]

PRODUCER = pb.Producer(node="node-a", pod="pod-a", pid=7, tp_rank=1, generation=3)


def tensor(i: int = 0, **kw) -> pb.TensorRecord:
    fields = dict(model_id="m", request_id="r1", trace_id=bytes(range(16)), span_id=bytes(range(8)), hook="resid_pre",
                  layer=i % 30, positions_kind=pb.TOKEN_RANGE, token_start=i, token_end=i + 2, phase=pb.DECODE,
                  step=i, dtype=pb.BFLOAT16, shape=[2, 4], encoding=pb.RAW, raw_size=16, payload=bytes(range(16)),
                  capture_time_unix_nano=1_700_000_000_000_000_000 + i, export_time_unix_nano=5,
                  producer=PRODUCER, seq=i)
    fields.update(kw)
    return pb.TensorRecord(**fields)


def summary(**kw) -> pb.RequestSummary:
    fields = dict(model_id="m", request_id="r1", trace_id=bytes(range(16)), span_id=bytes(range(8)), producer=PRODUCER,
                  seq=99, records_captured=3, complete=True, dropped_by_reason={"ring_full": 0}, hooks=["resid_pre"],
                  finish_reason="stop", producers=1)
    fields.update(kw)
    return pb.RequestSummary(**fields)


def python_outcome(data: bytes):
    """What the Python path makes of a message: ("envelope", message) or per record
    (kind, verdict, reason, message, the record's bytes)."""
    try:
        records = codec.decode_envelope(data)
    except codec.WireError as e:
        return ("envelope", str(e))
    out = []
    for r in records:
        kind = r.WhichOneof("kind")
        body = r.tensor if kind == "tensor" else r.summary
        try:
            if kind == "tensor":
                if body.chunk_count > 1:
                    out.append((kind, "chunked", "", "", body.SerializeToString()))
                    continue
                check_tensor_record(body)
            else:
                check_summary(body)
            out.append((kind, "ok", "", "", body.SerializeToString()))
        except InvalidRecord as e:
            out.append((kind, "invalid", e.reason.value, str(e), body.SerializeToString()))
    return out


def native_outcome(data: bytes):
    """The same through the scanner; None when it answered "Python path"."""
    sc = native.scan(data)
    if sc is None:
        return None
    out = []
    for i in range(sc.n):
        rec = sc.record(i)
        kind = "tensor" if sc.cols[i, native.C_KIND] == native.KIND_TENSOR else "summary"
        status = int(sc.cols[i, native.C_STATUS])
        if status == native.S_OK:
            out.append((kind, "ok", "", "", rec.SerializeToString()))
        elif status == native.S_CHUNKED:
            out.append((kind, "chunked", "", "", rec.SerializeToString()))
        else:   # the consumer re-checks such a record in Python for its exact message
            try:
                (check_tensor_record if kind == "tensor" else check_summary)(rec)
                out.append((kind, "native-only-invalid", str(status), "", rec.SerializeToString()))
            except InvalidRecord as e:
                out.append((kind, "invalid", e.reason.value, str(e), rec.SerializeToString()))
        if kind == "tensor":
            check_columns(sc, i, rec)
    return out


def check_columns(sc: native.Scan, i: int, rec: pb.TensorRecord) -> None:
    """Every column the consumers read equals the field upb decoded."""
    c = sc.cols[i]
    u = c.view(np.uint64)
    assert c[native.C_LAYER] == rec.layer and c[native.C_TP_RANK] == rec.tp_rank and c[native.C_TP_SIZE] == rec.tp_size
    assert c[native.C_POS_KIND] == rec.positions_kind and c[native.C_PHASE] == rec.phase
    assert (c[native.C_TOKEN_START], c[native.C_TOKEN_END]) == (rec.token_start, rec.token_end)
    assert u[native.C_STEP] == rec.step and u[native.C_SEQ] == rec.seq and u[native.C_RAW_SIZE] == rec.raw_size
    assert c[native.C_DTYPE] == rec.dtype and c[native.C_ENCODING] == rec.encoding
    assert u[native.C_CAPTURE_NS] == rec.capture_time_unix_nano and u[native.C_EXPORT_NS] == rec.export_time_unix_nano
    p = rec.producer
    assert (c[native.C_PID], c[native.C_PRANK], u[native.C_GENERATION]) == (p.pid, p.tp_rank, p.generation)
    assert sc.text(i, native.C_POD_OFF) == p.pod and sc.text(i, native.C_NODE_OFF) == p.node
    assert sc.text(i, native.C_MODEL_OFF) == rec.model_id and sc.text(i, native.C_RID_OFF) == rec.request_id
    assert sc.text(i, native.C_HOOK_OFF) == rec.hook
    assert sc.raw(i, native.C_TRACE_OFF) == rec.trace_id and sc.raw(i, native.C_SPAN_OFF) == rec.span_id
    assert sc.raw(i, native.C_PAYLOAD_OFF) == rec.payload
    assert (c[native.C_CHUNK_INDEX], c[native.C_CHUNK_COUNT]) == (rec.chunk_index, rec.chunk_count)
    assert c[native.C_NDIM] == len(rec.shape) and c[native.C_POS_COUNT] == len(rec.positions)
    one = np.zeros(1, np.int64)
    vals, offs = native.unpack([sc.data], one, one + c[native.C_SHAPE_OFF], one + c[native.C_SHAPE_LEN], 1)
    assert np.frombuffer(vals, np.int64).tolist() == list(rec.shape)
    vals, offs = native.unpack([sc.data], one, one + c[native.C_POS_OFF], one + c[native.C_POS_LEN], 0)
    assert np.frombuffer(vals, np.uint32).tolist() == list(rec.positions)
    if c[native.C_STATUS] != native.S_CHUNKED and rec.shape and min(rec.shape) >= 0:
        assert c[native.C_SHAPE0] == rec.shape[0] and c[native.C_LASTDIM] == rec.shape[-1]


def agree(data: bytes, must_scan: bool = False) -> None:
    py = python_outcome(data)
    nat = native_outcome(data)
    if nat is None:
        assert not must_scan, f"the scanner refused a canonical envelope: {py}"
        return
    assert py != "envelope" and not (isinstance(py, tuple) and py[0] == "envelope"), \
        f"the scanner accepted what the Python path refuses: {py}"
    assert nat == py


# -- fixed cases ------------------------------------------------------------------------------------

def test_valid_envelope_scans_natively_and_matches():
    recs = [tensor(i) for i in range(5)] + [summary()]
    data = codec.encode_envelope(recs)
    agree(data, must_scan=True)
    sc = native.scan(data)
    assert sc.n == 6 and list(sc.col(native.C_RUN)) == [0, 0, 0, 0, 0, 5]
    assert list(sc.col(native.C_MH)) == [0, 0, 0, 0, 0, 5]


@pytest.mark.parametrize("bad, reason", [
    (dict(shape=[2, -4]), "shape"),
    (dict(raw_size=15), "raw_size"),
    (dict(payload=bytes(15)), "raw_size"),
    (dict(token_end=9), "token_range"),
    (dict(positions_kind=pb.TOKEN_LIST, positions=[1, 2, 3]), "positions"),
    (dict(request_id=""), "missing_field"),
    (dict(hook=""), "missing_field"),
    (dict(shape=[1 << 40, 1 << 40, 1 << 40], raw_size=0), "raw_size"),   # product overflows 64 bits
    (dict(shape=[0, 1 << 62, 1 << 62], raw_size=0, payload=b"", token_start=0, token_end=0), "ok"),   # a zero dimension
])
def test_invalid_records_get_the_python_reason(bad, reason):
    data = codec.encode_envelope([tensor(0), tensor(1, **bad), tensor(2)])
    agree(data, must_scan=True)
    out = native_outcome(data)
    assert [o[1] for o in out] == ["ok", "invalid" if reason != "ok" else "ok", "ok"]
    if reason != "ok":
        assert out[1][2] == reason


@pytest.mark.parametrize("envelope", [
    b"", b"\x08\x01", b"\x08\x02\x12\x00", b"\x08\x01\x12\x00", b"\xff\xff",
    codec.encode_envelope([tensor(0, dtype=99)]),
    codec.encode_envelope([tensor(0, encoding=9)]),
    codec.encode_envelope([tensor(0, trace_id=b"short")]),
    codec.encode_envelope([tensor(0, span_id=b"x" * 9)]),
    codec.encode_envelope([tensor(0, chunk_count=3, chunk_index=3)]),
    codec.encode_envelope([summary(trace_id=b"abc")]),
])
def test_refused_envelopes_fall_back_to_the_python_error(envelope):
    assert native.scan(envelope) is None
    assert python_outcome(envelope)[0] == "envelope"


def test_non_ascii_and_merged_fields_take_the_python_path():
    assert native.scan(codec.encode_envelope([tensor(0, hook="résid")])) is None
    rec = pb.Record(tensor=tensor(0)).SerializeToString()
    twice = pb.Envelope(version=1).SerializeToString() + b"\x12" + _varint(len(rec)) + rec  # fine: one record
    agree(twice, must_scan=True)
    # the tensor field given twice in one Record: upb merges the two; the scanner defers
    body = tensor(0).SerializeToString()
    inner = b"\x0a" + _varint(len(body)) + body
    merged = b"\x08\x01\x12" + _varint(2 * len(inner)) + inner + inner
    assert native.scan(merged) is None
    agree(merged)


def test_chunked_records_are_marked():
    rec = tensor(0, payload=bytes(10), raw_size=10, shape=[5], token_end=5, dtype=pb.INT16)
    chunks = codec.chunk_record(rec, max_payload=4)
    data = codec.encode_envelope(chunks)
    agree(data, must_scan=True)
    assert set(native.scan(data).col(native.C_STATUS)) == {native.S_CHUNKED}


def test_runs_split_on_request_producer_and_invalid_records():
    other = pb.Producer(node="n", pod="pod-b", pid=7, generation=3)
    recs = [tensor(0), tensor(1), tensor(2, request_id="r2"), tensor(3, request_id="r2", producer=other),
            tensor(4, request_id="r2", producer=other, hook="attn_out"), tensor(5, request_id="r2", producer=other, raw_size=1),
            tensor(6, request_id="r2", producer=other)]
    sc = native.scan(codec.encode_envelope(recs))
    assert list(sc.col(native.C_RUN)) == [0, 0, 2, 3, 3, 5, 6]
    assert list(sc.col(native.C_MH)) == [0, 0, 2, 3, 4, 5, 6]


def test_gather_is_bounds_checked():
    data = b"abcdef"
    one = np.zeros(1, np.int64)
    assert native.gather([data], one, one + 1, one + 3) == (b"bcd", np.array([0, 3], np.int64).tobytes())
    assert native.gather([data], one, one, one, 4)[0] == b"\0" * 4
    for which, off, ln in ((1, 0, 1), (0, 5, 2), (0, -1, 1), (0, 0, -1)):
        with pytest.raises(ValueError):
            native.gather([data], one + which, one + off, one + ln)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


# -- property-based ---------------------------------------------------------------------------------

# weighted towards valid values (one_of picks its branches evenly), so most envelopes scan natively
ids = st.one_of(st.just(b""), st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
                st.binary(min_size=0, max_size=20))
spans = st.one_of(st.just(b""), st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8), st.binary(max_size=9))
names = st.one_of(st.sampled_from(["", "m", "resid_pre", "r1", "r2"]), st.sampled_from(["m", "r1", "attn_out"]),
                  st.text(max_size=6))
small = st.integers(min_value=0, max_value=6)


@st.composite
def tensor_records(draw):
    ndim = draw(st.integers(0, 3))
    shape = draw(st.lists(st.integers(-2, 5), min_size=ndim, max_size=ndim))
    valid = st.sampled_from([pb.FLOAT32, pb.BFLOAT16, pb.INT8, pb.FLOAT64])
    dtype = draw(st.one_of(valid, valid, valid, st.integers(0, 20)))
    elem = codec._DTYPES.get(dtype, ("", 1))[1]
    numel = int(np.prod(shape)) if shape and min(shape) >= 0 else 0
    raw_size = draw(st.one_of(st.just(numel * elem), st.integers(0, 64)))
    payload = draw(st.one_of(st.just(bytes(raw_size)), st.binary(max_size=40)))
    kind = draw(st.sampled_from([pb.TOKEN_RANGE, pb.TOKEN_LIST, pb.NO_TOKEN_AXIS, 0, 7]))
    start = draw(small)
    rows = shape[0] if shape else 0
    token_end = draw(st.one_of(st.just(max(0, start + rows)), small))
    positions = draw(st.one_of(st.just(list(range(max(0, rows)))), st.lists(small, max_size=4)))
    chunk_count = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3]))
    return pb.TensorRecord(
        model_id=draw(names), request_id=draw(names), trace_id=draw(ids), span_id=draw(spans),
        hook=draw(names), layer=draw(st.integers(-(1 << 31), (1 << 31) - 1)), tp_rank=draw(small), tp_size=draw(small),
        positions_kind=kind, token_start=start, token_end=token_end, positions=positions,
        phase=draw(st.integers(0, 3)), step=draw(st.integers(0, (1 << 64) - 1)), dtype=dtype, shape=shape,
        encoding=draw(st.one_of(st.sampled_from([pb.RAW, pb.ZSTD]), st.just(pb.RAW), st.integers(0, 6))), raw_size=raw_size,
        payload=payload, capture_time_unix_nano=draw(st.integers(0, (1 << 64) - 1)),
        producer=pb.Producer(pod=draw(names), pid=draw(small), generation=draw(st.integers(0, (1 << 64) - 1))),
        seq=draw(st.integers(0, (1 << 64) - 1)), chunk_index=draw(small), chunk_count=chunk_count)


@st.composite
def summaries(draw):
    return pb.RequestSummary(request_id=draw(names), model_id=draw(names), trace_id=draw(ids),
                             span_id=draw(spans), seq=draw(small),
                             records_captured=draw(small), dropped_by_reason=draw(st.dictionaries(names, small, max_size=2)),
                             hooks=draw(st.lists(names, max_size=2)), complete=draw(st.booleans()),
                             incomplete_reason=draw(names), producers=draw(small))


envelopes = st.lists(st.one_of(tensor_records(), tensor_records(), summaries()), min_size=1, max_size=5).map(codec.encode_envelope)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes)
def test_property_same_outcome(data):
    agree(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, st.data())
def test_property_truncated_and_corrupted(data, draw):
    cut = draw.draw(st.integers(0, len(data)))
    agree(data[:cut])
    if data:
        i = draw.draw(st.integers(0, len(data) - 1))
        flipped = bytearray(data)
        flipped[i] ^= draw.draw(st.integers(1, 255))
        agree(bytes(flipped))
        agree(data + draw.draw(st.binary(max_size=8)))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_property_random_bytes(data):
    agree(data)
    agree(b"\x08\x01\x12" + bytes([len(data) & 0x7F]) + data)


def test_switch_and_missing_extension_fall_back_to_the_python_path(monkeypatch):
    from tensortrace.consume import ConsumerConfig, ConsumerCore, RequestView

    class H:
        def on_request(self, req):
            pass

    monkeypatch.delenv("TENSORTRACE_NATIVE", raising=False)
    assert native.enabled() and ConsumerCore(ConsumerConfig(group_id="g"), RequestView(H())).native
    monkeypatch.setenv("TENSORTRACE_NATIVE", "0")
    assert not native.enabled() and "TENSORTRACE_NATIVE=0" in native.why_disabled()
    assert not ConsumerCore(ConsumerConfig(group_id="g"), RequestView(H())).native
    monkeypatch.delenv("TENSORTRACE_NATIVE")
    monkeypatch.setattr(native, "_decode", None)     # as when no compiler built it
    assert not native.enabled() and "not built" in native.why_disabled()
    assert not ConsumerCore(ConsumerConfig(group_id="g"), RequestView(H())).native
