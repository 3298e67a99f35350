"""Wire format v1 (tensortrace.wire.codec): tensors survive Kafka bit-exactly, bad bytes are refused."""

from __future__ import annotations

import random

import pytest
import torch

from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec
from tensortrace.wire.codec import WireError

pytestmark = pytest.mark.unit

FLOAT8_DTYPES = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                             "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)]
ACTIVATION_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                     torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool, *FLOAT8_DTYPES]
ENCODINGS = [pb.RAW, pb.ZSTD, pb.SHUFFLE_ZSTD, pb.LZ4]
TRACE_ID = bytes(range(1, 17))
SPAN_ID = bytes(range(1, 9))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Every bit pattern is possible (NaN, inf, subnormals), not just what randn produces."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def through_the_wire(rec: pb.TensorRecord) -> pb.TensorRecord:
    [back] = codec.decode_envelope(codec.encode_envelope([rec]))
    assert back.WhichOneof("kind") == "tensor"
    return back.tensor


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: pb.Encoding.Name(e))
@pytest.mark.parametrize("dtype", ACTIVATION_DTYPES, ids=str)
def test_every_activation_dtype_round_trips_bit_exactly(dtype, encoding):
    t = random_tensor(dtype, (5, 3, 8), seed=hash((str(dtype), encoding)) & 0xFFFF)
    rec = codec.tensor_to_record(t, encoding=encoding, request_id="r1", hook="resid_pre", layer=3,
                                 trace_id=TRACE_ID, span_id=SPAN_ID, token_start=7)
    back = through_the_wire(rec)
    assert back.dtype == codec.dtype_code(dtype)
    assert list(back.shape) == [5, 3, 8]
    assert (back.token_start, back.token_end) == (7, 12)
    assert same_bits(codec.record_to_tensor(back), t)


def test_float8_variants_of_this_torch_are_all_covered():
    names = {n for n in dir(torch) if n.startswith("float8_") and isinstance(getattr(torch, n), torch.dtype)}
    assert names == {str(d).removeprefix("torch.") for d in FLOAT8_DTYPES}
    for name in names:
        codec.dtype_code(name)  # raises WireError if the wire has no code for it


def test_real_activation_values_round_trip_bit_exactly():
    # Values a model produces (not random bits), down-cast the way inference casts them.
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 3
    for dtype in (torch.float16, torch.bfloat16, *FLOAT8_DTYPES[:2]):
        t = x.to(dtype)
        assert same_bits(codec.record_to_tensor(through_the_wire(codec.tensor_to_record(t, encoding=pb.SHUFFLE_ZSTD))), t)


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: pb.Encoding.Name(e))
@pytest.mark.parametrize("shape", [(0, 16), (0,), (3, 0), (2, 0, 4), ()], ids=str)
def test_empty_zero_row_and_scalar_tensors_round_trip(shape, encoding):
    t = random_tensor(torch.bfloat16, shape, seed=3)
    back = through_the_wire(codec.tensor_to_record(t, encoding=encoding))
    out = codec.record_to_tensor(back)
    assert out.shape == t.shape and out.dtype == t.dtype and same_bits(out, t)
    if shape == ():
        assert back.positions_kind == pb.NO_TOKEN_AXIS
    else:
        assert back.positions_kind == pb.TOKEN_RANGE
        assert back.token_end - back.token_start == shape[0]


def test_non_contiguous_and_sliced_tensors_are_captured_as_their_values():
    base = random_tensor(torch.float32, (6, 10), seed=4)
    for t in (base.t(), base[1:4, ::2], base[:, 3]):
        assert same_bits(codec.record_to_tensor(through_the_wire(codec.tensor_to_record(t))), t.contiguous())


def test_unsupported_dtype_is_refused_by_name():
    with pytest.raises(WireError, match="complex64 has no v1 wire code"):
        codec.tensor_to_record(torch.zeros(2, dtype=torch.complex64))


def test_records_and_summaries_share_an_envelope_in_order():
    recs = [codec.tensor_to_record(torch.full((1, 2), float(i)), request_id="r", seq=i) for i in range(3)]
    summary = pb.RequestSummary(request_id="r", seq=3, records_captured=3, complete=True,
                                dropped_by_reason={})
    out = codec.decode_envelope(codec.encode_envelope([*recs, summary]))
    assert [r.WhichOneof("kind") for r in out] == ["tensor"] * 3 + ["summary"]
    assert [r.tensor.seq for r in out[:3]] == [0, 1, 2]
    assert out[3].summary.records_captured == 3 and out[3].summary.complete


# -- chunking ------------------------------------------------------------------------------

def big_record(seq: int = 9, nbytes: int = 10_000, encoding: int = pb.RAW) -> tuple[pb.TensorRecord, torch.Tensor]:
    t = random_tensor(torch.float16, (nbytes // 2 // 50, 50), seed=seq)
    rec = codec.tensor_to_record(t, encoding=encoding, request_id="big", seq=seq,
                                 producer=pb.Producer(pod="pod-a", pid=42, generation=7))
    return rec, t


def test_chunking_splits_by_payload_size_and_reassembles_bit_exactly():
    rec, t = big_record()
    chunks = codec.chunk_record(rec, max_payload=3000)
    assert [c.chunk_index for c in chunks] == [0, 1, 2, 3]
    assert all(c.chunk_count == 4 and c.payload_size == len(rec.payload) for c in chunks)
    assert [c.chunk_offset for c in chunks] == [0, 3000, 6000, 9000]
    assert all(len(c.payload) <= 3000 for c in chunks)
    assert all(c.request_id == "big" and list(c.shape) == list(rec.shape) for c in chunks)  # metadata on each
    asm = codec.ChunkAssembler()
    results = [asm.add(through_the_wire(c)) for c in chunks]
    assert results[:3] == [None, None, None]
    whole = results[3]
    assert (whole.chunk_count, whole.chunk_index, whole.chunk_offset) == (0, 0, 0)
    assert same_bits(codec.record_to_tensor(whole), t)
    assert len(asm) == 0


def test_small_record_is_not_chunked():
    rec, _ = big_record(nbytes=1000)
    assert codec.chunk_record(rec, max_payload=1000) == [rec]
    assert codec.ChunkAssembler().add(rec) is rec


def test_out_of_order_and_duplicated_chunks_reassemble():
    rec, t = big_record(encoding=pb.SHUFFLE_ZSTD, nbytes=40_000)
    chunks = codec.chunk_record(rec, max_payload=1024)
    assert len(chunks) > 3
    delivered = chunks + chunks[:2]  # at-least-once: some chunks arrive twice
    random.Random(5).shuffle(delivered)
    asm = codec.ChunkAssembler()
    wholes = [w for w in (asm.add(c) for c in delivered) if w is not None]
    assert len(wholes) >= 1
    assert all(same_bits(codec.record_to_tensor(w), t) for w in wholes)


def test_chunks_of_different_records_do_not_mix():
    a, ta = big_record(seq=1)
    b, tb = big_record(seq=2)
    ca, cb = codec.chunk_record(a, 4000), codec.chunk_record(b, 4000)
    asm = codec.ChunkAssembler()
    interleaved = [x for pair in zip(ca, cb) for x in pair]
    wholes = [w for w in (asm.add(c) for c in interleaved) if w is not None]
    assert [w.seq for w in wholes] == [1, 2]
    assert same_bits(codec.record_to_tensor(wholes[0]), ta) and same_bits(codec.record_to_tensor(wholes[1]), tb)


def test_incomplete_chunk_sets_expire_and_are_reported():
    rec, _ = big_record()
    chunks = codec.chunk_record(rec, max_payload=3000)
    asm = codec.ChunkAssembler(timeout_s=60)
    for c in chunks[:-1]:
        assert asm.add(c, now=100.0) is None
    assert asm.expire(now=150.0) == []
    expired = asm.expire(now=161.0)
    assert len(expired) == 1
    key, parts, reason = expired[0]
    assert key == ("pod-a", 42, 7, 9)
    assert sorted(p.chunk_index for p in parts) == [0, 1, 2]
    assert "incomplete" in reason
    assert len(asm) == 0


def test_chunk_assembler_is_bounded_and_evicts_the_oldest():
    asm = codec.ChunkAssembler(max_pending=2)
    for seq, now in ((1, 1.0), (2, 2.0), (3, 3.0)):
        rec, _ = big_record(seq=seq)
        asm.add(codec.chunk_record(rec, 3000)[0], now=now)
    assert len(asm) == 2
    [(key, _, reason)] = asm.expire(now=3.0)
    assert key[3] == 1 and "too many" in reason


def test_a_chunk_one_byte_short_is_an_error_not_a_shorter_tensor():
    rec, _ = big_record()
    chunks = codec.chunk_record(rec, 3000)
    chunks[1].payload = chunks[1].payload[:-1]
    asm = codec.ChunkAssembler()
    with pytest.raises(WireError, match="chunks hold 9999 bytes, expected 10000"):
        for c in chunks:
            asm.add(c)


def test_an_unassembled_chunk_cannot_be_read_as_a_tensor():
    rec, _ = big_record()
    with pytest.raises(WireError, match="reassemble first"):
        codec.record_to_tensor(codec.chunk_record(rec, 3000)[0])


# -- bad input -------------------------------------------------------------------------------

def valid_envelope() -> bytes:
    rec = codec.tensor_to_record(random_tensor(torch.float32, (2, 4), seed=6), request_id="r1",
                                 trace_id=TRACE_ID, span_id=SPAN_ID, encoding=pb.ZSTD)
    return codec.encode_envelope([rec])


def test_every_truncation_of_an_envelope_is_refused():
    data = valid_envelope()
    for n in range(len(data)):
        with pytest.raises(WireError):
            codec.decode_envelope(data[:n])


@pytest.mark.parametrize("data, message", [
    (b"", "empty message"),
    (b"\xff\xff\xff\xff", "not a v1 envelope"),
    (b"hello, world", "not a v1 envelope"),
    (b"\x08\x02", "envelope version 2 is not 1"),
    (b"\x08\x01", "holds no records"),
    (pb.Envelope(version=1, records=[pb.Record()]).SerializeToString(), "record 0 of the envelope is empty"),
])
def test_garbage_is_refused_with_a_message_naming_the_problem(data, message):
    with pytest.raises(WireError, match=message):
        codec.decode_envelope(data)


def _envelope_with(**fields) -> bytes:
    rec = codec.tensor_to_record(torch.ones(2, 2), request_id="r1")
    for k, v in fields.items():
        setattr(rec, k, v)
    return codec.encode_envelope([rec])


@pytest.mark.parametrize("fields, message", [
    ({"dtype": 99}, "unknown dtype code 99"),
    ({"dtype": 0}, "unknown dtype code 0"),
    ({"encoding": 77}, "unknown encoding 77"),
    ({"encoding": 0}, "unknown encoding 0"),
    ({"chunk_count": 3, "chunk_index": 3}, "chunk 3 of 3"),
    ({"trace_id": b"\x01" * 15}, "trace_id is 15 bytes, not 16"),
    ({"trace_id": b"\x01" * 32}, "trace_id is 32 bytes, not 16"),
    ({"span_id": b"\x01" * 4}, "span_id is 4 bytes, not 8"),
])
def test_records_with_impossible_fields_are_refused(fields, message):
    with pytest.raises(WireError, match=message):
        codec.decode_envelope(_envelope_with(**fields))


def test_summary_with_wrong_length_trace_id_is_refused():
    data = codec.encode_envelope([pb.RequestSummary(request_id="r", trace_id=b"\x01" * 8)])
    with pytest.raises(WireError, match="trace_id is 8 bytes, not 16"):
        codec.decode_envelope(data)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: setattr(r, "raw_size", r.raw_size + 1), "raw_size 17 != 16 implied by shape"),
    (lambda r: r.shape.__setitem__(0, 3), "raw_size 16 != 24 implied by shape"),
    (lambda r: r.shape.__setitem__(0, -2), "negative dimension"),
    (lambda r: setattr(r, "payload", b"\x00" * 16), "does not decode as ZSTD"),
    (lambda r: setattr(r, "payload", r.payload[:-3]), "does not decode as ZSTD"),
])
def test_payload_inconsistent_with_its_metadata_is_refused(mutate, message):
    rec = codec.tensor_to_record(torch.ones(2, 2), encoding=pb.ZSTD)
    mutate(rec)
    [back] = codec.decode_envelope(codec.encode_envelope([rec]))
    with pytest.raises(WireError, match=message):
        codec.record_to_tensor(back.tensor)


@pytest.mark.parametrize("encoding", [pb.RAW, pb.LZ4, pb.SHUFFLE_ZSTD], ids=lambda e: pb.Encoding.Name(e))
def test_payload_of_the_wrong_size_is_refused_for_every_encoding(encoding):
    rec = codec.tensor_to_record(torch.ones(4, 4), encoding=encoding)
    raw_size = rec.raw_size
    rec.payload = codec.encode_payload(b"\x00" * (raw_size - 4), encoding, 4)
    with pytest.raises(WireError, match=f"(decoded payload is {raw_size - 4} bytes|does not decode|not a whole number)"):
        codec.record_to_tensor(rec)


def test_garbage_lz4_payload_is_refused():
    rec = codec.tensor_to_record(torch.ones(4, 4), encoding=pb.LZ4)
    rec.payload = b"not an lz4 frame"
    with pytest.raises(WireError, match="does not decode as LZ4"):
        codec.record_to_tensor(rec)


def test_unknown_fields_from_a_newer_producer_are_ignored():
    # Compatibility rule: fields are only added; an old consumer skips what it does not know.
    data = bytearray(valid_envelope())
    data += b"\xf8\x3f\x01"  # field 1023, varint 1, appended to the envelope
    [rec] = codec.decode_envelope(bytes(data))
    assert rec.tensor.request_id == "r1"


# -- trace context ---------------------------------------------------------------------------

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_traceparent_parses_and_formats_back():
    tid, sid = codec.parse_traceparent(TP)
    assert tid.hex() == "4bf92f3577b34da6a3ce929d0e0e4736" and sid.hex() == "00f067aa0ba902b7"
    assert codec.format_traceparent(tid, sid) == TP
    assert codec.format_traceparent(tid, sid, sampled=False).endswith("-00")


@pytest.mark.parametrize("header", [
    None, "", "garbage",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",   # short trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",   # short parent id
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # upper case
    "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",  # not hex
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",   # short flags
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has 4 fields
])
def test_invalid_traceparent_is_ignored_not_coerced(header):
    assert codec.parse_traceparent(header) is None


def test_future_traceparent_version_with_extra_fields_is_accepted():
    assert codec.parse_traceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what") is not None


def test_new_trace_id_is_16_nonzero_bytes():
    ids = {codec.new_trace_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 and any(i) for i in ids)
